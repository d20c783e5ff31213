"""Triton neighborhood-attention backend against the reference oracle: forward and
dq / dk / dv / drpb through the public ``na2d`` / ``na1d`` with backend="triton", plus the
host-side tiling plan the kernels rely on.

Where the kernels run (in process, or a child pytest under the interpreter): ``_triton_harness.py``.
For fast iteration on this file alone: ``TRITON_INTERPRET=1 pytest tests/ops/test_neighborhood_triton.py``.

The interpreter is slow, so the default cases are few and chosen to cover each feature
(odd maps, D padding, k 3/5/7, dilation with unequal sub-grids, odd and even strides,
per-axis tuples, rpb on/off, several tiles and halo chunks per map); ``ATTNZOO_SLOW=1``
adds a seeded random sweep (k up to 13, D up to 40, every dtype). The Hypothesis properties of
the cpu suite run here too on tiny maps (``test_triton_matches_reference``); more examples with
``TRITON_INTERPRET=1 pytest -m slow`` on this file, or ``ATTNZOO_PROPERTY_EXAMPLES`` (reaches the child).

HaloNet (``border="zero_pad"``, ``rel_h`` / ``rel_w``): against a local brute-force oracle
(``_halo_oracle``: zero-padded map, gathered windows, softmax with every bias; checked
independent of the reference on purpose), and through the public API against
``backend="reference"``.
"""
import importlib
import importlib.util
import os
import random
import zlib

import pytest
import torch
from _neighborhood_cases import cases, check
from _property import settings_for, sizes
from _triton_harness import kernel_module, poison_empty
from hypothesis import given

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from attnzoo.ops import neighborhood as nbh  # noqa: E402
from attnzoo.ops.neighborhood import reference  # noqa: E402

_CHILD_FLAG = "_ATTNZOO_NEIGHBORHOOD_TRITON_CHILD"
SLOW = os.environ.get("ATTNZOO_SLOW") == "1"


DEVICE, tri, kernel_test, test_kernels_in_interpreter_subprocess = kernel_module(
    __file__, _CHILD_FLAG, "attnzoo.ops.neighborhood.triton", timeout=1800 if SLOW else 600)


# --------------------------------------------------------------------------- cases

LOW = (torch.bfloat16, torch.float16)
# |actual - expected| <= atol * max|expected| + rtol * |expected|, against a float64
# reference on the same (rounded) inputs. fp32 is ~3e-7 in practice; fp16 / bf16 pay
# for P and dS being rounded to the input dtype before their matmuls (as FlashAttention).
TOL = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (3e-2, 3e-2),
}
F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16

# (B, H, W, heads, D, kernel, dilation, stride, rpb, dtypes)
CASES_2D = [
    (1, 7, 9, 1, 8, 3, 1, 1, False, (F32,)),
    (2, 7, 9, 2, 16, 3, 1, 2, True, (F32, F16)),
    (1, 11, 13, 2, 24, 5, 1, 1, True, (F32, BF16)),  # D=24: padded to 32, masked
    (1, 11, 13, 1, 8, 3, 3, 2, True, (F32, F64)),  # sub-grids of lengths 4,4,3 x 5,4,4
    (1, 16, 15, 2, 16, 7, 2, 1, True, (F32, BF16, F16)),
    (2, 16, 16, 1, 8, 7, 1, 2, True, (F32,)),  # 2 x 2 tiles, 4 halo chunks
    (1, 13, 16, 1, 8, (3, 5), (2, 3), (2, 1), True, (F32,)),
    (1, 16, 15, 1, 8, (5, 7), (3, 2), (3, 4), False, (F32, F64)),  # odd and even strides
    (1, 15, 14, 1, 40, (13, 9), 1, (2, 3), True, (F32,)),  # largest kernel; D=40 padded to 64
]

# (B, L, heads, D, kernel, dilation, stride, rpb, dtypes)
CASES_1D = [
    (2, 9, 1, 8, 3, 1, 1, False, (F32,)),
    (1, 23, 2, 16, 7, 2, 3, True, (F32, BF16)),
]


def _id(*fields):
    b, h, w, n, d, k, dl, s, r = fields
    if w is None:
        text = f"B{b}-L{h}-h{n}-D{d}-k{k}-d{dl}-s{s}"
    else:
        text = f"B{b}-H{h}-W{w}-h{n}-D{d}-k{k}-d{dl}-s{s}"
    return (text + ("-rpb" if r else "-norpb")).replace(" ", "")


