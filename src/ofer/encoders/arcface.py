"""ArcFace identity encoder: insightface's IResNet-100 with OFER's partial freezing.

The network follows insightface's `iresnet` definition so that the glint360k r100
`backbone.pth` loads with its own key names (`conv1.weight`, `layer1.0.bn1.weight`, ...,
`fc.weight`, `features.weight`). `ArcFaceEncoder` is the backbone itself (a subclass, not a
wrapper), so its state dict keeps those keys and the `arcface` entry of an original OFER
checkpoint maps onto it one to one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ofer.encoders.normalise import ARCFACE_SIZE, check_image_batch
from ofer.encoders.weights import compare_state_dicts, read_state_dict

logger = logging.getLogger(__name__)

IRESNET100_LAYERS = (3, 13, 30, 3)
ARCFACE_WEIGHTS = "pretrained/arcface/backbone.pth"
BN_EPS = 1e-5
# Number of leading stages (stem, layer1, ..., layer4) run without gradients per option.
FROZEN_STAGES = {"none": 0, "l2": 2, "l3": 3, "l4": 4}
# test.arcface_single_image_bn: what the final BN1d does for an image the original encodes alone.
SINGLE_IMAGE_BN_MODES = ("auto", "skip", "apply")


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Pre-activation residual block: BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN.

    `downsample` (1x1 conv + BN) projects the shortcut when the stride or width changes.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes, eps=BN_EPS)
        self.conv1 = _conv3x3(in_planes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=BN_EPS)
        self.prelu = nn.PReLU(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=BN_EPS)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes, eps=BN_EPS),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class IResNet(nn.Module):
    """insightface IResNet: (B, 3, 112, 112) in [-1, 1] -> raw (B, num_features) embedding.

    Stem conv3x3(64) + BN + PReLU; four stages of IBasicBlocks with widths 64/128/256/512, each
    starting with stride 2 (112 -> 7); head BN2d -> flatten -> dropout -> Linear(512*7*7, 512)
    -> BN1d whose weight is fixed to 1 and not trained.

    `apply_features_bn` (a plain attribute, True by default) says whether that final BN1d runs.
    False gives, for every image of a batch, what the original's forward gives for a batch of
    one image: it applies `features` only `if x.shape[0] > 1`. Keeping it per module rather than
    per batch makes the result independent of how many images are encoded together.
    """

    def __init__(
        self, layers: Sequence[int] = IRESNET100_LAYERS, num_features: int = 512, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"IResNet needs 4 block counts, got {list(layers)}")
        self.conv1 = _conv3x3(3, 64)
        self.bn1 = nn.BatchNorm2d(64, eps=BN_EPS)
        self.prelu = nn.PReLU(64)
        widths = (64, 128, 256, 512)
        in_planes = 64
        for index, (planes, blocks) in enumerate(zip(widths, layers), start=1):
            stage = [IBasicBlock(in_planes, planes, stride=2)]
            stage += [IBasicBlock(planes, planes) for _ in range(blocks - 1)]
            setattr(self, f"layer{index}", nn.Sequential(*stage))
            in_planes = planes
        self.bn2 = nn.BatchNorm2d(512, eps=BN_EPS)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(512 * 7 * 7, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=BN_EPS)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False
        self.apply_features_bn = True

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 112, 112) -> (B, 64, 112, 112)."""
        return self.prelu(self.bn1(self.conv1(x)))

    def stages(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        """The five feature stages in order: stem, layer1, layer2, layer3, layer4."""
        return [self.stem, self.layer1, self.layer2, self.layer3, self.layer4]

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 512, 7, 7) feature map -> (B, num_features) embedding (not normalised)."""
        x = torch.flatten(self.bn2(x), 1)  # (B, 512*7*7)
        x = self.fc(self.dropout(x))
        return self.features(x) if self.apply_features_bn else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages():
            x = stage(x)
        return self.head(x)


class ArcFaceEncoder(IResNet):
    """IResNet whose first stages are frozen; maps ArcFace crops to unit-norm identity codes.

    `with_freeze` says where training starts:
      - "l4": stem + layer1-3 run under no-grad; layer4 and the head are trained (OFER default),
      - "l3": stem + layer1-2 frozen, layer3 onwards trained,
      - "l2": stem + layer1 frozen, layer2 onwards trained,
      - "none": everything is trained.
    Frozen parameters also get `requires_grad=False` so optimisers can skip them. Freezing only
    concerns gradients: BatchNorm layers follow the module's train/eval mode as usual.
    """

    def __init__(self, layers: Sequence[int] = IRESNET100_LAYERS, with_freeze: str = "l4") -> None:
        super().__init__(layers)
        if with_freeze not in FROZEN_STAGES:
            raise ValueError(f"with_freeze must be one of {sorted(FROZEN_STAGES)}, got {with_freeze!r}")
        self.with_freeze = with_freeze
        self.num_frozen = FROZEN_STAGES[with_freeze]
        stage_modules = [(self.conv1, self.bn1, self.prelu), (self.layer1,), (self.layer2,), (self.layer3,)]
        for modules in stage_modules[: self.num_frozen]:
            for module in modules:
                module.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 112, 112) RGB in [-1, 1] -> (B, 512) L2-normalised identity code."""
        check_image_batch(x, ARCFACE_SIZE, type(self).__name__)
        stages = self.stages()
        with torch.no_grad():
            for stage in stages[: self.num_frozen]:
                x = stage(x)
        for stage in stages[self.num_frozen :]:
            x = stage(x)
        return F.normalize(self.head(x), dim=-1)


