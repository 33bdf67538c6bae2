"""Causal VAE: causality, exact streaming, save/load, shapes, errors, flat memory, and a tiny training run."""
import json, tempfile
from pathlib import Path
import numpy as np
import pytest, torch
from hypothesis import given, settings, strategies as st
from fastcore.test import test_eq as eq, test_fail as fails, test_close as close
from omnihuman_nb.core import BadInputError
from omnihuman_nb.vae import CausalVAE, TensorMemory
from omnihuman_nb.data import read_video
from omnihuman_nb.vae_train import (VAETrainConfig, make_toy_clips, train_vae, recon, load_clips,
                                    split_identities, evaluate_vae)

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    with torch.no_grad(): yield
    torch.set_num_threads(n)

def tiny(**kw):
    torch.manual_seed(0)
    return CausalVAE(**(dict(block_out_channels=(8, 16, 16, 16), latent_channels=4) | kw)).eval()

def vid(T, hw=16, seed=0): return torch.rand(1, 3, T, hw, hw, generator=torch.Generator().manual_seed(seed)) * 2 - 1

@pytest.mark.parametrize("T,t", [(1, 1), (5, 2), (17, 5), (33, 9)])
def test_shapes(T, t):
    v = tiny(); z = v.encode(vid(T)).mode()
    eq(z.shape, (1, 4, t, 2, 2)); eq(v.decode(z).shape, (1, 3, T, 16, 16))

def test_other_factors():
    v = tiny(block_out_channels=(8, 16, 16), spatial_compression=4, temporal_compression=2, mid_attention=True)
    z = v.encode(vid(9)).mode(); eq(z.shape, (1, 4, 5, 4, 4)); eq(v.decode(z).shape, (1, 3, 9, 16, 16))

@pytest.mark.parametrize("attn", [False, True])
def test_causality_bit_identical(attn):
    v = tiny(mid_attention=attn)
    for nn_ in v.modules():   # non-zero attention output so attention is really exercised
        if hasattr(nn_, "proj"): torch.nn.init.normal_(nn_.proj.weight, std=0.1)
    x = vid(17); z = v.encode(x).mode()
    for t in (1, 5, 9, 13):   # change frames t.. : latents covering frames < t stay put
        x2 = x.clone(); x2[:, :, t:] = vid(17 - t, seed=t)
        k = 1 + (t - 1) // 4
        eq(v.encode(x2).mode()[:, :, :k], z[:, :, :k])
        assert not torch.equal(v.encode(x2).mode()[:, :, k:], z[:, :, k:])

@settings(max_examples=8, deadline=None)
@given(k=st.integers(0, 6), chunk=st.integers(1, 4), attn=st.booleans())
def test_streaming_equals_single_pass(k, chunk, attn):
    v = tiny(mid_attention=attn); x = vid(1 + 4 * k, seed=k)
    z = v.encode(x).mode()
    assert (v.encode(x, chunk=chunk).mode() - z).abs().max() <= 1e-5
    assert (v.decode(z, chunk=chunk) - v.decode(z)).abs().max() <= 1e-5

def test_streaming_calls_do_not_leak():
    v = tiny(); x = vid(9)
    a = v.decode(v.encode(x, chunk=1).mode(), chunk=1)
    v.encode(vid(5, seed=3), chunk=1)                  # another video in between
    eq(v.decode(v.encode(x, chunk=1).mode(), chunk=1), a)

def test_save_load_exact(tmp_path):
    v = tiny(mid_attention=True); v.register_to_config(latents_mean=[0.5] * 4, latents_std=[2.0] * 4)
    v.save_pretrained(tmp_path); w = CausalVAE.from_pretrained(tmp_path).eval()
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    for (k, a), (k2, b) in zip(v.state_dict().items(), w.state_dict().items()): eq(k, k2); assert torch.equal(a, b)
    x = vid(5); eq(w.encode(x).mode(), v.encode(x).mode()); eq(w.config.latents_std, [2.0] * 4)

def test_errors():
    v = tiny()
    fails(lambda: v.encode(vid(8)), contains="video frame count: expected 1+4k")
    fails(lambda: v.encode(vid(5, hw=12)), contains="video size: expected H and W divisible by 8")
    fails(lambda: v.encode(torch.zeros(1, 1, 5, 16, 16)), contains="video shape: expected size 3 in dim 1")
    x = vid(5); x[0, 0, 0, 0, 0] = float("inf")
    fails(lambda: v.encode(x), contains="0 NaN and 1 inf")
    fails(lambda: v.decode(torch.zeros(1, 3, 2, 2, 2)), contains="latents shape")
    fails(lambda: v.encode(vid(5), pad="zeros"), contains="pad: expected 'error' or 'repeat_last'")
    assert isinstance(pytest.raises(BadInputError, v.encode, vid(6)).value, ValueError)
    eq(v.encode(vid(6), pad="repeat_last").mode().shape[2], 3)

def test_flat_stream_memory():
    v = tiny()
    def peak(n):
        z = torch.randn(1, 4, n, 4, 4)
        with TensorMemory() as m:
            for c in v.decode_stream(z, 1): del c
        return m.peak
    assert peak(33) <= 1.05 * peak(5)

def test_tiling_shapes_and_single_tile_exact():
    v = tiny(); x = vid(5, hw=64)
    small = v.encode(x[..., :32, :32]).mode()
    v.enable_tiling(32, 16)
    eq(v.encode(x[..., :32, :32]).mode(), small)
    eq(v.encode(x).mode().shape, (1, 4, 2, 8, 8)); eq(v.decode(torch.randn(1, 4, 2, 8, 8)).shape, (1, 3, 5, 64, 64))

def test_train_resume_recon(tmp_path):
    with torch.enable_grad():
        data = tmp_path / "data"; make_toy_clips(data, n_identities=3, clips_per_identity=1, frames=9, size=16)
        cfg = VAETrainConfig(size=16, block_out_channels=(8, 8, 8, 8), latent_channels=3, video_frames=5, batch_size=1,
                             image_batch_size=2, warmup=1, disc_start=1, eval_every=2, ckpt_every=2, eval_frames=5, holdout=0.34)
        s = train_vae(data, tmp_path / "run", steps=3, config=cfg, progress=False)
        eq(s["steps"], 3); assert s["heldout_psnr"] > 0 and not s["heldout_is_train"]
        eq(train_vae(data, tmp_path / "run", steps=4, config=cfg, progress=False)["steps_this_run"], 1)
    r = recon(tmp_path / "run", data / "toy00_00" / "video.mp4", tmp_path / "rec.mp4")
    eq(read_video(tmp_path / "rec.mp4")[0].shape, (9, 16, 16, 3)); assert "mouth_psnr" in r
