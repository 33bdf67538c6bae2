"""The package stands on its own: a wheel built from this tree, installed into a fresh virtual environment, runs the
main job from an empty folder, with no clone around it.

The environment is new (no system site-packages): torch first, at the version this one has, then the wheel with the
lock of tested versions (constraints.txt). pip's cache makes the install take a minute or two after `.ci/run`'s own.
"""
import os, shutil, stat, subprocess, sys, venv, zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

def run(cmd, cwd, timeout=900, env=None):
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r.stdout

def _umask():
    m = os.umask(0o022); os.umask(m)
    return m

@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    dist = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", dist, ROOT], cwd=ROOT)
    (whl,) = dist.glob("omnihuman_nb-*.whl")
    return whl

def test_the_wheel_holds_what_the_commands_need(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for need in ("omnihuman_nb/assets/probes.safetensors", "omnihuman_nb/assets/classroom/vae/config.json",
                 "omnihuman_nb/assets/classroom/dit/model/config.json", "omnihuman_nb/assets/speech/hello_puppet_f.wav",
                 "omnihuman_nb/assets/speech/wave_hand_m.wav", "omnihuman_nb/cli.py"):
        assert need in names, f"{need} is not in {wheel.name}"
    assert not any(n.startswith(("data_samples/", "nbs/", "tests/")) for n in names)
    size = wheel.stat().st_size / 2**20
    assert size < 40, f"{wheel.name} is {size:.1f} MB"
    print(f"{wheel.name}: {len(names)} files, {size:.1f} MB")

def test_an_installed_wheel_runs_demo_and_generate_from_an_empty_folder(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    py, bindir = env_dir / "bin" / "python", env_dir / "bin"
    pip = [py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    run(pip + [f"torch=={torch.__version__.split('+')[0]}"], cwd=tmp_path)
    run(pip + [wheel, "-c", ROOT / "constraints.txt"], cwd=tmp_path)
    empty = tmp_path / "empty"; empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    where = run([py, "-c", "import omnihuman_nb; print(omnihuman_nb.__file__)"], cwd=empty, env=env).strip()
    assert Path(where).is_relative_to(env_dir), f"omnihuman_nb came from {where}, not the fresh environment"
    omnihuman = bindir / "omnihuman"
    assert "usage: omnihuman" in run([omnihuman, "--help"], cwd=empty, env=env)
    # the user's own picture and recording, in the empty folder
    from PIL import Image
    import soundfile as sf
    from omnihuman_nb.puppet import render_puppet_clip, speech_audio, SR
    Image.fromarray(render_puppet_clip(seed=5, seconds=0.04).video[0]).save(empty / "me.png")
    sf.write(empty / "me.wav", speech_audio(0.6, seed=5)[0], SR)
    out = run([omnihuman, "generate", "--ref", "me.png", "--audio", "me.wav", "--steps", "1", "--out", "talk.mp4"], cwd=empty, env=env)
    assert "outputs are in talk.mp4" in out
    mode = stat.S_IMODE((empty / "talk.mp4").stat().st_mode)
    assert mode == 0o666 & ~_umask(), f"talk.mp4 has mode {mode:o}"
    assert mode & stat.S_IROTH or _umask() & 0o004, "others cannot read the video"
    out = run([omnihuman, "demo", "--steps", "1", "--max-seconds", "0.4", "--out", "demo"], cwd=empty, env=env)
    assert "outputs are in demo" in out
    for f in ("metrics.json", "report.html", "audio_driven.mp4", "pose_driven.mp4", "long.mp4"):
        assert (empty / "demo" / f).is_file(), f
    leftovers = [p.name for p in empty.rglob("*partial*")]
    assert not leftovers, f"temporary files left behind: {leftovers}"
