"""CPU fast path for neighborhood attention: tiled dense attention over zero-copy key halos.

All work happens per dilation sub-grid (the ``d x d`` sub-grids are batch dims, like
heads), in sub-grid coordinates:

- Queries are cut into ``th x tw`` tiles. Each tile attends one ``hh x hw`` key *halo*
  that contains the windows of all its queries; an additive mask (``-inf`` outside a
  query's window, the rpb inside) turns the tile's dense attention into neighborhood
  attention. Per axis, the tile origin and the halo offset are searched once per
  geometry so that clamped border windows and stride groups fit one halo size for
  every tile (``_AxisPlan``); the tile size comes from a small cost model.
- Keys / values are copied once into *column strips*: strip ``cb`` holds the ``hw``
  halo columns of query column tile ``cb`` for every row, so a halo is ``hh``
  consecutive strip rows, i.e. one contiguous block, and the halos of consecutive row
  tiles start ``th`` rows apart. Strips are laid out back to back, so every tile's
  halo of every (batch, head, sub-grid) is one ``as_strided`` view with a single batch
  stride: halos are never copied (they overlap in memory). Only the column halo is
  materialised (``hw / tw`` times the keys).
- Forward: ``S = Q_tile @ K_halo^T`` (one ``bmm``), ``S += mask``, ``P = softmax(S)``,
  ``O = P @ V_halo``; ``P`` is kept for the backward.
- Backward (own ``autograd.Function``): ``dP = dO @ V_halo^T``,
  ``dS = P * (dP - rowsum(dO * O))``, ``dQ = dS @ K_halo``. ``dK`` / ``dV`` go straight
  into a strip buffer: the ``j``-th ``th``-row chunk of all halos is one contiguous
  view, so each chunk is one in-place ``baddbmm_`` (``_halo_grad``). The rpb term of
  the mask depends on the key - query offset only, so ``d rpb`` is ``dS`` summed over
  batch and tiles (one ``[heads, lq * lk]`` tensor), folded by offset.
- Without gradients, the same tiles go through ``scaled_dot_product_attention`` (the
  fused CPU flash kernel reads the strided halo views).

HaloNet mode (``border="zero_pad"`` and / or per-query ``rel_h`` / ``rel_w``, dilation 1)
takes a separate *blocked* path (``_blocked_na2d``): queries are cut into their
``sh x sw`` stride groups (HaloNet's blocks; the map is zero-padded to a multiple of
the stride), every group gathers its one ``kh x kw`` key window from a zero-padded
copy of K / V (an ``unfold``-style gather). Without rpb, attention runs on torch's fused
CPU flash kernels with ``rel_h`` / ``rel_w`` carried as extra q / k channels against
one-hot key positions: ``_HaloFlash`` (zero padding; own backward) or ``_blocked_sdpa``
(clamped windows; autograd). With rpb it is one batched matmul per block with additive
terms, plain differentiable torch. ``rel_h`` / ``rel_w`` with dilation > 1 (clamp) run
the reference. A query stride (q on a coarser grid) runs on ``_HaloFlash`` when it divides the
stride (query blocks of ``s / qs`` per side, HaloNet's stride-2 blocks), else the reference.

Half-precision inputs are computed in float32 and cast back. Non-finite values in
``k`` / ``v`` can reach other queries of the same tile (``0 * inf``), which the
reference would not do; finite inputs give exact neighborhood attention.
"""
import math
from functools import lru_cache
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

Tensor = torch.Tensor

# Row/column tile sizes tried per axis; the plan picks the cheapest (see ``_tile_cost``).
_TILE_CANDIDATES = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16)


