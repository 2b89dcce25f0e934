"""Asset files are checked for content at start-up, and their errors reach the user as one line (exit 2)."""

import os
import pickle

import numpy as np
import pytest
import torch
import yaml

from conftest import demo_config
from ofer.config import config_to_dict
from ofer.flame import UnsafePickleError, load_flame_model
from ofer.io import InputError
from ofer.models.idrank import load_front_indices


class _RunsCommand:
    """Unpickling this would run a shell command."""

    def __init__(self, argument):
        self.argument = argument

    def __reduce__(self):
        return os.system, (self.argument,)


def test_front_indices_must_fit_the_flame_model(tmp_path):
    good = tmp_path / "good.npy"
    np.save(good, np.array([0, 5, 9]))
    assert torch.equal(load_front_indices(good, num_vertices=10), torch.tensor([0, 5, 9]))
    cases = {
        "outside.npy": (np.array([0, 5, 10]), r"outside.npy: vertex indices span \[0, 10\], outside \[0, 10\)"),
        "negative.npy": (np.array([-1, 3]), r"negative.npy: vertex indices span \[-1, 3\]"),
        "fraction.npy": (np.array([0.5, 2.0]), "fraction.npy: vertex indices must be whole numbers"),
        "nan.npy": (np.array([np.nan, 2.0]), "nan.npy: vertex indices must be whole numbers"),
        "empty.npy": (np.array([], dtype=np.int64), "empty.npy: no front-face vertex indices"),
        "text.npy": (np.array(["1", "2"]), "text.npy: expected a numeric array"),
        "mask.npy": (np.array([True, False]), "mask.npy: expected a numeric array, found dtype bool"),
        "table.npy": (np.zeros((3, 2), dtype=np.int64), r"table.npy: expected an array of shape \(\*\)"),
        "missing.npy": (None, "missing.npy: file not found"),
    }
    for name, (array, message) in cases.items():
        if array is not None:
            np.save(tmp_path / name, array)
        with pytest.raises(InputError, match=message):
            load_front_indices(tmp_path / name, num_vertices=10)


def test_flame_file_with_nan_is_refused_naming_file_and_key(synthetic_root, tmp_path):
    model = load_flame_model(synthetic_root / "flame" / "generic_model.pkl")
    model["v_template"][3, 1] = np.nan
    path = tmp_path / "nan_model.pkl"
    path.write_bytes(pickle.dumps(model))
    with pytest.raises(InputError, match=r"nan_model.pkl: key 'v_template' holds NaN or infinite values"):
        load_flame_model(path)


def test_train_cli_reports_an_unsafe_flame_pickle_in_one_line(synthetic_root, tmp_path, caplog):
    from ofer.train.cli import main

    marker = tmp_path / "marker"
    evil = tmp_path / "generic_model.pkl"
    evil.write_bytes(pickle.dumps({"v_template": _RunsCommand(f"touch {marker}")}, protocol=2))
    cfg = config_to_dict(demo_config("idgen", synthetic_root, tmp_path / "run", "dataset.validation_data=[]"))
    cfg["model"]["flame_model_path"] = str(evil)
    cfg_path = tmp_path / "idgen.yml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as code:
        main("idgen", ["--cfg", str(cfg_path)])
    assert code.value.code == 2
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].exc_info is None
    message = errors[0].getMessage()
    assert message.startswith(f"{evil}: refused to load global '") and ".system'" in message
    assert "\n" not in message
    assert not marker.exists()
    assert issubclass(UnsafePickleError, InputError)  # test.py's main() reports it the same way (exit 2)
