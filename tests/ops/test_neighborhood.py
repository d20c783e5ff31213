"""Neighborhood attention op: the cpu backend against the reference (forward and every
gradient), the reference's float64 gradcheck, the semantics against independent oracles
(dense softmax attention; NATTEN's published window / rpb / stride formulas), input
validation and backend dispatch.
"""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnzoo.ops import neighborhood as nbh
from attnzoo.ops.neighborhood import cpu, reference

# relative L2 error allowed against a float64 reference run on the same inputs
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2}

# (B, H, W, heads, D, kernel, dilation, stride, rpb)
CASES_2D = [
    (1, 7, 9, 1, 8, 3, 1, 1, False),
    (2, 7, 9, 2, 8, 3, 1, 2, True),
    (2, 13, 11, 2, 16, 5, 1, 1, True),
    (1, 13, 11, 1, 8, 5, 2, 1, True),
    (1, 13, 11, 2, 8, 3, 3, 2, False),
    (2, 16, 16, 2, 16, 7, 1, 1, True),
    (1, 16, 16, 1, 16, 7, 2, 2, True),
    (1, 16, 16, 2, 8, 5, 3, 1, False),
    (1, 11, 16, 1, 8, (3, 5), (2, 3), (2, 1), True),
    (2, 14, 14, 1, 8, 7, 2, 1, True),  # DiNAT-style: every sub-grid is exactly one window
]
IDS_2D = [f"B{b}-H{h}-W{w}-h{n}-D{d}-k{k}-d{dl}-s{s}-{'rpb' if r else 'norpb'}".replace(" ", "")
          for b, h, w, n, d, k, dl, s, r in CASES_2D]

# (B, L, heads, D, kernel, dilation, stride, rpb)
CASES_1D = [
    (2, 9, 1, 8, 3, 1, 1, False),
    (1, 23, 2, 16, 7, 2, 1, True),
    (2, 17, 2, 8, 5, 3, 2, True),
    (1, 30, 1, 8, 9, 1, 3, True),
]
IDS_1D = [f"B{b}-L{n}-h{h}-D{d}-k{k}-d{dl}-s{s}-{'rpb' if r else 'norpb'}" for b, n, h, d, k, dl, s, r in CASES_1D]


def _rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


def _pair(x):
    return (x, x) if isinstance(x, int) else tuple(x)


def _inputs(shape, heads, kernel, with_rpb, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(3))
    rpb = None
    if with_rpb:
        rpb = torch.randn((heads,) + tuple(2 * x - 1 for x in kernel), generator=g, dtype=torch.float64).to(dtype)
    return q, k, v, rpb


