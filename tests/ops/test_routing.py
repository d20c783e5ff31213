"""Bi-level routing attention: routing semantics against a brute-force oracle, every CPU
backend against the reference (forward and dq / dk / dv, odd and padded maps, topk
1..all), float64 gradcheck, validation. The Triton kernels: ``test_routing_triton.py``."""
import math

import pytest
import torch

from attnzoo.ops import _checks, routing
from attnzoo.ops.routing import cpu, reference

TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2}

# (B, H, W, heads, D, num_regions, topk)
CASES = [
    (2, 14, 14, 2, 8, 7, 4),  # divisible, 2x2 regions
    (1, 9, 12, 2, 8, 7, 16),  # padded: some regions are all padding
    (2, 13, 11, 1, 4, (3, 4), 3),  # non-square grid, padded
    (1, 8, 8, 2, 4, 2, -1),  # dense
    (1, 3, 3, 1, 4, 7, 16),  # grid larger than the map
    (2, 10, 10, 2, 4, 3, 1),  # topk 1, padded
    (1, 12, 15, 3, 4, 3, 9),  # topk == nR
    (1, 7, 9, 1, 16, 2, 2),
]
IDS = [f"B{c[0]}-{c[1]}x{c[2]}-h{c[3]}-D{c[4]}-n{c[5]}-k{c[6]}" for c in CASES]


def _inputs(shape, dtype, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)
            for _ in range(3)]


def _rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _regions(n):
    return _checks.as_pair("bra", "num_regions", n, minimum=1)


