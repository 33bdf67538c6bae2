"""The tutorial as a reader meets it: saved outputs, a static site, the README.

    python tools/docs.py refresh [NOTEBOOK ...]   # re-run chapters, save their outputs (plotly figures as PNG)
    python tools/docs.py site [--out _site]       # static HTML: one page per chapter, an index, the API of each module
    python tools/docs.py readme [--check]         # write README.md from nbs/index.ipynb (--check: fail if they differ)
    python tools/docs.py strip [--demo DIR]       # nbs/images/demo_frames.png from the videos of `omnihuman demo`

`refresh` runs each notebook in its own process, the way the test runner does (tests/test_notebooks.py): cells flagged
with settings.ini's `tst_flags` (`slow`, `gpu`) are skipped, and the notebooks run at their default sizes. It keeps
text results (printed numbers, tables) and turns every plotly figure into a static PNG through kaleido, so a notebook
carries no plotly.js and no widget state. Widget outputs are dropped: the explorers stay live-only. stderr (progress
bars, warnings) is dropped. It needs kaleido and a Chromium (`pip install -e ".[docs]"`, `apt-get install chromium`).
It records the seconds each chapter took in nbs/results/chapter_seconds.json. CI never re-renders: it only checks
that the saved outputs are there (tests/test_docs.py).
"""
import argparse, base64, json, os, re, shutil, subprocess, sys, tempfile, time
from configparser import ConfigParser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT / "nbs"
MINUTES = NBS / "results" / "chapter_seconds.json"
PLOTLY = "application/vnd.plotly.v1+json"
WIDGET = "application/vnd.jupyter.widget-view+json"
MAX_TEXT = 20_000  # characters of one text output kept; longer ones are cut with a note

def chapters():
    "The notebooks in nbs/, in reading order."
    return sorted(p for p in NBS.glob("*.ipynb") if not p.name.startswith(("_", ".")))

def skip_flags():
    cfg = ConfigParser(delimiters=["="])
    cfg.read(ROOT / "settings.ini")
    return cfg["DEFAULT"].get("tst_flags", "").split()

