"""Linear attention (plain and magnitude-aware): the reference against the official MALA
formula and against dense attention, the cpu backend against the reference (forward and
every gradient, every dtype, odd sizes, strided inputs, tiny and large magnitudes),
gradcheck, validation and dispatch. The Triton kernels: ``test_linear_triton.py``.
"""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _linear_cases import TOL, compare, gen, inputs, rope_tables

from attnzoo.ops import linear
from attnzoo.ops.linear import cpu, linear_attention, magnitude_aware_linear_attention, reference

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
DTYPES = [F32, F64, BF16, F16]


def _fn(magnitude_aware):
    def fn(q, k, v, rope, backend):
        return linear_attention(q, k, v, rope, magnitude_aware=magnitude_aware, backend=backend)
    return fn


def _official_mala(q, k, v, sin_full, cos_full, scale):
    """qhfan/MALA ``AddLinearAttention.forward`` from the elu+1 features on, written out
    independently: ``[N, D]`` tables with every angle repeated for both channels of a pair,
    RoPE through the "rotate every two" channel shuffle, z before RoPE, ``1e-6``."""
    n = q.shape[-2]
    z = q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) * scale

    def turn(x):
        shuffled = torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)
        return x * cos_full + shuffled * sin_full

    q, k = turn(q), turn(k)
    kv = (k.transpose(-2, -1) * (scale / n) ** 0.5) @ (v * (scale / n) ** 0.5)
    return q @ kv * (1 + 1 / (z + 1e-6)) - z * v.mean(dim=2, keepdim=True)


# --------------------------------------------------------------------------- reference semantics

@pytest.mark.parametrize("rope", [True, False])
def test_reference_is_the_official_formula(rope):
    q, k, v, tables, _ = inputs((2, 3, 37, 8), F64, True, ("official", rope))
    cos, sin = tables if rope else (torch.ones(37, 4, dtype=F64), torch.zeros(37, 4, dtype=F64))
    expected = _official_mala(q, k, v, sin.repeat_interleave(2, -1), cos.repeat_interleave(2, -1), 8 ** -0.5)
    got = magnitude_aware_linear_attention(q, k, v, tables if rope else None, backend="reference")
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def _dense_weights(q, k, scale, magnitude_aware, eps=1e-6):
    """``[B, h, N, N]`` attention weights that the linear forms factorise (no RoPE)."""
    n = q.shape[-2]
    qk = (scale / n) * q @ k.transpose(-2, -1)
    z = qk.sum(-1, keepdim=True)  # = scale * q . mean(k)
    if magnitude_aware:
        return (1 + 1 / (z + eps)) * qk - z / n
    return qk / (z + eps)


@pytest.mark.parametrize("magnitude_aware", [True, False])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_matches_dense_attention(magnitude_aware, backend):
    """Without RoPE the op is ``W v`` for explicit ``N x N`` weights, whose rows sum to 1 for MALA
    and plain linear attention alike up to eps (``(1 + 1/(z + eps)) z - z = z / (z + eps)``)."""
    q, k, v, _, _ = inputs((2, 2, 29, 6), F64, False, ("dense",))
    w = _dense_weights(q, k, 6 ** -0.5, magnitude_aware)
    torch.testing.assert_close(linear_attention(q, k, v, magnitude_aware=magnitude_aware, backend=backend), w @ v,
                               rtol=1e-10, atol=1e-12)
    z = (6 ** -0.5) * (q * k.mean(-2, keepdim=True)).sum(-1)
    torch.testing.assert_close(w.sum(-1), z / (z + 1e-6), rtol=1e-10, atol=1e-10)


def test_rope_is_a_rotation_of_pairs():
    g = gen("rotation")
    x = torch.randn(1, 1, 5, 6, generator=g, dtype=F64)
    cos, sin = rope_tables(5, 6, g)
    y = reference.rotate(x, cos, sin)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))  # pairs turned, norms kept
    torch.testing.assert_close(y[..., 0], x[..., 0] * cos[:, 0] - x[..., 1] * sin[:, 0])
    torch.testing.assert_close(y[..., 1], x[..., 1] * cos[:, 0] + x[..., 0] * sin[:, 0])


# --------------------------------------------------------------------------- cpu against the reference

CASES = [  # (B, heads, N, D)
    (1, 1, 2, 2),
    (2, 3, 63, 8),
    (1, 2, 60, 6),
    (2, 1, 130, 32),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CASES, ids=lambda s: "B{}-h{}-N{}-D{}".format(*s))
