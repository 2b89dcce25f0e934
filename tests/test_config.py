"""Config loading: defaults, YAML, dotted overrides, and errors that name the bad key."""

import pytest

from ofer.config import ConfigError, load_config


def test_defaults_follow_the_spec():
    cfg = load_config()
    assert cfg.varsched.num_steps == 1000
    assert cfg.varsched.beta_1 == pytest.approx(1e-4)
    assert cfg.net.dims == [300, 50, 10]
    assert cfg.net.numqkv == 16


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text("stage: expgen\nnet:\n  flame_dim: 53\n  dims: [53, 25, 10]\ntrain:\n  diff_lr: 1e-4\n")
    cfg = load_config(path, ["train.diff_lr=3e-5", "dataset.training_data=[LYHM, FLORENCE]"])
    assert cfg.stage == "expgen"
    assert cfg.net.dims == [53, 25, 10]
    assert cfg.train.diff_lr == pytest.approx(3e-5)
    assert cfg.dataset.training_data == ["LYHM", "FLORENCE"]


def test_misspelled_key_names_the_key_and_suggests(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text("net:\n  flame_dims: 300\n")
    with pytest.raises(ConfigError, match=r"net\.flame_dims.*did you mean 'net\.flame_dim'") as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_unknown_override_and_section():
    with pytest.raises(ConfigError, match="train.lrr"):
        load_config(None, ["train.lrr=1e-3"])
    with pytest.raises(ConfigError, match="'tran'"):
        load_config(None, ["tran.diff_lr=1e-3"])


def test_values_are_type_checked():
    with pytest.raises(ConfigError, match="net.numqkv.*int"):
        load_config(None, ["net.numqkv=sixteen"])
    with pytest.raises(ConfigError, match="test.sampling"):
        load_config(None, ["test.sampling=ddimm"])
    with pytest.raises(ConfigError, match=r"net.dims\[1\]"):
        load_config(None, ["net.dims=[300, x, 10]"])
    assert load_config(None, ["train.grad_clip=null"]).train.grad_clip is None
    assert load_config(None, ["train.grad_clip=1"]).train.grad_clip == 1.0


def test_every_shipped_config_loads():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.rglob("*.yml"))
    assert len(files) >= 10
    for path in files:
        load_config(path)

