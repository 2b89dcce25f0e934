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


def test_each_rank_makes_its_gpu_the_current_device(monkeypatch):
    """test.py under torchrun (and --device cuda:N): the rank's GPU becomes the current CUDA device."""
    from ofer.inference.ranks import Ranks

    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    assert Ranks(3, 4, 3).device("auto") == torch.device("cuda", 1)
    assert Ranks().device("cuda:1") == torch.device("cuda", 1)
    assert Ranks().device("cuda") == torch.device("cuda") and Ranks(1, 2, 1).device("cpu") == torch.device("cpu")
    assert current == [torch.device("cuda", 1), torch.device("cuda", 1)]


def test_training_ranks_set_their_gpu_before_joining_the_nccl_group(monkeypatch):
    """NCCL binds a rank to the current device when the group is made: set it first."""
    from ofer.train import trainer

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("set_device", index)))
    monkeypatch.setattr(trainer.dist, "init_process_group", lambda backend: calls.append(("group", backend)))
    monkeypatch.setattr(trainer.dist, "get_rank", lambda: 1)
    place = trainer.setup_distributed("cuda")
    assert calls == [("set_device", 1), ("group", "nccl")]
    assert place.device == torch.device("cuda", 1) and place.world_size == 2


class FakeCuda:
    """Records which CUDA device is current when StaticEps warms up, captures and replays (a CPU
    stand-in for torch.cuda: the step itself runs on CPU tensors)."""

    def __init__(self, monkeypatch) -> None:
        self.current, self.seen = 0, []
        fake = self

        class Device:
            def __init__(self, device) -> None:
                self.index = torch.device(device).index

            def __enter__(self) -> None:
                self.before, fake.current = fake.current, self.index

            def __exit__(self, *exc) -> None:
                fake.current = self.before

        class Stream:
            def __init__(self, *args) -> None:
                fake.seen.append(("stream", fake.current))

            def wait_stream(self, other) -> None:
                pass

        class Graph:
            def replay(self) -> None:
                fake.seen.append(("replay", fake.current))

        class Capture:  # torch.cuda.graph(g) and torch.cuda.stream(s)
            def __init__(self, what) -> None:
                fake.seen.append((type(what).__name__, fake.current))

            def __enter__(self) -> None:
                pass

            def __exit__(self, *exc) -> None:
                pass

        zeros = torch.zeros
        monkeypatch.setattr(torch, "zeros", lambda *shape, device=None, **kw: zeros(*shape, **kw))  # buffers on CPU
        for name, value in (("device", Device), ("Stream", Stream), ("current_stream", lambda *a: Stream()),
                            ("stream", Capture), ("CUDAGraph", Graph), ("graph", Capture)):
            monkeypatch.setattr(torch.cuda, name, value)


def test_capture_and_replay_run_on_the_step_device_not_the_current_one(monkeypatch):
    """--device cuda:1 (or a rank's GPU) while cuda:0 is current: warm-up streams, capture and
    replay all happen with cuda:1 current."""
    from ofer.diffusion.denoiser import StaticEps

    fake = FakeCuda(monkeypatch)
    calls = []
    static = StaticEps(lambda x, t: calls.append(t.clone()) or x * 2.0, (2, 3), torch.device("cuda", 1), cuda_graph=True)
    static.at_step(torch.ones(2, 3), 4)
    assert static.graph is not None and len(calls) == 4  # 3 warm-ups and the capture
    assert fake.seen and {device for _, device in fake.seen} == {1}, fake.seen
    assert fake.current == 0
