"""Metrics: the probe plumbing and every metric against a naive computation, the shipped probes' accuracy, and the two scoring entry points."""
import json

import numpy as np
import pytest
import torch
from fastcore.test import test_close as close, test_eq as eq, test_fail as fails
from hypothesis import given, settings, strategies as st

from omnihuman_nb.core import BadInputError
from omnihuman_nb.puppet import HAND_JOINTS, identity_pool, render_puppet_clip, mouth_from_audio, SAMPLES_PER_FRAME
from omnihuman_nb.metrics import (PROBES_FILE, soft_argmax, face_crop, face_frame, PuppetProbe, load_probes, save_probes, train_probes,
                                  probe_accuracy, probe_test_set, probe_identities, read_probes, pearson, sync_score, pose_error,
                                  hand_variance, identity_drift, frechet_distance, frame_change, flicker_score, evaluate_video)

torch.set_num_threads(1)

@pytest.fixture(scope="module")
def clip():
    return render_puppet_clip(seed=3, size=64, seconds=2.0, identity=identity_pool(8, 0)[7], framing="half_body", gesture="wave_left")

def test_soft_argmax_matches_a_loop():
    lg = torch.randn(2, 4, 8, 16)
    got = soft_argmax(lg, (32, 64))
    p = lg[1, 3].flatten().softmax(0).view(8, 16).numpy()
    x = sum(p[i, j] * (j + 0.5) * 4 for i in range(8) for j in range(16))
    y = sum(p[i, j] * (i + 0.5) * 4 for i in range(8) for j in range(16))
    close(got[1, 3].tolist(), [x, y], eps=1e-4)

def test_face_crop_of_the_whole_frame_is_the_frame():
    x = torch.rand(3, 3, 40, 40)
    same = face_crop(x, torch.full((3, 2), 20.0), torch.full((3,), 20 / 1.5), torch.zeros(3), size=40)
    close(same, x, eps=1e-5)

def test_face_frame_reads_the_head_radius(clip):
    from omnihuman_nb.puppet import framing_camera, BODY
    _, radius, _ = face_frame(torch.from_numpy(clip.keypoints))
    s, _ = framing_camera("half_body", 64, identity_pool(8, 0)[7])
    close(radius, torch.full_like(radius, BODY["head_r"] * identity_pool(8, 0)[7].head * s), eps=1e-3)

def test_held_out_identities_never_share_a_look():
    train, test = probe_identities(300, seed=1)
    look = lambda i: (i.person, i.skin, i.hair, i.shirt, i.background)
    assert not {look(i) for i in train} & {look(i) for i in test}

@given(st.integers(-4, 4), st.integers(0, 10_000))
@settings(max_examples=25, deadline=None)
def test_sync_lag_finds_any_shift(k, seed):
    a = np.random.default_rng(seed).random(80)
    v = np.roll(a, k)                       # the mouth k frames late (k < 0: early)
    s = sync_score(v, a, max_lag=5)
    eq(s["sync_lag"], k)
    close(s["sync_r_best"], 1.0, eps=1e-9)

def test_pearson_and_sync_edge_cases():
    eq(pearson(np.ones(10), np.arange(10.0)), 0.0)
    close(pearson(np.arange(10.0), 3 * np.arange(10.0) + 1), 1.0, eps=1e-12)
    eq(len(sync_score(np.arange(5.0), np.arange(5.0), max_lag=5)["lags"]), 3)
    with pytest.raises(BadInputError): sync_score(np.arange(2.0), np.arange(2.0))

def test_pose_error_against_loops():
    rng = np.random.default_rng(0)
    tgt, pred, vis = rng.uniform(0, 64, (6, 25, 2)), None, rng.random((6, 25)) > 0.3
    pred = tgt + rng.normal(0, 3, tgt.shape)
    errs, hits = [], []
    for t in range(6):
        pts = tgt[t][vis[t]]; size = (pts.max(0) - pts.min(0)).max()
        for k in np.nonzero(vis[t])[0]:
            e = np.linalg.norm(pred[t, k] - tgt[t, k]); errs.append(e); hits.append(e <= 0.1 * size)
    pe = pose_error(pred, tgt, vis)
    close((pe["kp_err"], pe["pck"]), (np.mean(errs), np.mean(hits)), eps=1e-9)
    eq(pose_error(tgt, tgt, vis)["pck"], 1.0)
    with pytest.raises(BadInputError): pose_error(pred, tgt, np.zeros_like(vis))

def test_hand_variance_and_identity_drift():
    rng = np.random.default_rng(1)
    kp = rng.normal(size=(30, 25, 2))
    close(hand_variance(kp), np.mean([kp[:, j].var(0).sum() for j in HAND_JOINTS]), eps=1e-9)
    eq(hand_variance(np.repeat(kp[:1], 9, 0)), 0.0)
    e, ref = rng.random((10, 8)), rng.random(8)
    d = 1 - e @ ref / np.linalg.norm(e, axis=1) / np.linalg.norm(ref)
    close(identity_drift(e, ref, 4), [d[:4].mean(), d[4:8].mean(), d[8:].mean()], eps=1e-9)
    eq(identity_drift(np.tile(ref, (5, 1)), ref, 5), [pytest.approx(0.0, abs=1e-12)])

