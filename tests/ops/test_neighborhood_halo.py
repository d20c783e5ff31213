"""HaloNet's blocked attention as a mode of ``na2d`` (issue 7): ``border="zero_pad"``
and the per-query relative logits ``rel_h`` / ``rel_w``.

cpu against the reference (forward and every gradient), the reference's float64
gradcheck, and two independent oracles: a hand-written padded-unfold blocked attention
and timm's ``HaloAttn`` itself (its q / k / v / ``PosEmbedRel`` parameters mapped onto
the op, output compared with timm's).
"""
import pytest
import torch
import torch.nn.functional as F

from attnzoo.ops import neighborhood as nbh
from attnzoo.ops.neighborhood import reference

TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2}

# (B, H, W, heads, D, block, halo, rpb)
CASES = [
    (1, 8, 8, 1, 8, 4, 1, False),
    (2, 13, 10, 2, 8, 4, 1, True),    # partial last blocks on both axes
    (1, 16, 16, 2, 16, 8, 3, False),  # HaloNet's default block 8 / halo 3 (even kernel 14)
    (1, 5, 3, 1, 8, 4, 2, True),      # map smaller than the kernel (8) and than a block
    (1, 9, 7, 1, 8, (3, 2), (1, 2), True),
]
IDS = [f"B{b}-H{h}-W{w}-h{n}-D{d}-b{bl}-halo{ha}-{'rpb' if r else 'norpb'}".replace(" ", "")
       for b, h, w, n, d, bl, ha, r in CASES]


def _pair(x):
    return (x, x) if isinstance(x, int) else tuple(x)


def _rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


def _inputs(case, dtype, seed=0):
    B, H, W, heads, D, block, halo, with_rpb = case
    bs, hs = _pair(block), _pair(halo)
    ks = tuple(b + 2 * h for b, h in zip(bs, hs))
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    q, k, v = (rnd(B, H, W, heads, D) for _ in range(3))
    rel_h, rel_w = rnd(B, H, W, heads, ks[0]), rnd(B, H, W, heads, ks[1])
    rpb = rnd(heads, 2 * ks[0] - 1, 2 * ks[1] - 1) if with_rpb else None
    return dict(q=q, k=k, v=v, rel_h=rel_h, rel_w=rel_w, rpb=rpb), ks, bs


def _run(leaves, ks, bs, backend):
    return nbh.na2d(leaves["q"], leaves["k"], leaves["v"], ks, stride=bs, rpb=leaves["rpb"],
                    border="zero_pad", rel_h=leaves["rel_h"], rel_w=leaves["rel_w"], backend=backend)


