"""test.py runs as a whole: per-image seeds, batches that fail, torchrun, the output folder, interruptions."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from ofer import api
from ofer.inference.outfolder import LOCK_NAME, OutputFolderError, OutputLock
from ofer.inference.summary import RankReport, RunPlan, write_summary
from test_inference import run

ARRAYS = ("shapes", "scores", "best", "expressions", "jaws")


def outputs(out, name):
    """The sampled arrays and the neutral landmarks of one image."""
    with np.load(out / f"{name}.npz") as params:
        arrays = {k: params[k] for k in ARRAYS}
    return {**arrays, "kpt68": np.load(out / name / "kpt68.npy")}


def assert_same_outputs(a, b):
    """Equal up to float rounding (a batch or another thread count sums in another order): 0.1 µm on mm."""
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-4, err_msg=key)


@pytest.fixture(scope="module")
def names(synthetic_root):
    return (synthetic_root / "test" / "list.txt").read_text().split()


@pytest.fixture(scope="module")
def batched(synthetic_root, checkpoints, names, tmp_path_factory):
    """The three test images reconstructed in one batch of 3 (the reference of the tests below)."""
    out = tmp_path_factory.mktemp("batched")
    assert run(synthetic_root, checkpoints, synthetic_root / "test" / "list.txt", synthetic_root / "test", out,
               "--batch", "3") == 0
    return {name: outputs(out, name) for name in names}


def test_samples_depend_on_seed_and_name_only(synthetic_root, checkpoints, names, batched, tmp_path):
    # One at a time, in the reverse order: the same samples as in the batch of 3.
    (tmp_path / "list.txt").write_text("\n".join(reversed(names)))
    out = tmp_path / "single"
    assert run(synthetic_root, checkpoints, tmp_path / "list.txt", synthetic_root / "test", out, "--batch", "1") == 0
    for name in names:
        assert_same_outputs(outputs(out, name), batched[name])
    # Another seed gives other samples.
    (tmp_path / "one.txt").write_text(names[0])
    out = tmp_path / "seed"
    assert run(synthetic_root, checkpoints, tmp_path / "one.txt", synthetic_root / "test", out, "--seed", "1") == 0
    assert not np.allclose(outputs(out, names[0])["shapes"], batched[names[0]]["shapes"])


def test_a_batch_with_nan_inside_the_networks_fails_only_the_bad_image(synthetic_root, checkpoints, names, batched,
                                                                      tmp_path, monkeypatch):
    load = api.load_inputs

    def load_with_nan(path):  # as if a NaN slipped past the input checks
        image, arcface = load(path)
        if path.stem == names[1]:
            arcface[0, 0, 0] = float("nan")
        return image, arcface

    monkeypatch.setattr(api, "load_inputs", load_with_nan)
    out = tmp_path / "out"
    assert run(synthetic_root, checkpoints, synthetic_root / "test" / "list.txt", synthetic_root / "test", out,
               "--batch", "3") == 1
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["failed"]) == [names[1]]
    assert "reconstruction failed" in summary["failed"][names[1]] and "NaN" in summary["failed"][names[1]]
    assert not (out / names[1]).exists() and not (out / f"{names[1]}.npz").exists()
    assert not list(out.rglob(f"{names[1]}_*.ply"))
    for name in (names[0], names[2]):
        assert_same_outputs(outputs(out, name), batched[name])


def test_torchrun_with_two_cpu_processes_equals_one_process(synthetic_root, checkpoints, names, batched,
                                                            tmp_path):
    out = tmp_path / "out"
    flame = synthetic_root / "flame"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(REPO / "test.py"), "--cfg", str(REPO / "configs" / "demo" / "test.yml"),
        "--opt", f"model.flame_model_path={flame / 'generic_model.pkl'}",
        "--opt", f"model.flame_lmk_embedding_path={flame / 'landmark_embedding.npy'}",
        "--opt", f"model.front_indices_path={flame / 'frontindices.npy'}",
        "--checkpoint1", str(checkpoints["idrank"]), "--checkpoint2", str(checkpoints["idgen"]),
        "--checkpoint3", str(checkpoints["expgen"]),
        "--filename", str(synthetic_root / "test" / "list.txt"), "--imagepath", str(synthetic_root / "test"),
        "--outputpath", str(out), "--num-shapes", "4", "--num-expressions", "3", "--sampler", "ddim", "--steps", "2",
        "--exp-sampler", "ddim", "--exp-steps", "2", "--device", "cpu", "--opt", "test.num_saved_expressions=2",
    ], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-6000:]
    for name in names:
        assert_same_outputs(outputs(out, name), batched[name])
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary["reconstructed"]) == sorted(names) and summary["failed"] == {}
    assert summary["world_size"] == 2 and summary["device"] == "cpu" and not summary["interrupted"]
    assert result.stdout.count("reconstructed 3 images") == 1  # rank 0 speaks for the run
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no lock, no rank reports left


def test_an_unusable_output_folder_is_refused_before_any_work(synthetic_root, checkpoints, tmp_path, caplog,
                                                              monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("models were loaded")

    monkeypatch.setattr(api.OferPipeline, "from_checkpoints", never)
    listing = synthetic_root / "test" / "list.txt"
    (tmp_path / "file").write_text("a regular file")
    assert run(synthetic_root, checkpoints, listing, synthetic_root / "test", tmp_path / "file" / "out") == 2
    assert f"{tmp_path / 'file'} is a file, not a folder" in caplog.text
    # Read-only: tests run as root, for whom permissions do not stop a write, so os.access answers as for a user.
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).endswith("ro") else real_access(p, mode))
    assert run(synthetic_root, checkpoints, listing, synthetic_root / "test", tmp_path / "ro") == 2
    assert f"output folder {tmp_path / 'ro'} is not writable" in caplog.text


def test_a_second_run_into_a_locked_folder_is_refused(synthetic_root, checkpoints, tmp_path, caplog,
                                                      monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    first = OutputLock(out)
    first.acquire()
    monkeypatch.setattr(api.OferPipeline, "from_checkpoints", lambda *a: pytest.fail("models were loaded"))
    assert run(synthetic_root, checkpoints, synthetic_root / "test" / "list.txt", synthetic_root / "test", out) == 2
    assert f"output folder {out} is in use by test.py pid {os.getpid()} on {socket.gethostname()}" in caplog.text
    assert not (out / "summary.json").exists()
    first.release()
    assert not (out / LOCK_NAME).exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "x"}))
    lock = OutputLock(tmp_path)
    lock.acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    other_host = OutputLock(tmp_path)
    other_host.owner = {**other_host.owner, "host": "elsewhere"}
    with pytest.raises(OutputFolderError, match=f"in use by test.py pid {os.getpid()}"):
        other_host.acquire()
    lock.release()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": "elsewhere", "started": "x"}))
    with pytest.raises(OutputFolderError, match=f"delete {tmp_path / LOCK_NAME}"):  # cannot check another host
        OutputLock(tmp_path).acquire()


def test_an_interrupted_run_writes_its_summary_and_frees_the_folder(synthetic_root, checkpoints, names, tmp_path,
                                                                    monkeypatch):
    write = api.write_outputs
    written = []

    def write_then_stop(out, name, *args):
        if written:
            raise KeyboardInterrupt  # Ctrl-C (SIGTERM is turned into the same) while writing the second image
        written.append(name)
        return write(out, name, *args)

    monkeypatch.setattr(api, "write_outputs", write_then_stop)
    out = tmp_path / "out"
    assert run(synthetic_root, checkpoints, synthetic_root / "test" / "list.txt", synthetic_root / "test", out) == 130
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] and summary["reconstructed"] == names[:1]
    assert summary["not_processed"] == {n: "interrupted" for n in names[1:]}
    assert not (out / LOCK_NAME).exists() and not (out / names[1]).exists()


def test_the_summary_names_a_rank_that_never_reported(tmp_path):
    plan = RunPlan(run_id="r", listed=["a", "b", "c", "d"], finished=["a"], todo=[("b", None), ("c", None),
                                                                                    ("d", None)])
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "done.json").write_text(json.dumps({"run": "r", "settings": {"seed": 0}}))
    RankReport(rank=0, device="cpu", failed={"d": "d.npy: file not found"}, seconds=2.0).save(tmp_path)
    summary = write_summary(tmp_path, plan, {"seed": 0}, world=2)  # rank 1 (image c) died without a report
    assert summary["reconstructed"] == ["b"] and summary["failed"] == {"d": "d.npy: file not found"}
    assert summary["not_processed"] == {"c": "rank 1 ended without a report"} and summary["interrupted"]
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


def test_ranks_take_every_kth_image_and_share_the_gpus_of_their_node(monkeypatch):
    from ofer.inference.ranks import Ranks

    assert [Ranks(r, 3, r).shard(list("abcdefg")) for r in range(3)] == [list("adg"), list("be"), list("cf")]
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    monkeypatch.setattr("torch.cuda.set_device", lambda device: None)  # tests/test_device.py checks it
    assert [str(Ranks(r, 4, r).device("auto")) for r in range(4)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert str(Ranks(1, 2, 1).device("cuda:0")) == "cuda:0" and str(Ranks(1, 2, 1).device("cpu")) == "cpu"
    assert str(Ranks().device("cuda")) == "cuda"  # one process: the current GPU, as before
