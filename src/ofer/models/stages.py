"""The three OFER stages as modules: IdGen, ExpGen (one class, two configs) and IdRank.

A stage owns its image encoders (`arcface`, `farl`) and its network (`net`, plus the noise
schedule `var_sched` for the diffusion stages). The attribute names equal the keys of the
original checkpoints, so `ofer.checkpoints.load_checkpoint` maps them one to one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ofer.config import Config, ConfigError
from ofer.diffusion import Denoiser, NoiseSchedule, diffusion_loss, sample
from ofer.diffusion.denoiser import DenoiserSampler, StaticEps
from ofer.diffusion.noise import Generators
from ofer.diffusion.samplers import check_sampling, network_steps
from ofer.encoders import build_arcface, build_farl
from ofer.models.idrank import IdRankNet

EncoderRun = Callable[[nn.Module, torch.Tensor], torch.Tensor]


class ImageContext(nn.Module):
    """Encodes the two crops into the conditioning vector [FaRL f, ArcFace a] (SPEC §1).

    `expencoder` picks the towers: `arcface` (512), `farl` (512) or `arcfarl` (1024).
    """

    def __init__(self, cfg: Config, load_weights: bool):
        super().__init__()
        m = cfg.model
        self.uses_farl = m.expencoder in ("farl", "arcfarl")
        self.uses_arcface = m.expencoder in ("arcface", "arcfarl")
        load = load_weights and not m.tiny_encoders  # tiny encoders have no pretrained weights
        self.farl = build_farl(m.tiny_encoders, m.farl_weights if load else None) if self.uses_farl else None
        self.arcface = (
            build_arcface(m.tiny_encoders, m.arcface_weights if load else None, m.with_freeze)
            if self.uses_arcface
            else None
        )

    @property
    def context_dim(self) -> int:
        return 512 * (int(self.uses_farl) + int(self.uses_arcface))

    def encode(self, image: torch.Tensor, arcface: torch.Tensor, run: EncoderRun | None = None) -> torch.Tensor:
        """image (B,3,224,224) CLIP-normalised, arcface (B,3,112,112) -> context (B, C).

        `run(encoder, input)` applies an encoder (default: calls it); the pipeline passes one
        that reuses the output of an identical encoder of another stage.
        """
        run = run or (lambda encoder, x: encoder(x))
        parts = []
        if self.farl is not None:
            parts.append(run(self.farl, image))
        if self.arcface is not None:
            parts.append(run(self.arcface, arcface))
        return torch.cat(parts, dim=1)


class DiffusionStage(ImageContext):
    """IdGen (FLAME shape, 300) or ExpGen (50 expression + 3 jaw): encoders + Denoiser.

    IdGen and ExpGen differ only by config (`net.flame_dim`, `net.context_dim`, `net.dims`,
    `model.expencoder`).
    """

    def __init__(self, cfg: Config, load_weights: bool = True):
        super().__init__(cfg, load_weights)
        if self.context_dim != cfg.net.context_dim:
            raise ValueError(
                f"net.context_dim={cfg.net.context_dim} but model.expencoder={cfg.model.expencoder!r} "
                f"gives {self.context_dim}"
            )
        self.net = Denoiser(cfg.net.flame_dim, cfg.net.context_dim, cfg.net.dims, cfg.net.numqkv)
        v = cfg.varsched
        self.var_sched = NoiseSchedule(v.num_steps, v.beta_1, v.beta_T)
        self.losstype = cfg.net.losstype
        # (rows, dtype, device) -> (parameter versions, sampler, its static step): see static_eps
        self.static_steps: dict[tuple, tuple[tuple[int, ...], DenoiserSampler, StaticEps]] = {}

    @property
    def flame_dim(self) -> int:
        return self.net.flame_dim

    def loss(self, context: torch.Tensor, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Noise-prediction loss for targets x0 (B, D) given contexts (B, C)."""
        return diffusion_loss(lambda x, t: self.net(x, t, context), self.var_sched, x0, self.losstype, generator)

    def check_sampling(self, sampler: str, steps: int | None, keys: str, model: str) -> None:
        """Refuse, before the first sample, settings `sample` would refuse with this stage's noise
        schedule: a ConfigError naming the config `keys` and the `model` (where it came from)."""
        try:
            check_sampling(sampler, self.var_sched, steps)
        except ValueError as err:
            raise ConfigError(f"config keys {keys} = {sampler}, {steps}: {err}; {model} has "
                              f"{self.var_sched.num_steps} diffusion steps") from None

    @torch.no_grad()
    def sample(
        self,
        context: torch.Tensor,
        num_samples: int,
        sampler: str = "ddim",
        steps: int | None = None,
        eta: float = 0.0,
        generator: Generators = None,
        progress: bool = False,
        dtype: torch.dtype = torch.float32,
        cuda_graph: bool = False,
        compiled: bool = False,
    ) -> torch.Tensor:
        """Draw `num_samples` coefficient vectors per context: (B, C) -> (B, N, D), in one batch.

        `eta` (stochasticity) applies to `ddim` only; the other samplers ignore it. `generator`
        may be one generator per image (`ofer.diffusion.noise`). The network runs its fast
        inference path (`Denoiser.sampler`), in `dtype` (float32, or bfloat16 autocast); with
        `cuda_graph` each network call runs over static buffers (`static_eps`), captured as a
        CUDA graph on a CUDA device; with `compiled` the call is compiled by torch.compile.
        """
        b = context.shape[0]
        ctx = context.repeat_interleave(num_samples, dim=0)  # (B*N, C), samples of one image adjacent
        if cuda_graph:
            eps_fn = self.static_eps(ctx, dtype)
        else:
            # the eager path computes the time half of every step it will visit up front
            timesteps = () if compiled else network_steps(sampler, self.var_sched, steps)
            eps_fn = self.net.sampler(ctx, dtype, compiled, timesteps)
        x = sample(
            eps_fn,
            self.var_sched,
            (b * num_samples, self.flame_dim),
            sampler=sampler,
            steps=steps,
            eta=eta if sampler == "ddim" else 0.0,
            generator=generator,
            device=context.device,
            progress=progress,
        )
        return x.view(b, num_samples, self.flame_dim)

    def static_eps(self, context: torch.Tensor, dtype: torch.dtype) -> StaticEps:
        """The network step over static buffers for these (rows, C) contexts (`StaticEps`; a CUDA
        graph on a CUDA device), made once per (rows, dtype, device) and kept: later calls copy
        the new context's half of the modulations into place (`DenoiserSampler.set_context`)
        instead of capturing again (a capture synchronises the device and empties PyTorch's
        memory cache). Kept steps are made again when a parameter was changed in place since
        (its version counter moved), e.g. by loading a state dict."""
        key = (context.shape[0], dtype, context.device)
        versions = tuple(p._version for p in self.net.parameters())
        kept = self.static_steps.get(key)
        if kept is not None and kept[0] == versions:
            kept[1].set_context(context)
            return kept[2]
        fast = self.net.sampler(context, dtype)
        static = StaticEps(fast.eps, (context.shape[0], self.flame_dim), context.device, cuda_graph=True)
        self.static_steps[key] = (versions, fast, static)
        return static


class IdRank(ImageContext):
    """Scores N shape samples of one image from their front-face meshes (SPEC §6)."""

    def __init__(self, cfg: Config, shape_dim: int, load_weights: bool = True):
        super().__init__(cfg, load_weights)
        if self.context_dim != cfg.net.context_dim:
            raise ValueError(
                f"net.context_dim={cfg.net.context_dim} but model.expencoder={cfg.model.expencoder!r} "
                f"gives {self.context_dim}"
            )
        self.net = IdRankNet(shape_dim=shape_dim, context_dim=cfg.net.context_dim, hidden_dims=cfg.net.hidden_dims)

    def scores(self, features: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """features (B, N, 2*shape_dim), context (B, C) -> scores (B, N)."""
        return self.net(features, context)