@given(st.integers(2, 12), st.integers(0, 10_000))
@settings(max_examples=15, deadline=None)
def test_frechet_distance_matches_scipy(d, seed):
    import scipy.linalg
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(50, d)), rng.normal(size=(40, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    naive = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa + sb - 2 * scipy.linalg.sqrtm(sa @ sb).real)
    close(frechet_distance(a, b, eps=0), naive, eps=1e-6 * max(1, abs(naive)))
    close(frechet_distance(a, b), frechet_distance(b, a), eps=1e-6 * max(1, abs(naive)))

def test_flicker(clip):
    close(flicker_score(clip.video, [clip.video])["flicker"], 1.0, eps=1e-9)
    eq(flicker_score(np.repeat(clip.video[:1], 5, 0), [clip.video])["flicker"], 0.0)
    close(frame_change(clip.video), np.abs(np.diff(clip.video.astype(float), axis=0)).mean(), eps=1e-4)

def test_tiny_training_is_reproducible_and_round_trips(tmp_path):
    kw = dict(steps=2, n_identities=2, frames_per_clip=3, seconds=0.4, n_test=1, batch_size=4, verbose=False)
    p1, rep = train_probes(tmp_path, **kw)
    p2, _ = train_probes(None, **kw)
    for a, b in zip(p1.state_dict().values(), p2.state_dict().values()): assert torch.equal(a, b)
    back = load_probes(tmp_path)
    for a, b in zip(p1.state_dict().values(), back.state_dict().values()): assert torch.equal(a, b)   # trained weights are fp16-exact already
    eq(back.meta["steps"], 2)
    eq(json.loads((tmp_path / "accuracy.json").read_text())["seed"], 0)

def test_shipped_probes_are_small_and_accurate():
    assert PROBES_FILE.is_file() and PROBES_FILE.stat().st_size < 1_000_000
    probe = load_probes()
    assert probe.meta["mouth_r"] >= 0.95 and probe.meta["kp_err_px"] <= 1.5, probe.meta
    acc = probe_accuracy(probe, probe_test_set(n_test=3, clips_per_identity=1, frames_per_clip=25))   # a quick held-out subset
    assert acc["mouth_r"] >= 0.93 and acc["kp_err_px"] <= 1.8, acc

def test_probes_on_a_real_clip(clip):
    r = read_probes(clip.video)
    assert sync_score(r["mouth"], mouth_from_audio(clip.audio, 50)["mouth"])["sync_r"] > 0.85
    assert pose_error(r["keypoints"], clip.keypoints, clip.visibility)["pck"] > 0.95

def test_evaluate_video_checks_its_inputs(clip, tmp_path):
    res = evaluate_video(clip.video, audio=clip.audio, pose=(clip.keypoints, clip.visibility, (64, 64)), json_path=tmp_path / "m.json", verbose=False)
    saved = json.loads((tmp_path / "m.json").read_text())
    for k in ("sync_r", "sync_lag", "pck", "kp_err", "hand_var", "identity_drift", "fd", "flicker"): assert saved[k] is not None, k
    eq(res["sync_lag"], 0)
    with pytest.raises(BadInputError, match="audio length"): evaluate_video(clip.video, audio=clip.audio[:SAMPLES_PER_FRAME * 40], verbose=False)
    with pytest.raises(BadInputError, match="pose frame count"): evaluate_video(clip.video, pose=(clip.keypoints[:9], clip.visibility[:9], (64, 64)), verbose=False)
    with pytest.raises(BadInputError, match="video file"): evaluate_video(tmp_path / "none.mp4", verbose=False)
    with pytest.raises(BadInputError, match="video frame count"): evaluate_video(clip.video[:2], verbose=False)

def test_evaluate_model_on_the_sample_clips(tmp_path):
    from pathlib import Path
    from omnihuman_nb.pipeline import build_pipeline, TINY, perturb_weights
    from omnihuman_nb.metrics import evaluate_model
    pipe = build_pipeline(**TINY); perturb_weights(pipe.transformer)
    pipe.save_pretrained(tmp_path / "pipe")
    data = Path(__file__).resolve().parent.parent / "data_samples" / "clips"
    res = evaluate_model(tmp_path / "pipe", data, json_path=tmp_path / "m.json", steps=1, verbose=False)
    eq(res["videos"], dict(audio=1, pose=1, text=1))
    saved = json.loads((tmp_path / "m.json").read_text())
    for k in ("sync_r", "sync_lag", "pck", "kp_err", "hand_var", "identity_drift", "fd", "flicker"): assert saved[k] is not None, k
    assert saved["real"]["sync_r"] > 0.9 and saved["real"]["pck"] > 0.9
    with pytest.raises(BadInputError, match="held-out clips"): evaluate_model(tmp_path / "pipe", data / "clip_00000", verbose=False)
    with pytest.raises(BadInputError, match="model: expected a pipeline folder"): evaluate_model(tmp_path / "nope", data, verbose=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInputError, match="a bundle with dit/ and vae/"): evaluate_model(tmp_path / "empty", data, verbose=False)
