"""The clip pipeline end to end: render → check → corrupt → check → load, plus the loader's contract.

The 'done when' of the data chapter lives here: a rendered dataset checks good; a corrupted copy
(truncated mp4, wav cut short, pose.json missing a frame, a missing caption) is reported clip by
clip; and a DataLoader over the corrupted copy skips those clips with warnings and goes on.
"""
import hashlib, json, shutil, warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from fastcore.test import test_eq as eq, test_close as close

from omnihuman_nb.core import BadInputError
from omnihuman_nb.puppet import FPS, SR, JOINTS, render_puppet_clip, mouth_from_audio, load_wav
from omnihuman_nb.data import (render_dataset, check_dataset, check_clip, ClipDataset, collate_clips, read_audio, write_audio,
                               read_video, read_meta, read_clip, held_out_identities, bench_data)

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "data_samples"

@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    out = tmp_path_factory.mktemp("render") / "ds"
    res = render_dataset(out, clips=6, seed=7, seconds=1.0, audio_share=0.5, pose_share=0.5, verbose=False)
    return out, res

def _files(d):
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}

def test_render_then_check_reports_every_clip_good(rendered):
    out, res = rendered
    eq((res["clips"], res["with_audio"], res["with_pose"]), (6, 3, 3))
    r = check_dataset(out, verbose=False)
    eq((r["n_clips"], r["n_good"], r["n_bad"]), (6, 6, 0))
    eq(held_out_identities(out), [6, 7])

def test_same_seed_same_bytes(rendered, tmp_path):
    out, _ = rendered
    render_dataset(tmp_path / "again", clips=6, seed=7, seconds=1.0, audio_share=0.5, pose_share=0.5, verbose=False)
    eq(_files(tmp_path / "again"), _files(out))

