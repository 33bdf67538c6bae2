"Omni-conditions trainer: bit-exact resume, bad input, the latent cache, the active-set draw, a 2-process run."
import json, os, subprocess, sys, textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from fastcore.test import test_eq as eq, test_fail as fails
from safetensors.torch import load_file

from omnihuman_nb.core import BadInputError
from omnihuman_nb.vae import CausalVAE
from omnihuman_nb.trainer import (StageConfig, TrainConfig, train_config, paper_stages, active_set, draw_pick, sample_order,
                                  train, latest_checkpoint, vae_fingerprint, LatentClips, _parse_stages)

CLIPS = Path(__file__).parents[1] / "data_samples" / "clips"
TINY = dict(batch_size=2, checkpoint_every=2, keep_checkpoints=10, dit_overrides=dict(num_layers=2, hidden_size=64))

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    "Tiny models train faster on one thread, and far faster when the CPU is shared."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("vae") / "vae"
    torch.manual_seed(0)
    CausalVAE(block_out_channels=(8, 8, 16, 16)).save_pretrained(d)
    return d

@pytest.fixture(scope="module")
def cache(tmp_path_factory): return tmp_path_factory.mktemp("cache")

def run(vae_dir, out, cache, **kw):
    kw = dict(dict(stages="1,2,3", steps_per_stage=2, config=train_config("classroom", **TINY), cache_dir=cache, verbose=False), **kw)
    return train(CLIPS, vae_dir, out, **kw)

def losses(out): return [json.loads(l)["loss"] for l in (Path(out) / "log.jsonl").read_text().splitlines()]

def test_resume_is_bit_exact(vae_dir, cache, tmp_path):
    a = run(vae_dir, tmp_path / "a", cache)
    eq(a["steps"], 6); assert a["finished"]
    b1 = run(vae_dir, tmp_path / "b", cache, max_steps=3)
    eq(b1["steps"], 3); assert not b1["finished"]
    b2 = run(vae_dir, tmp_path / "b", cache, resume=True)
    eq(b2["steps"], 6); assert b2["finished"]
    eq(losses(tmp_path / "a"), losses(tmp_path / "b"))                  # the same loss sequence, bit for bit
    wa = load_file(Path(a["checkpoint"]) / "model" / "diffusion_pytorch_model.safetensors")
    wb = load_file(Path(b2["checkpoint"]) / "model" / "diffusion_pytorch_model.safetensors")
    for k in wa: assert torch.equal(wa[k], wb[k]), k
    ea, eb = load_file(Path(a["checkpoint"]) / "ema.safetensors"), load_file(Path(b2["checkpoint"]) / "ema.safetensors")
    for k in ea: assert torch.equal(ea[k], eb[k]), k
    eq(a["counts"], b2["counts"])
    # a finished run resumed again does nothing and overwrites nothing
    b3 = run(vae_dir, tmp_path / "b", cache, resume=True)
    eq(b3["steps"], 6); eq(b3["weights_sha"], b2["weights_sha"])

def test_interventions_train_and_resume_exactly(vae_dir, cache, tmp_path):
    "Region weights, a condition learning rate and motion noise together: the run trains, the groups hold their rates, resume is bit-exact."
    cfg = train_config("classroom", **TINY, region_weights={"mouth": 30.0, "limbs": 3.0}, condition_lr=5.0, motion_noise=0.2)
    a = run(vae_dir, tmp_path / "a", cache, config=cfg)
    eq(a["steps"], 6)
    st = torch.load(Path(a["checkpoint"]) / "state.pt", weights_only=False)
    eq(sorted(g["initial_lr"] for g in st["optimizer"]["param_groups"]), sorted([cfg.lr, cfg.lr * 5.0]))   # before the warm-up factor
    run(vae_dir, tmp_path / "b", cache, config=cfg, max_steps=3)
    b = run(vae_dir, tmp_path / "b", cache, config=cfg, resume=True)
    eq(losses(tmp_path / "a"), losses(tmp_path / "b"))
    plain = run(vae_dir, tmp_path / "plain", cache)
    assert losses(tmp_path / "a") != losses(tmp_path / "plain")        # the interventions change the run