@pytest.mark.parametrize("rope", [True, False], ids=["rope", "norope"])
@pytest.mark.parametrize("magnitude_aware", [True, False], ids=["mala", "plain"])
def test_cpu_matches_reference(shape, dtype, rope, magnitude_aware):
    q, k, v, tables, dy = inputs(shape, dtype, rope, ("cpu", shape, str(dtype), rope, magnitude_aware))
    compare(_fn(magnitude_aware), q, k, v, tables, dy, dtype, "cpu", "cpu")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_no_grad_forward_equals_grad_forward(backend):
    q, k, v, tables, _ = inputs((2, 2, 17, 8), F32, True, ("nograd",))
    with torch.no_grad():
        a = magnitude_aware_linear_attention(q.float(), k.float(), v.float(), tables, backend=backend)
    b = magnitude_aware_linear_attention(q.float().requires_grad_(), k.float(), v.float(), tables, backend=backend)
    torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_strided_inputs(backend):
    """q, k, v as channel-major views of one conv output (the layer's layout), and a partial
    request of gradients: the same answer as contiguous inputs."""
    g = gen("strided", backend)
    B, heads, D, N = 2, 2, 8, 23
    buf = torch.randn(B, 3, heads, D, N, generator=g, dtype=F64)
    cos, sin = rope_tables(N, D, g)
    x = buf.clone().requires_grad_()
    q, k, v = (F.elu(t) + 1 if i < 2 else t for i, t in enumerate(x.transpose(-1, -2).unbind(1)))
    assert q.stride(-1) != 1
    y = magnitude_aware_linear_attention(q, k, v, (cos, sin), backend=backend)
    y.square().sum().backward()
    x2 = buf.clone().requires_grad_()
    q2, k2, v2 = (t.contiguous() for t in x2.transpose(-1, -2).unbind(1))
    y2 = magnitude_aware_linear_attention(F.elu(q2) + 1, F.elu(k2) + 1, v2, (cos, sin), backend="reference")
    y2.square().sum().backward()
    torch.testing.assert_close(y, y2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-12, atol=1e-12)
    vv = v2.detach().requires_grad_()
    (dv,) = torch.autograd.grad(magnitude_aware_linear_attention(q2.detach(), k2.detach(), vv, (cos, sin),
                                                                 backend=backend).sum(), [vv])
    assert dv.shape == vv.shape


def test_reference_gradcheck():
    for magnitude_aware in (True, False):
        for rope in (True, False):
            q, k, v, tables, _ = inputs((1, 2, 7, 4), F64, rope, ("gradcheck", magnitude_aware, rope))
            leaves = [t.requires_grad_() for t in (q, k, v)]
            fn = _fn(magnitude_aware)
            assert torch.autograd.gradcheck(lambda *a: fn(*a, tables, "reference"), leaves)


def test_cpu_gradcheck():
    for magnitude_aware in (True, False):
        q, k, v, tables, _ = inputs((2, 1, 9, 6), F64, True, ("gradcheck-cpu", magnitude_aware))
        leaves = [t.requires_grad_() for t in (q, k, v)]
        fn = _fn(magnitude_aware)
        assert torch.autograd.gradcheck(lambda *a: fn(*a, tables, "cpu"), leaves)


# --------------------------------------------------------------------------- numerics

@pytest.mark.parametrize("dtype", [BF16, F16, F32], ids=str)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("shift", [-30.0, -12.0], ids=["z-underflows", "z-tiny"])
def test_tiny_z_stays_finite(backend, dtype, shift):
    """Queries whose features underflow (``z`` ~ 0 or exactly 0): ``1/(z + eps)`` is taken in
    fp32 for half inputs, so it is at most ``1/eps`` and never overflows fp16 (the official
    code, run in fp16, takes ``1/(z + 1e-6)`` in fp16, where 1e6 is inf). The gradients are
    checked where the dtype can hold them: ``d out / d q`` really is ``kv / eps`` ~ 1e5 at
    ``q = 0``, beyond fp16's range (65504), so fp16 is checked on the forward only."""
    q, k, v, tables, dy = inputs((1, 2, 40, 8), dtype, True, ("tiny", dtype, shift), q_shift=shift)
    grads = dtype != F16
    compare(_fn(True), q, k, v, tables, dy, dtype, "cpu", backend, grads)
    compare(_fn(False), q, k, v, tables, dy, dtype, "cpu", backend, grads)


def test_official_formula_in_fp16_overflows_where_the_op_does_not():
    q, k, v, tables, _ = inputs((1, 1, 16, 8), F16, True, ("fp16-official",), q_shift=-30.0)
    cos, sin = tables
    half = [t.half() for t in (q, k, v)]
    off = _official_mala(*half, sin.repeat_interleave(2, -1).half(), cos.repeat_interleave(2, -1).half(), 8 ** -0.5)
    assert not torch.isfinite(off).all()
    assert torch.isfinite(magnitude_aware_linear_attention(*half, tables, backend="cpu")).all()


