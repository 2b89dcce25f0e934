"""Tests for the image encoders: IResNet-100 layout and freezing, FaRL loading, tiny encoders, factory."""

import logging

import numpy as np
import pytest
import torch

from ofer.encoders import (
    CLIP_MEAN,
    CLIP_STD,
    ArcFaceEncoder,
    FarlEncoder,
    IResNet,
    TinyArcFace,
    TinyFarl,
    arcface_normalise,
    build_arcface,
    build_farl,
    clip_normalise,
    configure_single_image_bn,
    load_arcface_weights,
    load_farl_state_dict,
    load_farl_weights,
)
from ofer.encoders.farl import VISUAL_PREFIX, QuickGELU
from ofer.encoders.weights import read_state_dict

SMALL_LAYERS = (1, 2, 1, 1)  # same code paths as IResNet-100, a fraction of the cost

# Key names and shapes as they appear in insightface's glint360k r100 backbone.pth.
INSIGHTFACE_R100_KEYS = {
    "conv1.weight": (64, 3, 3, 3),
    "bn1.weight": (64,),
    "bn1.running_var": (64,),
    "prelu.weight": (64,),
    "layer1.0.bn1.weight": (64,),
    "layer1.0.conv1.weight": (64, 64, 3, 3),
    "layer1.0.bn2.bias": (64,),
    "layer1.0.prelu.weight": (64,),
    "layer1.0.conv2.weight": (64, 64, 3, 3),
    "layer1.0.bn3.running_mean": (64,),
    "layer1.0.downsample.0.weight": (64, 64, 1, 1),
    "layer1.0.downsample.1.weight": (64,),
    "layer1.2.conv2.weight": (64, 64, 3, 3),
    "layer2.0.conv1.weight": (128, 64, 3, 3),
    "layer2.0.downsample.0.weight": (128, 64, 1, 1),
    "layer2.12.bn3.bias": (128,),
    "layer3.0.downsample.1.running_var": (256,),
    "layer3.29.prelu.weight": (256,),
    "layer4.0.conv1.weight": (512, 256, 3, 3),
    "layer4.2.conv2.weight": (512, 512, 3, 3),
    "bn2.weight": (512,),
    "bn2.running_mean": (512,),
    "fc.weight": (512, 512 * 7 * 7),
    "fc.bias": (512,),
    "features.weight": (512,),
    "features.bias": (512,),
    "features.running_var": (512,),
}


def _iresnet_parameter_count(layers) -> int:
    """Independent count from the architecture description (convs have no bias; BN = 2C, PReLU = C)."""
    total = 3 * 64 * 9 + 2 * 64 + 64  # stem
    in_planes = 64
    for planes, blocks in zip((64, 128, 256, 512), layers):
        for block in range(blocks):
            cin = in_planes if block == 0 else planes
            total += 2 * cin + 9 * cin * planes + 2 * planes + planes + 9 * planes * planes + 2 * planes
            if block == 0:
                total += cin * planes + 2 * planes  # downsample conv1x1 + BN
        in_planes = planes
    return total + 2 * 512 + (512 * 49 * 512 + 512) + 2 * 512  # bn2, fc, features


