"""Nothing lost, nothing written where it does not belong: test.py's list entries, an image's
files written all together or not at all, stale samples, and signals before the handler."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO
from ofer import api
from ofer.eval.metrics import find_samples
from ofer.flame import FLAME
from ofer.inference import export
from ofer.inference.cli import read_list
from ofer.inference.export import write_outputs
from ofer.inference.pipeline import Reconstruction
from ofer.io import InputError, WriteError, read_mesh
from test_inference import run


@pytest.fixture(scope="module")
def flame(synthetic_root):
    flame_dir = synthetic_root / "flame"
    return FLAME(flame_dir / "generic_model.pkl", landmark_embedding_path=flame_dir / "landmark_embedding.npy")


def reconstruction(flame: FLAME, num_expressions: int, offset: float = 0.0) -> Reconstruction:
    """A reconstruction of the synthetic model's mean face (every sample the same), moved by `offset` mm."""
    with torch.no_grad():
        neutral = flame(torch.zeros(1, flame.n_shape))[:1] * 1000.0 + offset  # (1, V, 3)
        kpt68, kpt7 = flame.landmarks68(neutral), flame.landmarks7(neutral)
    m = num_expressions
    return Reconstruction(shapes=np.zeros((4, flame.n_shape), np.float32), scores=np.arange(4, dtype=np.float32),
                          best=3, expressions=np.zeros((m, flame.n_exp), np.float32), jaws=np.zeros((m, 3), np.float32),
                          neutral_mm=neutral[0].numpy(), expression_mm=neutral.repeat(m, 1, 1).numpy(),
                          kpt68_mm=kpt68[0].numpy(), kpt7_mm=kpt7[0].numpy(),
                          shape_spread_mm=np.zeros(flame.num_vertices, np.float32),
                          expression_spread_mm=np.zeros(flame.num_vertices, np.float32))


def write(out, name, flame, num_saved, offset=0.0, provenance=None, mesh_format="ply"):
    arcface = np.zeros((3, 112, 112), np.float32)
    return write_outputs(out, name, reconstruction(flame, num_saved, offset), flame.faces.numpy(), arcface, num_saved,
                         provenance, mesh_format)


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def failing_after(calls: int, real):
    """`real`, failing like a full disk from its `calls`+1-th call on."""
    count = {"n": 0}

    def write(*args, **kwargs):
        count["n"] += 1
        if count["n"] > calls:
            raise WriteError(f"{args[0]}: could not be written ([Errno 28] No space left on device)")
        return real(*args, **kwargs)
    return write


@pytest.mark.parametrize("name", ["a", "sub/b"])
def test_a_failed_write_leaves_none_of_the_images_files(flame, tmp_path, monkeypatch, name):
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setitem(export.MESH_WRITERS, ".ply", failing_after(2, export.MESH_WRITERS[".ply"]))  # 2 meshes
    with pytest.raises(WriteError, match="No space left"):
        write(out, name, flame, num_saved=3)
    assert snapshot(out) == {} and list(out.iterdir()) == []  # no file, no empty folder of the image


def test_a_failed_overwrite_keeps_the_earlier_set_whole(flame, tmp_path, monkeypatch):
    out = tmp_path / "out"
    write(out, "a", flame, num_saved=3, provenance={"run": "first"})
    before = snapshot(out)
    monkeypatch.setitem(export.MESH_WRITERS, ".ply", failing_after(1, export.MESH_WRITERS[".ply"]))
    with pytest.raises(WriteError):
        write(out, "a", flame, num_saved=3, offset=5.0, provenance={"run": "second"})
    assert snapshot(out) == before  # old meshes, old marker: nothing mixed, nothing lost


