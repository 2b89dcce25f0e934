"""Tests of the 1-D U-Net denoiser: original state-dict layout, attention and ResnetBlock
semantics (against convolution-form references), batch-size independence, gradient flow to
every attention projection, and the fast sampling path against the training path."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ofer.diffusion import Denoiser, NoiseSchedule, diffusion_loss, sample
from ofer.diffusion.denoiser import (
    Attention,
    ResnetBlock,
    SinusoidalPosEmb,
    StaticEps,
    is_projection_key,
    original_state_dict_keys,
    pack_projection,
    project,
)
from ofer.diffusion.samplers import network_steps

REPO_ROOT = Path(__file__).resolve().parents[1]
LAYOUT_FILE = REPO_ROOT / "tests" / "data" / "ofer_state_dict_layout.txt"

# name: (constructor kwargs, tensors and parameters of the original layout)
CONFIGS = {
    "idgen": ({"flame_dim": 300, "context_dim": 512, "dims": [300, 50, 10]}, 174, 6_246_954),
    "expgen": ({"flame_dim": 53, "context_dim": 1024, "dims": [53, 25, 10]}, 174, 1_815_673),
}
# Attention blocks: downs (2), mid, ups (2), final -> channel sizes per config.
ATTENTION_DIMS = {"idgen": [300, 50, 10, 50, 300, 300], "expgen": [53, 25, 10, 25, 53, 53]}


def build(name: str, seed: int = 0) -> Denoiser:
    torch.manual_seed(seed)
    return Denoiser(**CONFIGS[name][0])


def small_denoiser(seed: int = 0) -> Denoiser:
    torch.manual_seed(seed)
    return Denoiser(flame_dim=12, context_dim=8, dims=[12, 6, 3])


def read_layout(name: str) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) entries of one `## name: …` section of the layout file."""
    entries, inside = [], False
    for line in LAYOUT_FILE.read_text().splitlines():
        if line.startswith("##"):
            inside = line[2:].split()[0].rstrip(":") == name
        elif inside and line.strip():
            key, shape = line.split(" ", 1)
            entries.append((key, tuple(int(v) for v in re.findall(r"\d+", shape))))
    return entries


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_original_parameter_counts(name: str) -> None:
    _, n_tensors, n_params = CONFIGS[name]
    model = build(name)
    state = model.state_dict()
    original = original_state_dict_keys(model)
    assert len(original) == n_tensors
    assert sum(state[key].numel() for key in original) == n_params


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_projection_keys_are_the_only_extra_keys(name: str) -> None:
    state = build(name).state_dict()
    projections = [key for key in state if is_projection_key(key)]
    assert len(projections) == 16 * len(ATTENTION_DIMS[name])
    assert len(state) == CONFIGS[name][1] + len(projections)
    dims = sorted(state[key].shape[1] for key in projections[::16])
    assert dims == sorted(ATTENTION_DIMS[name])
    assert all(state[key].shape[0] == 384 and state[key].shape[2] == 1 for key in projections)
    assert "downs.0.2.fn.fn.to_qkv.3.weight" in state


def test_is_projection_key() -> None:
    assert is_projection_key("downs.0.2.fn.fn.to_qkv.15.weight")
    assert is_projection_key("net.mid_attn.fn.fn.to_qkv.0.weight")
    assert not is_projection_key("downs.0.2.fn.fn.to_out.weight")
    assert not is_projection_key("downs.0.2.fn.fn.qkv.weight")  # the original's stray key
    assert not is_projection_key("downs.0.2.fn.fn.to_qkv.3.bias")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_state_dict_matches_original_layout_file(name: str) -> None:
    model = build(name)
    state = model.state_dict()
    ours = [(key, tuple(state[key].shape)) for key in original_state_dict_keys(model)]
    assert ours == read_layout(name)  # same keys, shapes and order