def _starts(n: int, k: int, s: int) -> List[int]:
    """Window start of every position of a sub-grid of length ``n`` (sub-grid units)."""
    out = []
    for p in range(n):
        leader = min(p - p % s + s // 2, n - 1)
        out.append(min(max(leader - k // 2, 0), n - k))
    return out


class _AxisPlan:
    """Tiling of one axis for tile size ``t``.

    Query tile ``m`` covers sub-grid positions ``[m*t - o, m*t - o + t)`` (positions
    outside the sub-grid are padding "junk" queries); its key halo is
    ``[m*t - o + c, m*t - o + c + hal)``. The offset ``o`` is chosen to minimise
    ``nt * hal``; ``c`` and ``hal`` are the smallest that hold every window of every
    tile, for every sub-grid length (``lens``: a map of length ``L`` splits into
    sub-grids of ``ceil(L/d)`` and ``floor(L/d)`` positions).
    In the key storage, position ``x`` sits at row ``x + shift`` (``shift = o - c``), so
    tile ``m``'s halo starts at row ``m * t``.
    """

    def __init__(self, length: int, k: int, d: int, s: int, t: int):
        self.length, self.k, self.d, self.s = length, k, d, s
        self.n_long = -(-length // d)
        # sub-grid lengths: residues r < length % d are one longer
        self.lens = sorted({(length - r + d - 1) // d for r in range(d)}, reverse=True)
        self.residue_class = [self.lens.index((length - r + d - 1) // d) for r in range(d)]
        starts = {n: _starts(n, k, s) for n in self.lens}
        best = None
        for o in range(min(t, self.n_long)):
            nt = -(-(self.n_long + o) // t)
            lo, hi = math.inf, -math.inf
            for n in self.lens:
                st = starts[n]
                for m in range(nt):
                    base = m * t - o
                    ps = range(max(base, 0), min(base + t, n))
                    if len(ps) == 0:
                        continue
                    lo = min(lo, min(st[p] for p in ps) - base)
                    hi = max(hi, max(st[p] for p in ps) + k - base)
            c, hal = lo, hi - lo
            cost = nt * hal
            if best is None or cost < best[0]:
                best = (cost, o, c, hal, nt)
        _, self.o, self.c, self.hal, self.nt = best
        self.t = t
        self.shift = self.o - self.c  # storage row = position + shift
        # allowed[cls, m, u, v]: key v is in query u's window, or u is a padding ("junk")
        # query (those attend the whole halo, so no softmax row is empty; their outputs
        # are dropped and their output gradients are zero).
        allowed = torch.zeros((len(self.lens), self.nt, t, self.hal), dtype=torch.bool)
        for ci, n in enumerate(self.lens):
            st = starts[n]
            for m in range(self.nt):
                for u in range(t):
                    p = m * t - self.o + u
                    if not 0 <= p < n:
                        allowed[ci, m, u] = True
                        continue
                    lo = st[p] - (m * t - self.o + self.c)
                    allowed[ci, m, u, lo:lo + k] = True
        self.allowed = allowed
        # rpb index of query u / key v of any tile: key - query + k - 1 = c + v - u + k - 1
        # (clamped: pairs outside [0, 2k-2] are never in a window)
        u = torch.arange(t)[:, None]
        v = torch.arange(self.hal)[None, :]
        self.rel = (self.c + v - u + k - 1).clamp(0, 2 * k - 2)


def _tile_cost(ax_h: _AxisPlan, ax_w: _AxisPlan) -> float:
    """Relative cost model for a pair of axis tilings (fit on the 56x56 / k=7 benchmark).

    Work is the number of logits (padded queries times halo keys); small tiles are
    penalised for the per-matrix overhead of the batched matmuls, and wide column halos
    for the strip copy.
    """
    lq = ax_h.t * ax_w.t
    logits = (ax_h.nt * ax_h.t * ax_h.hal) * (ax_w.nt * ax_w.t * ax_w.hal)
    tiles = ax_h.nt * ax_w.nt
    keys = ax_h.nt * ax_h.t * ax_w.nt * ax_w.hal
    return logits * (1.0 + 8.0 / lq) + 40.0 * tiles + 8.0 * keys


@lru_cache(maxsize=32)
def _plan(H: int, W: int, kh: int, kw: int, dh: int, dw: int, sh: int, sw: int,
          tile: Optional[Tuple[int, int]] = None) -> "_Plan":
    if tile is not None:
        return _Plan(_AxisPlan(H, kh, dh, sh, tile[0]), _AxisPlan(W, kw, dw, sw, tile[1]))
    nh, nw = -(-H // dh), -(-W // dw)
    cands_h = [_AxisPlan(H, kh, dh, sh, t) for t in _TILE_CANDIDATES if t <= nh] or [_AxisPlan(H, kh, dh, sh, nh)]
    cands_w = [_AxisPlan(W, kw, dw, sw, t) for t in _TILE_CANDIDATES if t <= nw] or [_AxisPlan(W, kw, dw, sw, nw)]
    if nh not in _TILE_CANDIDATES:
        cands_h.append(_AxisPlan(H, kh, dh, sh, nh))
    if nw not in _TILE_CANDIDATES:
        cands_w.append(_AxisPlan(W, kw, dw, sw, nw))
    best = min(((a, b) for a in cands_h for b in cands_w), key=lambda ab: _tile_cost(*ab))
    return _Plan(*best)


class _Plan:
    """Both axes plus the tables shared by every call with this geometry."""

    def __init__(self, ax_h: _AxisPlan, ax_w: _AxisPlan):
        self.h, self.w = ax_h, ax_w
        self.lq = ax_h.t * ax_w.t
        self.lk = ax_h.hal * ax_w.hal
        self.ncb = ax_w.nt
        self.nrt = ax_h.nt
        # per residue when the sub-grids differ in length, else one broadcast class
        ah = ax_h.allowed if len(ax_h.lens) == 1 else ax_h.allowed[ax_h.residue_class]  # [dh|1, nrt, th, hh]
        aw = ax_w.allowed if len(ax_w.lens) == 1 else ax_w.allowed[ax_w.residue_class]  # [dw|1, ncb, tw, hw]
        allowed = ah[:, None, None, :, :, None, :, None] & aw[None, :, :, None, None, :, None, :]
        # [1, dh|1, dw|1, ncb * nrt, lq, lk], matching the tile order of the batched matmuls
        self.allowed = allowed.reshape(1, ah.shape[0], aw.shape[0], self.ncb * self.nrt, self.lq, self.lk)
        kw2 = 2 * ax_w.k - 1
        self.rel_flat = (ax_h.rel[:, None, :, None] * kw2 + ax_w.rel[None, :, None, :]).reshape(-1)
        self.dense = bool(self.allowed.all())  # every tile attends its whole halo (e.g. sub-grid == kernel)
        self._masks = {}
        # row chunks of a halo for the dK / dV accumulation
        self.groups = -(-ax_h.hal // ax_h.t)

    def mask(self, rpb: Optional[Tensor], dtype, transposed: bool = False) -> Optional[Tensor]:
        """Additive mask [heads|1, dh|1, dw|1, ncb * nrt, lq, lk] (``transposed``: ``lk, lq``):
        -inf outside the windows, rpb inside; None when it would be all zero.

        The rpb term is the same for every tile (it depends on the key - query offset
        only), so it is gathered once per tile shape and broadcast.
        """
        if rpb is None and self.dense:
            return None
        key = ("mask", dtype, transposed)
        if key not in self._masks:
            allowed = self.allowed.transpose(-1, -2) if transposed else self.allowed
            zero = torch.zeros((), dtype=dtype)
            self._masks[key] = torch.where(allowed, zero, torch.full((), -math.inf, dtype=dtype)).contiguous()
        valid = self._masks[key]
        if rpb is None:
            return valid
        heads = rpb.shape[0]
        bias = rpb.to(dtype).reshape(heads, -1).index_select(1, self.rel_flat).view(heads, 1, 1, 1, self.lq, self.lk)
        return valid + (bias.transpose(-1, -2) if transposed else bias)

    def sdpa_mask(self, rpb: Optional[Tensor], heads: int, dtype) -> Optional[Tensor]:
        """The mask as ``[1, heads * dh * dw * ncb * nrt, lq, lk]``, SDPA's one broadcastable 4-D form."""
        key = ("sdpa", heads, dtype)
        if rpb is None and key in self._masks:
            return self._masks[key]
        m = self.mask(rpb, dtype)
        if m is None:
            return None
        m = m.expand(heads, self.h.d, self.w.d, *m.shape[3:]).reshape(1, -1, self.lq, self.lk)
        if rpb is None:
            self._masks[key] = m
        return m

    def drpb(self, ds: Tensor, B: int, heads: int, transposed: bool = True) -> Tensor:
        """rpb gradient from contiguous ``dS`` ([N, lq, lk]; ``transposed``: ``dS^T``, [N, lk, lq]):
        summed over batch, sub-grids and tiles, folded by key - query offset. Masked pairs
        (clamped in ``rel``) have ``dS == 0`` exactly, so they add nothing."""
        e = ds.view(B, heads, -1, self.lk * self.lq).sum(2).sum(0)  # ~10x faster than sum((0, 2))
        if transposed:
            e = e.view(heads, self.lk, self.lq).transpose(1, 2).reshape(heads, -1)
        kh2, kw2 = 2 * self.h.k - 1, 2 * self.w.k - 1
        out = e.new_zeros(heads, kh2 * kw2)
        out.index_add_(1, self.rel_flat, e)
        return out.view(heads, kh2, kw2)


# --------------------------------------------------------------------------- packing
# Maps are [B, H, W, heads, D]. A dilated map is viewed as [B, nH, dh, nW, dw, heads, D]
# (zero-padded first when H or W is not a multiple of the dilation).

def _subgrid_view(x: Tensor, plan: _Plan) -> Tensor:
    B, H, W, heads, D = x.shape
    dh, dw = plan.h.d, plan.w.d
    nh, nw = plan.h.n_long, plan.w.n_long
    if nh * dh != H or nw * dw != W:
        x = F.pad(x, (0, 0, 0, 0, 0, nw * dw - W, 0, nh * dh - H))
    return x.view(B, nh, dh, nw, dw, heads, D)


def _blocks(x: Tensor, dim: int, start: int, count: int, step: int, width: int) -> Tensor:
    """View of ``x`` with axis ``dim`` replaced by ``(count, width)``: ``[i, w] -> x[start + i*step + w]``."""
    s = x.stride(dim)
    size = list(x.shape[:dim]) + [count, width] + list(x.shape[dim + 1:])
    stride = list(x.stride()[:dim]) + [step * s, s] + list(x.stride()[dim + 1:])
    return x.as_strided(size, stride, x.storage_offset() + start * s)


# src block [B, rows, dh, strips, cols, dw, heads, D] -> tile layout [B, heads, dh, dw, strips, rows, cols, D]
_TO_TILES = (0, 6, 2, 5, 3, 1, 4, 7)
# map slice [B, rows, dh, cols, dw, heads, D] -> [B, heads, dh, dw, rows, cols, D]
_MAP_TO_TILE = (0, 5, 2, 4, 1, 3, 6)


def _strip_runs(ax: _AxisPlan, width: int, first: int):
    """Split the strips of axis ``ax`` (strip ``i`` covers ``[first + i*t, first + i*t + width)``)
    into a run of strips lying fully inside the map and the clipped border strips.

    Returns ``(lo, hi), border`` with ``border`` a list of ``(i, a, b, offset)``: map range
    ``[a, b)`` that goes to strip ``i`` at column ``offset``.
    """
    full = [i for i in range(ax.nt) if first + i * ax.t >= 0 and first + i * ax.t + width <= ax.n_long]
    lo, hi = (full[0], full[-1] + 1) if full else (0, 0)
    border = []
    for i in range(ax.nt):
        if lo <= i < hi:
            continue
        x0 = first + i * ax.t
        a, b = max(x0, 0), min(x0 + width, ax.n_long)
        if a < b:
            border.append((i, a, b, a - x0))
    return (lo, hi), border


def _pack_queries(x: Tensor, plan: _Plan, dtype, scale: float = 1.0) -> Tensor:
    """Query tiles [B, heads, dh, dw, ncb, nrt * th, tw, D]; junk (padding) positions are zero."""
    B, H, W, heads, D = x.shape
    ax_h, ax_w = plan.h, plan.w
    src = _subgrid_view(x, plan)
    out = x.new_empty((B, heads, ax_h.d, ax_w.d, plan.ncb, ax_h.nt * ax_h.t, ax_w.t, D), dtype=dtype)
    rows = slice(ax_h.o, ax_h.o + ax_h.n_long)
    out[:, :, :, :, :, :rows.start].zero_()
    out[:, :, :, :, :, rows.stop:].zero_()

    def put(dst, part):
        if scale != 1.0 and dst.dtype == part.dtype:
            torch.mul(part, scale, out=dst)
        else:
            dst.copy_(part)
            if scale != 1.0:
                dst.mul_(scale)

    (lo, hi), border = _strip_runs(ax_w, ax_w.t, -ax_w.o)
    if hi > lo:
        part = _blocks(src, 3, lo * ax_w.t - ax_w.o, hi - lo, ax_w.t, ax_w.t).permute(_TO_TILES)
        put(out[:, :, :, :, lo:hi, rows], part)
    for cb, a, b, off in border:
        out[:, :, :, :, cb, rows, :off].zero_()
        out[:, :, :, :, cb, rows, off + b - a:].zero_()
        put(out[:, :, :, :, cb, rows, off:off + b - a], src[:, :, :, a:b].permute(_MAP_TO_TILE))
    return out


def _unpack_queries(t: Tensor, plan: _Plan, shape, dtype, scale: float = 1.0) -> Tensor:
    """Inverse of ``_pack_queries``: tiles -> map [B, H, W, heads, D] (junk dropped)."""
    B, H, W, heads, D = shape
    ax_h, ax_w = plan.h, plan.w
    nh, nw = ax_h.n_long, ax_w.n_long
    t = t.view(B, heads, ax_h.d, ax_w.d, plan.ncb, ax_h.nt * ax_h.t, ax_w.t, D)
    padded = nh * ax_h.d != H or nw * ax_w.d != W
    out = t.new_empty((B, nh, ax_h.d, nw, ax_w.d, heads, D), dtype=dtype)
    rows = slice(ax_h.o, ax_h.o + nh)

    def put(dst, part):
        if scale != 1.0:
            torch.mul(part, scale, out=dst) if dst.dtype == part.dtype else dst.copy_(part * scale)
        else:
            dst.copy_(part)

    (lo, hi), border = _strip_runs(ax_w, ax_w.t, -ax_w.o)
    if hi > lo:
        put(_blocks(out, 3, lo * ax_w.t - ax_w.o, hi - lo, ax_w.t, ax_w.t).permute(_TO_TILES),
            t[:, :, :, :, lo:hi, rows])
    for cb, a, b, off in border:
        put(out[:, :, :, a:b].permute(_MAP_TO_TILE), t[:, :, :, :, cb, rows, off:off + b - a])
    out = out.view(B, nh * ax_h.d, nw * ax_w.d, heads, D)
    if padded:
        out = out[:, :H, :W].contiguous()
    return out


def _key_rows(plan: _Plan):
    """Where the map rows go in the key storage.

    A strip has ``Hs = nrt * th`` rows (its period in the flat buffer) and stores
    position ``x`` at row ``x + shift``. Rows past ``Hs`` *spill* into the first rows of
    the next strip, which hold that strip's leading padding: keys no real query of the
    next strip attends (masked), so the spilled values only need to be finite there.
    Returns ``(a, b, r0), (b, e, r1)``: positions ``[a, b)`` go to rows ``r0...`` of their
    own strip, positions ``[b, e)`` to rows ``r1...`` of the next strip (empty if none).
    """
    ax = plan.h
    period = ax.nt * ax.t
    a = max(0, -ax.shift)
    b = min(ax.n_long, period - ax.shift)
    e = ax.n_long
    return (a, b, a + ax.shift), (b, max(b, e), b + ax.shift - period)


def _buffer_size(plan: _Plan, B: int, heads: int, D: int) -> Tuple[int, int]:
    """(elements of the strips proper, elements including the slack after the last strip)."""
    ax_h, ax_w = plan.h, plan.w
    row = ax_w.hal * D
    main = B * heads * ax_h.d * ax_w.d * plan.ncb * ax_h.nt * ax_h.t * row
    (_, _, _), (b, e, _) = _key_rows(plan)
    slack = max(ax_h.hal - ax_h.t, e - b, 0) * row
    return main, main + slack


def _strips_view(buf: Tensor, plan: _Plan, B: int, heads: int, D: int, rows: int, first_row: int = 0) -> Tensor:
    """[B, heads, dh, dw, ncb, rows, hw, D] view of the buffer starting at strip row ``first_row``."""
    ax_h, ax_w = plan.h, plan.w
    period = ax_h.nt * ax_h.t
    size = (B, heads, ax_h.d, ax_w.d, plan.ncb, rows, ax_w.hal, D)
    stride, acc = [], 1
    for n in reversed((B, heads, ax_h.d, ax_w.d, plan.ncb, period, ax_w.hal, D)):
        stride.append(acc)
        acc *= n
    return buf.as_strided(size, tuple(reversed(stride)), first_row * ax_w.hal * D)


def _key_segments(buf: Tensor, plan: _Plan, B: int, heads: int, D: int):
    """(position range, storage view) pairs covering every map row of the key storage."""
    period = plan.h.nt * plan.h.t
    (a, b, r0), (b2, e, r1) = _key_rows(plan)
    if a < b:
        yield a, b, _strips_view(buf, plan, B, heads, D, b - a, r0)
    if b2 < e:  # spilled rows: the next strip's first rows
        yield b2, e, _strips_view(buf, plan, B, heads, D, e - b2, period + r1)


def _pack_keys(x: Tensor, plan: _Plan, dtype) -> Tensor:
    """Flat key storage (see ``_strips_view``); padding rows and columns are zero."""
    B, H, W, heads, D = x.shape
    ax_h, ax_w = plan.h, plan.w
    main, total = _buffer_size(plan, B, heads, D)
    buf = x.new_empty(total, dtype=dtype)
    period = ax_h.nt * ax_h.t
    strips = _strips_view(buf, plan, B, heads, D, period)
    # zero what no copy below writes: leading / trailing padding rows, padding columns
    # of the border strips, the slack after the last strip (spilled rows land on some
    # of these zeros afterwards)
    strips[:, :, :, :, :, :max(0, min(ax_h.shift, period))].zero_()
    strips[:, :, :, :, :, max(0, ax_h.n_long + ax_h.shift):].zero_()
    buf[main:].zero_()
    first = ax_w.c - ax_w.o
    (lo, hi), border = _strip_runs(ax_w, ax_w.hal, first)
    for cb, a, b, off in border:
        strips[:, :, :, :, cb, :, :off].zero_()
        strips[:, :, :, :, cb, :, off + b - a:].zero_()
    src = _subgrid_view(x, plan)
    for a, b, seg in _key_segments(buf, plan, B, heads, D):
        rows = src[:, a:b]
        if hi > lo:
            seg[:, :, :, :, lo:hi].copy_(
                _blocks(rows, 3, first + lo * ax_w.t, hi - lo, ax_w.t, ax_w.hal).permute(_TO_TILES))
        for cb, ca, cb_end, off in border:
            seg[:, :, :, :, cb, :, off:off + cb_end - ca].copy_(rows[:, :, :, ca:cb_end].permute(_MAP_TO_TILE))
    return buf


def _unpack_keys(buf: Tensor, plan: _Plan, shape, dtype) -> Tensor:
    """Gradient of ``_pack_keys``: overlapping strip columns are summed (strips ``G`` apart
    do not overlap, so the inner strips go in ``G`` strided adds)."""
    B, H, W, heads, D = shape
    ax_h, ax_w = plan.h, plan.w
    nh, nw = ax_h.n_long, ax_w.n_long
    out = buf.new_zeros((B, nh, ax_h.d, nw, ax_w.d, heads, D), dtype=dtype)
    first = ax_w.c - ax_w.o
    (lo, hi), border = _strip_runs(ax_w, ax_w.hal, first)
    G = -(-ax_w.hal // ax_w.t)
    for a, b, seg in _key_segments(buf, plan, B, heads, D):
        rows = out[:, a:b]
        for g in range(min(G, hi - lo)):
            cnt = len(range(lo + g, hi, G))
            _blocks(rows, 3, first + (lo + g) * ax_w.t, cnt, G * ax_w.t, ax_w.hal).permute(_TO_TILES).add_(
                seg[:, :, :, :, lo + g:hi:G])
        for cb, ca, cb_end, off in border:
            rows[:, :, :, ca:cb_end].permute(_MAP_TO_TILE).add_(seg[:, :, :, :, cb, :, off:off + cb_end - ca])
    out = out.view(B, nh * ax_h.d, nw * ax_w.d, heads, D)
    if nh * ax_h.d != H or nw * ax_w.d != W:
        out = out[:, :H, :W].contiguous()
    return out


def _halos(buf: Tensor, plan: _Plan, ntiles: int, D: int) -> Tensor:
    """Every tile's key halo as one strided view [ntiles, hh * hw, D] of the strip buffer."""
    return buf.as_strided((ntiles, plan.lk, D), (plan.h.t * plan.w.hal * D, D, 1))


def _halo_grad(like: Tensor, plan: _Plan, a: Tensor, b: Tensor, D: int) -> Tensor:
    """Strip buffer holding ``sum over tiles of halo[n] += a[n] @ b[n]`` (``a``: [N, lk, lq]).

    Tile ``n``'s halo rows ``[j*th, (j+1)*th)`` and tile ``n+1``'s rows ``[(j-1)*th, j*th)``
    are the same strip rows, so for a fixed chunk ``j`` the chunks of all tiles lie back
    to back: one contiguous ``[N, th * hw, D]`` view, updated by one in-place
    ``baddbmm_`` (MKL's batched gemm). Chunk 0 covers the whole buffer but the slack and
    is written with ``beta=0``, so only the slack is zeroed; chunks 1, 2, ... accumulate.
    A last, shorter chunk (``hh`` not a multiple of ``th``) is not contiguous and goes
    through a temporary.
    """
    th, hw = plan.h.t, plan.w.hal
    step = th * hw * D
    n = a.shape[0]
    buf = torch.empty_like(like)
    if plan.h.hal < th:
        buf.zero_()
    else:
        buf[n * step:].zero_()
    for j in range(plan.groups):
        r = min(th, plan.h.hal - j * th)
        part = a[:, j * th * hw:(j * th + r) * hw]
        view = buf.as_strided((n, r * hw, D), (step, D, 1), j * step)
        if r == th:
            view.baddbmm_(part, b, beta=0 if j == 0 else 1)
        else:
            view.add_(torch.bmm(part, b))
    return buf


def _compute_dtype(dtype):
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class _TiledNA(torch.autograd.Function):
    """Logits layout per tile shape. With ``lq`` a multiple of 16 (the AVX-512 fp32 width):
    transposed logits ``S^T = K_halo Q_tile^T`` ([N, lk, lq]); MKL's batched gemm runs the
    NN / TN products this layout needs about 25% faster than the NT products of ``S = Q K^T``
    (and ``dP = dO V^T``), and the softmax over dim 1 vectorises along ``lq``. Other ``lq``
    (e.g. NAT-Tiny's 5 x 14 tiles at 14 x 14) keep ``S`` ([N, lq, lk]): there the softmax over
    dim 1 takes 1.5-2x a last-dim one and outweighs the gemm gain (14 x 14 stage: -12 to -17%
    forward + backward). The backward reads ``P^T`` / ``dS^T`` as transposed views either way.

    Torch's fused CPU flash kernels (``_HaloFlash``'s forward and backward) were tried here:
    at NAT-Tiny shapes the forward is ~25% faster, but the flash backward alone takes 2-3x
    this whole backward (~6x its own forward), before the rpb gradient, which needs ``dS``
    recomputed on top (the aten backward returns no mask gradient)."""

    @staticmethod
    def forward(ctx, q, k, v, rpb, plan, scale):
        B, H, W, heads, D = q.shape
        cdt = _compute_dtype(q.dtype)
        qt = _pack_queries(q, plan, cdt, scale)
        N = qt.numel() // (plan.lq * D)
        qt = qt.view(N, plan.lq, D)
        kb, vb = _pack_keys(k, plan, cdt), _pack_keys(v, plan, cdt)
        kh, vh = _halos(kb, plan, N, D), _halos(vb, plan, N, D)
        tr = plan.lq % 16 == 0
        s = torch.bmm(kh, qt.transpose(1, 2).contiguous()) if tr else torch.bmm(qt, kh.transpose(1, 2))
        mask = plan.mask(rpb, cdt, transposed=tr)
        if mask is not None:
            s.view(B, heads, plan.h.d, plan.w.d, -1, *s.shape[1:]).add_(mask)
        p = torch.softmax(s, 1 if tr else 2)
        del s
        o = torch.bmm(p.transpose(1, 2) if tr else p, vh)  # [N, lq, D]
        out = _unpack_queries(o, plan, q.shape, q.dtype)
        ctx.plan, ctx.scale, ctx.shape, ctx.tr = plan, scale, q.shape, tr
        ctx.dtypes = (q.dtype, k.dtype, v.dtype, None if rpb is None else rpb.dtype)
        ctx.save_for_backward(qt, kb, vb, p, o)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        qt, kb, vb, p, o = ctx.saved_tensors
        plan, scale, shape, tr = ctx.plan, ctx.scale, ctx.shape, ctx.tr
        B, H, W, heads, D = shape
        N = qt.shape[0]
        cdt = qt.dtype
        kh, vh = _halos(kb, plan, N, D), _halos(vb, plan, N, D)
        do = _pack_queries(dout, plan, cdt).view(N, plan.lq, D)
        dq = dk = dv = drpb = None
        if ctx.needs_input_grad[2]:
            dv = _unpack_keys(_halo_grad(vb, plan, p if tr else p.transpose(1, 2), do, D), plan, shape,
                              ctx.dtypes[2])
        delta = (do * o).sum(-1)  # [N, lq]
        if tr:  # dS^T
            ds = torch.bmm(vh, do.transpose(1, 2).contiguous()).sub_(delta.unsqueeze(1)).mul_(p)
        else:  # dS
            ds = torch.bmm(do, vh.transpose(1, 2)).sub_(delta.unsqueeze(2)).mul_(p)
        del p
        ds_t = ds if tr else ds.transpose(1, 2)  # [N, lk, lq]
        if ctx.needs_input_grad[0]:
            dq = _unpack_queries(torch.bmm(ds_t.transpose(1, 2), kh), plan, shape, ctx.dtypes[0], scale)
        if ctx.needs_input_grad[1]:
            dk = _unpack_keys(_halo_grad(kb, plan, ds_t, qt, D), plan, shape, ctx.dtypes[1])
        if ctx.needs_input_grad[3]:
            drpb = plan.drpb(ds, B, heads, transposed=tr).to(ctx.dtypes[3])
        return dq, dk, dv, drpb, None, None


def _sdpa_forward(q, k, v, rpb, plan, scale):
    """No-grad path: the same tiles through the fused CPU flash kernel."""
    B, H, W, heads, D = q.shape
    cdt = _compute_dtype(q.dtype)
    qt = _pack_queries(q, plan, cdt)
    M = qt.numel() // (B * heads * plan.lq * D)  # tiles per (batch, head)
    kb, vb = _pack_keys(k, plan, cdt), _pack_keys(v, plan, cdt)
    step = plan.h.t * plan.w.hal * D
    size, stride = (B, heads * M, plan.lk, D), (heads * M * step, step, D, 1)
    kh, vh = kb.as_strided(size, stride), vb.as_strided(size, stride)
    mask = plan.sdpa_mask(rpb, heads, cdt)
    o = F.scaled_dot_product_attention(qt.view(B, heads * M, plan.lq, D), kh, vh, attn_mask=mask, scale=scale)
    return _unpack_queries(o, plan, q.shape, q.dtype)


def _reference_na2d(q, k, v, kernel_size, dilation, stride, rpb, scale, border, rel_h, rel_w, query_stride):
    """Geometries without a fast path (clamp + rel terms + dilation; a query stride that does not
    divide the stride, or off HaloNet's flash path): the reference under autograd, in float32 for
    half inputs like every other path here (bf16 sums lose the rpb gradient)."""
    from . import reference
    cdt = _compute_dtype(q.dtype)
    args = [None if t is None else t.to(cdt) for t in (q, k, v, rpb, rel_h, rel_w)]
    out = reference.na2d(*args[:3], kernel_size, dilation, stride, args[3], scale, border, *args[4:],
                         query_stride=query_stride)
    return out.to(q.dtype)


def _group_windows(length: int, k: int, s: int, border: str):
    """Per axis: number of stride groups ``ng`` and each group's window start ``[ng]``
    (map index; may be out of the map for ``zero_pad``). Dilation 1."""
    from .reference import window_start
    ng = -(-length // s)
    if border == "zero_pad":
        starts = [g * s + s // 2 - k // 2 for g in range(ng)]
    else:  # every query of a group shares the window; take the group's first query
        starts = [window_start(g * s, length, k, 1, s) for g in range(ng)]
    return ng, torch.tensor(starts, dtype=torch.long)


def _blocked_na2d(q, k, v, kernel_size, stride, rpb, scale, border, rel_h, rel_w, query_stride=(1, 1)):
    """HaloNet-style blocked attention (dilation 1): see the module docstring. With a query stride
    (dividing the stride) only the flash path is implemented; None elsewhere (caller falls back)."""
    B, H, W, heads, D = k.shape
    (kh, kw), (sh, sw) = kernel_size, stride
    cdt = _compute_dtype(q.dtype)
    ngh, st_h = _group_windows(H, kh, sh, border)
    ngw, st_w = _group_windows(W, kw, sw, border)
    # zero padding of K / V so that every window lies inside
    # window starts are non-decreasing: first and last are the extremes
    ph0 = max(0, -int(st_h[0]))
    ph1 = max(0, int(st_h[-1]) + kh - H)
    pw0 = max(0, -int(st_w[0]))
    pw1 = max(0, int(st_w[-1]) + kw - W)
    if rpb is None and border == "zero_pad" and (ngh - 1) * sh + kh == H + ph0 + ph1 \
            and (ngw - 1) * sw + kw == W + pw0 + pw1:
        return _HaloFlash.apply(q, k, v, rel_h, rel_w, (kh, kw), (sh, sw), (ph0, ph1, pw0, pw1), scale,
                                tuple(query_stride))
    if tuple(query_stride) != (1, 1):
        return None
    idx_h = st_h[:, None] + ph0 + torch.arange(kh)  # [ngh, kh] rows of the padded map
    idx_w = st_w[:, None] + pw0 + torch.arange(kw)  # [ngw, kw]
    kv = torch.stack((k, v)).to(cdt)  # [2, B, H, W, heads, D]
    kv = F.pad(kv, (0, 0, 0, 0, pw0, pw1, ph0, ph1))
    if border == "zero_pad":
        # windows start every s rows / columns: a zero-copy unfold (cheap backward)
        # [2, B, ngh, ngw, heads, D, kh, kw] -> [2, B, ngh, ngw, heads, kh * kw, D]
        win = kv.unfold(2, kh, sh).unfold(3, kw, sw)[:, :, :ngh, :ngw]
        win = win.permute(0, 1, 2, 3, 4, 6, 7, 5).reshape(2, B, ngh, ngw, heads, kh * kw, D)
    else:
        # clamped windows are not evenly spaced: gather [2, B, ngh, ngw, kh, kw, heads, D]
        win = kv[:, :, idx_h[:, None, :, None], idx_w[None, :, None, :]]
        win = win.permute(0, 1, 2, 3, 6, 4, 5, 7).reshape(2, B, ngh, ngw, heads, kh * kw, D)
    kwin, vwin = win[0], win[1]
    # query blocks: pad to a multiple of the stride -> [B, ngh, ngw, heads, sh * sw, D]
    Hp, Wp = ngh * sh, ngw * sw

    def blocks(x, last):
        x = F.pad(x.to(cdt), (0, 0, 0, 0, 0, Wp - W, 0, Hp - H))
        x = x.view(B, ngh, sh, ngw, sw, heads, last)
        return x.permute(0, 1, 3, 5, 2, 4, 6)  # [B, ngh, ngw, heads, sh, sw, last]

    qb = blocks(q, D).reshape(B, ngh, ngw, heads, sh * sw, D)
    if rpb is None:
        return _blocked_sdpa(qb, kwin, vwin, scale, blocks(rel_h, kh) if rel_h is not None else None,
                             blocks(rel_w, kw) if rel_w is not None else None,
                             (kh, kw), (sh, sw), (H, W)).to(q.dtype)
    logits = torch.matmul(qb * scale, kwin.transpose(-1, -2))  # [B, ngh, ngw, heads, sh*sw, kh*kw]
    logits = logits.view(B, ngh, ngw, heads, sh, sw, kh, kw)
    # rpb index: key - query + k - 1, per axis [ng, s, k]; padding queries clamped (dropped anyway)
    qpos_h = torch.arange(ngh)[:, None] * sh + torch.arange(sh)
    qpos_w = torch.arange(ngw)[:, None] * sw + torch.arange(sw)
    rh = (idx_h[:, None, :] - ph0 - qpos_h[:, :, None] + kh - 1).clamp(0, 2 * kh - 2)
    rw = (idx_w[:, None, :] - pw0 - qpos_w[:, :, None] + kw - 1).clamp(0, 2 * kw - 2)
    # [heads, ngh, ngw, sh, sw, kh, kw] -> [ngh, ngw, heads, sh, sw, kh, kw]
    bias = rpb.to(cdt)[:, rh[:, None, :, None, :, None], rw[None, :, None, :, None, :]]
    logits = logits + bias.permute(1, 2, 0, 3, 4, 5, 6)
    if rel_h is not None:
        logits = logits + blocks(rel_h, kh)[..., :, None]
    if rel_w is not None:
        logits = logits + blocks(rel_w, kw)[..., None, :]
    attn = logits.view(B, ngh, ngw, heads, sh * sw, kh * kw).softmax(-1)
    o = torch.matmul(attn, vwin)  # [B, ngh, ngw, heads, sh*sw, D]
    o = o.view(B, ngh, ngw, heads, sh, sw, D).permute(0, 1, 4, 2, 5, 3, 6).reshape(B, Hp, Wp, heads, D)
    return o[:, :H, :W].to(q.dtype)


def _key_positions(kh: int, kw: int, rows: bool, dtype) -> Tensor:
    """One-hot window row (``rows``) or column of each of the ``kh * kw`` window keys:
    ``[kh * kw, kh]`` or ``[kh * kw, kw]``, the key side of the relative-logit channels."""
    n = kh if rows else kw
    eye = torch.eye(n, dtype=dtype)
    return eye.repeat_interleave(kw, 0) if rows else eye.repeat(kh, 1)


def _blocked_sdpa(qb, kwin, vwin, scale, rel_h, rel_w, kernel_size, stride, size):
    """Blocked attention as one fused ``scaled_dot_product_attention`` call (no ``[L, k^2]``
    logits, probabilities or mask kept for the backward). The per-query relative logits
    become extra channels: ``rel_h[i, a] + rel_w[i, b]`` is ``[rel_h_i, rel_w_i]`` dotted
    with the one-hot ``[e_a, e_b]`` of window key ``(a, b)``, so they ride in ``q . k``;
    padded (zero) keys keep their relative logits, as zero padding implies. Gradients of
    q, k, v, rel_h and rel_w come from SDPA's backward."""
    B, ngh, ngw, heads, L, D = qb.shape
    (kh, kw), (sh, sw), (H, W) = kernel_size, stride, size
    qs, ks = [qb * scale], [kwin]
    for rel, n, rows in ((rel_h, kh, True), (rel_w, kw, False)):
        if rel is not None:
            qs.append(rel.reshape(B, ngh, ngw, heads, L, n))
            ks.append(_key_positions(kh, kw, rows, kwin.dtype).expand(B, ngh, ngw, heads, kh * kw, n))
    qa, ka = torch.cat(qs, -1), torch.cat(ks, -1)
    # the fused CPU kernel (forward and backward) needs one head dim for q, k and v
    va = F.pad(vwin, (0, qa.shape[-1] - D))
    n = B * ngh * ngw
    o = F.scaled_dot_product_attention(qa.reshape(n, heads, L, -1), ka.reshape(n, heads, kh * kw, -1),
                                       va.reshape(n, heads, kh * kw, -1), scale=1.0)[..., :D]
    o = o.view(B, ngh, ngw, heads, sh, sw, D).permute(0, 1, 4, 2, 5, 3, 6)
    return o.reshape(B, ngh * sh, ngw * sw, heads, D)[:, :H, :W]


class _HaloFlash(torch.autograd.Function):
    """Zero-padded blocked attention (HaloNet) on the fused CPU flash-attention kernels.

    Same trick as ``_blocked_sdpa`` (relative logits as extra channels against one-hot
    key positions), but with the buffers built by hand: q / k / v are copied once into
    fresh ``[blocks, heads, L, E]`` buffers (``_put_blocks``, ``_windows``), the flash
    forward keeps only the output and its log-sum-exp, and the backward folds the window
    gradients of K / V back with a few strided adds instead of autograd's zero-filled
    ``unfold`` / ``select`` / ``pad`` backwards. The kernel runs with scale 1 on a pre-scaled
    q, so the relative logits need no ``1 / scale`` (any finite scale, 0 included).

    The output and every gradient are laid out in memory like the tensor they belong to
    (``_layout``): a layer that hands in permuted NCHW conv outputs gets NCHW back, which
    keeps the rest of the network in one memory format (a BatchNorm backward whose input and
    gradient differ in format runs 5-8x slower on CPU)."""

    @staticmethod
    def forward(ctx, q, k, v, rel_h, rel_w, kernel_size, stride, pads, scale, query_stride):
        B, H, W, heads, D = k.shape
        Hq, Wq = q.shape[1:3]
        (kh, kw), (sh, sw) = kernel_size, stride
        # a block's queries on q's grid: stride / query_stride per side (the query stride divides it)
        qb = (sh // query_stride[0], sw // query_stride[1])
        ngh, ngw = -(-H // sh), -(-W // sw)
        cdt = _compute_dtype(q.dtype)
        E = D + (kh if rel_h is not None else 0) + (kw if rel_w is not None else 0)
        qa = torch.empty((B * ngh * ngw, heads, qb[0] * qb[1], E), dtype=cdt)
        _put_blocks(qa[..., :D], q, qb, scale)
        c, onehots = D, []
        for rel, n, rows in ((rel_h, kh, True), (rel_w, kw, False)):
            if rel is not None:
                _put_blocks(qa[..., c:c + n], rel, qb)
                onehots.append(_key_positions(kh, kw, rows, cdt))
                c += n
        ka = _windows(k, kernel_size, stride, pads, E, cdt, torch.cat(onehots, 1) if onehots else None)
        va = _windows(v, kernel_size, stride, pads, E, cdt)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qa, ka, va, scale=1.0)
        ctx.save_for_backward(qa, ka, va, out, lse)
        ctx.geom = (B, H, W, Hq, Wq, heads, D, kernel_size, stride, qb, pads, scale, q.dtype, rel_h is not None,
                    rel_w is not None)
        ctx.layouts = tuple(None if t is None else _layout(t) for t in (q, k, v, rel_h, rel_w))
        return _from_blocks(out[..., :D], (B, Hq, Wq), qb, ctx.layouts[0], q.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        qa, ka, va, out, lse = ctx.saved_tensors
        (B, H, W, Hq, Wq, heads, D, (kh, kw), (sh, sw), qb, (ph0, ph1, pw0, pw1), scale, dtype, has_h,
         has_w) = ctx.geom
        E = qa.shape[-1]
        do = torch.empty_like(qa)
        do[..., D:].zero_()
        _put_blocks(do[..., :D], dout, qb)
        dqa, dka, dva = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, qa, ka, va, out, lse, 0.0, False, scale=1.0)
        ngh, ngw = -(-H // sh), -(-W // sw)

        ch, cw = -(-kh // sh), -(-kw // sw)

        def fold(g, layout):  # [n, heads, kh * kw, E] window grads -> [B, H, W, heads, D], overlaps summed
            # windows start every (sh, sw): window rows [i*sh, (i+1)*sh) of block g land on padded
            # block row g + i, so ch * cw strided adds do it (3-4x faster than permute + col2im)
            gw = g[..., :D].view(B, ngh, ngw, heads, kh, kw, D)
            full = _empty(layout, (B, (ngh + ch) * sh, (ngw + cw) * sw, heads, D), g.dtype)
            out = full.view(B, ngh + ch, sh, ngw + cw, sw, heads, D)
            # the first window part covers blocks [0, ngh) x [0, ngw) whole when k >= s: copy it
            # there and zero only the rest (one pass less than zero-fill + add)
            first = kh >= sh and kw >= sw
            if first:
                out[:, ngh:].zero_()
                out[:, :ngh, :, ngw:].zero_()
            else:
                full.zero_()
            for i in range(ch):
                a0, ah = i * sh, min(sh, kh - i * sh)
                for j in range(cw):
                    b0, bw = j * sw, min(sw, kw - j * sw)
                    part = gw[:, :, :, :, a0:a0 + ah, b0:b0 + bw].permute(0, 1, 4, 2, 5, 3, 6)
                    if first and i == j == 0:
                        out[:, :ngh, :, :ngw].copy_(part)
                    else:
                        out[:, i:i + ngh, :ah, j:j + ngw, :bw] += part
            return full[:, ph0:ph0 + H, pw0:pw0 + W].to(dtype)

        size, (lq, lk, lv, lh, lw) = (B, Hq, Wq), ctx.layouts
        need = ctx.needs_input_grad
        dq = _from_blocks(dqa[..., :D], size, qb, lq, dtype, scale) if need[0] else None
        dk = fold(dka, lk) if need[1] else None
        dv = fold(dva, lv) if need[2] else None
        drh = _from_blocks(dqa[..., D:D + kh], size, qb, lh, dtype) if has_h and need[3] else None
        c = D + (kh if has_h else 0)
        drw = _from_blocks(dqa[..., c:c + kw], size, qb, lw, dtype) if has_w and need[4] else None
        return dq, dk, dv, drh, drw, None, None, None, None, None


def _layout(x: Tensor) -> Tuple[int, ...]:
    """x's dims from outermost to innermost in memory (ties in logical order)."""
    return tuple(sorted(range(x.dim()), key=lambda d: -x.stride(d)))


def _empty(layout: Tuple[int, ...], shape, dtype) -> Tensor:
    """An empty CPU tensor of ``shape`` whose dims lie in memory in the order ``layout`` (``_layout``)."""
    buf = torch.empty([shape[d] for d in layout], dtype=dtype)
    return buf.permute([layout.index(d) for d in range(len(layout))])


def _put_blocks(dst: Tensor, x: Tensor, block, scale: float = 1.0) -> None:
    """Writes the map ``x`` [B, H, W, heads, c] into ``dst`` [B * ngh * ngw, heads, bh * bw, c] (query
    blocks; a channel slice of a block buffer) in one pass, with the cast and ``scale``; block
    positions past the map get zeros."""
    B, H, W, heads, c = x.shape
    bh, bw = block
    ngh, ngw = -(-H // bh), -(-W // bw)
    if (ngh * bh, ngw * bw) != (H, W):  # odd sizes only: pad first
        x = F.pad(x, (0, 0, 0, 0, 0, ngw * bw - W, 0, ngh * bh - H))
    _write(dst.view(B, ngh, ngw, heads, bh, bw, c).permute(0, 1, 4, 2, 5, 3, 6),
           x.view(B, ngh, bh, ngw, bw, heads, c), scale)


def _windows(x, kernel_size, stride, pads, E, dtype, tail: Optional[Tensor] = None):
    """[B, H, W, heads, D] -> every stride group's key window [B * ngh * ngw, heads, kh * kw, E]
    of the zero-padded map, in ``dtype``; channels ``D:`` hold ``tail`` ([kh * kw, E - D]) or zeros.

    Copied into a fresh buffer on purpose: the ``unfold`` view of the padded map overlaps
    itself (neighbouring windows share keys), and a ``reshape`` of it is still a view whenever
    the strides allow (kernel width 1, a map one stride group wide); writing ``tail`` into such
    a view would overwrite the keys of other windows."""
    B, H, W, heads, D = x.shape
    (kh, kw), (sh, sw), (ph0, ph1, pw0, pw1) = kernel_size, stride, pads
    ngh, ngw = -(-H // sh), -(-W // sw)
    xp = F.pad(x, (0, 0, 0, 0, pw0, pw1, ph0, ph1))
    win = xp.unfold(1, kh, sh).unfold(2, kw, sw)[:, :ngh, :ngw]  # [B, ngh, ngw, heads, D, kh, kw]
    out = torch.empty((B, ngh, ngw, heads, kh, kw, E), dtype=dtype)
    out[..., :D].copy_(win.permute(0, 1, 2, 3, 5, 6, 4))
    if E > D:
        out = out.view(B, ngh, ngw, heads, kh * kw, E)
        if tail is None:
            out[..., D:].zero_()
        else:
            out[..., D:] = tail
    return out.view(B * ngh * ngw, heads, kh * kw, E)


def _from_blocks(x: Tensor, size, block, layout: Tuple[int, ...], dtype, scale: float = 1.0) -> Tensor:
    """Inverse of ``_put_blocks``: [B * ngh * ngw, heads, bh * bw, c] -> the map [B, H, W, heads, c]
    (``size`` = (B, H, W)) in ``dtype``, times ``scale``, laid out as ``layout``; one pass."""
    (B, H, W), (bh, bw) = size, block
    ngh, ngw = -(-H // bh), -(-W // bw)
    heads, c = x.shape[1], x.shape[-1]
    out = _empty(layout, (B, ngh * bh, ngw * bw, heads, c), dtype)
    _write(out.view(B, ngh, bh, ngw, bw, heads, c), x.view(B, ngh, ngw, heads, bh, bw, c).permute(0, 1, 4, 2, 5, 3, 6),
           scale)
    return out[:, :H, :W]


def _write(dst: Tensor, src: Tensor, scale: float) -> None:
    """``dst = src * scale`` in one pass where the dtypes agree; across a cast, scaled in the wider dtype."""
    if scale == 1.0:
        dst.copy_(src)
    elif src.dtype == dst.dtype:
        torch.mul(src, scale, out=dst)
    elif dst.dtype.itemsize > src.dtype.itemsize:
        dst.copy_(src).mul_(scale)
    else:
        dst.copy_(src * scale)


def na2d(q: Tensor, k: Tensor, v: Tensor, kernel_size: Tuple[int, int], dilation: Tuple[int, int],
         stride: Tuple[int, int], rpb: Optional[Tensor], scale: float, border: str = "clamp",
         rel_h: Optional[Tensor] = None, rel_w: Optional[Tensor] = None,
         query_stride: Tuple[int, int] = (1, 1), tile: Optional[Tuple[int, int]] = None) -> Tensor:
    qs = tuple(query_stride)
    if border != "clamp" or rel_h is not None or rel_w is not None or qs != (1, 1):
        if tuple(dilation) == (1, 1) and all(s % x == 0 for s, x in zip(stride, qs)):
            out = _blocked_na2d(q, k, v, kernel_size, stride, rpb, scale, border, rel_h, rel_w, qs)
            if out is not None:
                return out
        return _reference_na2d(q, k, v, kernel_size, dilation, stride, rpb, scale, border, rel_h, rel_w, qs)
    B, H, W, heads, D = q.shape
    plan = _plan(H, W, *kernel_size, *dilation, *stride, tile)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, rpb))
    if needs_grad:
        return _TiledNA.apply(q, k, v, rpb, plan, scale)
    with torch.no_grad():
        return _sdpa_forward(q, k, v, rpb, plan, scale)
