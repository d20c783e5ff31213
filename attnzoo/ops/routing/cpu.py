"""CPU bi-level routing attention without the ``topk`` copies of K and V.

The official code expands K/V to ``[B, nR, nR, n, C]`` and gathers ``topk`` copies;
its backward then materialises a zero gradient of the *expanded* shape (``nR`` times
K/V) and reduces it. Here a custom autograd Function:

- forward: for a chunk of query regions, ``index_select`` their selected regions'
  tokens straight from the ``[B*H*W, heads, D]`` map (padding points at a dummy token
  and is masked, so the map is never padded or copied), then one fused CPU flash
  attention call that also returns the log-sum-exp; only ``out`` and the LSE are saved.
- backward: re-gathers each chunk's K/V, calls the fused flash backward, and
  ``index_add_``s dK/dV back onto the map tokens.

Chunks hold ``~nR*B / topk^2`` query regions (more on small maps, see ``_chunk``), so the
gathered K/V alive at any time is at most ``1/topk`` of the official ``topk`` copies. Query
regions that are all padding are skipped. When ``topk`` covers every region that has a
real token, the op is plain attention over the unpadded map (one fused call). When it covers
at least ``1/_DENSE_FRACTION`` of them and the map is small, it is attention over the whole
map under the token-level mask of the routing (one fused call each way, nothing gathered):
at most ``_DENSE_FRACTION`` times the logits of the gathered form, but no per-chunk gathers,
``index_add_`` or small kernel calls. BiFormer-S's 14x14 stage (16 of 49 regions of 4 tokens)
runs ~3x faster this way (forward + backward); its 56x56 and 28x28 stages (1 and 4 regions)
stay gathered, where the dense form would be ~30x / ~3x slower.
"""
from typing import Optional, Tuple

import torch

from .._dispatch import no_autocast
from .reference import geometry, token_index

Tensor = torch.Tensor

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


_CHUNK_ELEMS = 2 ** 18  # gathered K (or V) elements per chunk that are always fine to hold
_DENSE_FRACTION = 4  # masked dense attention when topk >= 1/4 of the real regions ...
_MASK_ELEMS = 2 ** 22  # ... and its [B, N, N] mask stays this small (16 MB in fp32)