def unfold_blocked_attention(q, k, v, block, halo, scale, rel_h=None, rel_w=None):
    """Independent oracle: timm-style padded-unfold blocked attention, written from the
    HaloNet recipe (pad the map to a block multiple, pad K / V by the halo with zeros,
    ``unfold`` the (b+2h)^2 window of every block, dense softmax per block)."""
    B, H, W, heads, D = q.shape
    b, h = block, halo
    win = b + 2 * h
    nh, nw = -(-H // b), -(-W // b)
    Hp, Wp = nh * b, nw * b

    def to_nchw(x):  # [B, H, W, heads, C] -> [B * heads, C, Hp, Wp] zero-padded to the block grid
        x = x.permute(0, 3, 4, 1, 2).reshape(B * heads, x.shape[-1], H, W)
        return F.pad(x, (0, Wp - W, 0, Hp - H))
    qb = to_nchw(q).reshape(B * heads, D, nh, b, nw, b).permute(0, 2, 4, 3, 5, 1).reshape(B * heads, nh * nw, b * b, D)
    kv = F.pad(torch.cat((to_nchw(k), to_nchw(v)), 1), (h, h, h, h))
    kv = kv.unfold(2, win, b).unfold(3, win, b)  # [BH, 2D, nh, nw, win, win]
    kv = kv.reshape(B * heads, 2 * D, nh * nw, win * win).permute(0, 2, 3, 1)
    kb, vb = kv[..., :D], kv[..., D:]
    logits = qb @ kb.transpose(-1, -2) * scale  # [BH, nblocks, b*b, win*win]
    for rel, axis in ((rel_h, 0), (rel_w, 1)):
        if rel is None:
            continue
        r = to_nchw(rel).reshape(B * heads, win, nh, b, nw, b).permute(0, 2, 4, 3, 5, 1)
        r = r.reshape(B * heads, nh * nw, b * b, win)
        logits = logits + (r[..., :, None] if axis == 0 else r[..., None, :]).expand(
            -1, -1, -1, win, win).reshape(logits.shape)
    o = logits.softmax(-1) @ vb
    o = o.reshape(B, heads, nh, nw, b, b, D).permute(0, 2, 4, 3, 5, 1, 6).reshape(B, Hp, Wp, heads, D)
    return o[:, :H, :W]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_zero_pad_cpu_matches_reference(case, dtype):
    leaves, ks, bs = _inputs(case, dtype)
    ref_leaves, _, _ = _inputs(case, torch.float64)
    grads = {}
    for name, lv, backend in (("cpu", leaves, "cpu"), ("ref", ref_leaves, "reference")):
        lv = {n: None if t is None else t.clone().requires_grad_(True) for n, t in lv.items()}
        y = _run(lv, ks, bs, backend)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(y.dtype)
        names = [n for n, t in lv.items() if t is not None]
        grads[name] = (y, dict(zip(names, torch.autograd.grad(y, [lv[n] for n in names], dy))))
    y_cpu, g_cpu = grads["cpu"]
    y_ref, g_ref = grads["ref"]
    assert y_cpu.dtype == dtype
    assert _rel_err(y_cpu, y_ref) < TOL[dtype]
    assert set(g_cpu) == set(g_ref) >= {"q", "k", "v", "rel_h", "rel_w"}
    for n in g_ref:
        assert _rel_err(g_cpu[n], g_ref[n]) < TOL[dtype], n


def test_reference_gradcheck_zero_pad():
    leaves, ks, bs = _inputs((1, 6, 5, 2, 3, (2, 3), 1, True), torch.float64)
    names = list(leaves)
    tensors = [leaves[n].requires_grad_(True) for n in names]

    def f(*ts):
        return reference.na2d(*ts[:3], ks, (1, 1), bs, ts[5], 0.7, "zero_pad", ts[3], ts[4])
    assert torch.autograd.gradcheck(f, tensors)


def test_cpu_gradcheck_zero_pad():
    leaves, ks, bs = _inputs((1, 7, 5, 1, 3, 2, 1, True), torch.float64)
    tensors = [leaves[n].requires_grad_(True) for n in ("q", "k", "v", "rpb", "rel_h", "rel_w")]

    def f(q, k, v, rpb, rel_h, rel_w):
        return nbh.na2d(q, k, v, ks, stride=bs, rpb=rpb, border="zero_pad", rel_h=rel_h, rel_w=rel_w,
                        backend="cpu")
    assert torch.autograd.gradcheck(f, tensors)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("H, W, block, halo", [(8, 8, 4, 1), (13, 10, 4, 1), (16, 16, 8, 3), (5, 3, 4, 2)])
def test_zero_pad_matches_unfold_blocked_attention(backend, H, W, block, halo):
    g = torch.Generator().manual_seed(3)
    win = block + 2 * halo
    q, k, v = (torch.randn(2, H, W, 2, 8, generator=g, dtype=torch.float64) for _ in range(3))
    rel_h, rel_w = (torch.randn(2, H, W, 2, win, generator=g, dtype=torch.float64) for _ in range(2))
    want = unfold_blocked_attention(q, k, v, block, halo, 0.4, rel_h, rel_w)
    got = nbh.na2d(q, k, v, win, stride=block, scale=0.4, border="zero_pad", rel_h=rel_h, rel_w=rel_w,
                   backend=backend)
    assert _rel_err(got, want) < 1e-12
    got = nbh.na2d(q, k, v, win, stride=block, scale=0.4, border="zero_pad", backend=backend)
    assert _rel_err(got, unfold_blocked_attention(q, k, v, block, halo, 0.4)) < 1e-12


def timm_rel_terms(q, height_rel, width_rel, block):
    """HaloNet's ``PosEmbedRel`` as ``rel_h`` / ``rel_w`` (the mapping a layer must use).

    For a query at row ``r`` inside its block (``r = y % block``) and window row ``i``
    (``0..win-1``), timm adds ``q . height_rel[i - r + win - 1]`` (same for columns with
    ``width_rel``), ``win = block + 2 * halo``. ``q``: ``[B, H, W, heads, D]`` unscaled.
    """
    B, H, W, heads, D = q.shape
    win = (height_rel.shape[0] + 1) // 2
    i = torch.arange(win)
    idx_h = i[None, :] - (torch.arange(H) % block)[:, None] + win - 1  # [H, win]
    idx_w = i[None, :] - (torch.arange(W) % block)[:, None] + win - 1  # [W, win]
    rel_h = torch.einsum("byxnd,ykd->byxnk", q, height_rel[idx_h])
    rel_w = torch.einsum("byxnd,xkd->byxnk", q, width_rel[idx_w])
    return rel_h, rel_w


@pytest.mark.parametrize("block, halo, H, W", [(4, 1, 8, 12), (8, 3, 16, 16), (4, 2, 8, 8), (4, 1, 13, 10)])
def test_matches_timm_halo_attn(block, halo, H, W):
    """Non-divisible sizes: timm (which asserts divisibility) runs on the input zero-padded at
    the bottom / right to a block multiple, cropped back (qkv_bias=False: padded k / v are 0)."""
    halo_attn = pytest.importorskip("timm.layers.halo_attn")
    torch.manual_seed(0)
    dim, heads = 16, 2
    m = halo_attn.HaloAttn(dim, dim, num_heads=heads, block_size=block, halo_size=halo, qkv_bias=False).double()
    with torch.no_grad():  # non-trivial relative embeddings (timm's init is small)
        m.pos_embed.height_rel.normal_()
        m.pos_embed.width_rel.normal_()
    x = torch.randn(2, dim, H, W, dtype=torch.float64)
    Hp, Wp = -(-H // block) * block, -(-W // block) * block
    # [B, dim_out, H, W]; stride 1: no pooling, HaloAttn has no output projection
    want = m(F.pad(x, (0, Wp - W, 0, Hp - H)))[:, :, :H, :W]
    dq, dv = m.dim_head_qk, m.dim_head_v
    assert dq == dv
    # q: channel head * dq + d; kv: channel head * (dq + dv) + j, k first then v
    qm = m.q(x).view(2, heads, dq, H, W).permute(0, 3, 4, 1, 2)
    kv = m.kv(x).view(2, heads, dq + dv, H, W).permute(0, 3, 4, 1, 2)
    km, vm = kv[..., :dq], kv[..., dq:]
    rel_h, rel_w = timm_rel_terms(qm, m.pos_embed.height_rel, m.pos_embed.width_rel, block)
    for backend in ("reference", "cpu"):
        got = nbh.na2d(qm, km, vm, block + 2 * halo, stride=block, scale=m.scale, border="zero_pad",
                       rel_h=rel_h, rel_w=rel_w, backend=backend)
        got = got.permute(0, 3, 4, 1, 2).reshape(2, heads * dv, H, W)
        assert _rel_err(got, want) < 1e-12, backend


def test_clamp_with_rel_terms():
    """rel_h / rel_w also work with the default border (cpu: blocked path, or the
    reference with dilation); zero rel terms change nothing."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 9, 11, 2, 8, generator=g, dtype=torch.float64) for _ in range(3))
    rel_h = torch.randn(1, 9, 11, 2, 5, generator=g, dtype=torch.float64)
    rel_w = torch.randn(1, 9, 11, 2, 3, generator=g, dtype=torch.float64)
    rpb = torch.randn(2, 9, 5, generator=g, dtype=torch.float64)
    for dil, st in (((1, 1), (2, 1)), ((1, 3), (1, 2))):
        want = nbh.na2d(q, k, v, (5, 3), dil, st, rpb=rpb, rel_h=rel_h, rel_w=rel_w, backend="reference")
        got = nbh.na2d(q, k, v, (5, 3), dil, st, rpb=rpb, rel_h=rel_h, rel_w=rel_w, backend="cpu")
        assert _rel_err(got, want) < 1e-12
        plain = nbh.na2d(q, k, v, (5, 3), dil, st, rpb=rpb, backend="cpu")
        zero = nbh.na2d(q, k, v, (5, 3), dil, st, rpb=rpb, rel_h=rel_h * 0, rel_w=rel_w * 0, backend="cpu")
        assert _rel_err(zero, plain) < 1e-12


def test_zero_pad_window_semantics():
    """start = g + s//2 - k//2, unclamped; out-of-map keys are zero keys in the softmax."""
    assert reference.window_start(0, 13, 6, 1, 4, "zero_pad") == -1    # b=4, h=1: block start - h
    assert reference.window_start(11, 13, 6, 1, 4, "zero_pad") == 7    # cut-off last block: same rule
    assert reference.window_start(5, 16, 14, 1, 8, "zero_pad") == -3
    # a 1x1 map, 1 block of 1, halo 1: 8 zero keys and one real key
    q, k, v = torch.randn(3, 1, 1, 1, 1, 4, dtype=torch.float64)
    y = nbh.na2d(q, k, v, 3, stride=1, scale=1.0, border="zero_pad", backend="cpu")
    w = torch.exp((q * k).sum()) / (torch.exp((q * k).sum()) + 8)
    torch.testing.assert_close(y, w * v)


def test_bad_halo_inputs():
    x = torch.randn(1, 8, 9, 2, 4)
    with pytest.raises(ValueError, match="border must be one of"):
        nbh.na2d(x, x, x, 3, border="reflect")
    with pytest.raises(ValueError, match="zero_pad' supports dilation 1 only"):
        nbh.na2d(x, x, x, 3, dilation=2, border="zero_pad")
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        nbh.na2d(x, x, x, 4)  # even kernels only with zero_pad
    with pytest.raises(ValueError, match=r"rel_h must have shape .* \(1, 8, 9, 2, 3\)"):
        nbh.na2d(x, x, x, 3, rel_h=torch.zeros(1, 8, 9, 2, 5))
    with pytest.raises(ValueError, match=r"rel_w must have shape .* \(1, 8, 9, 2, 5\)"):
        nbh.na2d(x, x, x, (3, 5), rel_w=torch.zeros(1, 8, 9, 2, 3))
    nbh.na2d(x, x, x, 4, stride=2, border="zero_pad")  # even kernel, map < kernel fine
    nbh.na2d(x[:, :2, :3], x[:, :2, :3], x[:, :2, :3], 5, border="zero_pad")


def test_halo_arguments_reach_every_backend(monkeypatch):
    """Every backend implements HaloNet mode: the dispatch picks by device alone and hands a
    forced or automatically chosen backend the halo arguments (no second dispatch table)."""
    from attnzoo.ops import _dispatch
    monkeypatch.delenv("ATTNZOO_BACKEND", raising=False)
    calls = []
    fake = type("FakeTriton", (), {"na2d": staticmethod(lambda *a: calls.append(a[8:]) or a[0])})()
    backends = [_dispatch.Backend("triton", fake, lambda ts, forced: None)] + [
        b for b in nbh.BACKENDS if b.name != "triton"]
    monkeypatch.setattr(nbh, "BACKENDS", backends)
    x = torch.randn(1, 8, 8, 1, 4)
    rel = torch.randn(1, 8, 8, 1, 6)
    nbh.na2d(x, x, x, 6, stride=4, border="zero_pad", backend="triton")
    nbh.na2d(x, x, x, 6, stride=4, border="zero_pad", rel_h=rel)
    nbh.na2d(x, x, x, 3)
    assert calls == [("zero_pad", None, None, (1, 1)), ("zero_pad", rel, None, (1, 1)), ("clamp", None, None, (1, 1))]



# --------------------------------------------------------------------------- query stride

# (H, W, block, halo, query_stride): HaloNet's stride-2 blocks (timm's strided q conv), odd maps
# (partial last blocks), a map smaller than a block, per-axis strides
QS_CASES = [(16, 16, 8, 3, 2), (13, 10, 4, 1, 2), (9, 7, 4, 2, (2, 4)), (5, 3, 4, 2, 2), (11, 12, 6, 1, 3)]
QS_IDS = [f"H{h}-W{w}-b{b}-halo{ha}-qs{qs}".replace(" ", "") for h, w, b, ha, qs in QS_CASES]


def _qs_values(H, W, block, halo, qs, rel=True, rpb=False, seed=0):
    qh, qw = _pair(qs)
    win = block + 2 * halo
    g = torch.Generator().manual_seed(seed)
    q_shape = (2, -(-H // qh), -(-W // qw), 2, 8)
    values = {"q": torch.randn(q_shape, generator=g, dtype=torch.float64)}
    values.update({n: torch.randn(2, H, W, 2, 8, generator=g, dtype=torch.float64) for n in "kv"})
    if rel:
        values.update({n: torch.randn(q_shape[:-1] + (win,), generator=g, dtype=torch.float64) * 0.5
                       for n in ("rel_h", "rel_w")})
    if rpb:
        values["rpb"] = torch.randn(2, 2 * win - 1, 2 * win - 1, generator=g, dtype=torch.float64) * 0.5
    geom = dict(kernel_size=win, dilation=1, stride=block, border="zero_pad", scale=None, query_stride=qs)
    return values, geom


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", QS_CASES, ids=QS_IDS)
def test_query_stride_cpu_matches_reference(case, dtype):
    """Forward and every gradient against the float64 reference: the flash path (with and without
    rel terms; q and the rel terms in permuted / sliced layouts, as the layer passes them) and
    the fallback (rpb)."""
    from _neighborhood_cases import check
    for rel, rpb, layouts in ((True, False, dict(q="permuted", rel_h="sliced", k="transposed")),
                              (False, False, dict(v="sliced")), (True, True, {})):
        values, geom = _qs_values(*case, rel=rel, rpb=rpb)
        check((values, geom, layouts, dtype, False, 0), "cpu")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("border", ["zero_pad", "clamp"])
@pytest.mark.parametrize("case", QS_CASES, ids=QS_IDS)
def test_query_stride_is_subsampled_full_resolution(case, border, backend):
    """Independent oracle: query ``(i, j)`` at stride ``s`` is the full-resolution query at
    ``(s i, s j)`` (q placed on the full grid, the output subsampled)."""
    H, W, block, halo, qs = case
    qh, qw = _pair(qs)
    values, geom = _qs_values(*case)
    if border == "clamp":  # NATTEN windows (every map here is >= 3 x 3): the cpu backend's fallback
        geom.update(border="clamp", kernel_size=3, stride=(1, 2))
        values["rel_h"], values["rel_w"] = values["rel_h"][..., :3], values["rel_w"][..., :3]
    full = {}
    for n in ("q", "rel_h", "rel_w"):
        t = values[n]
        full[n] = t.new_zeros((2, H, W) + t.shape[3:])
        full[n][:, ::qh, ::qw] = t
    got = nbh.na2d(values["q"], values["k"], values["v"], rel_h=values["rel_h"], rel_w=values["rel_w"],
                   backend=backend, **geom)
    want = nbh.na2d(full["q"], values["k"], values["v"], rel_h=full["rel_h"], rel_w=full["rel_w"],
                    backend="reference", **dict(geom, query_stride=1))[:, ::qh, ::qw]
    assert got.shape == want.shape
    assert _rel_err(got, want) < 1e-12


def test_cpu_gradcheck_query_stride():
    values, geom = _qs_values(7, 6, 4, 1, 2)
    names = list(values)
    tensors = [values[n].requires_grad_(True) for n in names]

    def f(*ts):
        return nbh.na2d(**dict(zip(names, ts)), backend="cpu", **geom)
    assert torch.autograd.gradcheck(f, tensors)


def test_query_stride_output_and_gradients_keep_the_input_layout():
    """The flash path returns the output in q's memory layout and each gradient in its input's, so
    a layer that passes permuted NCHW conv outputs gets NCHW back (no format mixing downstream)."""
    values, geom = _qs_values(16, 16, 8, 3, 2)
    nchw = {n: t.permute(0, 3, 4, 1, 2).contiguous().permute(0, 3, 4, 1, 2).requires_grad_()
            for n, t in values.items()}
    y = nbh.na2d(**nchw, backend="cpu", **geom)
    assert y.permute(0, 3, 4, 1, 2).is_contiguous()
    grads = torch.autograd.grad(y, list(nchw.values()), torch.randn_like(y))
    for n, g in zip(nchw, grads):  # dk / dv: crops of a halo-padded NCHW buffer
        strides = g.permute(0, 3, 4, 1, 2).stride()
        assert list(strides) == sorted(strides, reverse=True) and strides[-1] == 1, n


def test_bad_query_stride():
    k = torch.randn(1, 8, 9, 2, 4)
    q = torch.randn(1, 4, 5, 2, 4)
    nbh.na2d(q, k, k, 6, stride=4, border="zero_pad", query_stride=2)
    with pytest.raises(ValueError, match=r"q of shape \(1, 4, 5, 2, 4\) \(the map \(8, 9\) at query_stride \(2, 2\)"):
        nbh.na2d(q[:, :3], k, k, 6, stride=4, border="zero_pad", query_stride=2)
    with pytest.raises(ValueError, match=r"q, k, v must have the same shape, got q \(1, 4, 5, 2, 4\)"):
        nbh.na2d(q, k, k, 6, stride=4, border="zero_pad")
    with pytest.raises(ValueError, match="query_stride must be >= 1, got 0"):
        nbh.na2d(k, k, k, 6, stride=4, border="zero_pad", query_stride=0)
    with pytest.raises(ValueError, match="query_stride must be an int or a tuple of 2 ints"):
        nbh.na2d(k, k, k, 6, stride=4, border="zero_pad", query_stride=(2, 2, 2))
    with pytest.raises(ValueError, match=r"rel_h must have shape .* \(1, 4, 5, 2, 6\)"):
        nbh.na2d(q, k, k, 6, stride=4, border="zero_pad", query_stride=2, rel_h=torch.zeros(1, 8, 9, 2, 6))


def test_triton_refuses_query_stride(monkeypatch):
    """A capability of the dispatch: the Triton kernels have no query stride, and say so."""
    from attnzoo.ops import _dispatch
    monkeypatch.setattr(_dispatch, "can_run_triton", lambda ts, forced=False: None)
    triton = next(b for b in nbh.BACKENDS if b.name == "triton")
    k = torch.randn(1, 8, 9, 2, 4)
    reason = triton.can_run([k[:, ::2, ::2], k, k], True)
    assert reason is not None and "query_stride" in reason and "(1, 4, 5, 2, 4)" in reason
    assert triton.can_run([k, k, k], True) is None
    with pytest.raises(Exception, match="query_stride"):
        nbh.na2d(k[:, ::2, ::2], k, k, 6, stride=4, border="zero_pad", query_stride=2, backend="triton")
