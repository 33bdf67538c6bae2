"""The explorers of chapter 13, driven headless: set widget values, click buttons, and check
the widgets' state and the figures that result (get_state, observe, to_dict). No browser."""
import base64, io, json, threading, time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from fastcore.test import test_eq as eq, test_close as close

from omnihuman_nb.core import BadInputError
from omnihuman_nb.puppet import FPS, render_puppet_clip
from omnihuman_nb.widgets import (png_uri, frame_strip, chunk_frames, record_attention, group_mass, dit_inputs, puppet_explorer,
                                  vae_explorer, dit_explorer, sampler_explorer, training_dashboard)

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "data_samples"

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

def changes(widget, name="value"):
    "A list that records every change of `widget.name`."
    seen = []
    widget.observe(lambda ch: seen.append(ch["new"]), names=name)
    return seen

def trace(fig, name): return next(t for t in fig.data if t.name == name)

# --- small pictures ------------------------------------------------------------------------

def test_png_uri_is_lossless_and_checks_its_input():
    img = np.random.default_rng(0).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    uri = png_uri(img)
    assert uri.startswith("data:image/png;base64,")
    eq(np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))), img)
    with pytest.raises(BadInputError, match="uint8"): png_uri(img.astype(np.float32))
    eq(frame_strip(np.zeros((3, 4, 5, 3), np.uint8)).shape, (4, 17, 3))

# --- puppet ----------------------------------------------------------------------------------

def test_puppet_explorer_follows_its_controls():
    speech = sorted((SAMPLES / "speech").glob("*.wav"))
    px = puppet_explorer(size=48, seconds=0.8, audio_files=speech[:1])
    px.gesture.value = "clap"
    eq(px.gesture.get_state()["index"], list(px.gesture.options).index("clap"))
    assert "clapping" in px.caption.value
    px.framing.value = "portrait"
    eq(px.clip.truth["framing"], "portrait"); eq(px.clip.video.shape, (20, 48, 48, 3))
    px.frame.value = 7
    d = px.fig.to_dict()
    eq(d["data"][0]["source"], png_uri(px.clip.video[7]))
    close(d["data"][5]["x"], [7.5 / FPS] * 2)
    vis = px.clip.visibility[7]
    close(px.fig.data[2].y, px.clip.keypoints[7, vis, 1] - 0.5)
    px.audio_source.value = "silence"
    eq(float(np.max(px.fig.data[3].y)), 0.0)
    px.audio_source.value = str(speech[0])
    assert float(np.max(px.fig.data[3].y)) > 0.5
    px.play.value = 3
    eq(px.frame.get_state()["value"], 3)
    eq(px.state()["frame"], 3)
    assert "application/vnd.jupyter.widget-view+json" in px._repr_mimebundle_()

# --- VAE -------------------------------------------------------------------------------------

def test_chunk_frames_cover_every_frame_once():
    for n in range(1, 8):
        for c in range(1, 9):
            for t in (1, 2, 4):
                parts = chunk_frames(n, c, t)
                eq([j for lat, _ in parts for j in lat], list(range(n)))
                eq([f for _, vid in parts for f in vid], list(range(1 + t * (n - 1))))
                for lat, vid in parts:                      # each chunk's video frames are exactly its latents' frames
                    eq(vid.start, 0 if lat.start == 0 else 1 + t * (lat.start - 1)); eq(vid.stop, 1 + t * (lat.stop - 1))
    with pytest.raises(BadInputError): chunk_frames(3, 0)

@pytest.mark.parametrize("kw", [dict(block_out_channels=(8, 16), spatial_compression=2, temporal_compression=2),
                                dict(block_out_channels=(8, 8, 8, 8))])