def test_never_overwrites_and_resume_checks_config(vae_dir, cache, tmp_path):
    run(vae_dir, tmp_path / "r", cache, stages="1", max_steps=2)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "r" / "checkpoints").iterdir()}
    with pytest.raises(BadInputError, match="never overwritten"): run(vae_dir, tmp_path / "r", cache, stages="1")
    with pytest.raises(BadInputError, match="lr"):
        run(vae_dir, tmp_path / "r", cache, stages="1", resume=True, config=train_config("classroom", **dict(TINY, lr=1e-3)))
    with pytest.raises(BadInputError, match="stages"): run(vae_dir, tmp_path / "r", cache, stages="1,2", resume=True)
    eq({p.name: p.stat().st_mtime_ns for p in (tmp_path / "r" / "checkpoints").iterdir()}, before)

def test_bad_data_and_vae(vae_dir, cache, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInputError, match="training data"): train(tmp_path / "empty", vae_dir, tmp_path / "o1", verbose=False)
    bad = tmp_path / "bad" / "clip_a"; bad.mkdir(parents=True)
    (bad / "meta.json").write_text(json.dumps(dict(n_frames=50, fps=25, height=64, width=64)))
    with pytest.raises(BadInputError, match="missing video.mp4"): train(tmp_path / "bad", vae_dir, tmp_path / "o2", verbose=False)
    v8 = tmp_path / "vae8"; CausalVAE(latent_channels=8, block_out_channels=(8, 8, 16, 16)).save_pretrained(v8)
    # the DiT takes its channels from the VAE; an override that disagrees with the VAE is refused
    clash = train_config("classroom", **dict(TINY, dit_overrides=dict(TINY["dit_overrides"], in_channels=16)))
    with pytest.raises(BadInputError, match="latent channels"): train(CLIPS, v8, tmp_path / "o3", config=clash, verbose=False)
    with pytest.raises(BadInputError, match="VAE folder"): train(CLIPS, tmp_path, tmp_path / "o4", verbose=False)
    assert not any((tmp_path / f"o{i}").exists() for i in (2, 3, 4))

def test_bad_stage_configs():
    with pytest.raises(BadInputError, match="ratio of audio"): StageConfig("s", dict(text=0.9, audio=1.5))
    with pytest.raises(BadInputError, match="some of"): StageConfig("s", dict(text=0.9, smell=0.5))
    with pytest.raises(BadInputError, match="ratio of pose"):
        TrainConfig.from_json('{"stages": [{"name": "x", "ratios": {"pose": -0.1}}]}')
    with pytest.raises(BadInputError, match="stages"): _parse_stages("1,4", train_config())

def test_active_set_frequencies():
    st = paper_stages()[2]
    rng = np.random.default_rng(0)
    info = dict(n_frames=50, has=dict(text=True, ref=True, audio=False, pose=True))
    cfg = TrainConfig()
    picks = [draw_pick(rng, 0, info, st, cfg) for _ in range(4000)]
    share = {c: np.mean([p.on[c] for p in picks]) for c in ("text", "ref", "audio", "pose")}
    eq(share["audio"], 0.0)                                            # the clip has no audio: never on
    for c in ("text", "ref", "pose"): assert abs(share[c] - st.ratios[c]) < 0.03, (c, share[c])
    assert abs(np.mean([p.motion for p in picks]) - st.motion_share) < 0.03
    for p in picks:                                                    # windows fit; motion frames sit before them
        assert 0 <= p.start and p.start + cfg.window_latents <= 13 and (not p.motion or p.start >= cfg.motion_latents)
        assert 0 <= p.ref_frame < 49                                   # 50 frames: the VAE encodes the first 1 + 4k = 49

def test_sample_order_epochs_and_ranks():
    cfg = TrainConfig(batch_size=3)
    r0 = sum((sample_order(s, 0, cfg, 6, 0, 2) for s in range(2)), [])
    r1 = sum((sample_order(s, 0, cfg, 6, 1, 2) for s in range(2)), [])
    eq(sorted(r0[:3] + r1[:3]), list(range(6)))                        # one epoch, split across the ranks

