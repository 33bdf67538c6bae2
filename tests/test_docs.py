"""The tutorial as a reader meets it: saved outputs, their size, the site and the README.

Nothing here re-renders a notebook: `python tools/docs.py refresh` does that, by hand, and these tests check what it
left in the committed notebooks.
"""
import base64, json, re, subprocess, sys, time
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT / "nbs"
sys.path.insert(0, str(ROOT / "tools"))
import docs  # noqa: E402

LESSONS = [f"{i:02d}_" for i in range(1, 14)] + ["15_"]   # the lesson chapters that must show a saved figure
MB = 1_000_000

def _nb(prefix):
    hits = [p for p in docs.chapters() if p.name.startswith(prefix)]
    assert len(hits) == 1, f"expected one notebook starting with {prefix} in {NBS}, found {hits}"
    return hits[0]

def _pngs(path):
    nb = json.loads(path.read_text())
    return [o["data"]["image/png"] for c in nb["cells"] if c["cell_type"] == "code"
            for o in c.get("outputs", []) if "image/png" in o.get("data", {})]

@pytest.mark.parametrize("prefix", LESSONS)
def test_lesson_has_a_saved_figure(prefix):
    pngs = _pngs(_nb(prefix))
    assert pngs, f"{_nb(prefix).name} has no saved image/png output: run python tools/docs.py refresh {prefix.rstrip('_')}"
    for p in pngs: assert base64.b64decode(p)[:8] == b"\x89PNG\r\n\x1a\n"

def test_notebook_sizes():
    sizes = {p.name: p.stat().st_size for p in docs.chapters()}
    big = {n: s for n, s in sizes.items() if s > 3 * MB}
    assert not big, f"notebooks over 3 MB: {big}"
    assert sum(sizes.values()) <= 20 * MB, f"notebooks together hold {sum(sizes.values()) / MB:.1f} MB, over 20 MB"

def test_no_plotly_json_or_widgets_saved():
    for p in docs.chapters():
        nb = json.loads(p.read_text())
        assert "widgets" not in nb.get("metadata", {}), f"{p.name} carries widget state"
        for c in nb["cells"]:
            for o in c.get("outputs", []):
                bad = {docs.PLOTLY, docs.WIDGET} & set(o.get("data", {}))
                assert not bad, f"{p.name} saved {bad}: run python tools/docs.py refresh {p.stem}"

def test_clean_outputs_keeps_text_and_turns_figures_into_placeholders():
    figs = []
    outs = [{"output_type": "stream", "name": "stderr", "text": "10%|#   |\r"},
            {"output_type": "stream", "name": "stdout", "text": "step 1\rstep 2\nloss 0.5\n"},
            {"output_type": "display_data", "data": {docs.WIDGET: {"model_id": "x"}, "text/plain": "VBox()"}},
            {"output_type": "display_data", "data": {docs.PLOTLY: {"data": [], "layout": {}}, "text/html": "<div>"}},
            {"output_type": "execute_result", "data": {"text/plain": ["0.25"]}}]
    kept = docs._clean_outputs(outs, figs)
    assert [o["output_type"] for o in kept] == ["stream", "display_data", "execute_result"]
    assert kept[0]["text"] == "step 2\nloss 0.5\n"        # the \r-redrawn line keeps its last state
    assert kept[1]["data"]["image/png"] == 0 and figs == [{"data": [], "layout": {}}]
    assert kept[2]["data"]["text/plain"] == "0.25"

def test_readme_agrees_with_index():
    assert (ROOT / "README.md").read_text() == docs.readme_text(), \
        "README.md differs from nbs/index.ipynb: edit the notebook, then run python tools/docs.py readme"

def test_front_door():
    readme = (ROOT / "README.md").read_text()
    strip = NBS / "images" / "demo_frames.png"
    assert strip.exists() and strip.stat().st_size < 300_000
    assert readme.index("nbs/images/demo_frames.png") < readme.index("01_puppet")
    secs = json.loads(docs.MINUTES.read_text())["minutes"]
    for p in docs.chapters():
        if p.stem == "index": continue
        assert p.stem in secs, f"no run time measured for {p.stem}"
        row = next((l for l in readme.splitlines() if l.startswith(f"| [`{p.stem}`]")), None)
        assert row, f"README's chapters table has no row for {p.stem}"
        assert row.endswith(f"| {docs.minutes(secs[p.stem])} |"), f"{row!r}: run python tools/docs.py readme"

class _Links(HTMLParser):
    def __init__(self): super().__init__(); self.links = []
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "a" and a.get("href"): self.links.append(a["href"])
        if tag == "img" and a.get("src"): self.links.append(a["src"])

def test_site_builds_and_links(tmp_path):
    t0 = time.time()
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "docs.py"), "site", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    pages = {p.name for p in tmp_path.glob("*.html")}
    assert "index.html" in pages
    for p in docs.chapters(): assert f"{p.stem}.html" in pages or p.stem == "index"
    for mod in (ROOT / "omnihuman_nb").glob("[a-z]*.py"):
        assert (tmp_path / "api" / "omnihuman_nb" / f"{mod.stem}.html").exists(), f"no API page for {mod.stem}"
    page = (tmp_path / "01_puppet.html").read_text()
    assert "data:image/png;base64" in page, "the chapter page does not show its saved figures"
    # every local link on the chapter pages and the API index resolves to a file of the site
    for html in [tmp_path / n for n in pages] + [tmp_path / "api" / "omnihuman_nb.html"]:
        parser = _Links(); parser.feed(html.read_text())
        for href in parser.links:
            if re.match(r"^(https?:|mailto:|#|data:|javascript:)", href): continue
            target = (html.parent / href.split("#")[0]).resolve()
            assert target.exists(), f"{html.name} links to {href}, which the site does not hold"
    print(f"site built in {time.time() - t0:.0f} s")