def _dtype_id(d):
    return str(d).replace("torch.", "")


def _expand(cases, one_d=False):
    params, ids = [], []
    for c in cases:
        *geo, dtypes = c
        for dt in dtypes:
            params.append((*geo, dt))
            if one_d:
                b, L, n, d, k, dl, s, r = geo
                ids.append(_id(b, L, None, n, d, k, dl, s, r) + "-" + _dtype_id(dt))
            else:
                ids.append(_id(*geo) + "-" + _dtype_id(dt))
    return params, ids


def _slow_cases():
    """Seeded random geometries for ATTNZOO_SLOW=1: every kernel size 1..13, D up to 40."""
    rng = random.Random(1234)
    out = []
    for i in range(40):
        kh, kw = rng.choice([1, 3, 5, 7, 9, 11, 13]), rng.choice([3, 5, 7, 9, 11, 13])
        dh, dw = rng.randint(1, 3), rng.randint(1, 3)
        if kh * dh > 30 or kw * dw > 30:
            dh = dw = 1
        sh, sw = rng.randint(1, kh), rng.randint(1, kw)
        H, W = rng.randint(kh * dh, kh * dh + 9), rng.randint(kw * dw, kw * dw + 9)
        D = rng.choice([3, 8, 16, 24, 40])
        dtype = rng.choice([F64, F64, F32, BF16, F16])
        out.append((rng.randint(1, 2), H, W, rng.randint(1, 2), D, (kh, kw), (dh, dw), (sh, sw),
                    rng.random() < 0.7, (dtype,)))
    return out


P2D, I2D = _expand(CASES_2D + (_slow_cases() if SLOW else []))
P1D, I1D = _expand(CASES_1D, one_d=True)


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _pair(x):
    return (x, x) if isinstance(x, int) else tuple(x)


def _inputs(shape, rpb_shape, dtype, key):
    """q, k, v, rpb, dy rounded to ``dtype`` (float64 values; the caller picks the precision)."""
    g = _gen(*key)
    ts = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3)]
    rpb = torch.randn(rpb_shape, generator=g, dtype=torch.float64) if rpb_shape is not None else None
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    rnd = [t.to(dtype).double() if t is not None else None for t in (*ts, rpb, dy)]
    return rnd


def _run(fn, q, k, v, rpb, dy, dtype, device, backend):
    """Output and (dq, dk, dv[, drpb]) of one backend in ``dtype`` on ``device``."""
    leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]
    r = rpb.to(device=device, dtype=dtype).requires_grad_() if rpb is not None else None
    y = fn(*leaves, r, backend)
    grads = torch.autograd.grad(y, leaves + ([r] if r is not None else []), dy.to(device=device, dtype=dtype))
    return y, grads


def _check(actual, expected, dtype, what):
    assert actual is not None and expected is not None, f"{what}: missing"
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    rtol, atol = TOL[dtype]
    expected = expected.detach()
    actual = actual.detach().cpu().to(expected.dtype)
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}")


def _compare(fn, q, k, v, rpb, dy, dtype):
    y_ref, g_ref = _run(fn, q, k, v, rpb, dy, torch.float64, "cpu", "reference")
    y, g = _run(fn, q, k, v, rpb, dy, dtype, DEVICE, "triton")
    _check(y, y_ref, dtype, "out")
    for name, a, b in zip(("dq", "dk", "dv", "drpb"), g, g_ref):
        _check(a, b, dtype, name)


def _na2d_fn(kernel, dilation, stride):
    return lambda q, k, v, rpb, backend: nbh.na2d(q, k, v, kernel, dilation, stride, rpb=rpb, backend=backend)


def _case_2d(B, H, W, heads, D, kernel, dilation, stride, with_rpb, dtype):
    kh, kw = _pair(kernel)
    rpb_shape = (heads, 2 * kh - 1, 2 * kw - 1) if with_rpb else None
    q, k, v, rpb, dy = _inputs((B, H, W, heads, D), rpb_shape, dtype,
                               (B, H, W, heads, D, kernel, dilation, stride, with_rpb, str(dtype)))
    _compare(_na2d_fn(kernel, dilation, stride), q, k, v, rpb, dy, dtype)


@pytest.fixture(autouse=True)
def _poisoned_buffers(monkeypatch):
    if tri is not None:
        poison_empty(monkeypatch, tri)