def reference_attention(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """SPEC §4 attention written with one projection at a time, as in the original."""
    q, k, v = [], [], []
    for proj in attn.to_qkv:
        qi, ki, vi = proj(x).chunk(3, dim=1)  # 3 × (B, 128, 1)
        q.append(qi.reshape(x.shape[0], 4, 32, 1))
        k.append(ki.reshape(x.shape[0], 4, 32, 1))
        v.append(vi.reshape(x.shape[0], 4, 32, 1))
    q, k, v = (torch.cat(z, dim=3) for z in (q, k, v))  # (B, heads, 32, tokens)
    sim = torch.einsum("bhdi,bhdj->bhij", q * 32**-0.5, k)
    out = torch.einsum("bhij,bhdj->bhid", sim.softmax(dim=-1), v)  # (B, heads, tokens, 32)
    out = out.permute(0, 1, 3, 2).reshape(x.shape[0], 128, -1)  # (B, heads·32, tokens)
    return attn.to_out_linear(attn.to_out(out))


def test_stacked_projections_match_per_projection_loop() -> None:
    torch.manual_seed(1)
    attn = Attention(dim=7, numqkv=16)
    with torch.no_grad():  # non-zero output biases, so that their reordering is checked too
        attn.to_out.bias.normal_()
        attn.to_out_linear.bias.normal_()
    x = torch.randn(5, 7, 1)
    expected = reference_attention(attn, x)
    assert expected.shape == (5, 7, 1)
    torch.testing.assert_close(attn(x[:, :, 0]), expected[:, :, 0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attn(x[:, :, 0], attn.prepare()), expected[:, :, 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows", [1, 5, 100])
def test_packed_projection_equals_linear_at_any_batch(rows: int) -> None:
    """The sampler packs each stacked projection for one batch size (oneDNN on a float32 CPU);
    the product is F.linear's at that and other batch sizes. Where packing does not apply
    (another dtype) the weight comes back unchanged."""
    torch.manual_seed(2)
    weight, x = torch.randn(6144, 53), torch.randn(rows, 53)
    packed = pack_projection(weight, batch=100)
    assert packed.is_mkldnn == torch.backends.mkldnn.is_available()
    torch.testing.assert_close(project(x, packed), torch.nn.functional.linear(x, weight), rtol=1e-5, atol=1e-5)
    assert pack_projection(weight.double(), batch=100).is_mkldnn is False


def test_resnet_block_matches_convolution_form() -> None:
    """Matrix products + layer norm on (B, C) equal the original 1×1 convs + GroupNorm(1) on (B, C, 1)."""
    torch.manual_seed(3)
    block = ResnetBlock(6, 4, cond_dim=10)
    with torch.no_grad():
        for norm in (block.block1.norm, block.block2.norm):
            norm.weight.normal_()
            norm.bias.normal_()
    x, cond = torch.randn(5, 6), torch.randn(5, 10)
    scale, shift = block.mlp(cond)[:, :, None].chunk(2, dim=1)  # (B, 4, 1) each
    h = torch.nn.functional.silu(block.block1.norm(block.block1.proj(x[:, :, None])) * (scale + 1) + shift)
    h = torch.nn.functional.silu(block.block2.norm(block.block2.proj(h)))
    expected = (h + block.res_conv(x[:, :, None]))[:, :, 0]
    torch.testing.assert_close(block(x, block.modulation(block.mlp(cond))), expected, rtol=1e-5, atol=1e-6)


def test_batch_of_one_matches_batch_of_five() -> None:
    model = build("expgen").eval()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 53, generator=gen)
    t = torch.randint(0, 1000, (5,), generator=gen)
    context = torch.randn(5, 1024, generator=gen)
    with torch.no_grad():
        batched = model(x, t, context)
        single = torch.cat(
            [model(x[i : i + 1], t[i : i + 1], context[i : i + 1]) for i in range(5)]
        )
    assert batched.shape == (5, 53)
    torch.testing.assert_close(single, batched, rtol=1e-4, atol=1e-5)


def test_output_depends_on_time_and_context() -> None:
    model = small_denoiser().eval()
    x = torch.randn(3, 12)
    t = torch.tensor([5, 5, 5])
    context = torch.randn(3, 8)
    with torch.no_grad():
        base = model(x, t, context)
        assert not torch.allclose(base, model(x, t + 100, context))
        assert not torch.allclose(base, model(x, t, context + 1.0))


def test_loss_gradients_reach_every_parameter_and_projection() -> None:
    model = small_denoiser()
    schedule = NoiseSchedule()
    context = torch.randn(4, 8)
    loss = diffusion_loss(
        lambda x_t, t: model(x_t, t, context),
        schedule,
        torch.randn(4, 12),
        generator=torch.Generator().manual_seed(0),
    )
    loss.backward()
    names = [name for name, _ in model.named_parameters()]
    assert sum(is_projection_key(name) for name in names) == 16 * 6
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_sinusoidal_embedding_values() -> None:
    emb = SinusoidalPosEmb(512)(torch.tensor([0, 1, 7]))
    assert emb.shape == (3, 512)
    torch.testing.assert_close(emb[0], torch.cat([torch.zeros(256), torch.ones(256)]))
    # frequency k = 255 is 1/10000; k = 0 is 1
    assert emb[2, 0].item() == pytest.approx(math.sin(7.0), abs=1e-6)
    assert emb[2, 255].item() == pytest.approx(math.sin(7e-4), rel=1e-4)
    assert emb[2, 256 + 255].item() == pytest.approx(math.cos(7e-4), abs=1e-6)


def test_rejects_bad_shapes() -> None:
    model = small_denoiser()
    with pytest.raises(ValueError, match="x must be"):
        model(torch.randn(2, 11), torch.zeros(2, dtype=torch.long), torch.randn(2, 8))
    with pytest.raises(ValueError, match="context must be"):
        model(torch.randn(2, 12), torch.zeros(2, dtype=torch.long), torch.randn(2, 9))
    with pytest.raises(ValueError, match="t must be"):
        model(torch.randn(2, 12), torch.zeros(3, dtype=torch.long), torch.randn(2, 8))
    with pytest.raises(ValueError, match="dims"):
        Denoiser(flame_dim=12, context_dim=8, dims=[10, 5])


# Small denoisers for the fast path: different level counts, flame_dim != every other level.
FAST_CASES = [
    {"flame_dim": 12, "context_dim": 16, "dims": [12, 8, 4]},
    {"flame_dim": 9, "context_dim": 5, "dims": [9, 14, 6, 3], "numqkv": 4},
]


@pytest.mark.parametrize("kwargs", FAST_CASES)
@pytest.mark.parametrize("step", [-1, 0, 3, 517, 999])
@pytest.mark.parametrize("planned", [(), (999, 517, 3, 0, -1)], ids=["per-call", "planned"])
def test_fast_sampler_matches_training_path(kwargs: dict, step: int, planned: tuple[int, ...]) -> None:
    """Also with the time half of the run's steps computed up front."""
    torch.manual_seed(4)
    model = Denoiser(**kwargs).eval()
    gen = torch.Generator().manual_seed(step + 10)
    x = torch.randn(7, kwargs["flame_dim"], generator=gen)
    context = torch.randn(7, kwargs["context_dim"], generator=gen)
    t = torch.full((7,), step)
    with torch.no_grad():
        expected = model(x, t, context)
        out = model.sampler(context, timesteps=planned)(x, t)
    assert out.shape == expected.shape
    assert (out - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "ddim_legacy", "dpmpp_2m", "unipc"])
def test_network_steps_are_the_steps_sampling_calls(sampler: str) -> None:
    """network_steps lists exactly the steps `sample` calls the network at, in order, and a
    sampler prepared for them samples as one that computes each step's time half when called."""
    model = Denoiser(**FAST_CASES[0]).eval()
    schedule = NoiseSchedule(num_steps=20)
    context = torch.randn(4, 16)
    steps = None if sampler in ("ddpm", "ddim_legacy") else 5
    called: list[int] = []
    fast = model.sampler(context)

    def recording(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        called.append(int(t[0]))
        return fast(x, t)

    plain = sample(recording, schedule, (4, 12), sampler, steps, generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match="sampler must be one of"):
        network_steps("euler", schedule)
    planned_steps = network_steps(sampler, schedule, steps)
    assert planned_steps == called
    planned = model.sampler(context, timesteps=planned_steps)
    prepared = sample(planned, schedule, (4, 12), sampler, steps, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(prepared, plain, rtol=1e-5, atol=1e-5)


def test_fast_sampler_wants_one_step_and_its_context_rows() -> None:
    model = small_denoiser()
    fast = model.sampler(torch.randn(3, 8))
    with pytest.raises(ValueError, match="same step"):
        fast(torch.randn(3, 12), torch.tensor([5, 5, 6]))
    with pytest.raises(ValueError, match="3 rows"):
        fast(torch.randn(2, 12), torch.tensor([5, 5]))
    planned = model.sampler(torch.randn(3, 8), timesteps=[9, 5, 1])
    with pytest.raises(ValueError, match="prepared for steps 1…9 .3 steps., called at step 4"):
        planned(torch.randn(3, 12), torch.tensor([4, 4, 4]))
    with pytest.raises(ValueError, match="eager path only"):
        model.sampler(torch.randn(3, 8), compiled=True, timesteps=[9, 5, 1])


def test_fast_sampler_follows_weight_changes_only_when_rebuilt() -> None:
    """It caches derived weights for one run: a new run sees new weights."""
    model = small_denoiser().eval()
    x, context, t = torch.randn(2, 12), torch.randn(2, 8), torch.full((2,), 40)
    with torch.no_grad():
        model.downs[0][2].fn.fn.to_qkv[5].weight.mul_(3.0)
        model.mid_block1.mlp[1].weight.add_(0.5)
        torch.testing.assert_close(model.sampler(context)(x, t), model(x, t, context), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampler", ["ddim_legacy", "ddpm"])
def test_static_buffer_step_equals_eager_sampling(sampler: str) -> None:
    """The capturable step (static x, t buffers; no host-side branch on t) gives the eager result."""
    model = Denoiser(**FAST_CASES[0]).eval()
    schedule = NoiseSchedule(num_steps=12)
    context = torch.randn(6, 16)
    fast = model.sampler(context)
    eager = sample(fast, schedule, (6, 12), sampler, generator=torch.Generator().manual_seed(5))
    static = StaticEps(fast.eps, (6, 12), torch.device("cpu"), cuda_graph=True)  # CPU: no capture
    assert static.graph is None
    replayed = sample(static, schedule, (6, 12), sampler, generator=torch.Generator().manual_seed(5))
    assert torch.equal(replayed, eager)
    reference = sample(lambda x, t: model(x, t, context), schedule, (6, 12), sampler,
                       generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(replayed, reference, rtol=1e-4, atol=1e-4)


def test_bfloat16_sampler_is_close_to_float32() -> None:
    model = Denoiser(**FAST_CASES[0]).eval()
    x, context, t = torch.randn(20, 12), torch.randn(20, 16), torch.full((20,), 300)
    exact = model.sampler(context)(x, t)
    low = model.sampler(context, torch.bfloat16)(x, t)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    assert not torch.equal(low, exact)  # it did run in bfloat16
    assert (low - exact).abs().max() < 0.05 * exact.abs().max()


class OpRecorder(TorchDispatchMode):
    """Records (operator, input tensors) of every operator run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[object, list[torch.Tensor]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append((func.overloadpacket, [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]))
        return func(*args, **(kwargs or {}))


def test_bfloat16_runs_the_products_in_bfloat16_and_the_norms_and_softmax_in_float32() -> None:
    """Which operators see which dtype at one sampling call, the same on every device (explicit
    casts, not autocast's per-device lists); ε̂ is float32. (The time half of the modulations,
    one row per step, stays float32: prepared here, as on the eager path.)"""
    model = Denoiser(**FAST_CASES[0]).eval()
    low = model.sampler(torch.randn(20, 16), torch.bfloat16, timesteps=[300])
    with OpRecorder() as record:
        out = low.at_step(torch.randn(20, 12), 300)
    assert out.dtype == torch.float32
    dtypes: dict[str, set[torch.dtype]] = {}
    for op, inputs in record.ops:
        dtypes.setdefault(op.__name__, set()).update(t.dtype for t in inputs if t.is_floating_point())
    for product in ("addmm", "mm", "bmm", "baddbmm", "mv"):
        assert dtypes.get(product, {torch.bfloat16}) == {torch.bfloat16}, product
    assert {"addmm", "bmm", "baddbmm"} <= dtypes.keys()
    for norm in ("native_layer_norm", "_softmax", "linalg_vector_norm"):
        assert dtypes[norm] == {torch.float32}, norm


def test_bfloat16_weights_are_cast_once_per_sampler_not_per_call() -> None:
    """No conversion inside a call takes a weight: the products' weights were cast when the
    sampler was built (autocast without its cache recast every weight in every call)."""
    model = Denoiser(**FAST_CASES[0]).eval()
    low = model.sampler(torch.randn(20, 16), torch.bfloat16)
    weights = {p.data_ptr() for p in [*model.parameters(), *low.walk.parameters()]}
    weights |= {w.data_ptr() for pair in low.attentions for w in pair}
    x = torch.randn(20, 12)
    with OpRecorder() as record:
        low.at_step(x, 300)
    casts = [inputs[0] for op, inputs in record.ops if op in (torch.ops.aten._to_copy, torch.ops.aten.copy_)]
    assert casts  # the activations are cast, each in the call
    assert not [t for t in casts if t.data_ptr() in weights]
    assert {p.dtype for p in low.walk.init_conv.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the network itself is untouched


def test_compiled_fast_path_equals_the_eager_one() -> None:
    """test.compile: the call compiled by torch.compile gives the eager fast path's output,
    also for a second sampler of the same network (which reuses the compiled code)."""
    torch.manual_seed(0)
    net = Denoiser(12, 16, [12, 8, 4]).eval()
    x, t = torch.randn(6, 12), torch.full((6,), 7, dtype=torch.long)
    for _ in range(2):
        context = torch.randn(6, 16)
        eager = net.sampler(context)(x, t)
        compiled = net.sampler(context, compiled=True)(x, t)
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_fast_path_on_cuda_equals_the_training_forward_and_the_cpu() -> None:
    """On a GPU the fast path (unpacked projections, F.linear) gives the forward's output,
    and the network the CPU's, at ExpGen's real size."""
    torch.manual_seed(0)
    net = Denoiser(53, 1024, [53, 25, 10]).eval()
    x, context, t = torch.randn(100, 53), torch.randn(100, 1024), torch.full((100,), 500)
    cuda = torch.device("cuda")
    with torch.no_grad():
        on_cpu = net(x, t, context)
        net, x, context, t = net.to(cuda), x.to(cuda), context.to(cuda), t.to(cuda)
        forward = net(x, t, context)
        fast = net.sampler(context, timesteps=[500])(x, t)
    torch.testing.assert_close(fast, forward, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(forward.cpu(), on_cpu, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("sampler", ["ddim_legacy", "ddpm"])
def test_cuda_graph_replay_equals_eager_sampling_on_cuda(sampler: str) -> None:
    """StaticEps captures the step as a CUDA graph; replaying it samples what the eager path does."""
    cuda = torch.device("cuda")
    model = Denoiser(**FAST_CASES[0]).eval().to(cuda)
    schedule = NoiseSchedule(num_steps=12)
    context = torch.randn(6, 16, device=cuda)
    fast = model.sampler(context)
    eager = sample(fast, schedule, (6, 12), sampler, generator=torch.Generator(cuda).manual_seed(5), device=cuda)
    static = StaticEps(fast.eps, (6, 12), cuda, cuda_graph=True)
    assert static.graph is not None
    replayed = sample(static, schedule, (6, 12), sampler, generator=torch.Generator(cuda).manual_seed(5), device=cuda)
    torch.testing.assert_close(replayed, eager, rtol=1e-5, atol=1e-5)
    low = StaticEps(model.sampler(context, torch.bfloat16).eps, (6, 12), cuda, cuda_graph=True)
    in_bf16 = sample(low, schedule, (6, 12), sampler, generator=torch.Generator(cuda).manual_seed(5), device=cuda)
    assert torch.isfinite(in_bf16).all() and not torch.equal(in_bf16, eager)
    assert (in_bf16 - eager).abs().max() < 0.1 * eager.abs().max()
