"""The generation pipeline end to end with tiny untrained models: save/load, determinism, the three kinds of
generation, long video through motion frames, guidance, NaN handling, mp4 export, bad input, generate and the bench."""
import json, shutil
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image
from fastcore.test import test_eq as eq, test_close as close, test_fail as fails

from omnihuman_nb.core import BadInputError, make_generator
from omnihuman_nb.data import read_video, read_audio
from omnihuman_nb.flow import guided_velocity, sampling_times
from omnihuman_nb.vae import TensorMemory
from omnihuman_nb.pipeline import (TINY, COMPONENTS, OmniHumanPipeline, build_pipeline, perturb_weights, plan_segments, Segment,
                                   export_mp4, generate, load_reference, fit_wav, load_wav, cfg_schedule,
                                   dit_velocity, separate_velocity)
from omnihuman_nb.bench import bench_sample

SAMPLES = Path(__file__).resolve().parents[1] / "data_samples"
SPEECH, POSE = SAMPLES / "speech/hello_puppet_f.wav", SAMPLES / "clips/clip_00005/pose.json"
CAPTION = "a man with short red hair in a green shirt, talking"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    old = torch.get_num_threads(); torch.set_num_threads(1)   # shared 2-core CPU
    yield
    torch.set_num_threads(old)

@pytest.fixture(scope="module")
def ref():
    return read_video(SAMPLES / "clips/clip_00005/video.mp4", stop=1)[0][0]

@pytest.fixture(scope="module")
def pipe():
    return _tiny()

def _tiny(**over):
    p = build_pipeline(**{**TINY, **over})
    perturb_weights(p.transformer)
    return p

@pytest.fixture(scope="module")
def model_dir(pipe, tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    pipe.save_pretrained(d)
    return d


def test_roundtrip_same_video(pipe, model_dir, ref):
    eq(sorted(p.name for p in model_dir.iterdir()), sorted(COMPONENTS + ("model_index.json",)))
    loaded = OmniHumanPipeline.from_pretrained(model_dir)
    kw = dict(audio=SPEECH, text=CAPTION, seconds=0.5, steps=2, seed=3)
    eq(loaded(ref, **kw).frames, pipe(ref, **kw).frames)
    keys = ("height", "width", "segment_frames", "motion_frames", "shift") + COMPONENTS
    eq({k: loaded.config[k] for k in keys}, {k: pipe.config[k] for k in keys})

def test_deterministic_bit_for_bit(model_dir, ref):
    a, b = (OmniHumanPipeline.from_pretrained(model_dir) for _ in range(2))
    kw = dict(audio=SPEECH, pose=POSE, text=CAPTION, seconds=0.5, steps=2, seed=7, cfg_audio=2.5, cfg_text=1.5, anneal="cosine")
    x, y = a(ref, **kw), b(ref, **kw)
    eq(x.frames, y.frames); eq(x.audio, y.audio)
    assert not np.array_equal(a(ref, **{**kw, "seed": 8}).frames, x.frames)

@pytest.mark.parametrize("mode", ["audio", "pose", "text"])
def test_three_modes(pipe, ref, mode):
    inputs = dict(audio=dict(audio=SPEECH, text=CAPTION), pose=dict(pose=POSE, text=CAPTION), text=dict(text=CAPTION))[mode]
    out = pipe(ref, **inputs, frames=12, steps=2)
    eq(out.frames.shape, (12, 32, 32, 3)); eq(out.frames.dtype, np.uint8)
    want = dict(audio=dict(text=True, ref=True, audio=True, pose=False), pose=dict(text=True, ref=True, audio=True, pose=True),
                text=dict(text=True, ref=True, audio=False, pose=False))[mode]
    eq(out.info["active"], want)
    eq(out.audio is None, mode != "audio")

def test_euler_and_diffusers_agree(pipe, ref):
    kw = dict(audio=SPEECH, text=CAPTION, frames=9, steps=6, seed=0)
    eq(pipe(ref, **kw, sampler="euler").frames, pipe(ref, **kw, sampler="diffusers").frames)
    p = pipe.prepare(ref, **kw)
    t, lens = pipe.text_encoder([p.caption])
    vel = dit_velocity(pipe.transformer, dict(text=t, text_lens=lens, ref=pipe.encode_frames(p.ref[None]), audio=pipe.audio_features(p.wav, 9)[None]))
    x, times = torch.randn(1, 16, 3, 4, 4, generator=make_generator(1)), sampling_times(6, 2.0)
    with torch.no_grad():
        za = pipe.sample_latents(vel, x, times, cfg_schedule(3.0), cfg_schedule(2.0), "euler")
        zb = pipe.sample_latents(vel, x, times, cfg_schedule(3.0), cfg_schedule(2.0), "diffusers")
        assert (za - zb).abs().max() <= 1e-6
        close(guided_velocity(vel, x, torch.tensor([0.5]), 3.0, 2.0), separate_velocity(vel, x, torch.tensor([0.5]), 3.0, 2.0), eps=1e-5)

def test_long_video_motion_audio_pose_per_segment(pipe, ref):
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append({k: kw[k] for k in ("motion", "audio", "pose")}), with_kwargs=True)
    wav = np.tile(load_wav(SPEECH), 2)
    try:
        plan = pipe.prepare(ref, audio=wav, pose=POSE, text=CAPTION, frames=30, steps=1, cfg_audio=2.0, cfg_text=1.0)
        parts = list(pipe.iter_segments(plan))
    finally: hook.remove()
    eq([s for s, _ in parts], [Segment(0, 0, 9, 9), Segment(1, 9, 9, 9), Segment(2, 18, 9, 9), Segment(3, 27, 5, 3)])
    eq(sum(len(f) for _, f in parts), 30)
    feats = pipe.audio_features(plan.wav, plan.frames_generated)
    from omnihuman_nb.data import pose_heatmaps
    assert seen[0]["motion"] is None
    for (s, f), prev, call in zip(parts, [None] + parts[:-1], seen):      # one DiT call per segment (steps=1, CFG batch of 2)
        eq(call["audio"].shape[0], 2)
        eq(call["audio"][0], feats[s.start:s.start + s.frames])           # audio sliced to the segment
        eq(call["pose"][0], pose_heatmaps(plan.keypoints[s.start:s.start + s.frames], plan.visibility[s.start:s.start + s.frames], (32, 32)))
        if prev is not None: eq(call["motion"][0], pipe.encode_frames(prev[1][-5:])[0])   # the last 5 frames before it