# --------------------------------------------------------------------------- against the reference

@kernel_test
@pytest.mark.parametrize("B,H,W,heads,D,kernel,dilation,stride,with_rpb,dtype", P2D, ids=I2D)
def test_na2d(B, H, W, heads, D, kernel, dilation, stride, with_rpb, dtype):
    _case_2d(B, H, W, heads, D, kernel, dilation, stride, with_rpb, dtype)


@kernel_test
@pytest.mark.parametrize("B,L,heads,D,kernel,dilation,stride,with_rpb,dtype", P1D, ids=I1D)
def test_na1d(B, L, heads, D, kernel, dilation, stride, with_rpb, dtype):
    rpb_shape = (heads, 2 * kernel - 1) if with_rpb else None
    q, k, v, rpb, dy = _inputs((B, L, heads, D), rpb_shape, dtype,
                               ("1d", B, L, heads, D, kernel, dilation, stride, with_rpb, str(dtype)))

    def fn(q, k, v, rpb, backend):
        return nbh.na1d(q, k, v, kernel, dilation, stride, rpb=rpb, backend=backend)

    _compare(fn, q, k, v, rpb, dy, dtype)


@kernel_test
@pytest.mark.parametrize("case", [
    (1, 16, 15, 2, 8, 7, 2, 1, True),
    (1, 13, 16, 1, 8, (5, 3), (2, 3), (3, 2), True),
    (2, 16, 9, 1, 8, 3, 1, 1, False),
], ids=lambda c: _id(*c))
def test_small_tiles(monkeypatch, case):
    """16-query tiles 4 wide and 16-key chunks: many tiles per sub-grid, tiles cut by the map
    edge, several halo / inverse-halo chunks per tile, exercised on small maps."""
    monkeypatch.setattr(tri, "_BLOCK_Q", 16)
    monkeypatch.setattr(tri, "_MAX_TILE_W", 4)
    monkeypatch.setattr(tri, "_BLOCK_K", 16)
    B, H, W, heads, D, kernel, dilation, stride, _ = case
    plan = tri._plan(H, W, _pair(kernel), _pair(dilation), _pair(stride), 16, 4, 16)
    assert plan.nth * plan.ntw >= 4 and plan.halo_h * plan.halo_w > plan.block_k
    _case_2d(*case, torch.float64)


@kernel_test
def test_strided_inputs():
    """q, k, v as views of one qkv buffer (read in place), a channel-strided q (copied), and an
    upstream gradient with zero strides (``y.sum()``): every layout gives the reference's answer."""
    B, H, W, heads, D = 1, 9, 11, 2, 8
    g = _gen("strided")
    qkv = torch.randn(B, H, W, 3, heads, D, generator=g, dtype=torch.float64)
    rpb0 = torch.randn(heads, 5, 5, generator=g, dtype=torch.float64)
    grads = {}
    for backend, device in (("reference", "cpu"), ("triton", DEVICE)):
        buf = qkv.to(device).requires_grad_()
        rpb = rpb0.to(device).requires_grad_()
        q, k, v = buf.unbind(3)
        q = q.transpose(-1, -2).contiguous().transpose(-1, -2)  # stride(-1) != 1
        assert not k.is_contiguous() and k.stride(-1) == 1 and q.stride(-1) != 1
        y = nbh.na2d(q, k, v, 3, 2, 2, rpb=rpb, backend=backend)
        y.sum().backward()
        grads[backend] = (y, buf.grad, rpb.grad)
    for name, a, b in zip(("out", "dqkv", "drpb"), grads["triton"], grads["reference"]):
        _check(a, b, torch.float64, name)


@kernel_test
@pytest.mark.parametrize("wants", ["q", "kv", "rpb", "qkv"])
def test_partial_grads(wants):
    """Only the requested gradients come back, and they are right on their own."""
    B, H, W, heads, D = 1, 9, 9, 1, 8
    g = _gen("partial", wants)
    base = {n: torch.randn(B, H, W, heads, D, generator=g, dtype=torch.float64) for n in "qkv"}
    base["rpb"] = torch.randn(heads, 5, 5, generator=g, dtype=torch.float64)
    dy = torch.randn(B, H, W, heads, D, generator=g, dtype=torch.float64)
    names = ("q", "k", "v", "rpb")
    res = {}
    for backend, device in (("reference", "cpu"), ("triton", DEVICE)):
        need = {"q": ("q",), "kv": ("k", "v"), "rpb": ("rpb",), "qkv": ("q", "k", "v")}[wants]
        leaves = {n: base[n].to(device).requires_grad_(n in need) for n in names}
        y = nbh.na2d(leaves["q"], leaves["k"], leaves["v"], 3, 1, 1, rpb=leaves["rpb"], backend=backend)
        (y * dy.to(device)).sum().backward()
        res[backend] = {n: leaves[n].grad for n in names}
    for n in names:
        want = res["reference"][n]
        if want is None:
            assert res["triton"][n] is None, n
        else:
            _check(res["triton"][n], want, torch.float64, f"d{n}")


