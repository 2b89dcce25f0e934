"""One bad photo never ends a preprocessing run: each is refused with its reason, the report is always written."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data

import ofer
from ofer.io import InputError
from ofer.preprocess import ARCFACE_TEMPLATE, batch, cli, main, run

# A face in a 96×96 synthetic photo: the ArcFace template, scaled and placed inside it.
KPS = ARCFACE_TEMPLATE * 0.6 + 14.0


def _photo(path: Path, seed: int = 0, size: int = 96) -> Path:
    rng = np.random.default_rng(seed)
    cv2.imwrite(str(path), rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8))
    return path


def _keypoints(path: Path, entries: dict) -> Path:
    path.write_text(json.dumps({name: {"kps": np.asarray(kps).tolist(), **extra} for name, (kps, extra) in entries.items()}))
    return path


def _report(out: Path) -> dict:
    return json.loads((out / "preprocess_report.json").read_text())


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header says width × height (RGB) but whose pixel data is a few bytes: small on disk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_huge_photo_first_is_refused_from_its_header_and_the_run_goes_on(tmp_path, monkeypatch):
    photos = tmp_path / "photos"
    photos.mkdir()
    _png_header_only(photos / "a_huge.png", 40000, 40000)
    astronaut = cv2.resize(skimage.data.astronaut()[:, :, ::-1], (256, 256), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(photos / "b_astronaut.png"), astronaut)
    decoded = []  # sizes of the files OpenCV was asked to decode
    imdecode = cv2.imdecode
    monkeypatch.setattr(cv2, "imdecode", lambda data, flags: decoded.append(data.size) or imdecode(data, flags))
    out = tmp_path / "crops"

    assert main(["--input", str(photos), "--out", str(out)]) == 1  # default detector (MTCNN)

    report = _report(out)
    assert [item["name"] for item in report["processed"]] == ["b_astronaut"]
    (failed,) = report["failed"]
    assert failed["image"].endswith("a_huge.png")
    assert "a_huge.png: image is too large" in failed["reason"] and "1600000000 pixels" in failed["reason"]
    assert decoded == [(photos / "b_astronaut.png").stat().st_size]  # the huge one was never decoded
    assert (out / "list.txt").read_text() == "b_astronaut\n"

    # The limit is a setting: a 96×96 photo is refused under a 0.005-megapixel limit.
    _photo(tmp_path / "small.png")
    kps = _keypoints(tmp_path / "k.json", {"small": (KPS, {})})
    assert main(["--input", str(tmp_path / "small.png"), "--out", str(tmp_path / "o2"), "--keypoints", str(kps),
                 "--max-megapixels", "0.005"]) == 1
    reason = _report(tmp_path / "o2")["failed"][0]["reason"]
    assert reason.endswith("small.png: 96×96 image (0 megapixels) is larger than the 0.005-megapixel limit; "
                           "downscale it first")


def test_faces_off_the_photo_are_refused_with_the_reason(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("inside", "kps_outside", "box_outside"):
        _photo(photos / f"{name}.png")
    kps = _keypoints(tmp_path / "k.json", {
        "inside": (KPS, {}),
        "kps_outside": (KPS + [40.0, 0.0], {}),  # right eye and right mouth corner past the right edge
        "box_outside": (KPS, {"box": [300.0, 300.0, 380.0, 400.0]}),  # the FaRL square lies off the photo
    })
    out = tmp_path / "crops"

    assert main(["--input", str(photos), "--out", str(out), "--keypoints", str(kps)]) == 1

    report = _report(out)
    assert [item["name"] for item in report["processed"]] == ["inside"]
    reasons = {Path(item["image"]).stem: item["reason"] for item in report["failed"]}
    assert reasons["kps_outside"].startswith("keypoints outside the 96×96 photo: right eye at (")
    assert "left eye" not in reasons["kps_outside"] and "right mouth corner" in reasons["kps_outside"]
    assert "224 FaRL crop lies 100% outside the 96×96 photo" in reasons["box_outside"]
    assert sorted(p.name for p in out.iterdir()) == ["inside.jpg", "inside.npy", "list.txt", "preprocess_report.json"]


class _Detector:
    """A stand-in detector: raises `error` on the photo made with seed 1, finds KPS elsewhere."""

    name = "stub"

    def __init__(self, error: BaseException):
        self.error, self.calls = error, 0

    def detect(self, image):
        self.calls += 1
        if image[0, 0].tolist() == _first_pixel(1):
            raise self.error
        box = np.array([[10.0, 10.0, 80.0, 90.0]])
        return box, np.array([0.99]), KPS[None].astype(np.float64)


def _first_pixel(seed: int) -> list:
    return np.random.default_rng(seed).integers(0, 256, size=(96, 96, 3), dtype=np.uint8)[0, 0].tolist()


def test_any_exception_is_that_photos_failure(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for seed in range(3):
        _photo(photos / f"p{seed}.png", seed)
    # Stale crops of an earlier run under the failing name must not survive as if they were new.
    out = tmp_path / "crops"
    out.mkdir()
    (out / "p1.jpg").write_bytes(b"old")
    (out / "p1.npy").write_bytes(b"old")

    report = run(photos, out, detector=_Detector(cv2.error("OpenCV(5.0) resize: out of memory")))

    assert [item["name"] for item in report["processed"]] == ["p0", "p2"]
    assert report["failed"] == [{"image": str(photos / "p1.png"), "reason": "error: OpenCV(5.0) resize: out of memory"}]
    assert report["detector"] == "stub" and report["interrupted"] is False and report["not_attempted"] == 0
    assert not (out / "p1.jpg").exists() and not (out / "p1.npy").exists()
    assert _report(out) == report


def test_interrupted_run_still_writes_its_report(tmp_path, monkeypatch):
    photos = tmp_path / "photos"
    photos.mkdir()
    for seed in range(3):
        _photo(photos / f"p{seed}.png", seed)
    out = tmp_path / "crops"

    with pytest.raises(KeyboardInterrupt):
        run(photos, out, detector=_Detector(KeyboardInterrupt()))

    report = _report(out)
    assert report["interrupted"] is True and report["not_attempted"] == 2  # p1 (interrupted) and p2
    assert [item["name"] for item in report["processed"]] == ["p0"] and report["failed"] == []
    assert (out / "list.txt").read_text() == "p0\n"

    # Interrupted between a photo's two files: the half-written photo leaves nothing behind.
    def interrupt(path, image):
        raise KeyboardInterrupt

    monkeypatch.setattr(batch, "write_image", interrupt)  # called after the .npy is saved
    with pytest.raises(KeyboardInterrupt):
        run(photos / "p2.png", tmp_path / "half", detector=_Detector(RuntimeError("unused")))
    assert sorted(p.name for p in (tmp_path / "half").iterdir()) == ["list.txt", "preprocess_report.json"]
    monkeypatch.undo()

    # The command line says so with exit status 130.
    monkeypatch.setattr(cli, "make_detector", lambda *args: _Detector(KeyboardInterrupt()))
    assert main(["--input", str(photos), "--out", str(tmp_path / "again")]) == 130
    assert _report(tmp_path / "again")["interrupted"] is True


def test_output_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path):
    _photo(tmp_path / "p1.png", 1)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    detector = _Detector(RuntimeError("never called"))

    refused = f"output folder {blocker / 'crops'}: {blocker} is a file, not a folder"
    with pytest.raises(InputError, match=re.escape(refused)):
        run(tmp_path / "p1.png", blocker / "crops", detector=detector)
    assert detector.calls == 0
    assert main(["--input", str(tmp_path / "p1.png"), "--out", str(blocker / "crops")]) == 2


# --------------------------------------------------------------------------- input files are never touched


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_input_files_are_never_written_replaced_or_deleted(tmp_path, caplog):
    photos = tmp_path / "photos"
    photos.mkdir()
    _photo(photos / "astro.jpg", 0)
    _photo(photos / "noface.jpg", 1)  # no keypoints for it: it fails, and a failed photo's crops are removed
    (photos / "list.txt").write_text("astro.jpg\nnoface.jpg\n")
    kps = _keypoints(tmp_path / "k.json", {"astro": (KPS, {})})
    elsewhere = tmp_path / "lists"
    elsewhere.mkdir()
    (elsewhere / "l.txt").write_text("../photos/astro.jpg\n")
    (tmp_path / "link").symlink_to(photos)
    crops = tmp_path / "crops"
    crops.mkdir()
    numbers = " ".join(f"{v:g}" for v in KPS.ravel())
    (crops / "list.txt").write_text(f"astro {numbers}\n")  # a keypoint file inside the output folder
    before, crops_before = _snapshot(photos), _snapshot(crops)

    refused = [
        ["--input", str(photos / "list.txt"), "--out", str(photos), "--keypoints", str(kps)],  # a list file
        ["--input", str(photos / "noface.jpg"), "--out", str(photos), "--keypoints", str(kps)],  # one photo
        ["--input", str(photos), "--out", str(photos), "--keypoints", str(kps)],  # a folder
        ["--input", str(elsewhere / "l.txt"), "--out", str(photos), "--keypoints", str(kps)],  # entries in the output
        ["--input", str(photos / "list.txt"), "--out", str(tmp_path / "link"), "--keypoints", str(kps)],  # via a link
        ["--input", str(photos), "--out", str(crops), "--keypoints", str(crops / "list.txt")],  # keypoints there
    ]
    for argv in refused:
        caplog.clear()
        assert main(argv) == 2, argv
        assert "the output folder holds input files" in caplog.text
        assert _snapshot(photos) == before and _snapshot(crops) == crops_before, argv
    with pytest.raises(InputError, match="holds input files"):
        run(photos / "list.txt", photos, keypoints=kps)
    assert _snapshot(photos) == before

    # An output folder inside the input folder holds no input: allowed, and the inputs stay as they were.
    assert main(["--input", str(photos), "--out", str(photos / "crops"), "--keypoints", str(kps)]) == 1
    assert _snapshot(photos) == before
    assert (photos / "crops" / "list.txt").read_text() == "astro\n"


# --------------------------------------------------------------------------- non-UTF-8 text files


def test_list_and_keypoint_files_not_in_utf8_name_the_file_and_line(tmp_path, caplog):
    _photo(tmp_path / "a.png")
    listing = tmp_path / "photos.txt"
    listing.write_bytes(b"a.png\n# caf\xe9 (Latin-1)\n")
    kps_txt = tmp_path / "k.txt"
    kps_txt.write_bytes(b"# keypoints\n\na " + " ".join(f"{v:g}" for v in KPS.ravel()).encode() + b" # \xff\n")
    kps_json = tmp_path / "k.json"
    kps_json.write_bytes(b'{"a": {"kps": %s},\n "\xe9": {"kps": []}}' % json.dumps(KPS.tolist()).encode())
    good_kps = _keypoints(tmp_path / "good.json", {"a": (KPS, {})})
    cases = [
        (["--input", str(listing), "--keypoints", str(good_kps)], f"{listing}, line 2: not UTF-8 text (byte 0xe9)"),
        (["--input", str(tmp_path / "a.png"), "--keypoints", str(kps_txt)], f"{kps_txt}, line 3: not UTF-8 text (byte 0xff)"),
        (["--input", str(tmp_path / "a.png"), "--keypoints", str(kps_json)], f"{kps_json}, line 2: not UTF-8 text"),
    ]
    for argv, message in cases:
        caplog.clear()
        assert main([*argv, "--out", str(tmp_path / "out")]) == 2
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and errors[0].startswith(message), errors


# --------------------------------------------------------------------------- SIGTERM acts as Ctrl-C


def _python(code: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter that imports this checkout's ofer."""
    src = str(Path(ofer.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code, *args], check=False, cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


# The third photo's detection sends SIGTERM to the process itself, as a scheduler stopping the job would.
_SIGTERM_ON_THIRD_PHOTO = """
import os, signal, sys
import numpy as np
from ofer.preprocess import ARCFACE_TEMPLATE, cli

class Detector:
    name, calls = "stub", 0

    def detect(self, image):
        self.calls += 1
        if self.calls == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return np.array([[10.0, 10.0, 80.0, 90.0]]), np.array([0.99]), (ARCFACE_TEMPLATE * 0.6 + 14.0)[None]

cli.make_detector = lambda *args: Detector()
sys.exit(cli.main(sys.argv[1:]))
"""

# SIGTERM as soon as numpy starts to load: during `python -m ofer.preprocess`'s start-up.
_SIGTERM_DURING_IMPORTS = """
import os, runpy, signal, sys

class SignalOnNumpy:
    def find_spec(self, name, path=None, target=None):
        if name == "numpy":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGTERM)
        return None

sys.meta_path.insert(0, SignalOnNumpy())
sys.argv = ["ofer.preprocess", *sys.argv[1:]]
runpy.run_module("ofer.preprocess", run_name="__main__", alter_sys=True)
"""


def test_sigterm_stops_like_ctrl_c_with_the_report_written(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for seed in range(5):
        _photo(photos / f"p{seed}.png", seed)
    out = tmp_path / "crops"

    done = _python(_SIGTERM_ON_THIRD_PHOTO, "--input", str(photos), "--out", str(out), cwd=tmp_path)

    assert done.returncode == 130, done.stderr
    assert "interrupted; the report lists what was done" in done.stderr
    report = _report(out)
    assert report["interrupted"] is True and report["not_attempted"] == 3  # p2 (interrupted), p3, p4
    assert [item["name"] for item in report["processed"]] == ["p0", "p1"]
    assert (out / "list.txt").read_text() == "p0\np1\n"
    assert sorted(p.name for p in out.iterdir()) == ["list.txt", "p0.jpg", "p0.npy", "p1.jpg", "p1.npy",
                                                     "preprocess_report.json"]

    early = _python(_SIGTERM_DURING_IMPORTS, "--input", str(photos), "--out", str(tmp_path / "early"), cwd=tmp_path)
    assert early.returncode == 130, early.stderr
    assert early.stderr.strip().splitlines()[-1] == "python -m ofer.preprocess: interrupted while starting; nothing was done"
    assert not (tmp_path / "early").exists()
