"""The HTML report of an output folder: what the index and the pages say, rebuilds, bad folders."""

import base64
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest

from conftest import REPORT_ODD_NAME
from ofer.inference.layout import UNCERTAINTY_FILES
from ofer.io import read_mesh
from ofer.report import build_report
from ofer.report.__main__ import main as report_main


class Page(HTMLParser):
    """The text, links (href, src) and table rows (lists of cell texts) of an HTML page, as a browser reads them."""

    def __init__(self, path: Path):
        super().__init__(convert_charrefs=True)
        self.text, self.links, self.rows, self._row, self._cell = [], [], [], None, None
        self.feed(path.read_text(encoding="utf-8"))

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.links += [attrs[k] for k in ("href", "src") if k in attrs]
        if tag == "tr":
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(" ".join(t for t in self._cell if t))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data.strip())

    def row(self, first: str, column: int = 0) -> str:
        """The text of the row whose cell `column` is `first`."""
        return " | ".join(next(r for r in self.rows if len(r) > column and r[column] == first))


def image_data(report: Path, name: str) -> dict:
    """The OFER_IMAGE object a page's data script sets."""
    text = (report / "images" / f"{name}.data.js").read_text()
    return json.loads(re.fullmatch(r"window\.OFER_IMAGE = (.*);\n", text, re.DOTALL).group(1))


def floats(data: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(data), dtype="<f4")


@pytest.fixture
def folder(report_outputs, tmp_path) -> Path:
    """A copy of the fixture's output folder that a test may change."""
    shutil.copytree(report_outputs, tmp_path / "out")
    return tmp_path / "out"


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_index_lists_every_image_with_status_and_a_working_page(folder):
    index = build_report(folder)
    assert index == folder / "report" / "index.html"
    page = Page(index)
    info = summary(folder)
    names = info["reconstructed"] + list(info["failed"])
    assert len(names) == 5 and REPORT_ODD_NAME in names
    for name in names:
        assert ("failed" if name in info["failed"] else "reconstructed") in page.row(name, 1)
    for link in page.links:  # every link and picture of the index exists
        assert (index.parent / unquote(link)).resolve().exists(), link
    for name in info["reconstructed"]:
        html = folder / "report" / "images" / f"{name}.html"
        assert f"images/{name}.html" in [unquote(link) for link in page.links]
        for link in Page(html).links:
            assert (html.parent / unquote(link)).resolve().exists(), (name, link)
        data = image_data(folder / "report", name)
        # The viewer gets the saved meshes: the ranked neutral shape, then the expression samples in order.
        neutral, faces = read_mesh(folder / "shapesample" / f"{name}_0.ply")
        assert [m["label"] for m in data["meshes"]] == ["ranked neutral shape"] + [f"expression sample {k}" for k in range(4)]
        np.testing.assert_array_equal(floats(data["meshes"][0]["positions"]), neutral.astype(np.float32).ravel())
        sample = read_mesh(folder / "flamesample" / f"{name}_0_3.ply")[0]
        np.testing.assert_array_equal(floats(data["meshes"][4]["positions"]), sample.astype(np.float32).ravel())
        spreads = np.load(folder / name / "uncertainty.npz")
        np.testing.assert_array_equal(floats(data["spreads"]["shape"]), spreads["shape_spread_mm"])
        assert data["faces"] is None  # shared once per run:
    run = json.loads(re.fullmatch(r"window\.OFER_RUN = (.*);\n", (folder / "report" / "assets" / "run_data.js")
                                  .read_text(), re.DOTALL).group(1))
    shared = np.frombuffer(base64.b64decode(run["faces"]["data"]), dtype="<u2").reshape(-1, 3)
    assert np.array_equal(shared, faces)
    assert (folder / "report" / "assets" / "viewer.min.js").read_bytes().startswith(b"/*! three.js 0.187.0")


def test_a_failed_image_appears_with_its_reason(folder):
    reason = summary(folder)["failed"]["broken"]
    assert "broken.npy" in reason
    page = Page(build_report(folder))
    row = page.row("broken", 1)
    assert "failed" in row and reason in row
    broken = Page(folder / "report" / "images" / "broken.html")
    assert reason in " ".join(broken.text)
    assert image_data(folder / "report", "broken")["meshes"] == []


def test_html_special_characters_in_names_are_escaped(folder):
    index = build_report(folder)
    raw = index.read_text()
    assert "<b>" not in raw and "&lt;b&gt;&amp;&quot;it&#x27;s&quot;" in raw
    page = Page(index)
    assert REPORT_ODD_NAME in " ".join(page.text)  # what a browser shows is the name itself
    html = index.parent / "images" / f"{REPORT_ODD_NAME}.html"
    assert html.is_file() and f"images/{REPORT_ODD_NAME}.html" in [unquote(link) for link in page.links]
    odd = Page(html)
    assert "<b>" not in html.read_text() and REPORT_ODD_NAME in " ".join(odd.text)
    assert image_data(index.parent, REPORT_ODD_NAME)["name"] == REPORT_ODD_NAME


