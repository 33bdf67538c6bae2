"""End-to-end runs of the `omnihuman` console script, as a user types them."""
import json, shutil, subprocess, sys
from pathlib import Path

import pytest

def omnihuman(*args, cwd=None):
    "Run the installed console script; return (status, stdout, stderr)."
    exe = shutil.which("omnihuman")
    cmd = [exe] if exe else [sys.executable, "-c", "import sys; from omnihuman_nb.cli import main; sys.exit(main())"]
    r = subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, cwd=cwd, timeout=600)
    return r.returncode, r.stdout, r.stderr

def test_help_and_version():
    st, out, _ = omnihuman("--help")
    assert st == 0 and "usage: omnihuman" in out
    for group in ("data", "vae", "bench"): assert group in out
    st, out, _ = omnihuman("--version")
    assert st == 0 and out.startswith("omnihuman_nb ")

def test_unknown_command_fails():
    st, _, err = omnihuman("data", "paint")
    assert st == 2 and "invalid choice" in err

def test_render_then_check(tmp_path):
    out = tmp_path / "clips"
    st, o, e = omnihuman("data", "render", "--out", out, "--clips", 3, "--seconds", 0.4, "--seed", 1)
    assert st == 0, e
    assert f"outputs are in {out}" in o
    st, o, e = omnihuman("data", "check", out)
    assert st == 0, o + e
    assert "3 of 3 clips good" in o

def test_check_reports_a_broken_clip(tmp_path):
    out = tmp_path / "clips"
    assert omnihuman("data", "render", "--out", out, "--clips", 2, "--seconds", 0.4)[0] == 0
    victim = sorted(p for p in out.iterdir() if p.is_dir())[0]
    (victim / "video.mp4").write_bytes((victim / "video.mp4").read_bytes()[:200])   # truncate the video
    st, o, e = omnihuman("data", "check", out)
    assert st == 1, "a folder with a bad clip must exit 1"
    assert victim.name in o and "BAD" in o

def test_bad_input_is_one_line(tmp_path):
    st, o, e = omnihuman("data", "check", tmp_path / "missing")
    assert st == 2
    assert e.startswith("error: ") and "Traceback" not in e

def test_the_whole_path_from_the_command(tmp_path):
    "render -> vae train -> train (3 stages) -> pipeline assemble -> generate: every step through the command, at toy size."
    import av
    from omnihuman_nb.data import read_video
    from PIL import Image
    d = tmp_path
    assert omnihuman("data", "render", "--out", d / "clips", "--clips", 4, "--seconds", 0.8, "--seed", 2)[0] == 0
    st, o, e = omnihuman("vae", "train", "--data", d / "clips", "--out", d / "vae", "--steps", 2)
    assert st == 0, e[-2000:]
    st, o, e = omnihuman("train", "--data", d / "clips", "--vae", d / "vae", "--out", d / "run", "--steps-per-stage", 1)
    assert st == 0, e[-2000:]
    assert "stage 3" in o and f"outputs are in {d / 'run'}" in o
    st, o, e = omnihuman("pipeline", "assemble", "--dit", d / "run", "--vae", d / "vae", "--out", d / "pipe")
    assert st == 0, e[-2000:]
    frame = read_video(next((d / "clips").glob("clip_*/video.mp4")))[0][0]
    Image.fromarray(frame).save(d / "ref.png")
    wav = Path(__file__).resolve().parent.parent / "data_samples" / "speech" / "hello_puppet_f.wav"
    st, o, e = omnihuman("generate", "--model", d / "pipe", "--ref", d / "ref.png", "--audio", wav, "--text", "a puppet talks",
                         "--seconds", 0.8, "--steps", 2, "--out", d / "talk.mp4")
    assert st == 0, e[-2000:]
    with av.open(str(d / "talk.mp4")) as c:
        kinds = sorted(s.type for s in c.streams)
        n_video = sum(1 for _ in c.decode(video=0))
    assert kinds == ["audio", "video"]
    assert n_video == 20                       # 0.8 s at 25 fps
    # score what was generated, then the model on the held-out clips
    st, o, e = omnihuman("eval", "--video", d / "talk.mp4", "--audio", wav, "--json", d / "talk.json")
    assert st == 0, e[-2000:]
    got = json.loads((d / "talk.json").read_text())
    for k in ("sync_r", "sync_lag", "hand_var", "identity_drift", "fd", "flicker"): assert k in got, k
    samples = Path(__file__).resolve().parent.parent / "data_samples" / "clips"   # holds clips of held-out identities
    st, o, e = omnihuman("eval", "--model", d / "pipe", "--data", samples, "--max-clips", 1, "--steps", 1, "--cfg-pose", 2, "--json", d / "model.json")
    assert st == 0, e[-2000:]
    got = json.loads((d / "model.json").read_text())
    assert got["clips"] == 1 and "real" in got and "pck" in got and got["cfg_pose"] == 2.0

