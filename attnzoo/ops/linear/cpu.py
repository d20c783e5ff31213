"""CPU fast path: linear attention with its own backward.

The eager composition (``reference.py``, or the official code) spends its time in
elementwise passes over ``[B, heads, N, D]``: RoPE alone is five (a negated copy, a
stack, two products, a sum) per tensor, and autograd doubles all of them. Here:

- RoPE is one complex multiply per tensor (``view_as_complex``: pairs ``(2i, 2i+1)``
  are the real and imaginary parts), its inverse the multiply by the conjugate;
- everything else is batched matmuls plus a few fused in-place updates;
- the backward is written out (derivation in ``README.md``), so no autograd graph is
  kept: it saves q, v, ``a(z) rope(q)`` (the forward's matmul operand, also the backward's
  ``dkv`` operand), ``rope(k)``, the ``[D, D]`` summary and three small per-row / per-head
  statistics; ``rope(q) . x`` is recovered as ``(a rope(q)) . x / a`` (``a > 0`` for the
  non-negative features the op is defined on);
- matrix-vector products run as ``mv`` per head (``bmm`` with a vector operand is slow on CPU).

Half inputs are computed in fp32 and cast back; fp64 stays fp64.
"""
from typing import Optional

import torch

from .. import _dispatch

Tensor = torch.Tensor