def test_rebuilding_gives_identical_files(folder, tmp_path, monkeypatch):
    def snapshot(report: Path) -> dict[str, bytes]:
        return {p.relative_to(report).as_posix(): p.read_bytes() for p in sorted(report.rglob("*")) if p.is_file()}

    first = snapshot(build_report(folder).parent)
    (folder / "report" / "images" / "stale.html").write_text("from an older report")
    monkeypatch.chdir(tmp_path)  # another working directory, a relative path
    second = snapshot(build_report(Path("out")).parent)
    assert first == second
    assert len(first) == 1 + 4 + 2 * 5  # the index, the assets, and a page and its data per image
    assert not list(folder.glob(".report-*"))  # no work folder left behind


def test_a_folder_made_before_the_spread_maps_still_gives_the_viewer_its_meshes(folder):
    for name in summary(folder)["reconstructed"]:
        for file in UNCERTAINTY_FILES:
            (folder / name / file).unlink()
    index = build_report(folder)
    name = summary(folder)["reconstructed"][0]
    data = image_data(index.parent, name)
    assert len(data["meshes"]) == 5 and data["spreads"] == {"shape": None, "expression": None}
    page = Page(index.parent / "images" / f"{name}.html")
    assert page.row(f"{name}/uncertainty.npz", 1).endswith("missing")
    assert "scores.png: missing" in " ".join(page.text)


def test_missing_and_corrupt_files_are_shown_as_missing_never_raised(folder):
    a, b, c = summary(folder)["reconstructed"][:3]
    (folder / "shapesample" / f"{a}_0.ply").write_bytes(b"ply\ngarbage")
    (folder / "flamesample" / f"{a}_0_2.ply").unlink()
    ply = folder / "flamesample" / f"{a}_0_3.ply"
    ply.write_bytes(ply.read_bytes()[:500])  # truncated
    (folder / b / "uncertainty.npz").write_bytes(b"PK\x03\x04 not a zip")
    (folder / b / "overlay.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (folder / c / "done.json").write_text("{not json")
    np.savez(folder / c / "uncertainty.npz", shape_spread_mm=np.zeros(3), expression_spread_mm=np.zeros(3))
    (folder / "summary.json").write_text('{"reconstructed": 7, "failed": ["x"], "settings": [1]}')
    index = build_report(folder)
    report = index.parent
    data = image_data(report, a)
    assert [m["label"] for m in data["meshes"]] == ["expression sample 0", "expression sample 1"]
    page_a = Page(report / "images" / f"{a}.html")
    assert "| unreadable: " in page_a.row(f"shapesample/{a}_0.ply", 1)
    assert page_a.row(f"flamesample/{a}_0_2.ply", 1).endswith("| missing")
    assert "| unreadable: " in page_a.row(f"flamesample/{a}_0_3.ply", 1)
    page_b = Page(report / "images" / f"{b}.html")
    assert image_data(report, b)["spreads"] == {"shape": None, "expression": None}
    assert "overlay.png: unreadable" in " ".join(page_b.text)
    assert len(image_data(report, b)["meshes"]) == 5
    assert image_data(report, c)["spreads"] == {"shape": None, "expression": None}  # 3 values for a bigger mesh
    assert "| unreadable: " in Page(report / "images" / f"{c}.html").row(f"{c}/uncertainty.npz", 1)
    # summary.json's wrongly typed entries are ignored; the images are still found from their done markers.
    page = Page(index)
    assert all(page.row(name, 1) for name in (a, b, c)) and "failed" in page.row("x", 1)


def test_an_unreadable_summary_is_reported_and_the_images_are_found(folder):
    names = summary(folder)["reconstructed"]
    (folder / "summary.json").write_text("{truncated")
    page = Page(build_report(folder))
    assert "summary.json: unreadable" in " ".join(page.text)
    for name in names:
        assert "outputs found" in page.row(name, 1)


def test_command_line(folder, tmp_path, capsys):
    assert report_main([str(folder)]) == 0
    assert capsys.readouterr().out.strip() == f"report: {folder / 'report' / 'index.html'}"
    assert report_main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert "nowhere" in err and "not a folder" in err and len(err.splitlines()) == 1


def test_an_image_named_report_keeps_its_files(folder):
    """test.py refuses such a list entry; a folder written by other code may still hold one."""
    shutil.rmtree(folder / "report")  # test.py's own report of the fixture's run
    (folder / "report").mkdir()
    (folder / "report" / "done.json").write_text(json.dumps({"name": "report"}))
    index = build_report(folder)
    assert index == folder / "ofer_report" / "index.html"
    assert (folder / "report" / "done.json").is_file()
    assert "outputs found" in Page(index).row("report", 1)