def test_an_overwrite_with_fewer_expressions_removes_the_stale_samples(flame, tmp_path):
    out = tmp_path / "out"
    write(out, "a", flame, num_saved=3)
    write(out, "a_0", flame, num_saved=2)  # an image whose samples look like a's by prefix
    marker = write(out, "a", flame, num_saved=1, offset=1.0)
    assert sorted(p.name for p in (out / "flamesample").iterdir()) == ["a_0_0.ply", "a_0_0_0.ply", "a_0_0_1.ply"]
    assert marker["files"] == json.loads((out / "a" / "done.json").read_text())["files"]
    assert "flamesample/a_0_0.ply" in marker["files"] and not any("a_0_1" in f for f in marker["files"])
    assert not list(out.rglob(".staging-*"))
    # Evaluation reads what the marker lists, not a file some other program left beside it.
    (out / "flamesample" / "a_0_5.ply").write_bytes((out / "flamesample" / "a_0_0.ply").read_bytes())
    assert [p.name for p in find_samples(out, "a")] == ["a_0_0.ply"]
    (out / "a" / "done.json").unlink()  # a folder without markers (the original code) is read as found
    assert [p.name for p in find_samples(out, "a")] == ["a_0_0.ply", "a_0_5.ply"]


def test_a_corrupt_marker_cannot_make_an_overwrite_delete_other_files(flame, tmp_path):
    out = tmp_path / "out"
    write(out, "a", flame, num_saved=1)
    write(out, "b", flame, num_saved=1)
    (tmp_path / "outside.txt").write_text("mine")
    marker = json.loads((out / "a" / "done.json").read_text())
    marker["files"] += ["../outside.txt", "b.npz", "shapesample/b_0.ply", "/etc/hostname", 7]
    (out / "a" / "done.json").write_text(json.dumps(marker))
    write(out, "a", flame, num_saved=1, offset=2.0)
    assert (tmp_path / "outside.txt").read_text() == "mine"
    assert (out / "b.npz").is_file() and (out / "shapesample" / "b_0.ply").is_file()


@pytest.mark.parametrize(("entry", "message"), [
    ("../imgs/clear_06", "line 2: entry '../imgs/clear_06' leaves the image folder"),
    ("sub/../../x.jpg", "leaves the image folder"),
    ("/data/imgs/clear_06.jpg", "line 2: entry '/data/imgs/clear_06.jpg' is an absolute path"),
    ("shapesample/a.jpg", "would write over the run's own files ('shapesample'"),
    ("report", "would write over the run's own files"),
    (".hidden/a.jpg", "would write over the run's own files"),
    ("arcface_input/.jpg", "would write over the run's own files"),
    ("x/../clear_07", "line 2: entries 'clear_07' and 'x/../clear_07' would both write outputs named 'clear_07'"),
    ("./clear_07.png", "entries 'clear_07' and './clear_07.png' would both write outputs named 'clear_07'"),
])
def test_list_entries_whose_outputs_would_leave_the_folder_are_refused(tmp_path, entry, message):
    (tmp_path / "list.txt").write_text(f"clear_07\n{entry}\n")
    with pytest.raises(InputError, match=r"list\.txt: ") as err:
        read_list(tmp_path / "list.txt", tmp_path)
    assert message in str(err.value)