def test_memory_flat_in_length(pipe, ref):
    def peak(frames):
        plan = pipe.prepare(ref, audio=SPEECH, text=CAPTION, frames=frames, steps=1)
        with TensorMemory() as mem:
            for _ in pipe.iter_segments(plan): pass
        return mem.peak
    one, four = peak(9), peak(36)
    assert four <= one * 1.1, (one, four)

def test_nan_names_the_step(pipe, ref):
    calls = [0]
    def poison(m, i, out):
        calls[0] += 1
        return out * float("nan") if calls[0] == 5 else out
    h = pipe.transformer.proj_out.register_forward_hook(poison)
    try: fails(lambda: pipe(ref, text=CAPTION, frames=18, steps=3), contains="latents after sampling step 2 of 3 (segment 2 of 2)")
    finally: h.remove()

def test_export_mp4_with_sound_and_no_partial(tmp_path):
    frames = (np.random.default_rng(0).random((20, 32, 48, 3)) * 255).astype(np.uint8)
    wav = (0.3 * np.sin(np.arange(12800) / 16000 * 2 * np.pi * 300)).astype(np.float32)
    p = export_mp4(iter([frames[:7], frames[7:]]), wav, tmp_path / "a.mp4")
    with av.open(str(p)) as f:
        eq(sorted(s.type for s in f.streams), ["audio", "video"])
        eq(f.streams.video[0].codec_context.name, "h264"); eq(f.streams.audio[0].codec_context.name, "aac")
    eq(read_video(p)[0].shape, (20, 32, 48, 3))
    def bad():
        yield frames[:5]
        yield frames[:5, :16]                      # a chunk of another size
    fails(lambda: export_mp4(bad(), wav, tmp_path / "b.mp4"), contains="frame size")
    eq(sorted(x.name for x in tmp_path.iterdir()), ["a.mp4"])
    fails(lambda: export_mp4(frames, None, tmp_path / "c.avi"), contains="output path: expected a file name ending in .mp4")

