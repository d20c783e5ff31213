"""Pieces every Triton backend shares: accumulator dtypes, matmul precision, and the
interpreter's bf16 work-around. Imported only by the ``triton.py`` backend modules."""
import torch
import triton
import triton.language as tl

from . import _dispatch


def acc_dtype(dtype: torch.dtype):
    """(triton, torch) accumulator dtypes: fp64 stays fp64 so it can serve as a tight oracle."""
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def precision(dtype: torch.dtype) -> str:
    """``dot``'s ``PREC`` for operands of ``dtype``: a kernel whose dots take fp32 operands for half
    inputs (upcast, or fp32 intermediates) passes its accumulator dtype."""
    # tf32 only where torch itself would use it for an fp32 matmul (the flag is off by default)
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "ieee" if dtype == torch.float64 else "tf32"


def upcast(dtype: torch.dtype) -> bool:
    """Whether ``dot`` must take bf16 operands to fp32 first (see ``dot``)."""
    return dtype == torch.bfloat16 and _dispatch.triton_interpreting()


@triton.jit
def dot(a, b, ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` accumulated in ``ACC``; ``UPCAST``: operands to fp32 first (the interpreter's
    bf16 ``tl.dot`` multiplies the raw bits; exact, as bf16 products are exact in fp32)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PREC, out_dtype=ACC)


def unit_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` read in place when its channel dim is unit-stride (any other strides), else a copy."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()
