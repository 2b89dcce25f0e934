"""The pipeline's speed-related behaviour: encoders shared between stages only when identical,
per-image generators, the static-buffer (CUDA-graph) sampling path and the bfloat16 option."""

from __future__ import annotations

import copy

import pytest
import torch

from ofer.config import load_config
from ofer.flame import FLAME
from ofer.flame.synthetic import write_synthetic_flame
from ofer.inference.pipeline import OferPipeline
from ofer.models.stages import DiffusionStage, IdRank

FRONT = 40  # front-face vertices scored by IdRank
CPU = torch.device("cpu")


def stage_config(expencoder: str, flame_dim: int, context_dim: int, dims: list[int], *extra: str):
    return load_config(None, [
        "model.tiny_encoders=true", "model.arcface_weights=null", "model.farl_weights=null",
        f"model.expencoder={expencoder}", f"net.flame_dim={flame_dim}", f"net.context_dim={context_dim}",
        f"net.dims={dims}", "varsched.num_steps=20", *extra,
    ])


@pytest.fixture(scope="module")
def flame(tmp_path_factory) -> FLAME:
    paths = write_synthetic_flame(tmp_path_factory.mktemp("flame"))
    return FLAME(paths.model, n_shape=10, n_exp=5, landmark_embedding_path=paths.landmarks)


def build(flame: FLAME, *test: str, device: torch.device = CPU) -> OferPipeline:
    torch.manual_seed(0)
    idgen = DiffusionStage(stage_config("arcface", 10, 512, [10, 6], "model.n_shape=10"), load_weights=False)
    expgen = DiffusionStage(stage_config("arcfarl", 8, 1024, [8, 4], "stage=expgen", "model.n_exp=5"),
                            load_weights=False)
    idrank = IdRank(stage_config("arcfarl", 10, 1024, [10, 6], "stage=idrank"), shape_dim=3 * FRONT, load_weights=False)
    # IdRank and ExpGen use the same FaRL; all three the same ArcFace.
    expgen.farl.load_state_dict(idrank.farl.state_dict())
    idgen.arcface.load_state_dict(idrank.arcface.state_dict())
    expgen.arcface.load_state_dict(idrank.arcface.state_dict())
    cfg = load_config(None, ["test.numsamples=3", "test.num_expressions=2", "test.sampling=ddim", "test.steps=4",
                             "test.exp_sampling=ddim_legacy", *test]).test
    return OferPipeline(idgen, idrank, expgen, flame, torch.arange(FRONT), cfg, 0.5, device)


def inputs(b: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(b, 3, 224, 224, generator=gen), torch.randn(b, 3, 112, 112, generator=gen)


def count_calls(modules) -> list[int]:
    counts = [0] * len(modules)
    for i, module in enumerate(modules):
        module.register_forward_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


def test_identical_encoders_run_once_and_give_the_stage_contexts(flame) -> None:
    pipe = build(flame)
    image, arcface = inputs()
    encoders = [pipe.idgen.arcface, pipe.idrank.farl, pipe.idrank.arcface, pipe.expgen.farl, pipe.expgen.arcface]
    counts = count_calls(encoders)
    contexts = pipe.encode(image, arcface)
    assert counts == [1, 1, 0, 0, 0]  # one ArcFace and one FaRL run for the three stages
    with torch.no_grad():
        for stage, context in zip((pipe.idgen, pipe.idrank, pipe.expgen), contexts):
            torch.testing.assert_close(context, stage.encode(image, arcface))


def test_encoders_with_other_weights_or_attributes_are_not_shared(flame) -> None:
    pipe = build(flame)
    with torch.no_grad():
        pipe.expgen.farl.fc.bias.add_(1.0)  # after construction: weights are compared at construction...
    pipe = OferPipeline(pipe.idgen, pipe.idrank, pipe.expgen, pipe.flame, pipe.front_idx, pipe.test, 0.5,
                        CPU)  # ...so rebuild
    pipe.expgen.arcface.switch = True  # equal weights, different plain attribute (compared per call)
    encoders = [pipe.idgen.arcface, pipe.idrank.farl, pipe.idrank.arcface, pipe.expgen.farl, pipe.expgen.arcface]
    counts = count_calls(encoders)
    contexts = pipe.encode(*inputs())
    assert counts == [1, 1, 0, 1, 1]
    with torch.no_grad():
        torch.testing.assert_close(contexts[2], pipe.expgen.encode(*inputs()))


def test_per_image_generators_make_each_image_independent_of_its_batch(flame) -> None:
    pipe = build(flame)
    image, arcface = inputs(2)
    both = pipe(image, arcface, [torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)])
    alone = pipe(image[1:], arcface[1:], [torch.Generator().manual_seed(8)])[0]
    assert len(both) == 2 and both[1].best == alone.best
    for name in ("shapes", "scores", "expressions", "jaws", "neutral_mm", "kpt7_mm"):
        assert torch.allclose(torch.from_numpy(getattr(both[1], name)), torch.from_numpy(getattr(alone, name)),
                              rtol=1e-4, atol=1e-4), name
    assert not torch.allclose(torch.from_numpy(both[0].shapes), torch.from_numpy(alone.shapes))
    # the neutral mesh is the ranked pick's sample mesh; landmarks lie on it
    neutral = pipe.flame(torch.from_numpy(alone.shapes[alone.best])[None])[0] * 1000.0
    torch.testing.assert_close(torch.from_numpy(alone.neutral_mm), neutral, rtol=1e-4, atol=1e-3)