def _chunk(total: int, topk: int, region_elems: int = 1) -> int:
    """Query regions per chunk: ``1/topk^2`` of them (so the gathered K/V alive at once is at most
    ``1/topk`` of the official ``topk`` copies), or more while a chunk stays under ``_CHUNK_ELEMS``
    (small maps: fewer, larger calls)."""
    return min(total, max(1, total // (topk * topk), _CHUNK_ELEMS // max(1, topk * region_elems)))


def _plan(B: int, H: int, W: int, idx: Tensor, num_regions: Tuple[int, int]):
    """Token index of every query region ``[R, n]``, of every chunk key ``[R, topk*n]``,
    the key validity (None when nothing is padded) and each map token's region-major slot.
    Query regions that are all padding are dropped (``R <= B * nR``)."""
    tok, valid = token_index(B, H, W, num_regions, idx.device)  # [B, nR, n], [nR, n]
    nR, n = valid.shape
    topk = idx.shape[-1]
    keep = valid.any(-1).expand(B, nR).reshape(-1)  # query regions with a real token
    flat_idx = (idx + (torch.arange(B, device=idx.device) * nR)[:, None, None]).reshape(B * nR, topk)[keep]
    all_tok = tok.reshape(B * nR, n)
    q_tok = all_tok[keep]
    R = q_tok.shape[0]
    k_tok = all_tok[flat_idx].reshape(R, topk * n)
    padded = not bool(valid.all())
    k_valid = q_valid = None
    vmask = valid.expand(B, nR, n).reshape(B * nR, n)
    if padded:
        k_valid = vmask[flat_idx].reshape(R, topk * n)
        q_valid = vmask[keep]
    # region-major slot of each map token (the inverse of q_tok on the valid tokens)
    slot = torch.empty(B * H * W, dtype=torch.long, device=idx.device)
    qv = vmask[keep].reshape(-1)
    slot[q_tok.reshape(-1)[qv]] = torch.arange(R * n, device=idx.device)[qv]
    return q_tok, k_tok, k_valid, q_valid, slot


def _mask(k_valid: Optional[Tensor], rows: slice, dtype) -> Optional[Tensor]:
    if k_valid is None:
        return None
    m = torch.zeros(k_valid[rows].shape, dtype=dtype, device=k_valid.device)
    return m.masked_fill_(~k_valid[rows], float("-inf"))[:, None, None, :]  # [c, 1, 1, keys]


class _BraFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, idx: Tensor, num_regions: Tuple[int, int], scale: float):
        B, H, W, heads, D = q.shape
        q_tok, k_tok, k_valid, q_valid, slot = _plan(B, H, W, idx, num_regions)
        R, n = q_tok.shape
        qm, km, vm = (t.reshape(B * H * W, heads, D) for t in (q, k, v))
        # index_select, not qm[...]: advanced indexing keeps the source's stride order, and the
        # aten flash kernel (unlike the public SDPA) reads D as unit-stride without checking
        q_rm = qm.index_select(0, q_tok.reshape(-1)).view(R, n, heads, D).transpose(1, 2)  # [R, heads, n, D]
        # token-major like q_rm, so the map is one index_select of it (a head-major buffer cost
        # a transposing copy and an advanced-indexing gather, ~2.5x the time)
        out_rm = q.new_empty(R, n, heads, D).transpose(1, 2)
        lse = q.new_empty(R, heads, n, dtype=torch.float32 if q.dtype in (torch.half, torch.bfloat16) else q.dtype)
        c = _chunk(R, idx.shape[-1], n * heads * D)
        for s in range(0, R, c):
            rows = slice(s, min(s + c, R))
            keys = k_tok[rows].reshape(-1)
            kk = km.index_select(0, keys).view(-1, k_tok.shape[1], heads, D).transpose(1, 2)
            vv = vm.index_select(0, keys).view(-1, k_tok.shape[1], heads, D).transpose(1, 2)
            o, l_ = _flash(q_rm[rows], kk, vv, attn_mask=_mask(k_valid, rows, q.dtype), scale=scale)
            out_rm[rows] = o
            lse[rows] = l_
        ctx.save_for_backward(q_rm, k, v, out_rm, lse, q_tok, k_tok, slot,
                              *(() if k_valid is None else (k_valid, q_valid)))
        ctx.scale, ctx.topk, ctx.shape = scale, idx.shape[-1], q.shape
        return out_rm.transpose(1, 2).view(R * n, heads, D).index_select(0, slot).view(B, H, W, heads, D)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout: Tensor):
        with no_autocast(dout.device.type):  # as the forward (see ``bra`` in ``__init__``)
            return _BraFunction._backward(ctx, dout)

    @staticmethod
    def _backward(ctx, dout: Tensor):
        q_rm, k, v, out_rm, lse, q_tok, k_tok, slot, *masks = ctx.saved_tensors
        k_valid, q_valid = masks if masks else (None, None)
        B, H, W, heads, D = ctx.shape
        R, n = q_tok.shape
        km, vm = k.reshape(B * H * W, heads, D), v.reshape(B * H * W, heads, D)
        # index_select: a contiguous copy whatever dout's strides (see forward)
        do_rm = dout.reshape(B * H * W, heads, D).index_select(0, q_tok.reshape(-1)).view(R, n, heads, D)
        if q_valid is not None:  # padded queries point at a real token: their gradient is not theirs
            do_rm = do_rm * q_valid[:, :, None, None]
        do_rm = do_rm.transpose(1, 2)
        dq_rm = torch.empty_like(q_rm)  # token-major, as q_rm
        dk = torch.zeros(B * H * W, heads, D, dtype=k.dtype, device=k.device)
        dv = torch.zeros_like(dk)
        c = _chunk(R, ctx.topk, n * heads * D)
        for s in range(0, R, c):
            rows = slice(s, min(s + c, R))
            keys = k_tok[rows].reshape(-1)
            kk = km.index_select(0, keys).view(-1, k_tok.shape[1], heads, D).transpose(1, 2)
            vv = vm.index_select(0, keys).view(-1, k_tok.shape[1], heads, D).transpose(1, 2)
            gq, gk, gv = _flash_bwd(do_rm[rows], q_rm[rows], kk, vv, out_rm[rows], lse[rows], 0.0, False,
                                    attn_mask=_mask(k_valid, rows, q_rm.dtype), scale=ctx.scale)
            dq_rm[rows] = gq
            dk.index_add_(0, keys, gk.transpose(1, 2).reshape(-1, heads, D))
            dv.index_add_(0, keys, gv.transpose(1, 2).reshape(-1, heads, D))
        dq = dq_rm.transpose(1, 2).view(R * n, heads, D).index_select(0, slot).view(B, H, W, heads, D)
        return dq, dk.view(B, H, W, heads, D), dv.view(B, H, W, heads, D), None, None, None