@pytest.mark.parametrize("dtype", [BF16, F16, F32], ids=str)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_large_magnitudes(backend, dtype):
    """Features ~ e^5 (z ~ 1e4): every output and gradient finite and matching fp64."""
    q, k, v, tables, dy = inputs((1, 2, 33, 8), dtype, True, ("large", dtype), q_shift=5.0, k_shift=3.0)
    compare(_fn(True), q, k, v, tables, dy, dtype, "cpu", backend)


def test_eps_argument():
    q, k, v, _, _ = inputs((1, 1, 9, 4), F64, False, ("eps",), q_shift=-40.0)
    assert q.max() < 1e-15  # z ~ 0: the output is what eps makes of it
    for eps in (1e-6, 1e-2):
        w = _dense_weights(q, k, 0.5, True, eps)
        torch.testing.assert_close(magnitude_aware_linear_attention(q, k, v, eps=eps, backend="cpu"), w @ v)


# --------------------------------------------------------------------------- validation and dispatch

def test_bad_inputs():
    x = torch.rand(1, 2, 5, 4)
    with pytest.raises(ValueError, match=r"\[B, heads, N, D\], got shape \(2, 5, 4\)"):
        linear_attention(x[0], x[0], x[0])
    with pytest.raises(ValueError, match="same shape"):
        linear_attention(x, x, x[..., :2])
    with pytest.raises(ValueError, match="floating dtype"):
        linear_attention(x, x, x.double())
    with pytest.raises(ValueError, match=r"rope cos must be \[N, D/2\] = \(5, 2\)"):
        linear_attention(x, x, x, (torch.ones(5, 4), torch.ones(5, 2)))
    with pytest.raises(ValueError, match="pair"):
        linear_attention(x, x, x, torch.ones(5, 2))
    with pytest.raises(ValueError, match="D must be even"):
        linear_attention(x[..., :3], x[..., :3], x[..., :3], (torch.ones(5, 1), torch.ones(5, 1)))
    with pytest.raises(ValueError, match="eps must be > 0"):
        linear_attention(x, x, x, eps=0.0)
    with pytest.raises(ValueError, match="empty"):
        linear_attention(x[:, :, :0], x[:, :, :0], x[:, :, :0])


def test_scale_argument():
    q, k, v, tables, _ = inputs((1, 2, 11, 4), F64, True, ("scale",))
    for backend in ("reference", "cpu"):
        a = magnitude_aware_linear_attention(q, k, v, tables, scale=0.3, backend=backend)
        b = reference.linear_attention(q, k, v, *tables, 0.3, 1e-6, True)
        torch.testing.assert_close(a, b)
        assert not torch.allclose(a, magnitude_aware_linear_attention(q, k, v, tables, backend=backend))


def test_dispatch(monkeypatch):
    x = torch.rand(1, 1, 4, 2)
    monkeypatch.delenv("ATTNZOO_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    calls = []
    for mod in (reference, cpu):
        real = mod.linear_attention
        monkeypatch.setattr(mod, "linear_attention",
                            lambda *a, _real=real, _n=mod.__name__.rsplit(".", 1)[1]: calls.append(_n) or _real(*a))
    linear_attention(x, x, x)
    linear_attention(x, x, x, backend="reference")
    monkeypatch.setenv("ATTNZOO_BACKEND", "reference")
    magnitude_aware_linear_attention(x, x, x)
    assert calls == ["cpu", "reference", "reference"]
    monkeypatch.delenv("ATTNZOO_BACKEND")
    with pytest.raises(RuntimeError, match="cannot run: .*CUDA"):
        linear_attention(x, x, x, backend="triton")
    assert [b.name for b in linear.BACKENDS] == ["triton", "cpu", "reference"]


def test_import_and_cpu_call_never_import_the_triton_backend():
    code = ("import sys, torch; from attnzoo.ops.linear import linear_attention; x = torch.rand(1, 1, 4, 2); "
            "linear_attention(x, x, x); assert 'attnzoo.ops.linear.triton' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


assert set(TOL) == set(DTYPES)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_autocast_is_cast(backend):
    """Under bf16 autocast the op runs on q, k, v cast to bf16 (fp32 accumulation inside): the same
    output as the op on pre-cast inputs, and gradients through that cast in the inputs' dtype. The
    backward runs after the autocast region, as in training."""
    for dtype in (BF16, F32):
        q, k, v, tables, dy = inputs((1, 2, 19, 8), dtype, True, ("autocast", str(dtype)))
        res = []
        for enabled in (False, True):
            leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
            with torch.autocast("cpu", dtype=BF16, enabled=enabled):
                ins = leaves if enabled else [t.to(BF16) for t in leaves]
                y = magnitude_aware_linear_attention(*ins, tables, backend=backend)
            grads = torch.autograd.grad(y, leaves, dy.to(BF16))
            res.append((y, *grads))
        for i, (a, b) in enumerate(zip(*res)):
            assert a.dtype == (BF16 if i == 0 else dtype)
            torch.testing.assert_close(a, b, rtol=0, atol=0)