def _oracle(q, k, v, num_regions, topk, scale):
    """Token by token: the regions of every token, region means over valid tokens, top-k
    by affinity, then softmax over the union of the chosen regions' tokens."""
    B, H, W, heads, D = q.shape
    nh, nw = num_regions
    h, w = math.ceil(H / nh), math.ceil(W / nw)
    region = [[(y // h) * nw + x // w for x in range(W)] for y in range(H)]
    members = {r: [] for r in range(nh * nw)}
    for y in range(H):
        for x in range(W):
            members[region[y][x]].append((y, x))
    out = torch.zeros_like(q)
    idx = torch.zeros(B, nh * nw, topk, dtype=torch.long)
    for b in range(B):
        qm = torch.stack([q[b, [p[0] for p in m], [p[1] for p in m]].mean(0) if m else q.new_zeros(heads, D)
                          for m in members.values()]).flatten(1)
        km = torch.stack([k[b, [p[0] for p in m], [p[1] for p in m]].mean(0) if m else q.new_zeros(heads, D)
                          for m in members.values()]).flatten(1)
        aff = qm @ km.T
        aff[:, [not m for m in members.values()]] = -math.inf
        idx[b] = aff.topk(topk, dim=-1).indices
        for y in range(H):
            for x in range(W):
                keys = [p for r in idx[b, region[y][x]].tolist() for p in members[r]]
                ky, kx = [p[0] for p in keys], [p[1] for p in keys]
                logits = torch.einsum("hd,nhd->hn", q[b, y, x] * scale, k[b, ky, kx])
                out[b, y, x] = torch.einsum("hn,nhd->hd", logits.softmax(-1), v[b, ky, kx])
    return out, idx


@pytest.mark.parametrize("case", CASES[:4] + CASES[5:6], ids=IDS[:4] + IDS[5:6])
def test_reference_matches_token_oracle(case):
    B, H, W, heads, D, nr, topk = case
    q, k, v = _inputs((B, H, W, heads, D), torch.float64, requires_grad=False)
    nr2 = (nr, nr) if isinstance(nr, int) else nr
    kk = nr2[0] * nr2[1] if topk == -1 else min(topk, nr2[0] * nr2[1])
    out, idx = routing.bra(q, k, v, nr, topk, backend="reference", return_index=True)
    exp_out, exp_idx = _oracle(q, k, v, nr2, kk, (heads * D) ** -0.5)
    if kk < nr2[0] * nr2[1]:
        assert torch.equal(idx, exp_idx)
    torch.testing.assert_close(out, exp_out, rtol=1e-12, atol=1e-12)


def test_route_matches_official_means():
    """Divisible map: the official ``q.mean([2, 3])`` over the window layout and ``topk`` of the scaled logits."""
    B, n, s, C = 2, 4, 3, 12
    q, k = torch.randn(2, B, n * s, n * s, C, dtype=torch.float64).unbind(0)
    win = lambda t: t.view(B, n, s, n, s, C).permute(0, 1, 3, 2, 4, 5).reshape(B, n * n, s, s, C)  # noqa: E731
    logits = (win(q).mean([2, 3]) * C ** -0.5) @ win(k).mean([2, 3]).transpose(-1, -2)
    idx = reference.route(q.view(B, n * s, n * s, 3, 4), k.view(B, n * s, n * s, 3, 4), (n, n), 5)
    assert torch.equal(idx, logits.topk(5, dim=-1).indices)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_cpu_matches_reference(case, dtype):
    B, H, W, heads, D, nr, topk = case
    q, k, v = _inputs((B, H, W, heads, D), dtype, seed=1)
    dy = torch.randn(B, H, W, heads, D, dtype=torch.float64).to(dtype)
    y, idx = routing.bra(q, k, v, nr, topk, backend="cpu", return_index=True)
    # the reference runs in float64 on the same (rounded) inputs and the same routing (low
    # precision region means may break near-ties differently; routing is checked in float64 above)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    y_ref = reference.bra(*leaves, idx, _regions(nr), (heads * D) ** -0.5)
    g_ref = torch.autograd.grad(y_ref, leaves, dy.double())
    if dtype == torch.float64:
        torch.testing.assert_close(y_ref, routing.bra(*leaves, nr, topk, backend="reference"))
    g = torch.autograd.grad(y, (q, k, v), dy)
    assert y.dtype == dtype and y.shape == q.shape
    assert _rel_err(y, y_ref) < TOL[dtype], "out"
    for name, a, b in zip(("dq", "dk", "dv"), g, g_ref):
        assert a.dtype == dtype, name
        assert _rel_err(a, b) < TOL[dtype] * (2 if dtype == torch.bfloat16 else 1), name
    with torch.no_grad():
        assert _rel_err(routing.bra(q, k, v, nr, topk, backend="cpu"), y_ref) < TOL[dtype], "no-grad forward"


def test_cpu_non_contiguous_inputs_and_nan_buffers(monkeypatch):
    """q, k, v as the layer makes them (views of one qkv tensor); buffers the backend allocates
    uninitialised are filled with NaN, so a slot it forgets to write shows up."""
    new_empty, empty_like = torch.Tensor.new_empty, torch.empty_like
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **kw: new_empty(self, *a, **kw).fill_(math.nan))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: empty_like(*a, **kw).fill_(math.nan))
    qkv = torch.randn(2, 11, 9, 3, 2, 4, dtype=torch.float64, requires_grad=True)
    outs = []
    for backend in ("reference", "cpu"):
        q, k, v = qkv.unbind(3)
        y = routing.bra(q, k, v, 3, 2, backend=backend)
        outs.append((y,) + torch.autograd.grad(y, qkv, torch.ones_like(y)))
    for a, b in zip(*outs):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_cpu_chunks_bound_gathered_kv():
    """The gathered K/V alive at once is at most 1/topk of the official topk copies, or under
    the small fixed budget; BiFormer's stage 2 at 224 px (B=2, 8x8 regions, C=128) is the former."""
    for total, topk, region in [(98, 4, 64 * 128), (98, 1, 64 * 128), (8, 16, 4), (3, 2, 8), (2000, 4, 64 * 128)]:
        c = cpu._chunk(total, topk, region)
        assert 1 <= c <= total
        assert c * topk <= max(total / topk, cpu._CHUNK_ELEMS / region, 1)
    assert cpu._chunk(98, 4, 64 * 128) * 4 * 64 * 128 <= 98 * 4 * 64 * 128 / 4


# --------------------------------------------------------------------------- gradcheck

def test_reference_gradcheck():
    q, k, v = _inputs((1, 5, 7, 2, 2), torch.float64, seed=3)
    for nr, topk in [(2, 1), (3, 4), ((2, 3), -1)]:
        assert torch.autograd.gradcheck(lambda a, b, c, n=nr, t=topk: reference.bra(
            a, b, c, reference.route(a, b, _regions(n), routing._validate(a, b, c, n, t, None)[1]),
            _regions(n), 0.5), (q, k, v))


def test_cpu_gradcheck():
    q, k, v = _inputs((2, 5, 7, 1, 3), torch.float64, seed=4)
    for nr, topk in [(2, 2), (3, 3)]:
        assert torch.autograd.gradcheck(lambda a, b, c, n=nr, t=topk: routing.bra(a, b, c, n, t, backend="cpu"),
                                        (q, k, v))


@pytest.mark.parametrize("shape, nr, topk, path", [
    ((2, 8, 8, 2, 4), 4, 16, "dense"),         # every region
    ((2, 8, 8, 2, 4), 4, 4, "masked"),         # a quarter of the regions: dense under the routing mask
    ((1, 7, 9, 2, 4), 3, 3, "masked"),         # padded map (regions of 3x3 over 7x9)
    ((2, 8, 8, 2, 4), 4, 3, "gather"),         # under a quarter: gathered regions
    ((1, 7, 9, 2, 4), 3, 2, "gather"),
])
def test_cpu_paths_match_reference(shape, nr, topk, path, monkeypatch):
    """Each of the cpu backend's three paths is taken where its docstring says, and each equals the
    float64 reference, forward and every gradient."""
    taken = []
    for name, fn in (("gather", cpu._BraFunction), ("dense", cpu._DenseFunction)):
        apply = fn.apply
        monkeypatch.setattr(fn, "apply", lambda *a, _apply=apply, _n=name: taken.append(
            "masked" if _n == "dense" and len(a) > 4 else _n) or _apply(*a))
    q, k, v = _inputs(shape, torch.float64, seed=11)
    y = routing.bra(q, k, v, nr, topk, backend="cpu")
    assert taken == [path]
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    y_ref = routing.bra(*leaves, nr, topk, backend="reference")
    dy = torch.randn_like(y)
    torch.testing.assert_close(y, y_ref)
    for a, b in zip(torch.autograd.grad(y, (q, k, v), dy), torch.autograd.grad(y_ref, leaves, dy)):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- API

def test_return_index_and_dense():
    q, k, v = _inputs((2, 6, 6, 1, 4), torch.float64, requires_grad=False)
    _, idx = routing.bra(q, k, v, 3, 4, return_index=True)
    assert idx.shape == (2, 9, 4) and idx.dtype == torch.long
    _, idx = routing.bra(q, k, v, 3, -1, return_index=True)
    assert torch.equal(idx, torch.arange(9).expand(2, 9, 9))
    dense = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q.flatten(1, 2), k.flatten(1, 2)) * 0.5, -1)
    expect = torch.einsum("bhqk,bkhd->bqhd", dense, v.flatten(1, 2)).view_as(q)
    for backend in ("reference", "cpu"):
        torch.testing.assert_close(routing.bra(q, k, v, 3, 100, backend=backend), expect)