def test_vae_explorer_streaming_changes_nothing(kw):
    from omnihuman_nb.vae import CausalVAE
    torch.manual_seed(0)
    vae = CausalVAE(**kw)
    clip = render_puppet_clip(seed=1, size=32, seconds=0.44)                  # 11 frames: trimmed to whole latent frames
    vx = vae_explorer(vae, clip, chunk=1)
    tf = vae.config.temporal_compression
    eq(len(vx.video), 1 + tf * ((11 - 1) // tf))
    reports = changes(vx.report)
    for c in range(1, vx.n_latent + 1):
        vx.chunk.value = c
        assert max(vx.difference["encode"], vx.difference["decode"]) < 1e-5, vx.difference   # float32 rounding at most
        rows = np.array(vx.fig.data[3].z)
        for i, (lat, vid) in enumerate(chunk_frames(vx.n_latent, c, tf)):
            eq(set(rows[0, vid.start:vid.stop]), {i}); eq(set(rows[1, lat.start:lat.stop]), {i})
    eq(len(reports), vx.n_latent - 1)                                           # the value 1 was already set
    vx.frame.value = len(vx.video) - 1
    eq(vx.fig.to_dict()["data"][4]["x"], (len(vx.video) - 1, vx.n_latent - 1))
    eq(np.array(vx.fig.data[2].z).shape[1], 4 * (32 // vae.config.spatial_compression + 1) - 1)

# --- DiT -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dit():
    from omnihuman_nb.dit import build_dit
    from omnihuman_nb.pipeline import perturb_weights
    torch.manual_seed(0)
    m = build_dit("classroom", hidden_size=32, num_layers=2, num_heads=2, pose_width=8, pose_channels=4, text_encoder="hashed-words")
    return perturb_weights(m, 0.2).eval()

def test_record_attention_is_what_the_model_used(tiny_dit):
    inp = {**dit_inputs(tiny_dit, batch=2, motion=2), "text_lens": torch.tensor([6, 3]),
           "condition_mask": {"motion": torch.tensor([False, True]), "text": torch.tensor([True, False])}}
    rec = record_attention(tiny_dit, **inp)
    lay = rec.layout
    assert rec.max_error < 1e-5
    for p in rec.joint:
        eq(p.shape, (2, 2, lay.n, lay.n)); close(p.sum(-1), torch.ones(2, 2, lay.n), eps=1e-5)
        eq(p[0][..., lay.slice("motion")].abs().sum().item(), 0.0)          # motion masked for sample 0
        eq(p[1][..., lay.slice("text")].abs().sum().item(), 0.0)            # text masked for sample 1
    tiny_dit.set_backends(attention="torch")                                   # another kernel, the same maps
    try: rec2 = record_attention(tiny_dit, **inp)
    finally: tiny_dit.set_backends(attention="sdpa")
    for a, b in zip(rec.joint + rec.audio, rec2.joint + rec2.audio): close(a, b, eps=1e-5)
    names, M = group_mass(rec.joint[0][0].mean(0), lay)
    eq(names, ["text", "reference", "motion", "video"]); close(M.sum(1), np.ones(4), eps=1e-5)
    # hooks and the spy are gone afterwards
    from omnihuman_nb import kernels as K
    assert K.attention.__name__ == "attention" and not tiny_dit.blocks[0]._forward_pre_hooks

def test_dit_explorer_controls(tiny_dit):
    dx = dit_explorer(tiny_dit)                                                # inputs made by dit_inputs
    lay = dx.record.layout
    eq(dx.kind.get_state()["_options_labels"], ("joint attention", "audio cross-attention"))
    close(dx.fig.data[0].z, dx.record.joint[0][0].mean(0).numpy())
    eq(dx.fig.to_dict()["layout"]["xaxis"]["ticktext"], ("text", "reference", "motion", "video"))
    dx.head.value, dx.block.value = 0, 1
    close(dx.fig.data[0].z, dx.record.joint[1][0, 0].numpy())
    assert "block 1, head 0" in dx.fig.layout.annotations[0].text
    dx.kind.value = "audio"
    T, S, A = dx.record.audio[1].shape[1], dx.record.audio[1].shape[3], dx.record.audio[1].shape[4]
    z = np.array(dx.fig.data[0].z)
    eq(z.shape, (T * S, T * A)); close(z.sum(1), np.ones(T * S), eps=1e-5)
    eq(len(dx.fig.to_dict()["layout"]["shapes"]), 2 * (T - 1))
    dx.distance.value = 7
    close(dx.rope_fig.data[5].y, np.cos(7 * dx.freqs[2]))
    eq(sum(dx.rope_split), 16)

# --- sampler ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_pipe():
    from omnihuman_nb.pipeline import build_pipeline, perturb_weights, TINY
    pipe = build_pipeline(**TINY)
    perturb_weights(pipe.transformer, seed=0)
    return pipe

def test_sampler_explorer(tiny_pipe):
    from omnihuman_nb.flow import GuidanceSchedule
    clip = render_puppet_clip(seed=2, size=32, seconds=0.4)
    sx = sampler_explorer(tiny_pipe, clip.video[0], audio=clip.audio, text=clip.caption, steps=2, run=False)
    eq(sx.output, None); eq(list(sx.schedule_fig.data[0].y), [3.0, 1.0])
    sx.cfg_text.value, sx.anneal.value, sx.steps.value = 4.5, "none", 3
    eq(list(sx.schedule_fig.data[1].y), [4.5] * 3)
    steps_seen = changes(sx.step)
    sx.run_button.click()
    eq(len(sx.x0_frames), 3); eq(steps_seen[-1], 2)
    eq(sx.x0_frames[-1], sx.output.frames)
    close(sx.schedule_fig.data[1].y, GuidanceSchedule.from_dict(sx.output.info["cfg_text"]).scales(3))
    eq(sx.video.get_state()["format"], "mp4"); eq(sx.video.value[4:8], b"ftyp")
    sx.step.value = 0
    eq(sx.frames_fig.to_dict()["data"][0]["source"], png_uri(frame_strip(sx.x0_frames[0])))
    eq(sx.schedule_fig.data[2].x, (0, 0))
    before = sx.output.frames
    sx.seed.value = 5; sx.run_button.click()
    assert not np.array_equal(before, sx.output.frames)

# --- training dashboard ------------------------------------------------------------------------

def _row(step, stage, combos):
    return dict(step=step, stage=stage, loss=1 / step, lr=1e-4, grad_norm=1.0, samples_per_s=1.0, s_per_step=1.0,
                combos={c: 1 for c in combos}, combo_loss={c: (1 + i) / step for i, c in enumerate(combos)})

def test_dashboard_follows_a_writer(tmp_path):
    log = tmp_path / "run" / "log.jsonl"
    db = training_dashboard(tmp_path / "run", follow=True, interval=0.02)
    assert db.follow.get_state()["value"] is True
    updates = changes(db.status)
    rows = [_row(s, 1 + (s > 5), ["text+ref"] + (["text+ref+audio"] if s > 5 else [])) for s in range(1, 11)]
    log.parent.mkdir()
    for r in rows:
        with open(log, "a") as f: f.write(json.dumps(r) + "\n")
        time.sleep(0.03)
    deadline = time.time() + 10
    while len(db.rows) < 10 and time.time() < deadline: time.sleep(0.02)
    db.follow.value = False
    assert db._thread is None
    assert len({u for u in updates if "steps" in u}) > 1                       # redrawn more than once while rows came in
    d = {t["name"]: t for t in db.fig.to_dict()["data"]}
    eq(sorted(d), ["stage 1", "stage 2", "text+ref", "text+ref+audio"])
    eq(d["text+ref"]["x"], tuple(range(1, 11))); close(d["text+ref+audio"]["y"], [2 / s for s in range(6, 11)])
    eq(d["stage 1"]["xaxis"], "x"); eq(d["text+ref"]["xaxis"], "x2")
    db.smooth.value = 3
    close(trace(db.fig, "stage 2").y[-1], np.mean([1 / 8, 1 / 9, 1 / 10]))
    # a resumed run rewrites the file shorter, then appends
    log.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]) + json.dumps(_row(3, 1, ["text"])) + "\n")
    eq(db.poll(), 3); eq([r["step"] for r in db.rows], [1, 2, 3]); eq(len(trace(db.fig, "stage 2").x), 0)
    # a half-written line waits for the rest
    line = json.dumps(_row(4, 1, ["text"])) + "\n"
    with open(log, "a") as f: f.write(line[:10])
    eq(db.poll(), 0)
    with open(log, "a") as f: f.write(line[10:])
    eq(db.poll(), 1); eq(db.rows[-1]["step"], 4)
    # the load button reads from the start
    db.load_button.click(); eq(len(db.rows), 4)
    # a line that is not a log row: an error that names it, shown in the status while following
    with pytest.raises(BadInputError, match="step, stage and loss"):
        with open(log, "a") as f: f.write('{"oops": 1}\n')
        db.poll()
    with open(log, "a") as f: f.write("not json\n")
    db.follow.value = True
    deadline = time.time() + 10
    while "error" not in db.status.value and time.time() < deadline: time.sleep(0.02)
    db.follow.value = False
    assert db.status.value.startswith("error: BadInputError: a line of"), db.status.value
    eq(len(db.rows), 4)

def test_dashboard_follows_a_real_training_run(tmp_path):
    from omnihuman_nb.trainer import train, train_config
    from omnihuman_nb.vae import CausalVAE
    torch.manual_seed(0); CausalVAE(block_out_channels=(8, 8, 8, 8)).save_pretrained(tmp_path / "vae")
    cfg = train_config("classroom", batch_size=2, checkpoint_every=100, split="all", dit_overrides=dict(num_layers=1, hidden_size=32, num_heads=2))
    db = training_dashboard(tmp_path / "run", follow=True, interval=0.05)
    res = train(SAMPLES / "clips", tmp_path / "vae", tmp_path / "run", steps_per_stage=2, config=cfg, cache_dir=tmp_path / "cache", verbose=False)
    deadline = time.time() + 10
    while len(db.rows) < res["steps"] and time.time() < deadline: time.sleep(0.05)
    db.stop()
    eq([r["step"] for r in db.rows], list(range(1, res["steps"] + 1)))
    names = {t.name for t in db.fig.data}
    eq({n for n in names if n.startswith("stage")}, {"stage 1", "stage 2", "stage 3"})
    eq({n for n in names if not n.startswith("stage")}, {c for st in res["counts"].values() for c in st})
    # the same run, finished, from its JSONL
    done = training_dashboard(tmp_path / "run" / "log.jsonl")
    eq(done.curves(), db.curves())

# --- the saved notebooks ----------------------------------------------------------------------

def test_committed_notebooks_carry_no_widget_state():
    "Every FigureWidget holds plotly.js (~5 MB) in its widget state: a notebook saved with that state grows by megabytes per explorer."
    total = 0
    for nb in sorted((ROOT / "nbs").glob("*.ipynb")):
        d = json.loads(nb.read_text())
        assert "widgets" not in d.get("metadata", {}), f"{nb.name} was saved with widget state; save it without (or nbdev_clean and strip metadata.widgets)"
        outs = sum(len(json.dumps(c.get("outputs", []))) for c in d["cells"])
        assert outs < 1_000_000, f"{nb.name} holds {outs:,} bytes of outputs"   # static PNG figures are 30-100 KB each; one FigureWidget's state is ~5 MB
        total += nb.stat().st_size
    assert total < 5_000_000, f"the notebooks total {total:,} bytes"