def _randomise_batchnorm_statistics(module: torch.nn.Module, seed: int) -> None:
    """Give BN buffers non-default values so an eval-mode output depends on them."""
    generator = torch.Generator().manual_seed(seed)
    for layer in module.modules():
        if isinstance(layer, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            layer.running_mean.copy_(0.1 * torch.randn(layer.running_mean.shape, generator=generator))
            layer.running_var.copy_(1.0 + 0.5 * torch.rand(layer.running_var.shape, generator=generator))


@pytest.fixture(scope="module")
def iresnet100() -> ArcFaceEncoder:
    torch.manual_seed(0)
    return ArcFaceEncoder(with_freeze="l4").eval()


@pytest.fixture(scope="module")
def farl() -> FarlEncoder:
    torch.manual_seed(0)
    return FarlEncoder().eval()


# ---------------------------------------------------------------- ArcFace


def test_iresnet100_keys_match_insightface(iresnet100):
    state = iresnet100.state_dict()
    for key, shape in INSIGHTFACE_R100_KEYS.items():
        assert tuple(state[key].shape) == shape, key
    for absent in ("layer1.3.conv1.weight", "layer3.30.bn1.weight", "layer1.1.downsample.0.weight", "fc.0.weight"):
        assert absent not in state
    roots = {key.split(".")[0] for key in state}
    assert roots == {"conv1", "bn1", "prelu", "layer1", "layer2", "layer3", "layer4", "bn2", "fc", "features"}


def test_iresnet100_parameter_count(iresnet100):
    count = sum(p.numel() for p in iresnet100.parameters())
    assert count == _iresnet_parameter_count((3, 13, 30, 3)) == 65_156_160
    assert not iresnet100.features.weight.requires_grad
    assert torch.all(iresnet100.features.weight == 1)


def test_iresnet100_output_is_unit_norm(iresnet100):
    images = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        codes = iresnet100(images)
    assert codes.shape == (2, 512)
    torch.testing.assert_close(codes.norm(dim=1), torch.ones(2))
    assert not torch.allclose(codes[0], codes[1])


def test_arcface_rejects_wrong_crop_size(iresnet100):
    with pytest.raises(ValueError, match=r"\(B, 3, 112, 112\)"):
        iresnet100(torch.zeros(1, 3, 224, 224))


@pytest.mark.parametrize(
    ("with_freeze", "trained"),
    [
        ("l4", {"layer4", "head"}),
        ("l3", {"layer3", "layer4", "head"}),
        ("l2", {"layer2", "layer3", "layer4", "head"}),
        ("none", {"stem", "layer1", "layer2", "layer3", "layer4", "head"}),
    ],
)
def test_with_freeze_controls_which_stages_get_gradients(with_freeze, trained):
    torch.manual_seed(0)
    encoder = ArcFaceEncoder(layers=SMALL_LAYERS, with_freeze=with_freeze).train()
    encoder(torch.randn(2, 3, 112, 112)).sum().backward()
    groups = {
        "stem": [encoder.conv1.weight, encoder.bn1.weight, encoder.prelu.weight],
        "layer1": list(encoder.layer1.parameters()),
        "layer2": list(encoder.layer2.parameters()),
        "layer3": list(encoder.layer3.parameters()),
        "layer4": list(encoder.layer4.parameters()),
        "head": [encoder.bn2.weight, encoder.fc.weight, encoder.features.bias],
    }
    for name, params in groups.items():
        has_grad = [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params]
        assert all(has_grad) if name in trained else not any(has_grad), name
        requires_grad = [p.requires_grad for p in params]
        assert all(requires_grad) if name in trained else not any(requires_grad), name


def test_with_freeze_rejects_unknown_option():
    with pytest.raises(ValueError, match="with_freeze"):
        ArcFaceEncoder(layers=SMALL_LAYERS, with_freeze="l5")


def test_backbone_file_loads_and_reproduces_outputs(tmp_path):
    torch.manual_seed(1)
    source = IResNet(SMALL_LAYERS)  # a plain backbone, as insightface saves it
    _randomise_batchnorm_statistics(source, seed=1)
    source.eval()
    # insightface files may lack num_batches_tracked buffers; they must still load.
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "backbone.pth"
    torch.save(state, path)

    torch.manual_seed(2)
    encoder = ArcFaceEncoder(layers=SMALL_LAYERS, with_freeze="l4").eval()
    images = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        before = encoder(images)
        load_arcface_weights(encoder, path)
        after = encoder(images)
        expected = torch.nn.functional.normalize(source(images), dim=-1)
    assert not torch.allclose(before, expected)
    torch.testing.assert_close(after, expected)


def _original_forward(encoder: ArcFaceEncoder, x: torch.Tensor) -> torch.Tensor:
    """The original's test-time ArcFace, written from SPEC §3: the final BN1d only `if x.shape[0] > 1`."""
    for stage in encoder.stages():
        x = stage(x)
    x = encoder.fc(encoder.dropout(torch.flatten(encoder.bn2(x), 1)))
    if x.shape[0] > 1:
        x = encoder.features(x)
    return torch.nn.functional.normalize(x, dim=-1)


@torch.no_grad()
def test_single_image_bn_both_behaviours_and_batch_independence():
    torch.manual_seed(0)
    encoder = ArcFaceEncoder(layers=(1, 1, 1, 1)).eval()
    _randomise_batchnorm_statistics(encoder, seed=3)
    encoder.features.bias.normal_()  # make the final BN1d visibly change the code
    images = torch.rand(3, 3, 112, 112) * 2 - 1
    alone = torch.cat([_original_forward(encoder, image[None]) for image in images])  # original, batch of 1
    repeated = torch.cat([_original_forward(encoder, image[None].repeat(4, 1, 1, 1))[:1] for image in images])
    assert (alone - repeated).abs().max() > 1e-2  # the two behaviours differ on these weights

    assert encoder.apply_features_bn  # default: as in training and as the original on batches > 1
    torch.testing.assert_close(encoder(images), repeated, atol=1e-6, rtol=0)
    torch.testing.assert_close(encoder(images[:1]), repeated[:1], atol=1e-6, rtol=0)

    encoder.apply_features_bn = False  # each image as the original encodes it alone, whatever the batch
    torch.testing.assert_close(encoder(images), alone, atol=1e-6, rtol=0)
    torch.testing.assert_close(encoder(images[1:]), alone[1:], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("mode", "original", "encoded_alone", "applied"),
    [("auto", True, True, False), ("auto", True, False, True), ("auto", False, True, True),
     ("skip", False, True, False), ("skip", True, False, True), ("apply", True, True, True)],
)
def test_configure_single_image_bn(mode, original, encoded_alone, applied):
    encoder = IResNet((1, 1, 1, 1))
    configure_single_image_bn(encoder, mode, original_checkpoint=original, encoded_alone=encoded_alone)
    assert encoder.apply_features_bn is applied
    configure_single_image_bn(TinyArcFace(), mode, original, encoded_alone)  # no BN1d: nothing to set
    configure_single_image_bn(None, mode, original, encoded_alone)
    with pytest.raises(ValueError, match="arcface_single_image_bn must be one of"):
        configure_single_image_bn(encoder, "original", original, encoded_alone)


def test_arcface_weights_missing_file_says_where_to_get_it(tmp_path):
    path = tmp_path / "arcface" / "backbone.pth"
    with pytest.raises(FileNotFoundError, match="insightface model zoo") as error:
        load_arcface_weights(ArcFaceEncoder(layers=SMALL_LAYERS), path)
    assert str(path) in str(error.value)
    assert "glint360k r100" in str(error.value)


def test_arcface_weights_key_mismatch_lists_keys(tmp_path):
    state = IResNet(SMALL_LAYERS).state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["layer2.0.conv1.weight"]
    path = tmp_path / "backbone.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match="layer2.0.conv1.weight") as error:
        load_arcface_weights(ArcFaceEncoder(layers=SMALL_LAYERS), path)
    assert "extra.weight" in str(error.value)


def test_arcface_weights_shape_mismatch_is_reported(tmp_path):
    path = tmp_path / "backbone.pth"
    torch.save(IResNet((1, 1, 1, 1)).state_dict() | {"fc.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(ValueError, match=r"fc.weight: file \(3, 3\)"):
        load_arcface_weights(IResNet((1, 1, 1, 1)), path)


def test_read_state_dict_refuses_non_tensor_content(tmp_path):
    path = tmp_path / "not_weights.pth"
    torch.save({"epoch": 3}, path)
    with pytest.raises(ValueError, match="not_weights.pth"):
        read_state_dict(path, "")


# ---------------------------------------------------------------- FaRL


def _openai_clip_dict(farl: FarlEncoder) -> dict[str, torch.Tensor]:
    """The encoder's weights in OpenAI-CLIP naming, plus text-tower keys the loader must ignore."""
    state = {f"visual.{k}": v.clone() for k, v in farl.visual.state_dict().items()}
    state |= {
        "positional_embedding": torch.zeros(77, 512),  # text tower; same suffix as a visual key
        "transformer.resblocks.0.attn.in_proj_weight": torch.zeros(1536, 512),
        "token_embedding.weight": torch.zeros(10, 512),
        "ln_final.weight": torch.zeros(512),
        "text_projection": torch.zeros(512, 512),
        "logit_scale": torch.tensor(4.6),
    }
    return state


def test_farl_is_openai_vit_b16_with_quickgelu(farl):
    assert sum(p.numel() for p in farl.parameters()) == 86_192_640
    assert all(isinstance(block.mlp.gelu, QuickGELU) for block in farl.visual.transformer.resblocks)
    keys = set(farl.state_dict())
    for key in (
        "visual.conv1.weight",
        "visual.class_embedding",
        "visual.positional_embedding",
        "visual.ln_pre.weight",
        "visual.transformer.resblocks.11.attn.in_proj_weight",
        "visual.transformer.resblocks.0.mlp.c_fc.weight",
        "visual.ln_post.bias",
        "visual.proj",
    ):
        assert key in keys


@pytest.mark.parametrize("train", [False, True])
def test_farl_equals_open_clip_tower_on_the_same_weights(farl, train):
    """Our tower against open_clip's ViT-B-16-quickgelu image tower (the library the spec names),
    same keys in the same order, same outputs, in eval mode (fused attention) and train mode."""
    open_clip = pytest.importorskip("open_clip")
    reference = open_clip.CLIP(**open_clip.get_model_config("ViT-B-16-quickgelu")).visual
    ours = {key.removeprefix(VISUAL_PREFIX): value for key, value in farl.state_dict().items()}
    assert list(reference.state_dict()) == list(ours)
    reference.load_state_dict(ours)
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    farl.train(train)
    reference.train(train)
    try:
        with torch.no_grad():
            torch.testing.assert_close(farl(images), reference(images), atol=1e-5, rtol=1e-4)
    finally:
        farl.eval()


def test_farl_file_loads_and_reproduces_outputs(farl, tmp_path):
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = farl(image)
    path = tmp_path / "FaRL-Base-Patch16-LAIONFace20M-ep64.pth"
    torch.save({"state_dict": _openai_clip_dict(farl), "epoch": 64}, path)
    original = {k: v.clone() for k, v in farl.state_dict().items()}
    try:
        with torch.no_grad():
            for param in farl.parameters():
                param.add_(1.0)
        load_farl_weights(farl, path)
        with torch.no_grad():
            reloaded = farl(image)
    finally:
        farl.load_state_dict(original)
    assert expected.shape == (1, 512)
    torch.testing.assert_close(reloaded, expected)


def test_farl_missing_visual_key_and_shape_mismatch_raise(farl):
    state = _openai_clip_dict(farl)
    del state["visual.ln_post.weight"]
    state["visual.proj"] = torch.zeros(768, 256)
    with pytest.raises(ValueError, match="visual.ln_post.weight") as error:
        load_farl_state_dict(farl, state, "farl.pth")
    assert "visual.proj: file (768, 256)" in str(error.value)
    assert "farl.pth" in str(error.value)


def test_farl_unknown_visual_key_is_warned(farl, caplog):
    state = _openai_clip_dict(farl) | {"visual.mim_head.weight": torch.zeros(3)}
    with caplog.at_level(logging.WARNING, logger="ofer.encoders.farl"):
        load_farl_state_dict(farl, state, "farl.pth")
    assert "visual.mim_head.weight" in caplog.text


def test_farl_missing_file_says_where_to_get_it(tmp_path):
    path = tmp_path / "missing.pth"
    with pytest.raises(FileNotFoundError, match="FaRL-Base-Patch16-LAIONFace20M-ep64.pth") as error:
        load_farl_weights(None, path)  # the file is checked before the module is used
    assert "FaRL GitHub release" in str(error.value)
    assert str(path) in str(error.value)


# ---------------------------------------------------------------- normalisation


def test_normalisation_helpers():
    pixels = np.array([0.0, 127.5, 255.0])
    np.testing.assert_allclose(arcface_normalise(pixels), [-1.0, 0.0, 1.0])
    image = torch.tensor(CLIP_MEAN)[:, None, None].expand(3, 2, 2) + torch.tensor(CLIP_STD)[:, None, None]
    torch.testing.assert_close(clip_normalise(image), torch.ones(3, 2, 2))


# ---------------------------------------------------------------- tiny encoders and factory


@pytest.mark.parametrize(("cls", "size", "unit_norm"), [(TinyArcFace, 112, True), (TinyFarl, 224, False)])
def test_tiny_encoders(cls, size, unit_norm):
    torch.manual_seed(0)
    encoder = cls()
    assert sum(p.numel() for p in encoder.parameters()) < 200_000
    for batch in (1, 3):
        codes = encoder(torch.randn(batch, 3, size, size))
        assert codes.shape == (batch, 512)
    norms = codes.norm(dim=1)
    assert torch.allclose(norms, torch.ones(3)) == unit_norm
    with pytest.raises(ValueError, match=cls.__name__):
        encoder(torch.randn(1, 3, size // 2, size // 2))


def test_factory_builds_tiny_and_full_encoders(caplog):
    assert isinstance(build_arcface(tiny=True), TinyArcFace)
    assert isinstance(build_farl(tiny=True), TinyFarl)
    with caplog.at_level(logging.DEBUG, logger="ofer.encoders.factory"):
        full = build_arcface(tiny=False, with_freeze="l3")
    assert isinstance(full, ArcFaceEncoder) and full.with_freeze == "l3"
    assert "without pretrained weights" in caplog.text
    with pytest.raises(ValueError, match="tiny"):
        build_arcface(tiny=True, weights="pretrained/arcface/backbone.pth")
    with pytest.raises(FileNotFoundError, match="insightface"):
        build_arcface(tiny=False, weights="does/not/exist.pth")


def test_farl_bare_image_tower_state_dict_loads(farl):
    """An original checkpoint's `farl` entry may hold the image tower alone (no `visual.` prefix)."""
    bare = {k[len("visual."):]: v.clone() + 1.0 for k, v in farl.state_dict().items()}
    original = {k: v.clone() for k, v in farl.state_dict().items()}
    try:
        load_farl_state_dict(farl, bare, "model_expgen.tar['farl']")
        assert torch.equal(farl.visual.conv1.weight, bare["conv1.weight"])
    finally:
        farl.load_state_dict(original)