def _run(fn, q, k, v, rpb, backend, dy):
    """Output and gradients w.r.t. q, k, v (and rpb) of one backend."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    r = rpb.detach().clone().requires_grad_() if rpb is not None else None
    y = fn(*leaves, r, backend)
    grads = torch.autograd.grad(y, leaves + ([r] if r is not None else []), dy.to(y.dtype))
    return y, grads


def _compare(fn, q, k, v, rpb, dtype):
    """cpu in ``dtype`` vs the reference in float64 on the same (rounded) inputs."""
    up = [t.double() if t is not None else None for t in (q, k, v, rpb)]
    dy = torch.randn(q.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y_ref, g_ref = _run(fn, *up, "reference", dy)
    y_cpu, g_cpu = _run(fn, q, k, v, rpb, "cpu", dy.to(dtype))
    assert y_cpu.dtype == dtype
    assert _rel_err(y_cpu, y_ref) < TOL[dtype], "forward"
    names = ["dq", "dk", "dv", "drpb"]
    for name, a, b in zip(names, g_cpu, g_ref):
        assert a.dtype == dtype, name
        assert _rel_err(a, b) < TOL[dtype] * (3 if dtype == torch.bfloat16 else 1), name
    # the no-grad forward (fused SDPA tiles) agrees too
    with torch.no_grad():
        y_ng = fn(q, k, v, rpb, "cpu")
    assert _rel_err(y_ng, y_ref) < TOL[dtype], "no-grad forward"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES_2D, ids=IDS_2D)
def test_na2d_cpu_matches_reference(case, dtype):
    B, H, W, heads, D, kernel, dil, stride, with_rpb = case
    q, k, v, rpb = _inputs((B, H, W, heads, D), heads, _pair(kernel), with_rpb, dtype)

    def fn(q, k, v, rpb, backend):
        return nbh.na2d(q, k, v, kernel, dil, stride, rpb=rpb, backend=backend)

    _compare(fn, q, k, v, rpb, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES_1D, ids=IDS_1D)
def test_na1d_cpu_matches_reference(case, dtype):
    B, L, heads, D, kernel, dil, stride, with_rpb = case
    q, k, v, rpb = _inputs((B, L, heads, D), heads, (kernel,), with_rpb, dtype)

    def fn(q, k, v, rpb, backend):
        return nbh.na1d(q, k, v, kernel, dil, stride, rpb=rpb, backend=backend)

    _compare(fn, q, k, v, rpb, dtype)


@pytest.mark.parametrize("tile", [(1, 1), (2, 3), (3, 2), (4, 4), (5, 7), (9, 9)], ids=lambda t: f"tile{t[0]}x{t[1]}")
def test_cpu_every_tiling_matches_reference(tile):
    """The plan search picks one tiling; every other one must be exact too (spill rows,
    padding queries, sub-grids of two lengths, strided groups across tile borders)."""
    B, H, W, heads, D = 2, 17, 15, 2, 4
    kernel, dil, stride = (5, 3), (2, 3), (3, 2)
    q, k, v, rpb = _inputs((B, H, W, heads, D), heads, kernel, True, torch.float64, seed=5)
    args = (kernel, dil, stride)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, rpb)]
    y_ref = reference.na2d(*leaves[:3], *args, leaves[3], 0.3)
    y_cpu = cpu.na2d(*leaves[:3], *args, leaves[3], 0.3, tile=tile)
    dy = torch.randn_like(y_ref)
    for a, b in zip(torch.autograd.grad(y_cpu, leaves, dy), torch.autograd.grad(y_ref, leaves, dy)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y_cpu, y_ref, rtol=1e-10, atol=1e-10)


def test_cpu_never_reads_uninitialised_memory(monkeypatch):
    """Fill every buffer the cpu backend allocates uninitialised with NaN: results stay exact."""
    new_empty, empty_like = torch.Tensor.new_empty, torch.empty_like
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **kw: new_empty(self, *a, **kw).fill_(math.nan))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: empty_like(*a, **kw).fill_(math.nan))
    for shape, kernel, dil, stride in [((1, 13, 17, 2, 4), 5, (2, 3), (2, 1)), ((2, 9, 16, 1, 4), 3, 1, 3)]:
        q, k, v, rpb = _inputs(shape, shape[3], _pair(kernel), True, torch.float64, seed=7)
        leaves = [t.clone().requires_grad_() for t in (q, k, v, rpb)]
        outs = {}
        for backend in ("reference", "cpu"):
            y = nbh.na2d(*leaves[:3], kernel, dil, stride, rpb=leaves[3], backend=backend)
            outs[backend] = (y,) + torch.autograd.grad(y, leaves, torch.ones_like(y))
            with torch.no_grad():
                outs[backend] += (nbh.na2d(q, k, v, kernel, dil, stride, rpb=rpb, backend=backend),)
        for a, b in zip(outs["cpu"], outs["reference"]):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_cpu_non_contiguous_inputs():
    """q, k, v as the layer makes them: views of one qkv tensor."""
    B, H, W, heads, D = 2, 9, 12, 2, 8
    qkv = torch.randn(B, H, W, 3, heads, D, dtype=torch.float64)
    q, k, v = qkv.unbind(3)
    rpb = torch.randn(heads, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(nbh.na2d(q, k, v, 3, (2, 1), rpb=rpb, backend="cpu"),
                               nbh.na2d(q.contiguous(), k.contiguous(), v.contiguous(), 3, (2, 1), rpb=rpb,
                                        backend="reference"))


# --------------------------------------------------------------------------- gradcheck

def test_reference_gradcheck_2d():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 5, 6, 2, 2, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(3))
    for kernel, dil, stride, with_rpb in [((3, 3), (1, 1), (1, 1), True), ((3, 3), (1, 2), (2, 3), False),
                                          ((3, 3), (1, 2), (1, 2), True), ((5, 3), (1, 2), (2, 1), True)]:
        rpb = None
        if with_rpb:
            rpb = torch.randn(2, 2 * kernel[0] - 1, 2 * kernel[1] - 1, dtype=torch.float64, generator=g,
                              requires_grad=True)

        def fn(a, b, c, r, ks=kernel, d=dil, s=stride):
            return reference.na2d(a, b, c, ks, d, s, r, 0.5)

        assert torch.autograd.gradcheck(fn, (q, k, v, rpb))


def test_reference_gradcheck_1d():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 8, 1, 3, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(3))
    rpb = torch.randn(1, 5, dtype=torch.float64, generator=g, requires_grad=True)

    def fn(a, b, c, r):
        return nbh.na1d(a, b, c, 3, 2, 2, rpb=r, backend="reference")

    assert torch.autograd.gradcheck(fn, (q, k, v, rpb))


def test_cpu_gradcheck():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 6, 5, 1, 3, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(3))
    rpb = torch.randn(1, 5, 5, dtype=torch.float64, generator=g, requires_grad=True)

    def fn(a, b, c, r):
        return nbh.na2d(a, b, c, 3, (2, 1), (1, 2), rpb=r, backend="cpu")

    assert torch.autograd.gradcheck(fn, (q, k, v, rpb))


# --------------------------------------------------------------------------- semantics

def _dense_attention(q, k, v, bias, scale):
    """Full softmax attention over all positions of a [B, *spatial, heads, D] map;
    ``bias``: [heads, Nq, Nk] or None."""
    B, heads, D = q.shape[0], q.shape[-2], q.shape[-1]
    qf, kf, vf = (t.reshape(B, -1, heads, D).transpose(1, 2) for t in (q, k, v))
    logits = qf @ kf.transpose(-1, -2) * scale
    if bias is not None:
        logits = logits + bias
    return (logits.softmax(-1) @ vf).transpose(1, 2).reshape(q.shape)


def _rpb_dense(rpb, H, W):
    """bias[h, (i, j), (a, b)] = rpb[h, a - i + H - 1, b - j + W - 1] for a dense H x W map."""
    i = torch.arange(H)
    j = torch.arange(W)
    di = (i[None, :] - i[:, None] + H - 1)  # [query, key]
    dj = (j[None, :] - j[:, None] + W - 1)
    b = rpb[:, di[:, None, :, None], dj[None, :, None, :]]  # [heads, H, W, H, W]
    return b.reshape(rpb.shape[0], H * W, H * W)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("kernel", [(5, 5), (3, 7)], ids=lambda k: f"k{k[0]}x{k[1]}")
def test_kernel_equal_to_map_is_dense_attention(backend, kernel):
    H, W = kernel
    q, k, v, rpb = _inputs((2, H, W, 2, 8), 2, kernel, True, torch.float64, seed=11)
    expect = _dense_attention(q, k, v, _rpb_dense(rpb, H, W), 8 ** -0.5)
    torch.testing.assert_close(nbh.na2d(q, k, v, kernel, rpb=rpb, backend=backend), expect)
    torch.testing.assert_close(nbh.na2d(q, k, v, kernel, backend=backend), _dense_attention(q, k, v, None, 8 ** -0.5))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_dilated_map_of_kernel_times_dilation_is_dense_per_subgrid(backend):
    """H = kh * dh: every sub-grid {r, r + d, ...} is one kh x kw window, attended densely."""
    kernel, dil = (3, 5), (2, 3)
    H, W = kernel[0] * dil[0], kernel[1] * dil[1]
    q, k, v, rpb = _inputs((1, H, W, 2, 4), 2, kernel, True, torch.float64, seed=12)
    out = nbh.na2d(q, k, v, kernel, dil, rpb=rpb, backend=backend)
    bias = _rpb_dense(rpb, *kernel)
    for r in range(dil[0]):
        for c in range(dil[1]):
            sub = [t[:, r::dil[0], c::dil[1]] for t in (q, k, v)]
            torch.testing.assert_close(out[:, r::dil[0], c::dil[1]], _dense_attention(*sub, bias, 0.5))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_stride_equal_to_kernel_is_block_diagonal(backend):
    """stride == kernel_size: the map splits into non-overlapping k x k blocks, each attended densely."""
    kernel = (3, 5)
    H, W = 2 * kernel[0], 3 * kernel[1]
    q, k, v, rpb = _inputs((2, H, W, 1, 4), 1, kernel, True, torch.float64, seed=13)
    out = nbh.na2d(q, k, v, kernel, stride=kernel, rpb=rpb, backend=backend)
    bias = _rpb_dense(rpb, *kernel)
    for bi in range(0, H, kernel[0]):
        for bj in range(0, W, kernel[1]):
            blk = [t[:, bi:bi + kernel[0], bj:bj + kernel[1]] for t in (q, k, v)]
            torch.testing.assert_close(out[:, bi:bi + kernel[0], bj:bj + kernel[1]], _dense_attention(*blk, bias, 0.5))


# NATTEN's published index math, transcribed as written (kernel size K, NS = K // 2).

def _natten014_window_start(index, length, K, NS, dilation):
    """NATTEN 0.14.x ``get_window_start`` (csrc/cpu/natten_cpu_commons.h)."""
    if dilation <= 1:
        return max(index - NS, 0) + (index + NS >= length) * (length - index - NS - 1)
    ni = index - NS * dilation
    if ni < 0:
        return index % dilation
    if index + NS * dilation >= length:
        imodd = index % dilation
        a = (length // dilation) * dilation
        b = length - a
        if imodd < b:
            return length - b + imodd - 2 * NS * dilation
        return a + imodd - K * dilation
    return ni


def _natten017_window_start(index, length, K, NS, dilation):
    """NATTEN 0.17.x ``get_window_start``, non-causal (cpu/naive/natten_cpu_commons.h)."""
    dilation_idx = index % dilation
    index_pdp = index // dilation
    length_pdp = (length + dilation - 1) // dilation
    num_padded = length_pdp * dilation - length
    length_pdp -= 1 if dilation_idx >= dilation - num_padded else 0
    start_idx = max(index_pdp - NS, 0) + (index_pdp + NS >= length_pdp) * (length_pdp - index_pdp - NS - 1)
    return start_idx * dilation + dilation_idx


def _natten_pb_start(index, length, K, NS, dilation):
    """NATTEN <= 0.17 ``get_pb_start``: the rpb index of the window's first key."""
    if dilation <= 1:
        return NS + (index < NS) * (NS - index) + (index + NS >= length) * (length - index - 1 - NS)
    if index - NS * dilation < 0:
        return K - 1 - index // dilation
    if index + NS * dilation >= length:
        return (length - index - 1) // dilation
    return NS


