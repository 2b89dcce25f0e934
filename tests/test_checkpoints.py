"""Checkpoint loading: original-format files (no projections, stray keys), ours, and errors."""

import logging

import pytest
import torch

from ofer.checkpoints import (
    CheckpointError,
    check_stage,
    checkpoint_stage,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from ofer.config import config_to_dict, load_config
from ofer.diffusion import is_projection_key
from ofer.models.stages import DiffusionStage, IdRank


def expgen_config():
    return load_config(None, [
        "stage=expgen", "net.flame_dim=53", "net.context_dim=1024", "net.dims=[53, 25, 10]",
        "model.expencoder=arcfarl", "model.tiny_encoders=true", "model.with_freeze=none",
    ])


def idgen_config(*overrides: str):
    return load_config(None, [
        "stage=idgen", "net.flame_dim=300", "net.context_dim=512", "net.dims=[300, 50, 10]",
        "model.expencoder=arcface", "model.tiny_encoders=true", *overrides,
    ])


def original_checkpoint(model: DiffusionStage, path):
    """Write `model` as the original code did: no projections, one stray qkv key, `diffusion` copy."""
    torch.manual_seed(123)
    net = {k: torch.randn_like(v) for k, v in model.net.state_dict().items() if not is_projection_key(k)}
    net["mid_attn.fn.fn.qkv.weight"] = torch.randn(384, 10, 1)  # the stray key of original files
    ckpt = {
        "net": net,
        "diffusion": {**{f"net.{k}": v for k, v in net.items()},
                      **{f"var_sched.{k}": v for k, v in model.var_sched.state_dict().items()}},
        "var_sched": model.var_sched.state_dict(),
        "arcface": model.arcface.state_dict(),
    }
    if model.farl is not None:
        ckpt["farl"] = model.farl.state_dict()
    torch.save(ckpt, path)
    return net


def outputs(model: DiffusionStage) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(3, 53, generator=g), torch.randn(3, 1024, generator=g)
    return model.net.eval()(x, torch.tensor([0, 500, 999]), ctx)


def test_original_checkpoint_loads_deterministically(tmp_path, caplog):
    cfg = expgen_config()
    path = tmp_path / "model_expgen_flame20.tar"
    net = original_checkpoint(DiffusionStage(cfg), path)
    first, second = DiffusionStage(cfg), DiffusionStage(cfg)
    with caplog.at_level(logging.WARNING):
        load_checkpoint(path, first)
    assert "fixed seed" in caplog.text
    load_checkpoint(path, second)
    for k, v in net.items():
        if "fn.fn.qkv" not in k:
            assert torch.equal(first.net.state_dict()[k], v)
    assert torch.equal(outputs(first), outputs(second))


def test_our_checkpoint_round_trip(tmp_path):
    cfg = expgen_config()
    model = DiffusionStage(cfg)
    save_checkpoint(tmp_path / "ours.tar", model, step=7)
    other = DiffusionStage(cfg)
    ckpt = load_checkpoint(tmp_path / "ours.tar", other)
    assert ckpt["step"] == 7
    assert torch.equal(outputs(model), outputs(other))
    assert not list(tmp_path.glob(".*"))  # the atomic write left no temporary file


def test_mismatches_are_named(tmp_path):
    cfg = expgen_config()
    model = DiffusionStage(cfg)
    state = {k: v for k, v in model.net.state_dict().items()}
    state.pop("init_conv.bias")
    state["extra.weight"] = torch.zeros(1)
    torch.save({"net": state, "arcface": model.arcface.state_dict(), "farl": model.farl.state_dict()}, tmp_path / "a.tar")
    with pytest.raises(CheckpointError, match=r"init_conv\.bias.*extra\.weight"):
        load_checkpoint(tmp_path / "a.tar", DiffusionStage(cfg))
    state = dict(model.net.state_dict(), **{"init_conv.bias": torch.zeros(7)})
    torch.save({"net": state, "arcface": model.arcface.state_dict(), "farl": model.farl.state_dict()}, tmp_path / "b.tar")
    with pytest.raises(CheckpointError, match=r"init_conv\.bias: file \(7,\)"):
        load_checkpoint(tmp_path / "b.tar", DiffusionStage(cfg))


def test_missing_and_unsafe_files(tmp_path):
    model = DiffusionStage(expgen_config())
    with pytest.raises(CheckpointError, match="not found.*checkpoint/"):
        load_checkpoint(tmp_path / "nope.tar", model)

    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"net": Evil()}, tmp_path / "evil.tar")
    with pytest.raises(CheckpointError, match="weights-only"):
        load_checkpoint(tmp_path / "evil.tar", model)