def need_kaleido():
    "Fail with what to install when PNG export cannot work here."
    try: import kaleido  # noqa: F401
    except ImportError: sys.exit('refresh needs kaleido: pip install -e ".[docs]" (or pip install kaleido)')
    chrome = [shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome", "chrome")]
    if not any(chrome) and not os.environ.get("BROWSER_PATH"):
        sys.exit("refresh needs a Chromium for kaleido: apt-get install chromium (or set BROWSER_PATH to a Chrome)")

# ---- refresh: run one notebook (in a child process) -------------------------------------------------------------
# Figures leave the notebook as plotly JSON (the `plotly_mimetype` renderer, whatever renderer the chapter picks);
# the child then turns them into PNG in one kaleido session.
PREAMBLE = """
import plotly.io as _pio
for _name in ("notebook_connected", "notebook", "browser", "iframe", "iframe_connected"):
    _pio.renderers[_name] = _pio.renderers["plotly_mimetype"]
"""

def _text(x): return "".join(x) if isinstance(x, list) else str(x)

def _clean_outputs(outs, figs):
    "Keep text and images; plotly JSON becomes a placeholder filled with PNG later; drop widgets, stderr, scripts."
    kept = []
    for o in outs:
        o = dict(o)
        kind = o.get("output_type")
        if kind == "stream":
            if o.get("name") != "stdout": continue
            text = _text(o.get("text", ""))
            text = re.sub(r"[^\n]*\r", "", text)  # progress bars redraw with \r: keep the last state only
            if not text.strip(): continue
            if len(text) > MAX_TEXT: text = text[:MAX_TEXT] + f"\n... ({len(text) - MAX_TEXT} more characters not saved)\n"
            kept.append({"name": "stdout", "output_type": "stream", "text": text})
        elif kind in ("display_data", "execute_result"):
            data = dict(o.get("data", {}))
            if WIDGET in data: continue
            if PLOTLY in data:
                figs.append(data[PLOTLY])
                data = {"image/png": len(figs) - 1, "text/plain": "<plotly figure>"}
            else:
                data = {k: _text(v) for k, v in data.items()}
                if "<script" in data.get("text/html", ""): data.pop("text/html")
                for k in [k for k in data if k.startswith("application/")]: data.pop(k)
                if "text/plain" in data and len(data["text/plain"]) > MAX_TEXT:
                    data["text/plain"] = data["text/plain"][:MAX_TEXT] + "\n..."
                if not data: continue
            new = {"data": data, "metadata": {}, "output_type": kind}
            if kind == "execute_result": new["execution_count"] = None
            kept.append(new)
    return kept

def figures_to_png(figs):
    "PNG bytes for each plotly figure dict, in one kaleido session."
    if not figs: return []
    import plotly.io as pio, kaleido, warnings
    warnings.filterwarnings("ignore", message="The kopts argument")
    try: kaleido.start_sync_server(silence_warnings=True)
    except Exception: pass
    try: return [pio.to_image(f, format="png") for f in figs]
    finally:
        try: kaleido.stop_sync_server(silence_warnings=True)
        except Exception: pass

def run_one(nb_path, out_json):
    "Execute `nb_path` as the test runner does and write its cleaned outputs (cell index -> outputs) to `out_json`."
    from nbdev.test import test_nb  # noqa: F401  (sets up nbdev's processors the same way)
    from nbdev.process import NBProcessor
    from nbdev.frontmatter import FrontmatterProc
    from execnb.shell import CaptureShell
    from fastcore.xtras import working_directory
    nb_path = Path(nb_path).resolve()
    sys.path.insert(0, str(ROOT))
    os.environ["IN_TEST"] = "1"
    flags = set(skip_flags())
    nb = NBProcessor(nb_path, procs=FrontmatterProc, process=True).nb
    def _no_eval(cell):
        if cell.cell_type != "code": return True
        if "nbdev_export" + "(" in cell.source: return True
        direc = getattr(cell, "directives_", {}) or {}
        if direc.get("eval:", [""])[0].lower() == "false": return True
        return bool(flags & direc.keys())
    shell = CaptureShell(nb_path)
    t0 = time.time()
    with working_directory(nb_path.parent):
        shell.run(PREAMBLE)
        shell.run_all(nb, exc_stop=True, preproc=_no_eval)
    secs = time.time() - t0
    figs, outputs = [], {}
    for cell in nb.cells:
        if cell.cell_type == "code" and getattr(cell, "outputs", None):
            outs = _clean_outputs(json.loads(json.dumps(cell.outputs)), figs)
            if outs: outputs[cell.idx_] = outs
    pngs = figures_to_png(figs)
    for outs in outputs.values():
        for o in outs:
            if isinstance(o.get("data", {}).get("image/png"), int):
                o["data"]["image/png"] = base64.b64encode(pngs[o["data"]["image/png"]]).decode()
    Path(out_json).write_text(json.dumps({"seconds": secs, "outputs": outputs, "figures": len(figs)}))

def save_outputs(nb_path, outputs):
    "Write `outputs` (cell index -> list) into the notebook's code cells, clearing the others, then nbdev_clean it."
    nb = json.loads(Path(nb_path).read_text())
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code": continue
        cell["outputs"] = outputs.get(str(i), outputs.get(i, []))
        cell["execution_count"] = None
    Path(nb_path).write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    subprocess.run(["nbdev_clean", "--fname", str(nb_path)], check=True, cwd=ROOT)

def refresh(names):
    need_kaleido()
    nbs = [resolve_nb(n) for n in names] if names else chapters()
    minutes = json.loads(MINUTES.read_text())["minutes"] if MINUTES.exists() else {}
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    failed = []
    for nb in nbs:
        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "outputs.json"
            t0 = time.time()
            r = subprocess.run([sys.executable, __file__, "_run_one", str(nb), str(out)], env=env)
            if r.returncode != 0 or not out.exists():
                print(f"{nb.name}: FAILED (its notebook is left unchanged)", flush=True)
                failed.append(nb.name); continue
            res = json.loads(out.read_text())
        save_outputs(nb, res["outputs"])
        minutes[nb.stem] = round(res["seconds"])
        size = nb.stat().st_size / 1e6
        print(f"{nb.name}: {res['seconds']:.0f} s to run, {res['figures']} figures as PNG, {size:.2f} MB "
              f"({time.time() - t0:.0f} s in all)", flush=True)
    MINUTES.write_text(json.dumps({"note": "seconds each chapter takes to run with slow/gpu cells skipped and one torch "
                                   "thread, measured by `python tools/docs.py refresh` on a shared 2-core CPU",
                                   "date": time.strftime("%Y-%m-%d"), "minutes": dict(sorted(minutes.items()))},
                                  indent=1) + "\n")
    if failed: sys.exit(f"failed: {' '.join(failed)}")

def resolve_nb(name):
    p = Path(name)
    if p.exists(): return p.resolve()
    hits = [q for q in chapters() if q.stem == name or q.name == name or q.stem.startswith(name + "_")]
    if len(hits) != 1: sys.exit(f"no single notebook matches {name!r} in {NBS}")
    return hits[0]

# ---- the site ---------------------------------------------------------------------------------------------------
def _chapter_page(nb_path, out):
    "One chapter's page, with a footer that links every chapter and the API."
    import nbformat
    from nbconvert import HTMLExporter
    nb = _link_fix(nbformat.read(nb_path, as_version=4))
    body, _ = HTMLExporter(template_name="classic").from_notebook_node(nb, resources={"metadata": {"name": nb_path.stem}})
    page = Path(out) / f"{nb_path.stem}.html"
    page.write_text(body.replace("</body>", _nav(nb_path.stem) + "</body>", 1), encoding="utf-8")
    return page.name

def build_site(out, workers=2):
    "Static HTML from the notebooks' saved outputs (nbconvert) and the API of each module (pdoc). Runs no notebook."
    from concurrent.futures import ProcessPoolExecutor
    try: import pdoc, nbconvert  # noqa: F401
    except ImportError as e: sys.exit(f'site needs nbconvert and pdoc: pip install -e ".[dev]" ({e})')
    out = Path(out); out.mkdir(parents=True, exist_ok=True)
    api = out / "api"
    # pdoc imports every module (torch and all), so it runs beside the chapter pages, not after them
    pd = subprocess.Popen([sys.executable, "-m", "pdoc", "--no-search", "-o", str(api), "omnihuman_nb", "!omnihuman_nb._modidx"],
                          cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with ProcessPoolExecutor(workers) as ex:
        pages = list(ex.map(_chapter_page, chapters(), [out] * len(chapters())))
    for d in ("images", "results"):   # pictures the chapters link to
        if (NBS / d).exists(): shutil.copytree(NBS / d, out / d, dirs_exist_ok=True)
    _, err = pd.communicate()
    if pd.returncode != 0: sys.exit(f"pdoc failed:\n{err[-3000:]}")
    print(f"site: {len(pages)} chapter pages and the API ({len(list(api.rglob('*.html')))} pages) in {out}; open {out / 'index.html'}")
    return out

def _link_fix(nb):
    "Links between chapters point at .ipynb files; on the site they point at the pages."
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            cell.source = re.sub(r"\]\((?!http)([\w./-]*?)\.ipynb\)", r"](\1.html)", cell.source)
            cell.source = cell.source.replace("](../nbs/", "](")
    return nb

def _nav(stem):
    links = " · ".join(f'<a href="{p.stem}.html">{p.stem}</a>' for p in chapters() if p.stem != "index")
    return (f'<hr><nav style="font-family:sans-serif;font-size:0.9em;margin:1em 3em">'
            f'<a href="index.html">home</a> · <a href="api/omnihuman_nb.html">API</a> · {links}</nav>')

# ---- README from the index --------------------------------------------------------------------------------------
README_HEAD = "<!-- Written from nbs/index.ipynb by `python tools/docs.py readme`: edit the notebook, not this file. -->\n\n"

def readme_text():
    "README.md as it follows from nbs/index.ipynb: its markdown as is, its code as python blocks, links from the root."
    nb = json.loads((NBS / "index.ipynb").read_text())
    parts = []
    for cell in nb["cells"]:
        src = _text(cell["source"]).strip()
        if not src or src.startswith("#| hide"): continue
        if cell["cell_type"] == "markdown":
            src = re.sub(r"\]\((?!http|#|/)([^)]+)\)", lambda m: f"](nbs/{m.group(1)})", src)
            src = re.sub(r'src="(?!http|/)([^"]+)"', lambda m: f'src="nbs/{m.group(1)}"', src)
            parts.append(src)
        elif cell["cell_type"] == "code":
            parts.append("```python\n" + src + "\n```")
    return README_HEAD + "\n\n".join(parts) + "\n"

def minutes(secs):
    "How a chapter's run time reads in the table: minutes, one decimal, at least 0.1."
    return f"{max(0.1, round(secs / 60, 1)):.1f}"

def fill_minutes(src, secs):
    "The chapters table of the index with its last column set from the measured seconds."
    lines = src.split("\n")
    for i, line in enumerate(lines):
        m = re.match(r"\| \[`(\w+)`\]", line)
        if m and m.group(1) in secs and line.endswith("|"):
            cells = line.split(" | ")
            lines[i] = " | ".join(cells[:-1]) + f" | {minutes(secs[m.group(1)])} |"
    return "\n".join(lines)

def readme(check):
    path, index = ROOT / "README.md", NBS / "index.ipynb"
    secs = json.loads(MINUTES.read_text())["minutes"]
    nb = json.loads(index.read_text())
    filled = [fill_minutes(_text(c["source"]), secs) if c["cell_type"] == "markdown" else None for c in nb["cells"]]
    stale = any(f is not None and f != _text(c["source"]) for f, c in zip(filled, nb["cells"]))
    if check:
        if stale: sys.exit("the chapters table in nbs/index.ipynb is not up to date with nbs/results/chapter_seconds.json: "
                           "run python tools/docs.py readme")
        if path.read_text() != readme_text(): sys.exit("README.md differs from nbs/index.ipynb: run python tools/docs.py readme")
        print("README.md agrees with nbs/index.ipynb"); return
    if stale:
        for f, c in zip(filled, nb["cells"]):
            if f is not None: c["source"] = f.splitlines(True)
        index.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
        subprocess.run(["nbdev_clean", "--fname", str(index)], check=True, cwd=ROOT)
    path.write_text(readme_text()); print(f"wrote {path}")

# ---- the demo's frames ------------------------------------------------------------------------------------------
def strip(demo, out, frames=6, size=96):
    "A strip of `frames` frames from each mp4 of an `omnihuman demo` folder: one row per video."
    import av, numpy as np
    from PIL import Image, ImageDraw, ImageFont
    vids = sorted(Path(demo).rglob("*.mp4"))
    if not vids: sys.exit(f"no mp4 in {demo}: run `omnihuman demo --out {demo}` first")
    rows = []
    for v in vids:
        with av.open(str(v)) as c:
            imgs = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        idx = np.linspace(0, len(imgs) - 1, frames).round().astype(int)
        tiles = [Image.fromarray(imgs[i]).resize((size, size), Image.NEAREST) for i in idx]
        row = Image.new("RGB", (frames * (size + 2) + 90, size + 4), "white")
        ImageDraw.Draw(row).text((4, size // 2 - 8), v.stem.replace("_", "-"), fill="black", font=ImageFont.load_default(size=15))
        for j, t in enumerate(tiles): row.paste(t, (90 + j * (size + 2), 2))
        rows.append(row)
    img = Image.new("RGB", (rows[0].width, sum(r.height for r in rows)), "white")
    y = 0
    for r in rows: img.paste(r, (0, y)); y += r.height
    out = Path(out); out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out, optimize=True)
    print(f"wrote {out} ({out.stat().st_size // 1024} KB, {len(vids)} videos x {frames} frames)")

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("refresh", help="re-run notebooks and save their outputs"); r.add_argument("notebooks", nargs="*")
    s = sub.add_parser("site", help="build the static HTML site"); s.add_argument("--out", default=str(ROOT / "_site"))
    m = sub.add_parser("readme", help="write README.md from nbs/index.ipynb"); m.add_argument("--check", action="store_true")
    f = sub.add_parser("strip", help="the demo's frame strip")
    f.add_argument("--demo", default="outputs/demo"); f.add_argument("--out", default=str(NBS / "images" / "demo_frames.png"))
    o = sub.add_parser("_run_one"); o.add_argument("nb"); o.add_argument("out")
    a = p.parse_args(argv)
    if a.cmd == "refresh": refresh(a.notebooks)
    elif a.cmd == "site": build_site(a.out)
    elif a.cmd == "readme": readme(a.check)
    elif a.cmd == "strip": strip(a.demo, a.out)
    elif a.cmd == "_run_one": run_one(a.nb, a.out)

if __name__ == "__main__": main()
