"""Per-image noise: an image's rows depend on its own generator only."""

import pytest
import torch

from ofer.diffusion.noise import randn
from ofer.diffusion.samplers import sample
from ofer.diffusion.schedule import NoiseSchedule


def _gens(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_per_image_rows_come_from_their_own_generator():
    batch = randn((6, 4), _gens(1, 2, 3))
    for i, seed in enumerate((1, 2, 3)):
        assert torch.equal(batch[2 * i : 2 * i + 2], randn((2, 4), _gens(seed)))


def test_rows_must_split_evenly():
    with pytest.raises(ValueError, match="per-image generators"):
        randn((5, 4), _gens(1, 2))


def test_batched_sampling_equals_single_image_sampling():
    """DDPM draws fresh noise every step: a batch of 3 images equals 3 single-image runs."""
    schedule = NoiseSchedule(50)
    context = torch.randn(3, 1, 2)

    def eps_fn_for(ctx: torch.Tensor):
        return lambda x, t: 0.1 * x + ctx.expand(-1, x.shape[0] // ctx.shape[0], -1).reshape(x.shape)

    batched = sample(eps_fn_for(context), schedule, (6, 2), "ddpm", generator=_gens(7, 8, 9))
    for i, seed in enumerate((7, 8, 9)):
        single = sample(eps_fn_for(context[i : i + 1]), schedule, (2, 2), "ddpm", generator=_gens(seed))
        assert torch.allclose(batched[2 * i : 2 * i + 2], single, atol=1e-6)


@pytest.mark.gpu
def test_a_cpu_seed_samples_the_same_on_the_gpu():
    """Noise from CPU generators moves to the GPU: one seed, the same samples (float rounding aside)."""
    from ofer.diffusion import Denoiser
    from ofer.diffusion.noise import seeded_generator

    torch.manual_seed(0)
    net = Denoiser(12, 16, [12, 8, 4]).eval()
    context = torch.randn(6, 16)
    runs = []
    for device in (torch.device("cpu"), torch.device("cuda")):
        fast = net.to(device).sampler(context.to(device))
        runs.append(sample(fast, NoiseSchedule(50).to(device), (6, 12), "ddpm",
                           generator=[seeded_generator(3), seeded_generator(4)], device=device).cpu())
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-4, atol=1e-4)