def rope_table(cos: Optional[Tensor], sin: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    if cos is None:
        return None
    return torch.complex(cos.to(dtype), sin.to(dtype))


def rope_turn(x: Tensor, cis: Optional[Tensor], conj: bool = False) -> Tensor:
    """``x`` turned by ``cis`` (``conj``: the inverse turn); ``x`` itself when there is no RoPE."""
    if cis is None:
        return x
    if x.stride(-1) != 1 or any(s % 2 for s in x.stride()[:-1]) or x.storage_offset() % 2:
        x = x.contiguous()
    xc = torch.view_as_complex(x.unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * (cis.conj() if conj else cis)).flatten(-2)


def _coefs(z: Tensor, eps: float, magnitude_aware: bool):
    """``out = a * (q_rot @ kv) - b * mean(v)`` and ``da/dz`` (per row); ``b`` is z (MALA) or 0."""
    inv = 1 / (z + eps)
    a = 1 + inv if magnitude_aware else inv
    return a, -inv * inv


def _flat(x: Tensor) -> Tensor:
    return x.reshape(-1, *x.shape[-2:])


def _rowdot(x: Tensor, vec: Tensor) -> Tensor:
    """``[..., N, D] . [..., 1, D]`` per row -> ``[..., N, 1]`` (``mv`` per head: ``bmm`` with a
    vector operand is several times slower on CPU)."""
    flat, vflat = _flat(x), _flat(vec)
    out = torch.stack([torch.mv(m, u[0]) for m, u in zip(flat, vflat)])
    return out.view(*x.shape[:-1], 1)


def _coldot(w: Tensor, x: Tensor) -> Tensor:
    """``sum_n w[n] x[n]``: ``[..., N, 1]``, ``[..., N, D]`` -> ``[..., 1, D]``."""
    out = torch.stack([torch.mv(m.t(), u[:, 0]) for m, u in zip(_flat(x), _flat(w))])
    return out.view(*x.shape[:-2], 1, x.shape[-1])


def _forward(q, k, v, cis, scale, eps, magnitude_aware):
    """Output and, for the backward, ``a * rope(q)``, ``rope(k)``, ``kv``, ``z``, ``mean(k)``, ``mean(v)``."""
    n = q.shape[-2]
    km = k.mean(dim=-2, keepdim=True)  # [B, h, 1, D]
    z = _rowdot(q, km).mul_(scale)  # [B, h, N, 1]
    qa, kr = rope_turn(q, cis), rope_turn(k, cis)
    kv = torch.bmm(_flat(kr).transpose(-2, -1), _flat(v)).mul_(scale / n).view(*q.shape[:-2], *km.shape[-1:] * 2)
    a, _ = _coefs(z, eps, magnitude_aware)
    qa = qa * a if qa is q else qa.mul_(a)  # a > 0 for non-negative features: the backward divides by it
    out = qa @ kv
    vm = None
    if magnitude_aware:
        vm = v.mean(dim=-2, keepdim=True)
        out.addcmul_(z, vm, value=-1)
    return out, (qa, kr, kv, z, km, vm)


def _turn_(x: Tensor, cis: Optional[Tensor]) -> Tensor:
    """In-place turn of a fresh contiguous ``x`` by ``cis`` (no-op without RoPE)."""
    if cis is not None:
        torch.view_as_complex(x.unflatten(-1, (-1, 2))).mul_(cis)
    return x


def _backward(g, q, v, qa, kr, kv, z, km, vm, cis, scale, eps, magnitude_aware, need_q, need_k, need_v):
    # Three full-size buffers, the three gradients: a fresh one costs page faults worth
    # several elementwise passes, so every other step runs in place or into one of them.
    n = q.shape[-2]
    a, dadz = _coefs(z, eps, magnitude_aware)
    inv = None if cis is None else cis.conj().resolve_conj()
    g = g.contiguous()
    gk = g @ kv.transpose(-2, -1)  # dL/d(q_rot @ kv), before the per-row factor a; becomes dq
    # becomes dk, written below through ``out=_flat(dk)`` and turned in place: it must be
    # contiguous (a product would take qa's layout, that is q's, and the reshape would copy)
    buf = torch.mul(qa, gk, out=torch.empty_like(gk, memory_format=torch.contiguous_format))
    dz = buf.sum(dim=-1, keepdim=True).div_(a).mul_(dadz)  # rope(q) . gk = (a rope(q)) . gk / a
    if magnitude_aware:
        dz.sub_(_rowdot(g, vm))
    dz.mul_(scale)  # now dL/d(q . mean(k)) per row
    dq = dk = dv = None
    if need_q:
        dq = _turn_(gk.mul_(a), inv)
        dq.addcmul_(dz, km)
    if need_k or need_v:
        dkv = (qa.transpose(-2, -1) @ g).mul_(scale / n)  # (s/N) dL/dkv, [B, h, D, D]: scaled while small
        if need_k:
            dk = buf.view(q.shape)
            torch.bmm(_flat(v), _flat(dkv).transpose(-2, -1), out=_flat(dk))
            _turn_(dk, inv).add_(_coldot(dz, q), alpha=1 / n)
        if need_v:
            if magnitude_aware:  # + d mean(v) / N, from the -z * mean(v) term
                shift = _coldot(z, g).div_(-n)
                dv = torch.baddbmm(_flat(shift), _flat(kr), _flat(dkv)).view(v.shape)
            else:
                dv = kr @ dkv
    return dq, dk, dv


class _LinearAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cos, sin, scale, eps, magnitude_aware):
        dtype = q.dtype
        compute = torch.promote_types(dtype, torch.float32)
        q, k, v = q.to(compute), k.to(compute), v.to(compute)
        cis = rope_table(cos, sin, compute)
        out, (qa, kr, kv, z, km, vm) = _forward(q, k, v, cis, scale, eps, magnitude_aware)
        ctx.save_for_backward(q, v, qa, kr, kv, z, km, vm, cis)
        ctx.args = (scale, eps, magnitude_aware, dtype)
        return out.to(dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        with _dispatch.no_autocast(g.device.type):  # as the forward (see ``__init__``)
            return _LinearAttention._backward(ctx, g)

    @staticmethod
    def _backward(ctx, g):
        q, v, qa, kr, kv, z, km, vm, cis = ctx.saved_tensors
        scale, eps, magnitude_aware, dtype = ctx.args
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        g = g.to(q.dtype)
        dq, dk, dv = _backward(g, q, v, qa, kr, kv, z, km, vm, cis, scale, eps, magnitude_aware,
                               need_q, need_k, need_v)
        cast = (lambda t: None if t is None else t.to(dtype))
        return cast(dq), cast(dk), cast(dv), None, None, None, None, None


def linear_attention(q: Tensor, k: Tensor, v: Tensor, cos: Optional[Tensor], sin: Optional[Tensor],
                     scale: float, eps: float, magnitude_aware: bool) -> Tensor:
    """Same contract as ``reference.linear_attention``; RoPE tables get no gradient."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return _LinearAttention.apply(q, k, v, cos, sin, float(scale), float(eps), bool(magnitude_aware))
    dtype = q.dtype
    compute = torch.promote_types(dtype, torch.float32)
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    return _forward(q, k, v, rope_table(cos, sin, compute), scale, eps, magnitude_aware)[0].to(dtype)