def _corrupt(src, dst):
    "Copy `src` and break four clips; return {clip name: expected first problem}."
    shutil.copytree(src, dst)
    names = [c["name"] for c in json.loads((dst / "dataset.json").read_text())["clips"]]
    audio = [n for n in names if read_meta(dst / n)["has_audio"]]
    pose = [n for n in names if read_meta(dst / n)["has_pose"] and n != audio[0]]
    rest = [n for n in names if n not in (audio[0], pose[0])]
    v = dst / rest[0] / "video.mp4"; v.write_bytes(v.read_bytes()[: v.stat().st_size // 2])
    w = dst / audio[0] / "audio.wav"; write_audio(w, read_audio(w)[: SR // 4])
    p = dst / pose[0] / "pose.json"; doc = json.loads(p.read_text()); doc["keypoints"].pop(); p.write_text(json.dumps(doc))
    (dst / rest[1] / "caption.txt").unlink()
    return {rest[0]: "unreadable video.mp4", audio[0]: "audio is 0.25 s, shorter than the video's 1.00 s",
            pose[0]: "pose.json has 24 frames, the video has 25", rest[1]: "missing caption.txt"}

def test_corrupted_copy_is_reported_clip_by_clip(rendered, tmp_path, capsys):
    broken = tmp_path / "broken"
    expected = _corrupt(rendered[0], broken)
    r = check_dataset(broken)
    eq(r["n_bad"], 4); eq(r["n_good"], 2)
    eq({k: v[0] for k, v in r["bad"].items()}, expected)
    printed = capsys.readouterr().out
    for name, problem in expected.items(): assert f"{name}" in printed and problem in printed
    assert "2 of 6 clips good, 4 bad" in printed
    # the fast check (no decoding) finds the same clips
    eq(sorted(n for n in expected), sorted(k for k in expected if check_clip(broken / k, decode=False)))

def test_loader_skips_bad_clips_and_goes_on(rendered, tmp_path):
    broken = tmp_path / "broken"
    expected = _corrupt(rendered[0], broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ClipDataset(broken, n_frames=9)
    eq(len(ds), 2)
    eq(sorted(ds.skipped), sorted(expected))
    eq(sum("skipping clip" in str(w.message) for w in caught), 4)
    seen = []
    for epoch in range(2):
        ds.set_epoch(epoch)
        for b in DataLoader(ds, batch_size=2, shuffle=True, collate_fn=collate_clips):
            eq(b["video"].shape, (len(b["clip"]), 3, 9, 64, 64))
            seen += b["clip"]
    eq(len(seen), 4); assert not set(seen) & set(expected)

def test_loader_skips_a_clip_that_breaks_after_opening(rendered, tmp_path):
    shutil.copytree(rendered[0], tmp_path / "ds")
    ds = ClipDataset(tmp_path / "ds", n_frames=9)
    victim = ds.clips[1]
    (victim / "video.mp4").write_bytes(b"\x00" * 100)                 # broken after the dataset was opened
    with pytest.warns(UserWarning, match=f"skipping clip {victim.name}: failed to load"):
        s = ds[1]
    assert s["clip"] != victim.name
    eq(len([ds[i] for i in range(len(ds))]), len(ds))                 # still serves every index

def test_all_clips_bad_is_a_clear_error(tmp_path):
    (tmp_path / "c").mkdir(); (tmp_path / "c" / "meta.json").write_text("{not json")
    with pytest.warns(UserWarning), pytest.raises(BadInputError, match="at least one usable clip"):
        ClipDataset(tmp_path)

def test_sample_contract_and_mixed_collate(rendered):
    ds = ClipDataset(rendered[0], n_frames=5, audio_radius=1)
    samples = [ds[i] for i in range(len(ds))]
    for s in samples:
        eq(s["video"].shape, (3, 5, 64, 64)); eq(s["ref"].shape, (3, 64, 64))
        eq(s["audio"].shape, (5, 3, 128)); eq(s["pose"].shape, (len(JOINTS), 5, 64, 64))
        eq(bool(s["audio"].abs().sum() > 0), s["has_audio"]); eq(bool(s["pose"].sum() > 0), s["has_pose"])
        assert s["has_text"] and s["has_truth"] and s["caption"]
    b = collate_clips(samples)
    eq(b["has_audio"].tolist(), [s["has_audio"] for s in samples])
    eq(b["pose"].shape, (6, len(JOINTS), 5, 64, 64))
    eq(b["identity"].dtype, torch.long)

def test_visible_keypoints_in_frame_and_heatmaps_peak_there(rendered):
    ds = ClipDataset(rendered[0], n_frames=5)
    for i in range(len(ds)):
        s = ds[i]
        if not s["has_pose"]: continue
        kp = s["keypoints"]; vis = kp[..., 2] > 0
        xy = kp[..., :2][vis]
        assert ((xy >= 0) & (xy < 64)).all()
        t, k = torch.nonzero(vis)[0].tolist()
        peak = divmod(int(s["pose"][k, t].argmax()), 64)
        close(np.array([peak[1] + 0.5, peak[0] + 0.5]), kp[t, k, :2].numpy(), eps=0.51)

def test_mp4_wav_round_trip_keeps_frames_and_duration(rendered):
    c = read_clip(rendered[0] / "clip_00000")
    T = c.meta["n_frames"]
    eq(len(c.video), T)
    if c.audio is not None: close(len(c.audio) / SR, T / FPS, eps=1e-9)
    close(c.meta["duration"], T / FPS, eps=1e-9)

def test_shipped_samples_are_good_and_small():
    assert sum(p.stat().st_size for p in SAMPLES.rglob("*") if p.is_file()) < 5 * 2**20
    r = check_dataset(SAMPLES / "clips", verbose=False)
    eq((r["n_clips"], r["n_bad"]), (6, 0))
    wavs = sorted((SAMPLES / "speech").glob("*.wav"))
    assert len(wavs) >= 2
    for w in wavs:
        y = load_wav(w)
        assert len(y) > SR and np.abs(y).max() > 0.1

def test_real_speech_drives_the_mouth():
    wav = load_wav(sorted((SAMPLES / "speech").glob("*.wav"))[0])
    c = render_puppet_clip(seed=0, audio=wav[: 2 * SR], seconds=2.0, framing="portrait")
    feat = mouth_from_audio(c.audio, len(c.video))
    close(c.truth["mouth"], feat["mouth"], eps=1e-6)
    assert np.corrcoef(c.truth["mouth"], c.truth["envelope"])[0, 1] > 0.9

def test_bench_returns_figures(tmp_path):
    res = bench_data(clips=2, seconds=0.6, n_frames=5, batch_size=2, min_seconds=0.2, json_path=tmp_path / "b.json", verbose=False)
    eq(json.loads((tmp_path / "b.json").read_text()), res)
    assert res["render_frames_per_s"] > 0 and res["loader_samples_per_s"] > 0

@pytest.mark.parametrize("ctx", ["fork", "spawn"])
def test_persistent_workers_follow_set_epoch(ctx):
    ds = ClipDataset(SAMPLES / "clips", n_frames=9, heatmaps=False)
    dl = DataLoader(ds, batch_size=len(ds), num_workers=1, persistent_workers=True, multiprocessing_context=ctx, collate_fn=collate_clips)
    seen = []
    for e in range(3):
        ds.set_epoch(e)
        seen.append(next(iter(dl))["frame_start"].tolist())
    eq(seen[2], [ds[i]["frame_start"] for i in range(len(ds))])
    assert seen[0] != seen[1]