def test_normalised_entries_find_their_image(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.png").write_bytes(b"")
    (tmp_path / "list.txt").write_text("x/../sub/a\n./b.jpg\n")
    assert read_list(tmp_path / "list.txt", tmp_path) == [("sub/a", tmp_path / "sub" / "a.png"),
                                                          ("b", tmp_path / "b.jpg")]


@pytest.mark.parametrize(("content", "message"), [
    (b"", r"lists no image \(only empty lines or # comments\)"),
    (b"# nothing yet\n\n   \n", "lists no image"),
    (b"a.jpg\nb\xff\xfe.jpg\n", "line 2: not UTF-8 text"),
])
def test_a_list_without_images_or_not_utf8_is_refused(tmp_path, content, message):
    (tmp_path / "list.txt").write_bytes(content)
    with pytest.raises(InputError, match=message):
        read_list(tmp_path / "list.txt", tmp_path)


def test_a_list_escaping_the_output_folder_writes_nothing_anywhere(synthetic_root, checkpoints, tmp_path, caplog,
                                                                   monkeypatch):
    images = tmp_path / "imgs"
    images.mkdir()
    name = (synthetic_root / "test" / "list.txt").read_text().split()[0]
    for suffix in (".jpg", ".npy"):
        (images / f"{name}{suffix}").write_bytes((synthetic_root / "test" / f"{name}{suffix}").read_bytes())
    (tmp_path / "crops").mkdir()
    (tmp_path / "list.txt").write_text(f"../imgs/{name}\n")
    before = snapshot(tmp_path)
    monkeypatch.setattr(api.OferPipeline, "from_checkpoints", lambda *a: pytest.fail("models were loaded"))
    assert run(synthetic_root, checkpoints, tmp_path / "list.txt", tmp_path / "crops", tmp_path / "out") == 2
    assert "leaves the image folder" in caplog.text
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["empty list", "missing imagepath"])
def test_nothing_to_do_is_refused_before_loading_models(synthetic_root, checkpoints, tmp_path, caplog, monkeypatch,
                                                        case):
    listing = tmp_path / "list.txt"
    listing.write_text("# only a comment\n" if case == "empty list" else "a.jpg\n")
    monkeypatch.setattr(api.OferPipeline, "from_checkpoints", lambda *a: pytest.fail("models were loaded"))
    image_dir = tmp_path if case == "empty list" else tmp_path / "nowhere"
    assert run(synthetic_root, checkpoints, listing, image_dir, tmp_path / "out") == 2
    assert ("lists no image" if case == "empty list" else "--imagepath") in caplog.text


SLOW_IMPORT = """
import importlib.abc, sys, time
class Slow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == {module!r}:
            print("importing", flush=True)
            time.sleep(60)
        return None
sys.meta_path.insert(0, Slow())
"""


@pytest.mark.parametrize(("script", "module"), [("test.py", "ofer.inference.cli"), ("trainIdGen.py", "ofer.train.cli")])
def test_sigterm_while_the_command_imports_exits_as_interrupted(tmp_path, script, module):
    """A job stopped during start-up (here: while its command module imports) says so and exits 130, not 143."""
    (tmp_path / "sitecustomize.py").write_text(SLOW_IMPORT.format(module=module))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO / "src")])}
    proc = subprocess.Popen([sys.executable, str(REPO / script)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "importing"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "interrupted while starting; nothing was done" in err


def test_meshes_as_obj_or_both_read_back_the_same(flame, tmp_path):
    out = tmp_path / "out"
    write(out, "a", flame, num_saved=2, mesh_format="both")
    for k in range(2):
        ply, obj = (read_mesh(out / "flamesample" / f"a_0_{k}{suffix}") for suffix in (".ply", ".obj"))
        np.testing.assert_allclose(obj[0], ply[0], atol=1e-6) and np.testing.assert_array_equal(obj[1], ply[1])
    assert [p.name for p in find_samples(out, "a")] == ["a_0_0.ply", "a_0_1.ply"]  # one mesh per sample
    write(out, "a", flame, num_saved=2, mesh_format="obj")  # an overwrite removes the other format's files
    assert sorted(p.name for p in (out / "flamesample").iterdir()) == ["a_0_0.obj", "a_0_1.obj"]
    assert [p.name for p in find_samples(out, "a")] == ["a_0_0.obj", "a_0_1.obj"]
    assert (out / "shapesample" / "a_0.obj").is_file() and not (out / "shapesample" / "a_0.ply").exists()


def test_a_list_saved_with_a_byte_order_mark_reads_as_without(tmp_path):
    (tmp_path / "list.txt").write_bytes(b"\xef\xbb\xbfa.jpg\r\nb\r\n")  # as Windows editors save UTF-8
    assert [name for name, _ in read_list(tmp_path / "list.txt", tmp_path)] == ["a", "b"]