def test_idrank_checkpoint(tmp_path):
    cfg = load_config(None, ["stage=idrank", "net.context_dim=1024", "model.expencoder=arcfarl",
                             "model.tiny_encoders=true"])
    model = IdRank(cfg, shape_dim=30)
    torch.save({"net": model.net.state_dict(), "arcface": model.arcface.state_dict(),
                "farl": model.farl.state_dict()}, tmp_path / "model_idrank.tar")
    other = IdRank(cfg, shape_dim=30)
    load_checkpoint(tmp_path / "model_idrank.tar", other)
    feats, ctx = torch.randn(1, 5, 60), torch.randn(1, 1024)
    assert torch.equal(model.net.eval()(feats, ctx), other.net.eval()(feats, ctx))


def test_stage_is_told_from_shapes_of_original_files_and_from_the_config_of_ours(tmp_path):
    files = {"expgen": tmp_path / "model_expgen_flame20.tar", "idgen": tmp_path / "model_idgen_flame20.tar"}
    original_checkpoint(DiffusionStage(expgen_config()), files["expgen"])
    original_checkpoint(DiffusionStage(idgen_config()), files["idgen"])
    rank_cfg = load_config(None, ["stage=idrank", "net.context_dim=1024", "model.expencoder=arcfarl",
                                  "model.tiny_encoders=true"])
    rank = IdRank(rank_cfg, shape_dim=30)
    files["idrank"] = tmp_path / "model_idrank.tar"
    torch.save({"net": rank.net.state_dict(), "arcface": rank.arcface.state_dict(),
                "farl": rank.farl.state_dict()}, files["idrank"])
    for stage, path in files.items():
        ckpt = read_checkpoint(path)
        assert checkpoint_stage(ckpt) == stage
        check_stage(ckpt, stage, path, "--slot")  # the right slot is accepted
    with pytest.raises(CheckpointError, match=r"model_expgen_flame20.tar: given as the IdGen checkpoint "
                       r"\(--checkpoint2\), but it holds an ExpGen stage \(from its network shapes\)"):
        check_stage(read_checkpoint(files["expgen"]), "idgen", files["expgen"], "--checkpoint2")
    with pytest.raises(CheckpointError, match=r"given as the ExpGen checkpoint \(--checkpoint3\), but it holds an IdRank"):
        check_stage(read_checkpoint(files["idrank"]), "expgen", files["idrank"], "--checkpoint3")

    # Ours: small sizes that shapes could not tell; the saved config says the stage.
    small = idgen_config("net.flame_dim=10", "net.dims=[10, 5]", "stage=expgen", "model.n_exp=7")
    save_checkpoint(tmp_path / "ours.tar", DiffusionStage(small), config=config_to_dict(small))
    with pytest.raises(CheckpointError, match=r"holds an ExpGen stage \(from its config\)"):
        check_stage(read_checkpoint(tmp_path / "ours.tar"), "idgen", tmp_path / "ours.tar", "--checkpoint2")
    # Unknown sizes without a config: not refused here (loading checks the shapes).
    ckpt = read_checkpoint(tmp_path / "ours.tar")
    del ckpt["config"]
    assert checkpoint_stage(ckpt) is None
    check_stage(ckpt, "idgen", tmp_path / "ours.tar", "--checkpoint2")


