"""The GPU code paths under ``DeviceCheck`` on a CPU: the step a CUDA graph captures, the
bfloat16 path and the samplers' loops with per-image generators make no host sync and keep
every tensor on the pipeline's device (``meta`` stands for a GPU: a tensor made on the CPU
by mistake is found there as it would be on CUDA). The checker itself fails on planted faults."""

from __future__ import annotations

import pytest
import torch

from ofer.diffusion import Denoiser, NoiseSchedule, sample
from ofer.diffusion.denoiser import StaticEps, step_of
from ofer.diffusion.device_check import DeviceCheck, DeviceCheckError
from ofer.diffusion.noise import randn, seeded_generator

META = torch.device("meta")


def meta_step(dtype: torch.dtype = torch.float32) -> StaticEps:
    """A small denoiser's static-buffer step on the meta device, as ``DiffusionStage.static_eps`` makes it."""
    torch.manual_seed(0)
    net = Denoiser(12, 16, [12, 8, 4]).eval().to(META)
    fast = net.sampler(torch.randn(6, 16, device=META), dtype)
    return StaticEps(fast.eps, (6, 12), META)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_captured_step_stays_on_the_device_without_host_syncs(dtype: torch.dtype) -> None:
    static = meta_step(dtype)
    with DeviceCheck(META):
        out = static.at_step(torch.randn(6, 12, device=META), 7)
    assert out.device == META and out.dtype == torch.float32


@pytest.mark.parametrize(("sampler", "steps"), [("ddpm", None), ("ddim", 5), ("ddim_legacy", None),
                                                ("dpmpp_2m", 5)])
def test_sampling_loops_with_per_image_cpu_generators_make_no_host_sync(sampler: str, steps: int | None) -> None:
    """The loop around the step: noise drawn by CPU generators moves to the device without
    blocking, the schedule is indexed with Python ints, the solver's tables stay on the host."""
    static = meta_step()
    schedule = NoiseSchedule(20).to(META)
    with DeviceCheck(META, strict=False):
        x = sample(static, schedule, (6, 12), sampler, steps, generator=[seeded_generator(1), seeded_generator(2)],
                   device=META)
    assert x.device == META


def test_unipc_copies_its_sigmas_to_the_device_each_step() -> None:
    """A known cost inside diffusers 0.42's UniPC update (``sigmas[i].to(device)``, blocking);
    bench/gpu_check.sh times unipc against dpmpp_2m on the GPU."""
    with DeviceCheck(META, strict=False), pytest.raises(DeviceCheckError, match="blocking copy from the host"):
        sample(meta_step(), NoiseSchedule(20).to(META), (6, 12), "unipc", 5, generator=seeded_generator(1),
               device=META)


def test_calling_with_a_tensor_of_steps_reads_the_step_back() -> None:
    """What the samplers avoid by calling ``at_step``: a plain eps_fn(x, t) that must learn t."""
    static = meta_step()
    with DeviceCheck(META), pytest.raises(DeviceCheckError, match="reads a value back"):
        static(torch.randn(6, 12, device=META), torch.full((6,), 7, device=META))
    cpu_fast, schedule = Denoiser(12, 16, [12, 8, 4]).eval().sampler(torch.randn(6, 16)), NoiseSchedule(20)
    with DeviceCheck("cpu", strict=False), pytest.raises(DeviceCheckError, match="reads a value back"):
        sample(lambda x, t: cpu_fast(x, t), schedule, (6, 12), "ddim", 3)
    with DeviceCheck("cpu", strict=False):  # the same sampler, called by step: no read-back
        sample(cpu_fast, schedule, (6, 12), "ddim", 3)


@pytest.mark.parametrize(("fault", "message"), [
    (lambda x: x * float(x.sum()), "reads a value back"),
    (lambda x: x if x.sum() > 0 else -x, "reads a value back"),  # a Python branch on a value
    (lambda x: x + x.sum().item(), "reads a value back"),
    (lambda x: x * len(x.tolist()), "reads a value back"),
    (lambda x: x[x > 0], "needs values on the host"),
    (lambda x: x.nonzero(), "needs values on the host"),
    (lambda x: x.cpu(), "reads a value back"),
    (lambda x: x + torch.arange(x.shape[1]), "on cpu, not on meta"),  # made without device=
    (lambda x: x + torch.tensor(1.0, device=x.device), "copies from the host and blocks"),
    (lambda x: x + torch.ones(x.shape[1]).to(x.device), "blocking copy from the host"),  # also when not strict
    (lambda x: torch.randn(x.shape, generator=seeded_generator(0), device=x.device), "generator on cpu fills"),
])
def test_the_checker_fails_on_planted_faults(fault, message: str) -> None:
    x = torch.randn(4, 3, device=META)
    strict = "on cpu, not on meta" in message  # the other faults are found outside a captured step too
    with DeviceCheck(META, strict=strict), pytest.raises(DeviceCheckError, match=message):
        fault(x)


def test_a_step_with_a_planted_fault_fails_where_the_real_one_passes() -> None:
    """A step that reads its step back, as the previous StaticEps did per call, or that builds
    its time table on the host: both fail the check the real step passes."""
    static = meta_step()
    x = torch.randn(6, 12, device=META)

    def reads_back(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return static.step(x, t[:1] * step_of(t))

    def host_table(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return static.step(x, torch.arange(1) + t)

    for bad in (reads_back, host_table):
        with DeviceCheck(META), pytest.raises(DeviceCheckError):
            StaticEps(bad, (6, 12), META).at_step(x, 3)


def test_noise_from_cpu_generators_moves_to_the_device() -> None:
    """A CPU generator fills a CPU tensor (the rule the checker enforces) and the noise moves:
    a seed draws the same numbers whatever device samples."""
    gens = [seeded_generator(5), seeded_generator(6)]
    with DeviceCheck(META, strict=False):
        noise = randn((40, 7), gens, META)
    assert noise.device == META
    again = randn((40, 7), [seeded_generator(5), seeded_generator(6)], "cpu")
    for i, seed in enumerate((5, 6)):  # 140 values each: the vectorised normal_ path
        assert torch.equal(again[20 * i : 20 * (i + 1)], torch.randn(20, 7, generator=seeded_generator(seed)))
    assert not torch.equal(gens[0].get_state(), seeded_generator(5).get_state())  # the CPU generator drew
