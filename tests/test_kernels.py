"""Property tests for `omnihuman_nb.kernels`: every Triton kernel (the interpreter on a CPU) against the torch reference.

Shapes, masks and dtypes are drawn by hypothesis. The pass rule is `compare_to_reference`'s (stated and justified in
nbs/05_kernels.ipynb): fp32 within 1e-5 of the fp32 reference, fp16/bf16 within twice the reference's own low-precision
error plus a floor, forward and every gradient. Heavier runs (more examples, inductor) need OMNIHUMAN_TEST_FLAGS=slow.
"""
import os, subprocess, sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from torch.library import opcheck

from omnihuman_nb import kernels as K
from omnihuman_nb.core import BadInputError

SLOW = "slow" in os.environ.get("OMNIHUMAN_TEST_FLAGS", "").split()
DEV = "cuda" if torch.cuda.is_available() else "cpu"
CAN_TRITON = K.HAS_TRITON and (K.INTERPRET or DEV == "cuda")
pytestmark = pytest.mark.skipif(not CAN_TRITON, reason="triton is not installed (or cannot run here)")

DTYPES = st.sampled_from([torch.float32, torch.float16])
PROPS = settings(max_examples=30 if SLOW else 10, deadline=None, suppress_health_check=list(HealthCheck))


def randn(gen, *shape): return torch.randn(*shape, generator=gen).to(DEV)
def _ok(res): assert res["ok"], res


# ---------------------------------------------------------------- properties: forward and gradients vs the reference
@PROPS
@given(B=st.integers(1, 3), N=st.integers(1, 40), D=st.sampled_from([1, 7, 16, 48, 100, 256]),
       heads=st.booleans(), dtype=DTYPES, seed=st.integers(0, 2**16))