@pytest.mark.parametrize("bad, match", [
    (dict(q=torch.randn(2, 4, 4, 8)), r"\[B, H, W, heads, D\].*\(2, 4, 4, 8\)"),
    (dict(k=torch.randn(2, 4, 5, 1, 8)), r"same shape.*\(2, 4, 5, 1, 8\)"),
    (dict(v=torch.randn(2, 4, 4, 1, 8, dtype=torch.float64)), "dtype"),
    (dict(num_regions=0), "num_regions"),
    (dict(num_regions=(2, 2, 2)), "num_regions"),
    (dict(topk=0), "topk"),
    (dict(topk=-2), "topk"),
])
def test_validation(bad, match):
    args = dict(q=torch.randn(2, 4, 4, 1, 8), k=torch.randn(2, 4, 4, 1, 8), v=torch.randn(2, 4, 4, 1, 8),
                num_regions=2, topk=2)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        routing.bra(**args)


def test_cpu_saves_no_topk_copies():
    """What autograd keeps between forward and backward (inputs aside): the cpu backend's gather
    path (topk 3 of 16 regions: under a quarter, so not the masked dense path) saves q re-laid
    out, the output and the LSE (~3x q); the official gather form keeps topk copies of K/V."""
    q, k, v = _inputs((2, 16, 16, 2, 16), torch.float32, seed=5)
    inputs = {t.data_ptr() for t in (q, k, v)}

    def saved_bytes(backend):
        total = [0]

        def pack(t):
            if t.data_ptr() not in inputs and t.is_floating_point():
                total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            routing.bra(q, k, v, 4, 3, backend=backend)
        return total[0]

    qb = q.numel() * q.element_size()
    assert saved_bytes("cpu") <= 3.5 * qb
    assert saved_bytes("reference") >= 2 * 3 * qb  # K and V, topk = 3 copies each