def test_cuda_graph_option_runs_the_static_path_with_the_same_result(flame) -> None:
    image, arcface = inputs(1)
    eager = build(flame)(image, arcface, torch.Generator().manual_seed(3))[0]
    static = build(flame, "test.cuda_graph=true")(image, arcface, torch.Generator().manual_seed(3))[0]
    # the same network path, except that the eager one computes the time half of all its steps
    # in one product up front: equal up to float rounding
    assert static.best == eager.best
    torch.testing.assert_close(static.shapes, eager.shapes, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(static.expression_mm, eager.expression_mm, rtol=1e-5, atol=1e-4)


def test_static_steps_are_made_once_per_rows_and_dtype_and_take_each_new_context() -> None:
    """test.cuda_graph: the step (a CUDA graph on a GPU) is kept per (rows, dtype, device) and
    a new context is copied into it, sampling what a fresh eager sampler samples; changing a
    weight in place makes it again."""
    torch.manual_seed(0)
    stage = DiffusionStage(stage_config("arcface", 10, 512, [10, 6], "model.n_shape=10"), load_weights=False).eval()
    contexts = torch.randn(2, 2, 512)

    def run(context: torch.Tensor, cuda_graph: bool) -> torch.Tensor:
        return stage.sample(context, 3, "ddim", 4, generator=torch.Generator().manual_seed(1), cuda_graph=cuda_graph)

    kept = []
    for context in contexts:
        torch.testing.assert_close(run(context, True), run(context, False), rtol=1e-5, atol=1e-6)
        kept.append(stage.static_steps[(6, torch.float32, CPU)][2])
    assert kept[0] is kept[1] and len(stage.static_steps) == 1
    stage.sample(contexts[0, :1], 3, "ddim", 4, cuda_graph=True)  # 3 rows: a step of its own
    assert len(stage.static_steps) == 2
    with torch.no_grad():
        stage.net.init_conv.weight.mul_(2.0)
    torch.testing.assert_close(run(contexts[1], True), run(contexts[1], False), rtol=1e-5, atol=1e-6)
    assert stage.static_steps[(6, torch.float32, CPU)][2] is not kept[0]


def test_bfloat16_option_runs_and_stays_near_float32(flame) -> None:
    image, arcface = inputs(1)
    exact = build(flame)(image, arcface, torch.Generator().manual_seed(3))[0]
    low = build(flame, "test.dtype=bfloat16")(image, arcface, torch.Generator().manual_seed(3))[0]
    for name in ("shapes", "expressions", "jaws", "neutral_mm"):
        a, b = torch.from_numpy(getattr(exact, name)), torch.from_numpy(getattr(low, name))
        assert torch.isfinite(b).all() and not torch.equal(a, b), name
        assert (a - b).abs().max() < 0.1 * a.abs().max(), name


@pytest.mark.gpu
def test_on_cuda_the_cuda_graph_and_bfloat16_options_follow_the_eager_float32_run(flame) -> None:
    """On a GPU: replayed CUDA graphs give the eager run's reconstructions (float rounding
    aside); bfloat16 with CUDA graphs stays near them."""
    cuda = torch.device("cuda")
    image, arcface = inputs(2)

    def run(*test: str):
        pipe = build(copy.deepcopy(flame), *test, device=cuda)  # the pipeline moves its FLAME to the GPU
        return pipe(image, arcface, [torch.Generator(cuda).manual_seed(seed) for seed in (3, 4)])

    eager, replayed, low = run(), run("test.cuda_graph=true"), run("test.cuda_graph=true", "test.dtype=bfloat16")
    for a, b, c in zip(eager, replayed, low, strict=True):
        assert b.best == a.best
        torch.testing.assert_close(b.shapes, a.shapes, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.expression_mm, a.expression_mm, rtol=1e-5, atol=1e-3)
        for name in ("shapes", "expressions", "jaws", "neutral_mm"):
            exact, in_bf16 = torch.from_numpy(getattr(a, name)), torch.from_numpy(getattr(c, name))
            assert torch.isfinite(in_bf16).all() and not torch.equal(exact, in_bf16), name
            assert (exact - in_bf16).abs().max() < 0.1 * exact.abs().max(), name


def test_jaw_limits_clamp_the_jaw_that_poses_the_meshes(flame) -> None:
    """With all limits 0 every expression mesh has a closed, straight jaw; the raw samples are kept."""
    image, arcface = inputs(1)
    rec = build(flame, "test.jaw_limits=[0, 0, 0, 0, 0, 0]")(image, arcface, torch.Generator().manual_seed(3))[0]
    assert (rec.jaws != 0).any()
    shape = torch.from_numpy(rec.shapes[rec.best])[None].expand(len(rec.expressions), -1)
    closed = pipe_flame_mm(flame, shape, torch.from_numpy(rec.expressions))
    torch.testing.assert_close(torch.from_numpy(rec.expression_mm), closed, rtol=1e-4, atol=1e-3)


def pipe_flame_mm(flame: FLAME, shape: torch.Tensor, expression: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return flame(shape, expression=expression) * 1000.0
