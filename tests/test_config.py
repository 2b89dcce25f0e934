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



@pytest.mark.parametrize("override, message", [
    ("train.checkpoint_steps=0", "'train.checkpoint_steps': 0 is out of range; allowed: >= 1"),
    ("dataset.batch_size=0", "'dataset.batch_size': 0 is out of range; allowed: >= 1"),
    ("net.dims=[300, -1, 10]", "'net.dims[1]': -1 is out of range; allowed: >= 1"),
    ("train.max_steps=-3", "'train.max_steps': -3 is out of range; allowed: >= 1"),
    ("train.diff_lr=0", "'train.diff_lr': 0.0 is out of range; allowed: > 0"),
    ("train.ema_decay=1.0", "'train.ema_decay': 1.0 is out of range; allowed: [0, 1)"),  # Optional: range, not type
    ("dataset.occlusion.prob=1.5", "'dataset.occlusion.prob': 1.5 is out of range; allowed: [0, 1]"),
    ("varsched.beta_T=1", "'varsched.beta_T': 1.0 is out of range; allowed: (0, 1)"),
    ("test.numsamples=0", "'test.numsamples': 0 is out of range; allowed: >= 1"),
    ("test.steps=0", "'test.steps': 0 is out of range; allowed: >= 1"),
    ("train.lr_factor=.nan", "'train.lr_factor': nan is out of range; allowed: (0, 1)"),
    ("train.grad_clip=.inf", "'train.grad_clip': inf is out of range; allowed: > 0"),
])
def test_out_of_range_values_name_key_value_and_range(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value) == f"config key {message}"


def test_boundary_values_are_accepted():
    cfg = load_config(None, ["train.checkpoint_steps=1", "train.ema_decay=0.0", "dataset.occlusion.prob=1",
                             "dataset.num_workers=0", "train.lr_patience=0", "test.eta=1"])
    assert cfg.train.checkpoint_steps == 1 and cfg.dataset.occlusion.prob == 1.0


def test_every_default_lies_in_its_range():
    from ofer.config import Config, config_from_dict, config_to_dict

    assert config_from_dict(config_to_dict(Config())) == Config()


@pytest.mark.parametrize("overrides, match", [
    (["net.dims=[10, 64, 32]"], r"'net.dims'.*start with net.flame_dim \(300\)"),
    (["net.flame_dim=10", "net.dims=[10]"], r"'net.dims'.*at least 2 entries"),
    (["net.flame_dim=10", "net.dims=[10, 5]"], r"'net.flame_dim': 10 must equal model.n_shape \(300\)"),
    (["stage=expgen", "model.n_exp=10"], r"'net.flame_dim': 300 must equal model.n_exp \+ 3 \(13\)"),
    (["varsched.beta_1=0.02"], r"'varsched.beta_1': 0.02 must not exceed varsched.beta_T"),
    (["dataset.occlusion.min_area=0.4"], r"min_area.*must not exceed dataset.occlusion.max_area"),
])
def test_keys_that_must_agree_are_checked_together(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_train_cli_reports_a_bad_setting_like_a_bad_key(tmp_path, caplog):
    from ofer.train.cli import main

    path = tmp_path / "c.yml"
    path.write_text("stage: idgen\ntrain:\n  checkpoint_steps: 0\n")
    with pytest.raises(SystemExit) as code:
        main("idgen", ["--cfg", str(path)])
    assert code.value.code == 2
    assert f"{path}: config key 'train.checkpoint_steps': 0 is out of range; allowed: >= 1" in caplog.text


def test_an_error_from_an_override_names_the_override_besides_the_file(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text("stage: idgen\ntrain:\n  max_steps: 10\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["train.log_steps=5", "train.checkpoint_steps=0"])
    assert str(err.value) == (f"{path}, override 'train.checkpoint_steps=0': config key 'train.checkpoint_steps': "
                              "0 is out of range; allowed: >= 1")
    with pytest.raises(ConfigError, match=r"override 'train.max_stepz=3': unknown config key 'train.max_stepz'"):
        load_config(path, ["train.max_stepz=3"])