def configure_single_image_bn(encoder: nn.Module | None, mode: str, original_checkpoint: bool,
                              encoded_alone: bool) -> None:
    """Set `encoder.apply_features_bn` for test time as the original's test.py would have run it.

    The original's ArcFace skips its final BN1d on a batch of one image. At test time its ranking
    step encodes each image alone (so the released IdRank scores with codes without that BN,
    although it was trained with batches > 1, with it); IdGen and ExpGen encode the image repeated
    once per sample, so they apply it unless a single sample is drawn.

    Args:
        encoder: a stage's ArcFace; tiny encoders (no BN1d) and None are left alone.
        mode: "skip" reproduces the original where it encoded one image, "apply" always applies the
            BN1d (as in training), "auto" is "skip" for original checkpoints and "apply" for ours.
        original_checkpoint: the stage's weights come from an original OFER file (no `format`).
        encoded_alone: the original encodes this stage's image as a batch of one.
    """
    if mode not in SINGLE_IMAGE_BN_MODES:
        raise ValueError(f"arcface_single_image_bn must be one of {SINGLE_IMAGE_BN_MODES}, got {mode!r}")
    if not isinstance(encoder, IResNet):
        return
    skip = mode == "skip" or (mode == "auto" and original_checkpoint)
    encoder.apply_features_bn = not (skip and encoded_alone)


def load_arcface_weights(module: IResNet, path: str | Path = ARCFACE_WEIGHTS) -> None:
    """Load an insightface IResNet state dict (`backbone.pth`) into `module` in place.

    The file is read with `torch.load(weights_only=True)`. Missing `num_batches_tracked`
    buffers are tolerated (older files lack them); any other missing or unexpected key, or a
    shape mismatch, raises.

    Raises:
        FileNotFoundError: `path` does not exist (the message says where to get the file).
        ValueError: the file is not a state dict or its keys/shapes do not match.
    """
    state_dict = read_state_dict(
        path,
        f"download the ArcFace glint360k r100 backbone.pth from the insightface model zoo; "
        f"put it at {path} (default location {ARCFACE_WEIGHTS})",
    )
    diff = compare_state_dicts(module.state_dict(), state_dict)
    missing = [k for k in diff.missing if not k.endswith("num_batches_tracked")]
    if missing or diff.unexpected or diff.mismatched:
        raise ValueError(
            f"{path} does not match the IResNet layout: missing keys {missing}, "
            f"unexpected keys {diff.unexpected}, shape mismatches {diff.mismatched}"
        )
    module.load_state_dict(state_dict, strict=False)
    logger.info("loaded ArcFace weights from %s", path)
