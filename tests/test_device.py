"""`test.py --device` and `train.device`: a device this machine lacks is refused up front, by name."""

import pytest
import torch

from conftest import REPO
from ofer import api
from ofer.config import ConfigError
from ofer.device import resolve_device
from test_inference import run


def test_auto_and_cpu_resolve_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", "--device") == torch.device("cpu")
    assert resolve_device("cpu", "--device") == torch.device("cpu")


@pytest.mark.parametrize(("requested", "gpus", "message"), [
    ("gpu", 0, "--device 'gpu': not a device; use cpu, cuda, cuda:N or auto"),
    ("cuda:x", 0, "--device 'cuda:x': not a device"),
    ("cuda", 0, "--device cuda: PyTorch sees no CUDA GPU here"),
    ("cuda:1", 0, "--device cuda:1: PyTorch sees no CUDA GPU here"),
    ("cuda:2", 2, "--device cuda:2: this machine has 2 CUDA device(s), cuda:0 to cuda:1"),
    ("meta", 0, "--device meta: OFER cannot run on meta devices; use cpu, cuda, cuda:N or auto"),
    ("xpu", 0, "--device xpu: OFER cannot run on xpu devices"),
    ("mps", 0, "--device mps: PyTorch has no usable mps device here"),
])
def test_a_device_this_machine_lacks_is_a_config_error(monkeypatch, requested, gpus, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ConfigError) as err:
        resolve_device(requested, "--device")
    assert str(err.value).startswith(message)


def test_test_py_refuses_a_missing_gpu_before_any_work(synthetic_root, checkpoints, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(api.OferPipeline, "from_checkpoints", lambda *a: pytest.fail("models were loaded"))
    out = tmp_path / "out"
    listing = synthetic_root / "test" / "list.txt"
    assert run(synthetic_root, checkpoints, listing, synthetic_root / "test", out, "--device", "cuda") == 2
    assert "--device cuda: PyTorch sees no CUDA GPU here" in caplog.text
    assert not out.exists()


def test_training_refuses_a_bad_device_before_writing(tmp_path, caplog):
    """Before the output folder is made and before the data set is read (here: none there)."""
    from ofer.train.cli import main

    out = tmp_path / "run"
    with pytest.raises(SystemExit) as code:
        main("idgen", ["--cfg", str(REPO / "configs" / "demo" / "idgen.yml"), "--opt", "train.device=gpu",
                       "--opt", f"train.output_dir={out}", "--opt", f"dataset.root={tmp_path / 'no_data'}"])
    assert code.value.code == 2
    assert "train.device 'gpu': not a device; use cpu, cuda, cuda:N or auto" in caplog.text
    assert not out.exists()
