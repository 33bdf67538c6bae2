"""Property tests for chapter 16's instruments: region masks on the latent grid, keypoint errors, timestep weights."""
from pathlib import Path

import numpy as np
import pytest
import torch
from fastcore.test import test_eq as eq, test_close as close

from omnihuman_nb.core import BadInputError

from omnihuman_nb.flow import FlowConfig
from omnihuman_nb.puppet import J, FRAMINGS, framing_camera, identity_pool, render_puppet_clip
from omnihuman_nb.reliance import (ARM_RADIUS, REGIONS, head_radius, keypoint_error, limb_masks, loss_by_region, mouth_masks,
                                   region_masks, timestep_weights, to_latent_grid)

DATA = Path(__file__).resolve().parent.parent / "data_samples" / "clips"

def _loop_grid(mask, s, f):
    T, H, W = mask.shape
    out = np.zeros((1 + (T - 1) // f, H // s, W // s), bool)
    for k in range(out.shape[0]):
        frames = [0] if k == 0 else range(f * k - f + 1, f * k + 1)
        for i in range(H // s):
            for j in range(W // s): out[k, i, j] = mask[list(frames), i * s:(i + 1) * s, j * s:(j + 1) * s].any()
    return out

@pytest.mark.parametrize("shape,s,f", [((9, 64, 64), 8, 4), ((5, 32, 48), 8, 4), ((7, 12, 6), 2, 2), ((1, 16, 16), 4, 4)])
def test_latent_grid_matches_a_loop(shape, s, f):
    rng = np.random.default_rng(0)
    for density in (0.0, 0.002, 0.05, 1.0):
        m = rng.random(shape) < density
        eq(to_latent_grid(m, s, f), _loop_grid(m, s, f))

def test_latent_grid_is_monotone():
    rng = np.random.default_rng(1)
    a = rng.random((9, 32, 32)) < 0.01
    b = a | (rng.random((9, 32, 32)) < 0.01)
    ga, gb = to_latent_grid(a), to_latent_grid(b)
    assert not (ga & ~gb).any()

def test_latent_grid_rejects_bad_shapes():
    with pytest.raises(BadInputError, match="mask shape"): to_latent_grid(np.zeros((9, 60, 64), bool))
    with pytest.raises(BadInputError, match=r"mask: expected a \(T, H, W\) array"): to_latent_grid(np.zeros((64, 64), bool))

@pytest.mark.parametrize("framing", list(FRAMINGS))
def test_regions_on_rendered_puppets(framing):
    ident = identity_pool(8, 0)[3]
    clip = render_puppet_clip(seed=5, seconds=9 / 25, identity=ident, gesture="wave_right", framing=framing)
    kp, vis = clip.keypoints.astype(np.float32), clip.visibility
    T, H, W = clip.video.shape[:3]
    # wide enough: the radius (margin 1 px) covers the renderer's upper arm, 0.026 body units
    s = framing_camera(framing, (H, W), ident)[0]
    assert (ARM_RADIUS * head_radius(kp) + 1.0 >= 0.026 * s).all()
    limbs = limb_masks(kp, H, W)
    for n in ("left_elbow", "right_elbow", "left_wrist", "right_wrist", "right_middle"):
        for f in range(T):
            if vis[f, J[n]]: assert limbs[f, int(kp[f, J[n], 1]), int(kp[f, J[n], 0])], (n, f)
    assert limbs.sum() <= limb_masks(kp, H, W, margin=2.0).sum()
    mouth = mouth_masks(kp, H, W)
    assert mouth.any(1).any(1).all() and mouth.mean() < 0.05
    r = region_masks(kp, H, W)
    eq(sum(r[g].astype(int) for g in REGIONS), np.ones((3, H // 8, W // 8), int))
    eq(r["mouth"], to_latent_grid(mouth))

def test_keypoint_error():
    rng = np.random.default_rng(2)
    a, vis = rng.normal(size=(4, 25, 2)), rng.random((4, 25)) < 0.7
    close(keypoint_error(a, a + [3.0, 4.0], vis), 5.0)
    close(keypoint_error(a, a[::-1], vis), keypoint_error(a[::-1], a, vis))
    b = a.copy(); b[~vis] += 100
    close(keypoint_error(a, b, vis), 0.0)

def test_timestep_weights():
    ts = (0.1, 0.3, 0.5, 0.7, 0.9)
    w = timestep_weights(ts, 48)
    close(w.sum(), 1.0); eq(len(w), 5)
    close(timestep_weights(ts, 48, FlowConfig(sampling="uniform", shift=1.0)), [0.2] * 5, eps=0.01)
    eq(timestep_weights(ts, 48), w)   # seeded

def test_loss_by_region_identities():
    from omnihuman_nb.pipeline import build_pipeline, TINY
    torch.set_num_threads(1)
    res = loss_by_region(build_pipeline(**TINY), DATA, split="all", ts=(0.2, 0.8), windows_per_clip=1)
    close(sum(res["area"].values()), 1.0)
    for r in res["rows"]:
        close(sum(r[f"{g}_share"] for g in REGIONS), 1.0, eps=1e-5)
        close(sum(r[f"{g}_mse"] * res["area"][g] for g in REGIONS), r["loss"], eps=1e-5 * r["loss"])
    close(res["rows"][0]["loss"], res["rows"][1]["loss"], eps=1e-6)   # a fresh DiT says 0: the target does not depend on t