@kernel_test
def test_no_grad_forward():
    """Inference takes the plain launcher, not the autograd Function."""
    q, k, v, rpb, _ = _inputs((2, 11, 9, 2, 16), (2, 9, 5), torch.float64, ("no_grad",))
    with torch.no_grad():
        y = nbh.na2d(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), (5, 3), (2, 3), (1, 2), rpb=rpb.to(DEVICE),
                     backend="triton")
        ref = nbh.na2d(q, k, v, (5, 3), (2, 3), (1, 2), rpb=rpb, backend="reference")
    assert y.grad_fn is None
    _check(y, ref, torch.float64, "out")


@kernel_test
def test_dispatch_reaches_triton(monkeypatch):
    """backend="triton" runs this module's na2d (not a silent fallback), for na2d and na1d."""
    calls = []
    real = tri.na2d

    def spy(*args):
        calls.append(args[3:6])
        return real(*args)

    monkeypatch.setattr(tri, "na2d", spy)
    x = torch.randn(1, 7, 7, 1, 8, device=DEVICE)
    nbh.na2d(x, x, x, 3, backend="triton")
    nbh.na1d(x[:, 0], x[:, 0], x[:, 0], 5, dilation=1, stride=2, backend="triton")
    assert calls == [((3, 3), (1, 1), (1, 1)), ((5, 1), (1, 1), (2, 1))]