def test_window_and_rpb_index_match_natten_formulas():
    checked = 0
    for K in (1, 3, 5, 7, 9):
        for d in range(1, 6):
            for length in range(K * d, K * d + 2 * d + 9):
                keys, bias = reference.neighbor_index(length, K, d, 1)
                for i in range(length):
                    ws = _natten017_window_start(i, length, K, K // 2, d)
                    assert _natten014_window_start(i, length, K, K // 2, d) == ws, (K, d, length, i)
                    assert keys[i].tolist() == [ws + t * d for t in range(K)], (K, d, length, i)
                    pb = _natten_pb_start(i, length, K, K // 2, d)
                    assert bias[i].tolist() == [pb + t for t in range(K)], (K, d, length, i)
                    checked += 1
    assert checked > 5000


def _natten_flex_mask_1d(length, K, d, s):
    """NATTEN >= 0.20 ``get_na_flex_mask`` for one non-causal axis, as a [query, key] bool table."""
    q = torch.arange(length)[:, None]
    kv = torch.arange(length)[None, :]
    q_di, kv_di = q // d, kv // d
    q_grp, kv_grp = q % d, kv % d
    padding = 1 - ((q_grp + (d - (length % d))) // d)
    n = (length // d) + padding
    left = K // 2
    right = K // 2 + (K % 2 - 1)
    leader = torch.minimum((q_di // s) * s + (s // 2), n - 1)
    center = torch.maximum(torch.minimum(leader, n - 1 - right), torch.full_like(leader, left))
    w0, w1 = center - kv_di, kv_di - center
    return (((0 <= w0) & (w0 <= left)) | ((0 <= w1) & (w1 <= right))) & (q_grp == kv_grp)


def test_stride_windows_match_natten_generalized_na():
    """Stride groups: every query uses the window of its group's centre ("leader") query."""
    for K in (1, 3, 5, 7):
        for s in range(1, K + 1):
            for d in (1, 2, 3):
                for length in range(K * d, K * d + 3 * d + 8):
                    keys, _ = reference.neighbor_index(length, K, d, s)
                    ours = torch.zeros(length, length, dtype=torch.bool)
                    ours.scatter_(1, keys, True)
                    assert torch.equal(ours, _natten_flex_mask_1d(length, K, d, s)), (K, s, d, length)


def test_na1d_is_na2d_on_a_column():
    q, k, v, rpb = _inputs((2, 19, 2, 8), 2, (5,), True, torch.float64, seed=21)
    out = nbh.na1d(q, k, v, 5, 3, 2, rpb=rpb, backend="reference")
    # brute force: explicit loops over NATTEN's window of every position
    keys, bias = reference.neighbor_index(19, 5, 3, 2)
    expect = torch.empty_like(q)
    for i in range(19):
        logits = torch.einsum("bhd,bkhd->bhk", q[:, i], k[:, keys[i]]) * 8 ** -0.5 + rpb[:, bias[i]]
        expect[:, i] = torch.einsum("bhk,bkhd->bhd", logits.softmax(-1), v[:, keys[i]])
    torch.testing.assert_close(out, expect)
    torch.testing.assert_close(nbh.na1d(q, k, v, 5, 3, 2, rpb=rpb, backend="cpu"), expect)


def test_scale_argument():
    q, k, v, _ = _inputs((1, 7, 7, 1, 4), 1, (3, 3), False, torch.float64)
    for backend in ("reference", "cpu"):
        torch.testing.assert_close(nbh.na2d(q, k, v, 3, scale=1.0, backend=backend),
                                   nbh.na2d(q * 2.0, k, v, 3, scale=0.5, backend=backend))


# --------------------------------------------------------------------------- validation

def test_bad_inputs():
    x = torch.randn(1, 8, 9, 2, 4)
    with pytest.raises(ValueError, match=r"same shape, got q \(1, 8, 9, 2, 4\), k \(1, 8, 8, 2, 4\)"):
        nbh.na2d(x, x[:, :, :8], x, 3)
    with pytest.raises(ValueError, match=r"\[B, H, W, heads, D\], got shape \(8, 9, 2, 4\)"):
        nbh.na2d(x[0], x[0], x[0], 3)
    with pytest.raises(ValueError, match=r"\[B, L, heads, D\], got shape \(1, 8, 9, 2, 4\)"):
        nbh.na1d(x, x, x, 3)
    with pytest.raises(ValueError, match=r"map \(8, 9\) of k \(1, 8, 9, 2, 4\) is smaller than kernel_size \* "
                                         r"dilation \(9, 9\)"):
        nbh.na2d(x, x, x, 3, dilation=3)
    with pytest.raises(ValueError, match=r"map \(8, 9\) .* smaller .* \(9, 3\)"):
        nbh.na2d(x, x, x, (9, 3))
    with pytest.raises(ValueError, match=r"rpb must have shape .* \(2, 5, 5\) .* got \(2, 3, 3\)"):
        nbh.na2d(x, x, x, 3, rpb=torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match=r"rpb must have shape .* \(2, 5\) .* got \(2, 5, 5\)"):
        nbh.na1d(x[:, 0], x[:, 0], x[:, 0], 3, rpb=torch.zeros(2, 5, 5))
    with pytest.raises(ValueError, match=r"kernel_size must be odd .* got \(3, 4\)"):
        nbh.na2d(x, x, x, (3, 4))
    with pytest.raises(ValueError, match="kernel_size must be odd .* got 0"):
        nbh.na2d(x, x, x, 0)
    with pytest.raises(ValueError, match=r"stride must not exceed kernel_size .* stride 5 and kernel_size 3"):
        nbh.na2d(x, x, x, 3, stride=5)
    with pytest.raises(ValueError, match="dilation must be >= 1, got 0"):
        nbh.na2d(x, x, x, 3, dilation=0)
    with pytest.raises(ValueError, match=r"kernel_size must be an int or a tuple of 2 ints, got \(3, 3, 3\)"):
        nbh.na2d(x, x, x, (3, 3, 3))
    with pytest.raises(ValueError, match="one floating dtype"):
        nbh.na2d(x, x.double(), x, 3)
    with pytest.raises(ValueError, match=r"empty inputs of shape \(0, 8, 9, 2, 4\)"):
        nbh.na2d(x[:0], x[:0], x[:0], 3)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_bias_dtype_and_scale_rejected_before_dispatch(backend):
    """The public op checks these for every backend (triton included: it raises before dispatch,
    so no GPU is needed): a bias in another dtype than q, and a non-finite scale."""
    x = torch.randn(1, 7, 7, 2, 4)
    with pytest.raises(ValueError, match=r"rpb must have q's dtype torch.float32, got torch.float64"):
        nbh.na2d(x, x, x, 3, rpb=torch.zeros(2, 5, 5, dtype=torch.float64), backend=backend)
    with pytest.raises(ValueError, match=r"rpb must have q's dtype torch.float32, got torch.bfloat16"):
        nbh.na1d(x[:, 0], x[:, 0], x[:, 0], 3, rpb=torch.zeros(2, 5, dtype=torch.bfloat16), backend=backend)
    with pytest.raises(ValueError, match=r"rel_w must have q's dtype torch.float32, got torch.float16"):
        nbh.na2d(x, x, x, 4, stride=2, border="zero_pad", rel_w=torch.zeros(1, 7, 7, 2, 4, dtype=torch.float16),
                 backend=backend)
    for bad in (float("inf"), -float("inf"), float("nan")):
        with pytest.raises(ValueError, match=r"scale must be finite, got"):
            nbh.na2d(x, x, x, 3, scale=bad, backend=backend)
    with pytest.raises(ValueError, match=r"scale must be a real number, got 'a'"):
        nbh.na1d(x[:, 0], x[:, 0], x[:, 0], 3, scale="a", backend=backend)


def test_zero_and_negative_scale_are_attention():
    """scale 0 is uniform attention over each window; a negative scale is legal too (every backend
    that runs here agrees with the reference, the HaloNet flash path included)."""
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 6, 5, 1, 3, generator=g, dtype=torch.float64) for _ in range(3))
    rel = torch.randn(1, 6, 5, 1, 4, generator=g, dtype=torch.float64)
    for scale in (0.0, -0.7):
        for kw in (dict(kernel_size=3), dict(kernel_size=4, stride=2, border="zero_pad", rel_h=rel, rel_w=rel)):
            want = nbh.na2d(q, k, v, scale=scale, backend="reference", **kw)
            torch.testing.assert_close(nbh.na2d(q, k, v, scale=scale, backend="cpu", **kw), want)
    flat = nbh.na2d(q, k, v, 5, scale=0.0, backend="cpu")  # 5 x 5 windows clamped into a 6 x 5 map
    torch.testing.assert_close(flat[:, 0, 0], v[:, :5, :5].mean((1, 2)))


# --------------------------------------------------------------------------- dispatch

def test_dispatch(monkeypatch):
    x = torch.randn(1, 7, 7, 1, 4)
    monkeypatch.delenv("ATTNZOO_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert nbh._dispatch.choose_backend("t", nbh.BACKENDS, [x]).name == "cpu"
    calls = []

    def spy(mod):
        real = mod.na2d

        def wrapped(*args, **kwargs):
            calls.append(mod.__name__.rsplit(".", 1)[1])
            return real(*args, **kwargs)
        return wrapped

    for mod in (reference, cpu):
        monkeypatch.setattr(mod, "na2d", spy(mod))
    nbh.na2d(x, x, x, 3)
    nbh.na2d(x, x, x, 3, backend="reference")
    nbh.na1d(x[:, 0], x[:, 0], x[:, 0], 3, backend="cpu")
    monkeypatch.setenv("ATTNZOO_BACKEND", "reference")
    nbh.na2d(x, x, x, 3)
    assert calls == ["cpu", "reference", "cpu", "reference"]
    monkeypatch.setenv("ATTNZOO_BACKEND", "nope")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        nbh.na2d(x, x, x, 3)
    monkeypatch.delenv("ATTNZOO_BACKEND")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="cannot run: .*CUDA"):
        nbh.na2d(x, x, x, 3, backend="triton")


def test_import_and_cpu_call_never_import_the_triton_backend():
    # with CUDA the package imports it up front, which registers its custom ops for torch.compile
    code = ("import sys, torch; from attnzoo.ops.neighborhood import na2d; x = torch.randn(1, 7, 7, 1, 4); "
            "na2d(x, x, x, 3); "
            "assert torch.cuda.is_available() or 'attnzoo.ops.neighborhood.triton' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