def test_rms_norm(B, N, D, heads, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = randn(g, B, 2, N, D) if heads else randn(g, B, N, D)
    _ok(K.compare_to_reference(K.rms_norm, (x, randn(g, D), 1e-6), dtype, seed=seed))


@PROPS
@given(op=st.sampled_from(["modulated_layer_norm", "gated_residual", "residual_modulated_layer_norm"]),
       B=st.integers(1, 3), N=st.integers(1, 150), D=st.sampled_from([8, 24, 48, 130, 256]),
       vec3=st.booleans(), dtype=DTYPES, seed=st.integers(0, 2**16))
def test_adaln_family(op, B, N, D, vec3, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = randn(g, B, N, D), randn(g, B, N, D)
    sh, sc, gate = (randn(g, B, 1, D) if vec3 else randn(g, B, D) for _ in range(3))
    args = {"modulated_layer_norm": (x, sh, sc, 1e-6), "gated_residual": (x, y, gate),
            "residual_modulated_layer_norm": (x, y, gate, sh, sc, 1e-6)}[op]
    _ok(K.compare_to_reference(getattr(K, op), args, dtype, seed=seed))


@PROPS
@given(shape=st.lists(st.integers(1, 40), min_size=1, max_size=3), scale=st.sampled_from([1.0, 6.0]),
       dtype=DTYPES, seed=st.integers(0, 2**16))
def test_gelu_tanh(shape, scale, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    _ok(K.compare_to_reference(K.gelu_tanh, (randn(g, *shape) * scale,), dtype, seed=seed))


@PROPS
@given(B=st.integers(1, 2), H=st.integers(1, 3), N=st.integers(1, 70), D=st.sampled_from([6, 16, 32, 64, 96, 128]),
       per_sample=st.booleans(), dtype=DTYPES, seed=st.integers(0, 2**16))
def test_apply_rope(B, H, N, D, per_sample, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, 9, (B, N, 3) if per_sample else (N, 3), generator=g)
    cos, sin = (t.to(DEV) for t in K.rope_3d_table(pos, D))
    _ok(K.compare_to_reference(K.apply_rope, (randn(g, B, H, N, D), cos, sin), dtype, seed=seed))


@PROPS
@given(B=st.integers(1, 2), H=st.integers(1, 2), NQ=st.integers(1, 80), NK=st.integers(1, 80),
       D=st.sampled_from([32, 64, 128]), masked=st.booleans(), dtype=DTYPES, seed=st.integers(0, 2**16))
def test_attention(B, H, NQ, NK, D, masked, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = randn(g, B, H, NQ, D), randn(g, B, H, NK, D), randn(g, B, H, NK, D)
    kv_lens = torch.randint(0, NK + 1, (B,), generator=g).to(DEV) if masked else None
    _ok(K.compare_to_reference(K.attention, (q, k, v, kv_lens), dtype, seed=seed))


@pytest.mark.parametrize("name", ["rms_norm", "modulated_layer_norm", "residual_modulated_layer_norm", "gelu_tanh",
                                  "apply_rope", "attention"])
def test_bf16(name):
    "bf16 passes the same rule in the interpreter, whose fp32->bf16 store truncates (one ulp at most)."
    g = torch.Generator().manual_seed(0)
    x, y, c = randn(g, 2, 33, 40), randn(g, 2, 33, 40), randn(g, 3, 2, 40)
    cos, sin = (t.to(DEV) for t in K.rope_3d_table(K.video_positions(3, 3, 3), 32))
    args = {"rms_norm": (x, randn(g, 40), 1e-6), "modulated_layer_norm": (x, c[0], c[1], 1e-6),
            "residual_modulated_layer_norm": (x, y, c[2], c[0], c[1], 1e-6), "gelu_tanh": (x,),
            "apply_rope": (randn(g, 2, 2, 27, 32), cos, sin),
            "attention": (randn(g, 2, 2, 33, 64), randn(g, 2, 2, 40, 64), randn(g, 2, 2, 40, 64), torch.tensor([40, 3], device=DEV))}[name]
    _ok(K.compare_to_reference(getattr(K, name), args, torch.bfloat16))


# ---------------------------------------------------------------- attention edge cases
def test_attention_empty_rows_are_zero_not_nan():
    g = torch.Generator().manual_seed(1)
    q, k, v = (randn(g, 3, 2, n, 32).requires_grad_() for n in (17, 40, 40))
    kv_lens = torch.tensor([0, 40, 1], device=DEV)
    o = K.attention(q, k, v, kv_lens, backend="triton")
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), torch.randn_like(o))
    for t in (o, dq, dk, dv): assert torch.isfinite(t).all()
    for t in (o, dq, dk, dv): assert t[0].abs().max().item() == 0.0
    assert dk[2, :, 1:].abs().max().item() == 0.0 and dv[2, :, 1:].abs().max().item() == 0.0
    # one key: every query copies that key's value exactly (up to rounding)
    torch.testing.assert_close(o[2], v[2, :, :1].expand(-1, 17, -1), rtol=1e-5, atol=1e-5)


def test_attention_kv_lens_out_of_range_are_clamped():
    g = torch.Generator().manual_seed(2)
    q, k, v = randn(g, 2, 1, 9, 32), randn(g, 2, 1, 12, 32), randn(g, 2, 1, 12, 32)
    got = K.attention(q, k, v, torch.tensor([99, -3], device=DEV), backend="triton")
    want = K.attention(q, k, v, torch.tensor([12, 0], device=DEV), backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("D", [16, 40, 256])
def test_attention_other_head_dims(D):
    g = torch.Generator().manual_seed(D)
    _ok(K.compare_to_reference(K.attention, (randn(g, 1, 2, 21, D), randn(g, 1, 2, 34, D), randn(g, 1, 2, 34, D),
                                             torch.tensor([30], device=DEV)), torch.float16))


def test_attention_views_and_backends():
    "(B, N, H, D) tensors transposed to (B, H, N, D) need no copy; sdpa agrees with torch."
    g = torch.Generator().manual_seed(3)
    q, k, v = (randn(g, 2, n, 2, 32).transpose(1, 2) for n in (19, 26, 26))
    kv = torch.tensor([26, 5], device=DEV)
    ref = K.attention(q, k, v, kv, backend="torch")
    for be in ("triton", "sdpa"): torch.testing.assert_close(K.attention(q, k, v, kv, backend=be), ref, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- opcheck, compile, a DiT-shaped block
def _rg(g, *s): return randn(g, *s).requires_grad_()

def _opcheck_samples():
    g = torch.Generator().manual_seed(4)
    x, y, c = _rg(g, 2, 9, 16), _rg(g, 2, 9, 16), _rg(g, 2, 48)
    cos, sin = (t.to(DEV) for t in K.rope_3d_table(K.video_positions(1, 3, 3), 16))
    kl = torch.tensor([5, 0], dtype=torch.int32, device=DEV)
    return {
        "rms_norm": (K.rms_norm_fwd, (_rg(g, 2, 9, 2, 16).transpose(1, 2), _rg(g, 16), 1e-6)),
        "modulated_layer_norm": (K.modulated_layer_norm_fwd, (x, c[:, :16], c[:, 16:32], 1e-6)),
        "gated_residual": (K.gated_residual_fwd, (x, y, c[:, 32:])),
        "residual_modulated_layer_norm": (K.residual_modulated_layer_norm_fwd, (x, y, c[:, 32:], c[:, :16], c[:, 16:32], 1e-6)),
        "gelu_tanh": (K.gelu_tanh_fwd, (_rg(g, 3, 7),)),
        "rope": (K.rope_fwd, (_rg(g, 2, 2, 9, 16), cos.clone().requires_grad_(), sin.clone().requires_grad_())),
        "rope_per_sample": (K.rope_fwd, (_rg(g, 2, 2, 9, 16), torch.stack([cos, cos]), torch.stack([sin, sin]))),
        "attention": (K.attention_fwd, (_rg(g, 2, 2, 9, 32), _rg(g, 2, 2, 5, 32), _rg(g, 2, 2, 5, 32), kl, 0.2)),
    }

@pytest.mark.parametrize("name", list(_opcheck_samples()))
def test_opcheck(name):
    op, args = _opcheck_samples()[name]
    assert set(opcheck(op, args).values()) == {"SUCCESS"}


def test_opcheck_backward_ops():
    g = torch.Generator().manual_seed(5)
    x, w = randn(g, 4, 24), randn(g, 24)
    _, rstd = K.rms_norm_fwd(x, w, 1e-6)
    x3, y3, dy3, vec = randn(g, 2, 6, 24), randn(g, 2, 6, 24), randn(g, 2, 6, 24), randn(g, 3, 2, 24)
    _, mean, rstd3 = K.modulated_layer_norm_fwd(x3, vec[0], vec[1], 1e-6)
    _, _, rmean, rrstd = K.residual_modulated_layer_norm_fwd(x3, y3, vec[2], vec[0], vec[1], 1e-6)
    q, k, v = randn(g, 1, 2, 7, 32), randn(g, 1, 2, 5, 32), randn(g, 1, 2, 5, 32)
    kl = torch.tensor([3], dtype=torch.int32, device=DEV)
    o, lse = K.attention_fwd(q, k, v, kl, 0.3)
    cases = [(K.rms_norm_bwd, (randn(g, 4, 24), x, w, rstd)),
             (K.modulated_layer_norm_bwd, (dy3, x3, vec[1], mean, rstd3)),
             (K.gated_residual_bwd, (dy3, y3, vec[2])),
             (K.residual_modulated_layer_norm_bwd, (dy3, dy3 * 0.5, x3, y3, vec[2], vec[1], rmean, rrstd)),
             (K.gelu_tanh_bwd, (dy3, x3)),
             (K.attention_bwd, (torch.randn_like(o), q, k, v, o, lse, kl, 0.3))]
    for op, args in cases: assert set(opcheck(op, args).values()) == {"SUCCESS"}, op


def mini_block(x, ada, w, cos, sin, kv_lens, backend):
    "A DiT-shaped block that calls every op: adaLN, QK-norm per head, 3D RoPE, masked attention, fused residual, GELU."
    sh, sc, g = ada.chunk(3, -1)
    B, N, D = x.shape
    h = K.modulated_layer_norm(x, sh, sc, backend=backend)
    q = K.rms_norm(h.view(B, N, 2, D // 2).transpose(1, 2), w, backend=backend)
    q = K.apply_rope(q, cos, sin, backend=backend)
    a = K.attention(q, q, q, kv_lens, backend=backend).transpose(1, 2).reshape(B, N, D)
    r, h2 = K.residual_modulated_layer_norm(x, a, g, sh, sc, backend=backend)
    return K.gated_residual(r, K.gelu_tanh(h2, backend=backend), g, backend=backend)

def _block_args():
    g = torch.Generator().manual_seed(6)
    cos, sin = (t.to(DEV) for t in K.rope_3d_table(K.video_positions(3, 2, 2), 16))
    return (_rg(g, 2, 12, 32), _rg(g, 2, 96), _rg(g, 16), cos, sin, torch.tensor([12, 7], device=DEV)), randn(g, 2, 12, 32)

def _run_block(f, backend):
    args, dout = _block_args()
    out = f(*args, backend)
    return [out, *torch.autograd.grad(out, args[:3], dout)]

@pytest.mark.parametrize("compiler", ["eager", "aot_eager"] + (["inductor"] if SLOW else []))
def test_block_triton_matches_torch(compiler):
    "Same outputs and gradients on 'triton' as on 'torch', eagerly and through torch.compile(fullgraph=True)."
    f = mini_block if compiler == "eager" else torch.compile(mini_block, fullgraph=True, backend=compiler)
    for a, b in zip(_run_block(f, "triton"), _run_block(mini_block, "torch")):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- API: backends, tables, bad input
def test_backends():
    x = torch.zeros(2, 3)
    assert K.default_backend("cpu") == "torch"
    assert K.resolve_backend("sdpa", x) == "torch" and K.resolve_backend("sdpa", x, attention=True) == "sdpa"
    with pytest.raises(BadInputError, match="backend: expected one of"): K.resolve_backend("cudnn", x)
    if torch.cuda.is_available(): assert K.default_backend("cuda") == "triton"


def test_rope_3d_table():
    pos = torch.cat([K.video_positions(1, 2, 2), K.video_positions(2, 2, 2, t0=1)])   # reference frame at t=0, video from t=1
    cos, sin = K.rope_3d_table(pos, 64)
    assert cos.shape == sin.shape == (12, 32) and cos.dtype == torch.float32
    t_slots = K.default_rope_split(64)[0] // 2
    assert (cos[:4, :t_slots] == 1).all() and (sin[:4, :t_slots] == 0).all()     # t = 0: time slots do not turn
    assert not (cos[4:, :t_slots] == 1).all()
    assert torch.equal(cos[4, t_slots:], cos[0, t_slots:])                       # same (h, w), spatial slots equal
    cb, _ = K.rope_3d_table(torch.stack([pos, pos.flip(0)]), 64)
    assert cb.shape == (2, 12, 32) and torch.equal(cb[0], cos)
    with pytest.raises(BadInputError, match="positions"): K.rope_3d_table(torch.zeros(5, 2), 64)
    with pytest.raises(BadInputError, match="rope split"): K.rope_3d_table(pos, 64, split=(20, 21, 23))
    with pytest.raises(BadInputError, match="head_dim"): K.default_rope_split(7)


def test_bad_inputs_name_the_problem():
    x = torch.zeros(2, 5, 8)
    with pytest.raises(BadInputError, match="rms_norm weight shape"): K.rms_norm(x, torch.ones(4))
    with pytest.raises(BadInputError, match="shift shape"): K.modulated_layer_norm(x, torch.zeros(3, 8), torch.zeros(2, 8))
    with pytest.raises(BadInputError, match="x shape"): K.gated_residual(x[0], x[0], torch.zeros(2, 8))
    with pytest.raises(BadInputError, match="y shape"): K.residual_modulated_layer_norm(x, x[:, :4], *torch.zeros(3, 2, 8))
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(BadInputError, match="x head dim"): K.apply_rope(torch.zeros(1, 1, 4, 7), torch.ones(4, 3), torch.ones(4, 3))
    with pytest.raises(BadInputError, match="cos shape"): K.apply_rope(q, torch.ones(5, 4), torch.ones(5, 4))
    with pytest.raises(BadInputError, match="v shape"): K.attention(q, q, torch.zeros(1, 2, 5, 8))
    with pytest.raises(BadInputError, match="dtypes"): K.attention(q, q, q.half())
    with pytest.raises(BadInputError, match="kv_lens shape"): K.attention(q, q, q, torch.tensor([1, 2]))
    with pytest.raises(BadInputError, match="head dim"): K.attention(*(torch.zeros(1, 1, 2, 512, device=DEV),) * 3, backend="triton")


def test_imports_and_runs_without_triton():
    "triton is a dev dependency: without it the module imports, 'torch' works and 'triton' says what is missing."
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch; from omnihuman_nb import kernels as K\n"
            "assert not K.HAS_TRITON\n"
            "x = torch.randn(2, 3, 8); print(K.rms_norm(x, torch.ones(8)).shape)\n"
            "try: K.rms_norm(x, torch.ones(8), backend='triton')\n"
            "except K.BadInputError as e: print('error:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "torch.Size([2, 3, 8])" in out.stdout and "triton installed" in out.stdout


# ---------------------------------------------------------------- the benchmark's CPU fallback
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU bench_kernels times instead of sweeping")
def test_bench_kernels_without_gpu_runs_the_sweep(tmp_path, capsys):
    from omnihuman_nb.kernel_bench import bench_kernels
    res = bench_kernels(tmp_path / "k.json", quick=True)
    out = capsys.readouterr().out
    assert "No CUDA GPU here" in out and f"outputs are in {tmp_path / 'k.json'}" in out
    assert res["mode"] == "interpreter-sweep" and res["all_ok"] and len(res["rows"]) == 21
    assert (tmp_path / "k.json").exists()