def _heads(t: Tensor) -> Tensor:
    """``[B, H, W, heads, D]`` -> ``[B, heads, H*W, D]`` with unit-stride D (what the flash kernel reads)."""
    B, H, W, heads, D = t.shape
    t = t.reshape(B, H * W, heads, D).transpose(1, 2)
    return t if t.stride(-1) == 1 else t.contiguous()


def _routing_mask(H: int, W: int, idx: Tensor, num_regions: Tuple[int, int], dtype) -> Tensor:
    """Additive ``[B, 1, H*W, H*W]`` mask: token i sees token j iff j's region is one of the ``idx``
    regions of i's region (padding has no token here, so it needs no masking)."""
    h, w = geometry(H, W, num_regions)
    nR = num_regions[0] * num_regions[1]
    region = ((torch.arange(H, device=idx.device) // h)[:, None] * num_regions[1]
              + (torch.arange(W, device=idx.device) // w)[None]).reshape(-1)  # [N]
    # region-level mask, then its rows and columns per token (two index_selects: advanced
    # indexing with a pair of index tensors is several times slower)
    mask = torch.full((idx.shape[0], nR, nR), float("-inf"), dtype=dtype, device=idx.device).scatter_(2, idx, 0.0)
    return mask.index_select(1, region).index_select(2, region)[:, None]


class _DenseFunction(torch.autograd.Function):
    """Attention over the whole unpadded map, optionally under the token-level mask of a routing
    ``idx`` (``_routing_mask``, rebuilt in the backward rather than saved: it is ``N / (heads * D)``
    times the size of q): the fused flash kernel both ways. Its own Function (not
    ``F.scaled_dot_product_attention``) so its backward runs with autocast off, and a q whose D
    is not unit-stride is not sent to SDPA's unfused math fallback."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float, idx: Optional[Tensor] = None,
                num_regions: Optional[Tuple[int, int]] = None):
        qh, kh, vh = _heads(q), _heads(k), _heads(v)
        mask = None if idx is None else _routing_mask(q.shape[1], q.shape[2], idx, num_regions, q.dtype)
        out, lse = _flash(qh, kh, vh, attn_mask=mask, scale=scale)
        ctx.save_for_backward(qh, kh, vh, out, lse, *(() if idx is None else (idx,)))
        ctx.scale, ctx.shape, ctx.num_regions = scale, q.shape, num_regions
        return out.transpose(1, 2).reshape(q.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout: Tensor):
        qh, kh, vh, out, lse, *idx = ctx.saved_tensors
        with no_autocast(dout.device.type):
            mask = _routing_mask(ctx.shape[1], ctx.shape[2], idx[0], ctx.num_regions, qh.dtype) if idx else None
            grads = _flash_bwd(_heads(dout), qh, kh, vh, out, lse, 0.0, False, attn_mask=mask, scale=ctx.scale)
        return (*(g.transpose(1, 2).reshape(ctx.shape) for g in grads), None, None, None)


def bra(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, num_regions: Tuple[int, int], scale: float) -> Tensor:
    B, H, W, heads, D = q.shape
    h, w = geometry(H, W, num_regions)
    real = -(-H // h) * -(-W // w)  # regions with a real token
    topk = idx.shape[-1]
    if topk >= real:
        # every region with a real token is selected (they outrank all-padding ones): dense
        # attention over the unpadded map, whose key order does not matter
        return _DenseFunction.apply(q, k, v, scale)
    if topk * _DENSE_FRACTION >= real and B * (H * W) ** 2 <= _MASK_ELEMS:
        return _DenseFunction.apply(q, k, v, scale, idx, tuple(num_regions))
    return _BraFunction.apply(q, k, v, idx, tuple(num_regions), scale)