def test_eval_scores_a_real_clip_and_refuses_a_mix(tmp_path):
    clip = Path(__file__).resolve().parent.parent / "data_samples" / "clips" / "clip_00004"
    st, o, e = omnihuman("eval", "--video", clip / "video.mp4", "--audio", clip / "audio.wav", "--json", tmp_path / "m.json")
    assert st == 0, e[-2000:]
    got = json.loads((tmp_path / "m.json").read_text())
    assert got["sync_lag"] == 0 and got["sync_r"] > 0.8, got
    st, o, e = omnihuman("eval")
    assert st == 2 and e.startswith("error: what to score")
    st, o, e = omnihuman("eval", "--video", clip / "video.mp4", "--model", tmp_path)
    assert st == 2 and "got both" in e

def test_demo_with_the_shipped_weights(tmp_path):
    "`omnihuman demo` as the README runs it, cut to a quick look: three mp4s with the right sound, metrics.json, report.html."
    from omnihuman_nb.data import read_video
    from omnihuman_nb.demo import CLASSROOM_DIR
    import av
    assert (CLASSROOM_DIR / "vae" / "config.json").is_file() and (CLASSROOM_DIR / "dit" / "model" / "config.json").is_file(), \
        "the classroom weights ship with the package"
    out = tmp_path / "demo"
    st, o, e = omnihuman("demo", "--out", out, "--steps", 2, "--max-seconds", 1.6)
    assert st == 0, e[-2000:]
    assert f"outputs are in {out}" in o and "report.html" in o
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["videos"]) == {"audio_driven", "pose_driven", "long"}
    assert m["info"]["weights"] == str(CLASSROOM_DIR)
    for name, v in m["videos"].items():
        frames, fps = read_video(out / f"{name}.mp4")
        assert frames.shape == (40, 256, 256, 3) and fps == 25
        with av.open(str(out / f"{name}.mp4")) as c:
            assert (len(c.streams.audio) == 1) == (name != "pose_driven"), name   # sound where audio drove it
    assert m["videos"]["audio_driven"]["sync_r"] is not None and m["videos"]["pose_driven"]["pck"] is not None
    html = (out / "report.html").read_text()
    assert all(f'src="{n}.mp4"' in html for n in m["videos"])

def test_experiment_cfg_from_the_command(tmp_path):
    "`omnihuman experiment cfg` cut to one step everywhere: the clips are rendered, the sweep is scored, results.json and figure.html written."
    out = tmp_path / "exp"
    st, o, e = omnihuman("experiment", "cfg", "--out", out, "--seeds", "0", "--base-steps", 1, "--eval-clips", 1, "--eval-steps", 1)
    assert st == 0, e[-2000:]
    r = json.loads((out / "cfg" / "results.json").read_text())
    assert [row["arm"] for row in r["rows"]] == ["cfg 1", "cfg 2 constant", "cfg 2 annealed", "cfg 3 constant", "cfg 3 annealed",
                                                 "cfg 5 constant", "cfg 5 annealed"]
    assert all(row["sync_r"] is not None for row in r["rows"]) and (out / "cfg" / "figure.html").is_file()
    assert (out / "base" / "heldout" / "dataset.json").is_file() and f"outputs are in {out / 'cfg'}" in o
    assert not (out / "base" / "stage1").exists()                 # the sweep needs no shared model: none is trained
    st, o, e = omnihuman("experiment", "nope", "--out", out)
    assert st == 2 and "invalid choice" in e
