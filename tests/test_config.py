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


def _alias_bomb(levels: int, width: int = 9) -> str:
    """A YAML flow list whose anchors each repeat the previous one `width` times: width**levels values."""
    ones = ", ".join(["1"] * width)
    nested = [f"&a0 [{ones}]"] + [f"&a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels)]
    return f"[{', '.join(nested)}]"


def test_a_yaml_alias_bomb_is_refused_with_a_short_message(tmp_path):
    """Showing the value in an error once formatted all 9**6 (here) repeats of the shared lists."""
    refusal = ("config key 'test.numsamples': more than 10000 values (YAML aliases or shared references repeating "
               "a structure?); a config holds single values and short lists")
    path = tmp_path / "bomb.yml"
    path.write_text(f"stage: idgen\ntest:\n  numsamples: {_alias_bomb(6)}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: {refusal}"
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"test.numsamples={_alias_bomb(6)}"])
    assert str(err.value) == refusal
    with pytest.raises(ConfigError) as err:  # a small shared structure is shown cut short
        load_config(None, [f"test.numsamples={_alias_bomb(3)}"])
    assert str(err.value).startswith("config key 'test.numsamples': expected int, got [[1, 1, 1, 1, 1, 1, ...], [[...], ")
    assert len(str(err.value)) < 200


@pytest.mark.parametrize("value", ["[", "*a", "!!binary abc", "!!python/name:os.system",
                                   "!!python/object/apply:os.system [echo hacked]", "{a: 1"])
def test_an_override_that_is_not_valid_yaml_is_one_error_line_naming_it(tmp_path, value):
    path = tmp_path / "c.yml"
    path.write_text("stage: idgen\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["train.max_steps=3", f"test.sampling={value}"])
    message = str(err.value)
    assert message.startswith(f"{path}, override 'test.sampling={value}': the value is not valid YAML: ")
    assert "\n" not in message


def test_a_config_file_that_is_not_utf8_is_one_error_line(tmp_path):
    path = tmp_path / "c.yml"
    path.write_bytes("stage: idgen\nname: café\n".encode("latin-1"))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: not valid YAML: the text is not UTF-8 (byte 0xe9 at byte 22: invalid continuation byte)"
    path.write_text("stage: idgen\nname: café  # µm\n", encoding="utf-8")
    assert load_config(path).name == "café"


@pytest.mark.parametrize("overrides, message", [
    (["test=5", "test.sampling=ddim"], ("override 'test=5': 'test' is a config section, not a value; set its keys, "
                                        "e.g. test.numsamples=...")),
    (["test="], "override 'test=': 'test' is a config section, not a value; set its keys, e.g. test.numsamples=..."),
    (["dataset.occlusion=[1, 2]"], ("override 'dataset.occlusion=[1, 2]': 'dataset.occlusion' is a config section, "
                                    "not a value; set its keys, e.g. dataset.occlusion.enabled=...")),
    (["train.diff_lr=0.5", "train.diff_lr.x=1"], ("override 'train.diff_lr.x=1': 'train.diff_lr' is 0.5, not a "
                                                   "section, so it has no keys to set")),
    (["train..diff_lr=1"], "override 'train..diff_lr=1': the key 'train..diff_lr' has an empty part"),
])
def test_a_section_replaced_by_a_value_is_refused_not_dropped(tmp_path, overrides, message):
    """`test=5` then a test.py flag's `test.sampling=...` used to drop every key of the file's test: section."""
    path = tmp_path / "c.yml"
    path.write_text("stage: idgen\ntest:\n  jaw_limits: [-0.1, 0.5, -0.1, 0.1, -0.1, 0.1]\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    assert str(err.value) == f"{path}, {message}"


def test_a_section_the_file_sets_to_a_value_is_not_replaced_by_an_override(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text("stage: idgen\ntest: 5\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["test.sampling=ddim"])
    assert str(err.value) == f"{path}, override 'test.sampling=ddim': 'test' is 5, not a section, so it has no keys to set"


def test_occluder_kinds_are_checked_in_the_config():
    import typing

    from ofer.config import OccluderKind
    from ofer.data.occlusion import KINDS

    assert set(typing.get_args(OccluderKind)) == set(KINDS)
    with pytest.raises(ConfigError) as err:
        load_config(None, ["dataset.occlusion.kinds=[]"])
    assert str(err.value) == "config key 'dataset.occlusion.kinds': must not be empty"
    with pytest.raises(ConfigError, match=r"'dataset.occlusion.kinds\[1\]': expected 'rectangle' \| 'ellipse'"):
        load_config(None, ["dataset.occlusion.kinds=[hand, square]"])
