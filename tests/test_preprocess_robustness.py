"""One bad photo never ends a preprocessing run: each is refused with its reason, the report is always written."""

from __future__ import annotations

import json
import re
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data

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