def test_bad_inputs(pipe, model_dir, ref, tmp_path):
    (tmp_path / "x.png").write_text("this is not a png")
    fails(lambda: pipe.prepare(tmp_path / "x.png", text="hi", seconds=1), contains="reference image: expected an image file")
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    fails(lambda: pipe.prepare(ref, audio=tmp_path / "empty.wav", seconds=1), contains="audio: expected at least one sample")
    (tmp_path / "junk.wav").write_bytes(b"RIFF0000WAVEjunk")
    fails(lambda: pipe.prepare(ref, audio=tmp_path / "junk.wav", seconds=1), contains="audio file: expected a readable audio file")
    fails(lambda: pipe.prepare(ref, pose=POSE, seconds=2.5), contains="pose: expected at least 62 frames")
    fails(lambda: pipe.prepare(ref, text="hi"), contains="duration")
    for c in COMPONENTS:
        broken = tmp_path / f"no_{c}"
        shutil.copytree(model_dir, broken); shutil.rmtree(broken / c)
        fails(lambda: OmniHumanPipeline.from_pretrained(broken), contains=f"lacks ['{c}']")
    w = tmp_path / "no_weights"; shutil.copytree(model_dir, w)
    for f in (w / "transformer").glob("*.safetensors"): f.unlink()
    fails(lambda: OmniHumanPipeline.from_pretrained(w), contains="lacks ['transformer']")

def test_reference_policy(ref):
    tall = np.concatenate([ref, ref[::-1]], 0)                         # 128 x 64
    out = load_reference(Image.fromarray(tall), (32, 32))
    eq(out.shape, (32, 32, 3))
    big = np.asarray(Image.fromarray(tall).resize((32, 64), Image.BICUBIC))
    eq(out, big[16:48])                                                # scaled to cover, centre kept
    eq(load_reference(ref, (64, 64)), ref)

def test_generate_writes_and_reports(model_dir, ref, tmp_path, capsys):
    Image.fromarray(ref).save(tmp_path / "ref.png")
    res = generate(tmp_path / "ref.png", audio=SPEECH, text=CAPTION, seconds=0.4, steps=2, out=tmp_path / "o" / "out.mp4", model_dir=model_dir)
    assert f"outputs are in {tmp_path / 'o' / 'out.mp4'}" in capsys.readouterr().out
    eq(res["frames"], 10); eq(Path(res["out"]).exists(), True)
    eq(read_video(res["out"])[0].shape, (10, 32, 32, 3))
    eq(sorted(x.name for x in (tmp_path / "o").iterdir()), ["out.mp4"])
    fails(lambda: generate(tmp_path / "ref.png", pose=POSE, seconds=5, out=tmp_path / "p.mp4", model_dir=model_dir), contains="pose: expected at least")
    assert not (tmp_path / "p.mp4").exists()

def test_bench_sample_keys(tmp_path):
    r = bench_sample(tmp_path / "b.json", seconds=0.2, steps=1, size=32, repeats=2)
    d = json.loads((tmp_path / "b.json").read_text())
    for k in ("seconds_per_video_second", "batched_cfg_speedup", "pose_guidance_cost"): assert d[k] > 0 and d[k] == r[k]
    assert d["batched_vs_separate_max_diff"] < 1e-4

@settings(max_examples=60, deadline=None)
@given(st.integers(1, 600), st.integers(0, 16))
def test_plan_segments_cover(n, k):
    segs = plan_segments(n, 1 + 4 * k)
    eq(sum(s.keep for s in segs), n)
    for a, b in zip(segs, segs[1:]): eq(b.start, a.start + a.keep); eq(a.keep, a.frames)
    assert all((s.frames - 1) % 4 == 0 and 1 <= s.keep <= s.frames <= 1 + 4 * k for s in segs)
    assert segs[-1].frames - segs[-1].keep < 4

def test_cfg_schedule_never_below_one():
    for kind in ("linear", "cosine", "none"):
        for s in (0.5, 1.0, 1.2, 3.0, 7.5):
            sc = cfg_schedule(s, kind).scales(10)
            eq(sc[0], s)
            assert all(v >= min(1.0, s) - 1e-9 for v in sc)