@kernel_test
def test_plan_covers_every_window():
    """The host plan the kernels trust: every query's window lies in its tile's key halo, and
    every query that sees a key lies in that key tile's inverse halo; checked against
    ``reference.neighbor_index`` for many axis geometries (pure Python, no kernel)."""
    for length in (7, 9, 13, 16, 23):
        for k in (1, 3, 5, 7):
            for d in (1, 2, 3):
                if length < k * d:
                    continue
                for s in range(1, k + 1):
                    keys, _ = reference.neighbor_index(length, k, d, s)
                    for t in (1, 4, 8):
                        n_tiles, halo, qhalo, qrange = tri._axis_plan(length, k, d, s, t)
                        for i in range(length):
                            r, p = i % d, i // d
                            m = p // t
                            h0 = (keys[r + m * t * d, 0].item() - r) // d  # the tile's first query
                            sub = (keys[i] - r) // d
                            assert h0 <= sub.min().item() and sub.max().item() < h0 + halo, (length, k, d, s, t, i)
                            for x in sub.tolist():  # query p sees key x of key tile x // t
                                q0, count = qrange[r][x // t]
                                assert q0 <= p < q0 + count <= q0 + qhalo, (length, k, d, s, t, i, x)


# --------------------------------------------------------------------------- HaloNet: zero_pad border, rel_h / rel_w

def _halo_oracle(q, k, v, kernel, dilation, stride, rpb, scale, border, rel_h, rel_w):
    """Independent brute force: zero-padded map, every query's ``kh x kw`` window gathered from
    it, softmax over all window positions (padding keys included: logit = biases only)."""
    B, H, W, heads, D = q.shape
    tabs = []
    for length, kk, d, s in ((H, kernel[0], dilation[0], stride[0]), (W, kernel[1], dilation[1], stride[1])):
        if border == "zero_pad":
            start = torch.tensor([p - p % s + s // 2 - kk // 2 for p in range(length)])
            keys = start[:, None] + torch.arange(kk)[None, :]
        else:
            keys, _ = reference.neighbor_index(length, kk, d, s)
        bias = torch.div(keys - torch.arange(length)[:, None], d, rounding_mode="floor") + kk - 1
        tabs.append((keys, bias))
    (kh_, bh), (kw_, bw) = tabs
    lo_h, hi_h = max(0, -kh_.min().item()), max(0, kh_.max().item() + 1 - H)
    lo_w, hi_w = max(0, -kw_.min().item()), max(0, kw_.max().item() + 1 - W)
    pad = (0, 0, 0, 0, lo_w, hi_w, lo_h, hi_h)
    kp, vp = torch.nn.functional.pad(k, pad), torch.nn.functional.pad(v, pad)
    rows, cols = (kh_ + lo_h)[:, None, :, None], (kw_ + lo_w)[None, :, None, :]
    logits = torch.einsum("bijnd,bijxynd->bnijxy", q * scale, kp[:, rows, cols])
    if rpb is not None:
        logits = logits + rpb[:, bh[:, None, :, None], bw[None, :, None, :]]
    if rel_h is not None:
        logits = logits + rel_h.permute(0, 3, 1, 2, 4)[..., :, None]
    if rel_w is not None:
        logits = logits + rel_w.permute(0, 3, 1, 2, 4)[..., None, :]
    attn = logits.flatten(-2).softmax(-1).view(logits.shape)
    return torch.einsum("bnijxy,bijxynd->bijnd", attn, vp[:, rows, cols])


# (B, H, W, heads, D, kernel, stride, border, rpb, rel, dtypes); HaloNet: stride = block b,
# kernel = b + 2 * halo (even when b is)
HALO_CASES = [
    (1, 16, 16, 2, 8, 14, 8, "zero_pad", False, True, (F32, BF16)),  # block 8 halo 3: 2 x 2 blocks
    (2, 13, 10, 1, 16, 6, 4, "zero_pad", False, True, (F32, BF16)),  # block 4 halo 1, map not divisible
    (1, 9, 9, 2, 16, 8, 4, "zero_pad", True, True, (F32,)),  # block 4 halo 2, rpb too
    (1, 5, 6, 1, 8, 8, 4, "zero_pad", False, True, (F32,)),  # map smaller than the kernel
    (1, 9, 11, 1, 8, (6, 8), (4, 2), "zero_pad", True, False, (F32,)),  # per-axis, rpb only
    (1, 9, 11, 2, 8, (5, 3), (2, 3), "clamp", True, True, (F32,)),  # rel_h / rel_w on clamped windows
]


def _halo_id(c):
    b, h, w, n, d, k, s, border, r, rel, _ = c
    return f"B{b}-H{h}-W{w}-h{n}-D{d}-k{k}-s{s}-{border}" + ("-rpb" if r else "") + ("-rel" if rel else "")


HALO_P = [(*c[:-1], dt) for c in HALO_CASES for dt in c[-1]]
HALO_I = [_halo_id(c) + "-" + _dtype_id(dt) for c in HALO_CASES for dt in c[-1]]


def _halo_case(B, H, W, heads, D, kernel, stride, border, with_rpb, with_rel, dtype, dilation=(1, 1)):
    kh, kw = _pair(kernel)
    stride = _pair(stride)
    g = _gen("halo", B, H, W, heads, D, kernel, stride, border, with_rpb, with_rel, str(dtype))
    shape = (B, H, W, heads, D)
    base = {n: torch.randn(shape, generator=g, dtype=torch.float64) for n in ("q", "k", "v", "dy")}
    if with_rpb:
        base["rpb"] = torch.randn(heads, 2 * kh - 1, 2 * kw - 1, generator=g, dtype=torch.float64)
    if with_rel:
        base["rel_h"] = torch.randn(B, H, W, heads, kh, generator=g, dtype=torch.float64)
        base["rel_w"] = torch.randn(B, H, W, heads, kw, generator=g, dtype=torch.float64)
    base = {n: t.to(dtype).double() for n, t in base.items()}  # the same rounded values for both
    names = [n for n in ("q", "k", "v", "rpb", "rel_h", "rel_w") if n in base]
    scale = D ** -0.5
    res = {}
    for which, dt, device in (("oracle", torch.float64, "cpu"), ("triton", dtype, DEVICE)):
        leaves = {n: base[n].to(device=device, dtype=dt).requires_grad_() for n in names}
        args = (leaves["q"], leaves["k"], leaves["v"], (kh, kw), dilation, stride, leaves.get("rpb"), scale,
                border, leaves.get("rel_h"), leaves.get("rel_w"))
        y = (_halo_oracle if which == "oracle" else tri.na2d)(*args)
        grads = torch.autograd.grad(y, [leaves[n] for n in names], base["dy"].to(device=device, dtype=dt))
        res[which] = (y, grads)
    _check(res["triton"][0], res["oracle"][0], dtype, "out")
    for n, a, b in zip(names, res["triton"][1], res["oracle"][1]):
        _check(a, b, dtype, "d" + n)


@kernel_test
@pytest.mark.parametrize("B,H,W,heads,D,kernel,stride,border,with_rpb,with_rel,dtype", HALO_P, ids=HALO_I)
def test_halo(B, H, W, heads, D, kernel, stride, border, with_rpb, with_rel, dtype):
    _halo_case(B, H, W, heads, D, kernel, stride, border, with_rpb, with_rel, dtype)


@kernel_test
def test_halo_small_tiles(monkeypatch):
    """zero_pad with 16-query tiles and 16-key chunks: several tiles, halo chunks and inverse-halo
    chunks per map, tiles whose halo starts outside the map."""
    monkeypatch.setattr(tri, "_BLOCK_Q", 16)
    monkeypatch.setattr(tri, "_MAX_TILE_W", 4)
    monkeypatch.setattr(tri, "_BLOCK_K", 16)
    plan = tri._plan(13, 10, (6, 6), (1, 1), (4, 4), 16, 4, 16, True)
    assert plan.nth * plan.ntw >= 4 and plan.halo_h * plan.halo_w > plan.block_k
    _halo_case(1, 13, 10, 1, 8, 6, 4, "zero_pad", True, True, torch.float64)


@kernel_test
def test_halo_partial_grads():
    """Only rel_h asks for a gradient: it comes back right, the rest stay None."""
    g = _gen("halo_partial")
    B, H, W, heads, D, kk, s = 1, 8, 8, 1, 8, 6, 4
    q, k, v = (torch.randn(B, H, W, heads, D, generator=g, dtype=torch.float64) for _ in range(3))
    rh = torch.randn(B, H, W, heads, kk, generator=g, dtype=torch.float64)
    rw = torch.randn(B, H, W, heads, kk, generator=g, dtype=torch.float64)
    grads = {}
    for which, device in (("oracle", "cpu"), ("triton", DEVICE)):
        leaves = [t.to(device) for t in (q, k, v, rh, rw)]
        leaves[3].requires_grad_()
        fn = _halo_oracle if which == "oracle" else tri.na2d
        y = fn(*leaves[:3], (kk, kk), (1, 1), (s, s), None, 0.3, "zero_pad", leaves[3], leaves[4])
        (y.square().sum()).backward()
        grads[which] = (y, leaves[3].grad, leaves[4].grad)
    _check(grads["triton"][0], grads["oracle"][0], torch.float64, "out")
    _check(grads["triton"][1], grads["oracle"][1], torch.float64, "drel_h")
    assert grads["triton"][2] is None


@kernel_test
def test_halo_plan_covers_every_window():
    """The zero_pad host plan: every query's (unclamped) window lies in its tile's halo, and every
    query seeing an in-map key lies in that key tile's inverse halo (pure Python)."""
    for length in (3, 9, 13, 16):
        for k, s in ((6, 4), (8, 4), (14, 8), (5, 1), (4, 2)):
            for t in (1, 4, 8):
                n_tiles, halo, qhalo, qrange = tri._axis_plan(length, k, 1, s, t, True)
                for p in range(length):
                    st = p - p % s + s // 2 - k // 2
                    h0 = (p // t * t) - (p // t * t) % s + s // 2 - k // 2
                    assert h0 <= st and st + k <= h0 + halo, (length, k, s, t, p)
                    for x in range(max(st, 0), min(st + k, length)):
                        q0, count = qrange[0][x // t]
                        assert q0 <= p < q0 + count <= q0 + qhalo, (length, k, s, t, p, x)


@kernel_test
@pytest.mark.parametrize("case", [
    (1, 9, 9, 2, 16, 8, 4, "zero_pad", True, True),
    (1, 13, 10, 1, 8, (6, 4), (4, 2), "zero_pad", False, True),
], ids=lambda c: _halo_id((*c, None)))
def test_halo_public_vs_reference(case):
    """Through the public ``na2d`` (the dispatch hands the halo arguments to this module) against
    ``backend="reference"``: out and every gradient."""
    B, H, W, heads, D, kernel, stride, border, with_rpb, with_rel = case
    kh, kw = _pair(kernel)
    g = _gen("halo_public", *case)
    shape = (B, H, W, heads, D)
    base = {n: torch.randn(shape, generator=g, dtype=torch.float64) for n in ("q", "k", "v", "dy")}
    if with_rpb:
        base["rpb"] = torch.randn(heads, 2 * kh - 1, 2 * kw - 1, generator=g, dtype=torch.float64)
    if with_rel:
        base["rel_h"] = torch.randn(B, H, W, heads, kh, generator=g, dtype=torch.float64)
        base["rel_w"] = torch.randn(B, H, W, heads, kw, generator=g, dtype=torch.float64)
    names = [n for n in ("q", "k", "v", "rpb", "rel_h", "rel_w") if n in base]
    res = {}
    for backend, device in (("reference", "cpu"), ("triton", DEVICE)):
        leaves = {n: base[n].to(device).requires_grad_() for n in names}
        y = nbh.na2d(leaves["q"], leaves["k"], leaves["v"], (kh, kw), 1, stride, rpb=leaves.get("rpb"),
                     backend=backend, border=border, rel_h=leaves.get("rel_h"), rel_w=leaves.get("rel_w"))
        res[backend] = (y, torch.autograd.grad(y, [leaves[n] for n in names], base["dy"].to(device)))
    _check(res["triton"][0], res["reference"][0], torch.float64, "out")
    for n, a, b in zip(names, res["triton"][1], res["reference"][1]):
        _check(a, b, torch.float64, "d" + n)


# --------------------------------------------------------------------------- properties (Hypothesis)
# The cpu suite's properties (``test_neighborhood_props.py``: every layout, dtype, border, bias,
# degenerate geometry, autocast) on maps of at most 5 x 5 and D <= 8, as the interpreter is slow.

@kernel_test
@pytest.mark.parametrize("n", sizes(30, 600))
def test_triton_matches_reference(n):
    @settings_for(n)
    @given(case=cases(max_len=5, max_kernel=5, max_d=8))
    def prop(case):
        check(case, "triton", device=DEVICE)
    prop()


@kernel_test
@pytest.mark.parametrize("n", sizes(8, 150))
def test_triton_autocast_bf16(n):
    @settings_for(n)
    @given(case=cases(max_len=5, max_kernel=5, max_d=8, autocast=True))
    def prop(case):
        check(case, "triton", device=DEVICE, autocast=torch.bfloat16)
    prop()


# --------------------------------------------------------------------------- torch.compile

@kernel_test
@pytest.mark.parametrize("halo", [False, True], ids=["clamp-rpb", "zero_pad-rel"])
def test_compile_traces_the_custom_ops(monkeypatch, halo):
    """torch.compile(fullgraph=True) traces backend="triton" as the registered custom ops
    (fake shapes, autograd) and gives the eager reference's output and gradients."""
    calls = []
    for name in ("forward", "backward"):
        monkeypatch.setattr(tri, name, lambda *a, _f=getattr(tri, name), _n=name, **k: calls.append(_n) or _f(*a, **k))
    g = _gen("compile", halo)
    B, H, W, heads, D = 1, 9, 10, 2, 8
    kernel, stride = (6, 2) if halo else (3, 1)
    base = [torch.randn(B, H, W, heads, D, generator=g, dtype=torch.float64) for _ in range(3)]
    if halo:
        base += [torch.randn(B, H, W, heads, kernel, generator=g, dtype=torch.float64) for _ in range(2)]
    else:
        base += [torch.randn(heads, 2 * kernel - 1, 2 * kernel - 1, generator=g, dtype=torch.float64)]

    def fn(q, k, v, *bias, backend):
        if halo:
            return nbh.na2d(q, k, v, kernel, stride=stride, border="zero_pad", rel_h=bias[0], rel_w=bias[1],
                            backend=backend)
        return nbh.na2d(q, k, v, kernel, dilation=2, rpb=bias[0], backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    res = {}
    for name, f, device in (("reference", fn, "cpu"), ("triton", compiled, DEVICE)):
        leaves = [t.to(device).requires_grad_() for t in base]
        y = f(*leaves, backend=name)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=device).view_as(y)).sum().backward()
        res[name] = [y] + [t.grad for t in leaves]
    assert calls == ["forward", "backward"]  # the kernels ran, inside the compiled graph
    for i, (a, b) in enumerate(zip(res["triton"], res["reference"])):
        _check(a, b, torch.float64, f"output {i}")
