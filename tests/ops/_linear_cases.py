"""Inputs and checks shared by the linear-attention op tests (``test_linear*.py``)."""
import zlib

import torch
import torch.nn.functional as F

# |actual - expected| <= atol * max|expected| + rtol * |expected|, against a float64
# reference on the same (rounded) inputs; half inputs are accumulated in fp32, so the
# error is about one rounding of each output.
TOL = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}


def gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def rope_tables(n: int, d: int, g: torch.Generator):
    ang = torch.rand(n, d // 2, generator=g, dtype=torch.float64) * 20
    return ang.cos(), ang.sin()


def inputs(shape, dtype, rope: bool, key, q_shift: float = 0.0, k_shift: float = 0.0):
    """elu+1 features q, k, values v, RoPE tables and an upstream gradient, rounded to ``dtype``
    and returned in float64. ``*_shift`` moves the pre-activations (very negative: tiny features)."""
    g = gen(*key)
    q, k, v, dy = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(4))
    q, k = F.elu(q + q_shift) + 1, F.elu(k + k_shift) + 1
    rope_t = rope_tables(shape[-2], shape[-1], g) if rope else None
    q, k, v, dy = (t.to(dtype).double() for t in (q, k, v, dy))
    return q, k, v, rope_t, dy


def run(fn, q, k, v, rope, dy, dtype, device, backend):
    """Output and (dq, dk, dv) of one backend in ``dtype`` on ``device``."""
    leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]
    r = None if rope is None else tuple(t.to(device=device, dtype=torch.float32 if dtype != torch.float64 else
                                             torch.float64) for t in rope)
    y = fn(*leaves, r, backend)
    return y, torch.autograd.grad(y, leaves, dy.to(device=device, dtype=dtype))


def check(actual, expected, dtype, what):
    assert actual is not None and expected is not None, f"{what}: missing"
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    assert torch.isfinite(actual).all(), f"{what}: not finite"
    rtol, atol = TOL[dtype]
    expected = expected.detach()
    actual = actual.detach().cpu().to(expected.dtype)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * expected.abs().max().item(),
                               msg=lambda m: f"{what}: {m}")


def compare(fn, q, k, v, rope, dy, dtype, device, backend, grads=True):
    y_ref, g_ref = run(fn, q, k, v, rope, dy, torch.float64, "cpu", "reference")
    y, g = run(fn, q, k, v, rope, dy, dtype, device, backend)
    check(y, y_ref, dtype, "out")
    for name, a, b in zip(("dq", "dk", "dv") if grads else (), g, g_ref):
        check(a, b, dtype, name)
