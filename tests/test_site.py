"""The course as a web site (tools/build_site.py), built for a few fast chapters and
opened in a real browser.

The build runs 00, 01 and 02 with --quick into a temporary folder, as a learner's
`python tools/build_site.py --quick` would run all of them. The pages must link up (the
course map to every chapter and diff), show every figure from a PNG file next to the
page, name nothing on the network, and carry no traceback. Headless Chromium then
opens the course map, a chapter page and a diff page from disk, behind a proxy that
refuses everything, and reports from inside the page what it loaded: every image
decoded, and every resource a file:// one.

Chromium is Debian's `chromium` package (.ci/run installs it where it is missing).
Without it, the browser tests fail and say how to install it: a site test that quietly
passed without a browser would prove nothing about how the pages render.
"""
import importlib.util
import json
import shutil
import struct
import subprocess
import sys
import zlib
from html.parser import HTMLParser

import pytest

from conftest import ROOT, has_matplotlib

pytest.importorskip("jupytext", reason="the README's set-up installs jupytext")
pytest.importorskip("nbclient", reason="the README's set-up installs nbclient")

BUILDER = ROOT / "tools" / "build_site.py"
CHAPTERS = ["00_intro", "01_linalg", "02_linreg"]


def load_builder():
    spec = importlib.util.spec_from_file_location("build_site", BUILDER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The site for CHAPTERS, built once for this module's tests."""
    out = tmp_path_factory.mktemp("site")
    completed = subprocess.run(
        [sys.executable, str(BUILDER), "--quick", "--chapters", ",".join(CHAPTERS),
         "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "wrote 6 pages" in completed.stdout, completed.stdout
    return out


class Elements(HTMLParser):
    """Every start tag of a page, with its attributes, and the text of its <style>s."""

    def __init__(self):
        super().__init__()
        self.tags, self.styles, self._in_style = [], [], False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_style = tag == "style"

    def handle_endtag(self, tag):
        self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.styles.append(data)


def elements(path):
    parser = Elements()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def png_size(path):
    """(width, height) of a PNG file, after checking it is one: the signature, an IHDR
    first, every chunk's CRC, image data that inflates, and an IEND last."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    position, kinds, pixels = 8, [], b""
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        body = data[position + 8:position + 8 + length]
        (crc,) = struct.unpack(">I", data[position + 8 + length:position + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"{path}: bad CRC in {kind!r}"
        kinds.append(kind)
        if kind == b"IDAT":
            pixels += body
        position += 12 + length
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND", (path, kinds)
    assert zlib.decompress(pixels), path
    return struct.unpack(">II", data[16:24])


def test_each_chapter_is_diffed_against_the_one_it_builds_on():
    builder = load_builder()
    names = builder.all_chapters()
    bases = {name: builder.diff_base(name, names) for name in names}
    assert bases["00_intro"] is None
    assert bases["01_linalg"] == "00_intro"
    assert bases["04b_cnn"] == "04_classify" and bases["05b_gru"] == "05_rnn"
    assert bases["05_rnn"] == "04_classify" and bases["06_autograd"] == "05_rnn"
    assert bases["13_gpt"] == "12_triton"
    assert sum(base is not None for base in bases.values()) == len(names) - 1 == 15
    # Course order: an optional chapter straight after the one it extends.
    assert names.index("04b_cnn") == names.index("04_classify") + 1
    assert builder.select("00,02_linreg", names) == ["00_intro", "02_linreg"]


def test_the_course_map_links_every_chapter_and_diff(site):
    links = {attrs.get("href") for tag, attrs in elements(site / "index.html").tags if tag == "a"}
    for name in CHAPTERS:
        assert f"{name}.html" in links, links
    assert {"diff_00_01.html", "diff_01_02.html"} <= links, links
    text = (site / "index.html").read_text(encoding="utf-8")
    assert "Linear regression by gradient descent" in text     # 02's docstring title
    assert "test_mae" in text                                  # 02's summary figures
    for page in site.glob("*.html"):
        for tag, attrs in elements(page).tags:
            target = attrs.get("href", "") if tag == "a" else ""
            if target and not target.startswith("#"):
                assert (site / target.split("#")[0]).is_file(), (page.name, target)


def test_a_chapter_page_has_prose_code_output_and_figures(site):
    page = (site / "02_linreg.html").read_text(encoding="utf-8")
    assert "<h2" in page and "<li>" in page and "<code>" in page      # formatted prose
    assert 'class="highlight"' in page and '<span class="k">def</span>' in page  # Pygments
    assert 'class="output stdout"' in page and "summary: {" in page   # printed output
    assert '<a href="01_linalg.html" rel="prev">' in page                  # the way back
    diff = (site / "diff_01_02.html").read_text(encoding="utf-8")
    assert 'class="add"' in diff and 'class="del"' in diff and "+++ 02_linreg.py" in diff


def test_every_image_is_a_png_next_to_its_page(site):
    images = [(page, attrs["src"]) for page in site.glob("*.html")
              for tag, attrs in elements(page).tags if tag == "img"]
    if has_matplotlib():
        assert len(images) >= 3, images
    for page, src in images:
        width, height = png_size(site / src)
        assert width > 50 and height > 50, (page.name, src, width, height)


def test_no_page_names_the_network_or_shows_a_traceback(site):
    for page in site.glob("*.html"):
        parsed = elements(page)
        for tag, attrs in parsed.tags:
            assert tag not in ("script", "iframe", "object", "embed"), (page.name, tag)
            for name in ("src", "srcset", "poster", "data") + (("href",) if tag != "a" else ()):
                value = (attrs.get(name) or "").strip().lower()
                assert not value.startswith(("http:", "https:", "//")), (page.name, tag, value)
        for style in parsed.styles:
            assert "@import" not in style and "url(" not in style, page.name
        assert "Traceback (most recent call last)" not in page.read_text(encoding="utf-8"), page.name


def chromium():
    found = next(filter(None, map(shutil.which, ["chromium", "chromium-browser",
                                                 "google-chrome", "google-chrome-stable"])), None)
    if found is None:
        pytest.fail("headless Chromium is needed to test the site in a browser and is not "
                    "installed: apt-get install chromium (.ci/run does this where it can)")
    return found


# Runs in a copy of the page the test makes (the site itself has no script): once the
# page and its images have loaded, it writes what the browser got into the DOM that
# --dump-dom prints.
PROBE = """<script>
window.addEventListener("load", () => {
  document.documentElement.setAttribute("data-probe", JSON.stringify({
    images: Array.from(document.images).map(image => ({src: image.getAttribute("src"),
      complete: image.complete, width: image.naturalWidth})),
    resources: performance.getEntriesByType("resource").map(entry => entry.name),
    headings: Array.from(document.querySelectorAll("h1, h2")).map(h => h.textContent),
    links: document.links.length}));
});
</script>"""


def browse(site, page, tmp_path):
    """Open `page` in headless Chromium, behind a proxy that refuses every connection,
    and return what the probe saw."""
    probe = site / f"probe-{page}"
    probe.write_text((site / page).read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"),
                     encoding="utf-8")
    try:
        completed = subprocess.run(
            [chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run",
             "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
             f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=10000",
             "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    finally:
        probe.unlink()
    assert completed.returncode == 0, completed.stderr[-2000:]
    root = next((attrs for tag, attrs in start_tags(completed.stdout) if tag == "html"), {})
    assert "data-probe" in root, ("the page's load event never ran", completed.stdout[:500])
    return json.loads(root["data-probe"])


def start_tags(text):
    """The start tags of an HTML text (what Chromium printed)."""
    parser = Elements()
    parser.feed(text)
    return parser.tags


@pytest.mark.parametrize("page, heading", [("index.html", "Zero to GPT"),
                                           ("02_linreg.html", "Linear regression"),
                                           ("diff_01_02.html", "From 01_linalg to 02_linreg")])
def test_chromium_renders_the_pages_offline(site, tmp_path, page, heading):
    seen = browse(site, page, tmp_path)
    assert any(text.startswith(heading) for text in seen["headings"]), seen["headings"]
    assert seen["links"] >= 2, seen
    for image in seen["images"]:
        assert image["complete"] and image["width"] > 0, (page, image)
    if page == "02_linreg.html" and has_matplotlib():
        assert len(seen["images"]) >= 2, seen["images"]
    assert all(name.startswith("file:") for name in seen["resources"]), seen["resources"]


def test_chromium_screenshots_a_chapter_page(site, tmp_path):
    shot = tmp_path / "page.png"
    completed = subprocess.run(
        [chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run",
         "--proxy-server=127.0.0.1:9", f"--user-data-dir={tmp_path / 'chromium-profile'}",
         "--window-size=1200,1600", f"--screenshot={shot}", (site / "01_linalg.html").as_uri()],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert png_size(shot) == (1200, 1600)


def test_a_failing_chapter_fails_the_build_in_one_line(tmp_path, monkeypatch, capsys):
    builder = load_builder()
    course = tmp_path / "course"
    course.mkdir()
    shutil.copy(ROOT / "00_intro.py", course)
    (course / "01_broken.py").write_text(
        '"""A chapter that breaks."""\n\n# %% [markdown]\n# ## Trouble\n\n'
        '# %%\nprint("about to fail")\n\n# %%\nraise ValueError("the weather table is empty")\n')
    monkeypatch.setattr(builder, "ROOT", course)
    out = tmp_path / "site"
    assert builder.main(["--quick", "--out", str(out)]) == 1
    message = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert message == ["error: 01_broken failed: ValueError: the weather table is empty"], message
    assert not out.exists() or not list(out.glob("*.html")), "a failed build published pages"
