"""report.html: one self-contained file (every image inside it, loadable), with what a reader needs."""

from __future__ import annotations

import base64
import io
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import PROMPT, simulate_argv


class Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.svgs = 0
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag == "svg":
            self.svgs += 1
        for key in ("href", "src"):
            if key in attrs and tag != "img":
                self.links.append(attrs[key])

    def handle_data(self, data):
        self.text.append(data)


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def decoded(uri: str) -> Image.Image:
    assert uri.startswith("data:image/"), uri[:40]
    header, payload = uri.split(",", 1)
    assert header.endswith(";base64")
    img = Image.open(io.BytesIO(base64.b64decode(payload)))
    img.load()
    return img


@pytest.fixture
def run(cli, tiny_model, inputs, tmp_path) -> Path:
    out = tmp_path / "run"
    argv = simulate_argv(inputs["image"], out, model=tiny_model, mask=inputs["mask"], steps=3, seed=11)
    assert cli(*argv).exit_code == 0
    return out


def test_the_report_holds_everything_and_references_nothing_outside(cli, run):
    result = cli("evaluate", run, "--classifier", "demo")
    assert result.exit_code == 0, result.output
    assert str(run / "report.html") in result.stderr
    page = parse(run / "report.html")
    text = " ".join(page.text)
    assert "SYNTHETIC - research simulation" in text and "not a diagnosis" in text
    assert PROMPT in text and "11" in text  # the prompt and the seed
    assert "Pace (severity):" in text  # the evaluation's sentence
    assert page.links == []  # no stylesheet, script or link to anything
    images = [decoded(uri) for uri in page.images]
    gifs = [img for img in images if img.format == "GIF"]
    assert len(gifs) == 1 and gifs[0].n_frames == 4  # the progression GIF, every frame
    assert sum(img.format == "PNG" and img.size == (64, 64) for img in images) == 4  # frames 0-3
    # Vector curves (matplotlib, the `report` extra, is in the dev set): change, PSNR, drift outside,
    # severity, confidence; without matplotlib (make test-min) the same five curves as PNG.
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert page.svgs == 0
    else:
        assert page.svgs == 5
    html = (run / "report.html").read_text()
    assert "PSNR vs frame 0 (dB)" in html and "expected grade (0-3)" in html
    assert "Drift outside the mask" in html and "dilated by 5 px excluded" in html


def test_without_matplotlib_the_curves_are_png(cli, run, monkeypatch):
    import pie_cli.evaluation.html as report_html

    monkeypatch.setattr(report_html, "has_matplotlib", lambda: False)
    assert cli("evaluate", run, "--classifier", "demo").exit_code == 0
    page = parse(run / "report.html")
    assert page.svgs == 0
    charts = [decoded(uri) for uri in page.images if decoded(uri).size == (300, 170)]
    assert len(charts) == 5


def test_a_trajectory_run_report_shows_the_grid(cli, tiny_model, inputs, tmp_path):
    out = tmp_path / "run"
    argv = simulate_argv(inputs["image"], out, "-k", "2", model=tiny_model, mask=inputs["mask"], steps=2)
    assert cli(*argv).exit_code == 0
    assert cli("evaluate", out).exit_code == 0
    page = parse(out / "report.html")
    assert "Mean +- sd over trajectories" in " ".join(page.text)
    grid = Image.open(out / "report.png")
    assert any(decoded(uri).size == grid.size for uri in page.images)  # the K x N grid with its spread row


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs headless Chromium on PATH")
def test_headless_chromium_loads_every_image(cli, run, tmp_path):
    """Open the report in a real browser: every <img> decoded (complete, natural width > 0)."""
    assert cli("evaluate", run, "--classifier", "demo").exit_code == 0
    probe = tmp_path / "probe.html"
    check = (
        "<script>window.addEventListener('load',()=>{const i=[...document.images];"
        "const bad=i.filter(x=>!(x.complete&&x.naturalWidth>0)).length;"
        "document.body.setAttribute('data-images',i.length+' loaded '+(i.length-bad));});</script>"
    )
    probe.write_text((run / "report.html").read_text().replace("</body>", check + "</body>"))
    done = subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=5000",
            "--dump-dom",
            probe.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    count = len(parse(run / "report.html").images)
    assert f'data-images="{count} loaded {count}"' in done.stdout, done.stderr[-2000:]