def test_loading_says_once_where_each_part_came_from(tmp_path, caplog):
    path = tmp_path / "model_expgen_flame20.tar"
    original_checkpoint(DiffusionStage(expgen_config()), path)
    with caplog.at_level(logging.INFO):
        load_checkpoint(path, DiffusionStage(expgen_config()))
    lines = [r.getMessage() for r in caplog.records if "weights from" in r.getMessage()]
    expected = (f"ExpGen weights from {path} (original OFER format): network from 'net', noise schedule "
                f"from the config (checked against 'var_sched'), ArcFace from 'arcface', FaRL from 'farl'")
    assert lines == [expected]
    assert "random" not in caplog.text.lower()


def _flip_bytes_in_a_tensor(path):
    """Change 4 bytes in the middle of the largest tensor of a zip-format checkpoint (still loadable)."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_and_extra = int.from_bytes(raw[info.header_offset + 26: info.header_offset + 28], "little") + \
        int.from_bytes(raw[info.header_offset + 28: info.header_offset + 30], "little")
    middle = info.header_offset + 30 + name_and_extra + info.file_size // 2
    raw[middle: middle + 4] = bytes(b ^ 0x10 for b in raw[middle: middle + 4])
    path.write_bytes(bytes(raw))
    return info.filename


def test_a_damaged_checkpoint_is_refused_by_its_crc(tmp_path):
    path = tmp_path / "ours.tar"
    torch.save({"format": "x", "net": {"a.weight": torch.randn(64), "b.weight": torch.randn(1000)}}, path)
    member = _flip_bytes_in_a_tensor(path)
    assert torch.load(path, weights_only=True)["net"]  # torch alone reads it without a word
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    assert str(err.value) == (f"{path}: damaged checkpoint: member '{member}' fails its CRC check (changed since it "
                              "was written); copy or download it again")


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_checkpoint_with_non_finite_weights_or_optimiser_state_is_refused(tmp_path, legacy):
    ckpt = {"format": "x", "net": {"a.weight": torch.randn(4, 5), "a.bias": torch.randn(5)},
            "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": []}}
    key = "a.weight"
    path = tmp_path / "ckpt.tar"
    torch.save(ckpt, path, _use_new_zipfile_serialization=not legacy)
    assert read_checkpoint(path)["net"].keys() == ckpt["net"].keys()  # legacy files load (without a CRC to check)
    ckpt["net"][key].view(-1)[:2] = float("nan")
    torch.save(ckpt, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    assert str(err.value) == (f"{path}: 'net.{key}' holds 2 NaN or infinite values of {ckpt['net'][key].numel()} "
                              "(a damaged file, or one saved after training diverged)")
    ckpt["net"][key].zero_()
    ckpt["optimizer"]["state"][0]["exp_avg"][1] = float("inf")
    torch.save(ckpt, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError, match=r"'optimizer.state.0.exp_avg' holds 1 NaN or infinite values of 3"):
        read_checkpoint(path)


def test_a_checkpoint_whose_saved_config_is_a_bomb_is_refused_naming_the_file(tmp_path):
    saved = config_to_dict(idgen_config())
    bomb = [1] * 9
    for _ in range(7):
        bomb = [bomb] * 9  # one list shared 9 times per level: 9**8 values when formatted
    saved["test"]["numsamples"] = bomb
    path = tmp_path / "ours.tar"
    torch.save({"format": "x", "net": {}, "config": saved}, path)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    assert str(err.value) == (f"{path}: the config saved in it is invalid: config key 'test.numsamples': more than "
                              "10000 values (YAML aliases or shared references repeating a structure?); a config "
                              "holds single values and short lists")


def test_test_py_refuses_a_damaged_checkpoint_with_one_error_line(synthetic_root, checkpoints, tmp_path, caplog):
    from test_inference import run

    damaged = tmp_path / "idgen.tar"
    damaged.write_bytes(checkpoints["idgen"].read_bytes())
    member = _flip_bytes_in_a_tensor(damaged)
    out = tmp_path / "out"
    code = run(synthetic_root, {**checkpoints, "idgen": damaged}, synthetic_root / "test" / "list.txt",
               synthetic_root / "test", out)
    assert code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [(f"{damaged}: damaged checkpoint: member '{member}' fails its CRC check (changed since it was "
                       "written); copy or download it again")]
    assert not list(out.glob("*.npz"))