def test_latent_cache_keyed_by_vae(vae_dir, tmp_path):
    vae = CausalVAE.from_pretrained(vae_dir).eval()
    lc = LatentClips(CLIPS, vae, vae_fingerprint(vae_dir), 9, tmp_path, verbose=False)
    files = sorted((tmp_path / vae_fingerprint(vae_dir)).glob("*.safetensors"))
    eq(len(files), len(lc))
    z = lc.latents(0)
    eq(z["latents"].shape[:2], (16, 13)); eq(z["frames"].shape[:2], (49, 16))
    assert torch.allclose(z["latents"], lc.encode(0)["latents"], atol=1e-5)   # cached == freshly encoded
    v2 = tmp_path / "vae2"; torch.manual_seed(1); CausalVAE(block_out_channels=(8, 8, 16, 16)).save_pretrained(v2)
    assert vae_fingerprint(v2) != vae_fingerprint(vae_dir)             # another VAE, another cache folder

SCRIPT = """
import sys, torch
from omnihuman_nb.trainer import train, train_config
cfg = train_config("classroom", batch_size=1, checkpoint_every=100, dit_overrides=dict(num_layers=1, hidden_size=32, num_heads=2))
train(sys.argv[1], sys.argv[2], sys.argv[3], stages="1", steps_per_stage=2, config=cfg, cache_dir=sys.argv[4], verbose=False)
"""

def test_two_processes_gloo(vae_dir, cache, tmp_path):
    (tmp_path / "ddp.py").write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(tmp_path / "ddp.py"),
           str(CLIPS), str(vae_dir), str(tmp_path / "out"), str(cache)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    r = [json.loads((tmp_path / "out" / f"rank{i}.json").read_text()) for i in (0, 1)]
    eq(r[0]["weights_sha"], r[1]["weights_sha"])                      # DDP kept the replicas identical
    assert not set(r[0]["seen"][:2]) & set(r[1]["seen"][:2])           # each rank drew different clips
    eq(json.loads((tmp_path / "out" / "summary.json").read_text())["world_size"], 2)

STOP_SCRIPT = """
import sys, json, torch
torch.set_num_threads(1)
from omnihuman_nb.trainer import train, train_config
cfg = train_config("classroom", batch_size=1, checkpoint_every=1000, dit_overrides=dict(num_layers=1, hidden_size=32, num_heads=2))
r = train(sys.argv[1], sys.argv[2], sys.argv[3], stages="1", steps_per_stage=100000, config=cfg, cache_dir=sys.argv[4], verbose=False)
print("RESULT", json.dumps(dict(interrupted=r["interrupted"], steps=r["steps"], checkpoint=r["checkpoint"])))
"""

def test_sigterm_saves_and_exits(vae_dir, cache, tmp_path):
    import time
    (tmp_path / "stop.py").write_text(STOP_SCRIPT)
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, str(tmp_path / "stop.py"), str(CLIPS), str(vae_dir), str(out), str(cache)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    t0 = time.time()
    while not ((out / "log.jsonl").exists() and (out / "log.jsonl").read_text().count("\n") >= 2):
        assert p.poll() is None and time.time() - t0 < 120, p.stderr.read()[-2000:] if p.poll() is not None else "timeout"
        time.sleep(0.2)
    p.send_signal(15)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 0, stderr[-2000:]
    r = json.loads(stdout.split("RESULT", 1)[1])
    assert r["interrupted"] and r["steps"] >= 2
    ck = latest_checkpoint(out)
    eq(json.loads((ck / "trainer_state.json").read_text())["step"], r["steps"])   # the checkpoint holds the last step

def test_grad_accum_and_minutes(vae_dir, cache, tmp_path):
    r = run(vae_dir, tmp_path / "acc", cache, stages="2", config=train_config("classroom", **dict(TINY, batch_size=1, grad_accum=2)))
    eq(r["steps"], 2); eq(sum(r["counts"]["2"].values()), 4)           # 2 steps x 2 micro-batches x 1 sample
    rows = [json.loads(l) for l in (tmp_path / "acc" / "log.jsonl").read_text().splitlines()]
    eq([sum(x["combos"].values()) for x in rows], [2, 2])
    r = run(vae_dir, tmp_path / "min", cache, stages="1", steps_per_stage=None, minutes_per_stage=0.01)
    assert r["finished"] and r["steps"] >= 1                           # the stage ended on its time budget