def test_latent_stream_mode_matches_one_decode(ref, tmp_path):
    from omnihuman_nb.pipeline import _to_frames
    p = _tiny(motion="latents", motion_latents=2)
    zs, seen = [], []
    sample = p.sample_latents
    p.sample_latents = lambda *a, **k: zs.append(sample(*a, **k)) or zs[-1]
    h = p.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    try:
        plan = p.prepare(ref, audio=SPEECH, pose=POSE, text=CAPTION, frames=25, steps=1, cfg_audio=2.0, cfg_text=1.0)
        parts = list(p.iter_segments(plan))
    finally: h.remove(); del p.sample_latents
    eq([s for s, _ in parts], [Segment(0, 0, 9, 9, 3), Segment(1, 9, 12, 12, 3), Segment(2, 21, 4, 4, 1)])
    video = np.concatenate([f for _, f in parts])
    eq(video, _to_frames(p.vae.decode(p.vae.denormalize(torch.cat(zs, 2))))[:25])
    for k in (1, 2): eq(seen[k]["motion"][:1], zs[k - 1][:, :, -2:])
    eq(seen[2]["audio"].shape[1], 1)                       # a one-latent segment hears one frame: its last
    p.save_pretrained(tmp_path / "m")
    q = OmniHumanPipeline.from_pretrained(tmp_path / "m")
    eq((q.config.motion, q.config.motion_latents), ("latents", 2))
    kw = dict(text=CAPTION, frames=14, steps=2, seed=1)
    eq(q(ref, **kw).frames, p(ref, **kw).frames)
    fails(lambda: _tiny(motion="frames"), contains="motion: expected 'pixels', 'latents' or 'none'")

@settings(max_examples=40, deadline=None)
@given(st.integers(1, 400), st.integers(0, 12))
def test_plan_segments_continuous_cover(n, k):
    segs = plan_segments(n, 1 + 4 * k, continuous=True)
    eq(sum(s.keep for s in segs), n)
    eq(segs[0].frames, 1 + 4 * (segs[0].latents - 1))
    for s in segs[1:]: eq(s.frames, 4 * s.latents); assert 1 <= s.latents <= 1 + k
    for a, b in zip(segs, segs[1:]): eq(b.start, a.start + a.frames)

def test_assemble_from_trainer_layout(pipe, ref, tmp_path):
    from safetensors.torch import save_file
    from omnihuman_nb.dit import OmniHumanDiT
    from omnihuman_nb.pipeline import assemble_pipeline, TextEncoderModel
    ck = tmp_path / "run" / "checkpoints" / "step_00000005"
    pipe.transformer.save_pretrained(ck / "model")
    ema = {k: v * 0.5 for k, v in pipe.transformer.named_parameters()}
    save_file({k: v.detach().contiguous() for k, v in ema.items()}, ck / "ema.safetensors")
    (ck / "trainer_state.json").write_text(json.dumps(dict(step=5, config=dict(n_frames=9, motion_latents=2))))
    (tmp_path / "run" / "checkpoints" / "latest").write_text(ck.name)
    pipe.vae.save_pretrained(tmp_path / "vae")
    fails(lambda: assemble_pipeline(tmp_path / "run", tmp_path / "vae"), contains="hashed-words")
    m = assemble_pipeline(tmp_path / "run", tmp_path / "vae", height=32, width=32, text_encoder=pipe.text_encoder)
    eq((m.config.segment_frames, m.config.motion, m.config.motion_latents), (9, "latents", 2))
    eq(m.transformer.state_dict()["blocks.0.vid.qkv.weight"], ema["blocks.0.vid.qkv.weight"].detach())
    m2 = assemble_pipeline(ck / "model", tmp_path, height=32, width=32, text_encoder=pipe.text_encoder)   # a bare DiT folder: raw weights, pixel motion
    eq(m2.config.motion, "pixels"); eq(m2.transformer.state_dict()["proj_out.weight"], pipe.transformer.state_dict()["proj_out.weight"])
    eq(m(ref, text=CAPTION, frames=14, steps=1).frames.shape, (14, 32, 32, 3))
