"""Triton linear-attention backend against the reference oracle: forward and dq / dk / dv
through the public op with backend="triton", plain and magnitude-aware, with and without
RoPE, every dtype, odd sizes, padded D, several chunks per head, strided inputs.

Where the kernels run (in process, or a child pytest under the interpreter): ``_triton_harness.py``.
For fast iteration on this file alone: ``TRITON_INTERPRET=1 pytest tests/ops/test_linear_triton.py``.
The Hypothesis properties of the cpu suite (``test_linear_props.py``: every layout, the RoPE
tables' included, dtype, N = 1, odd D, partial gradients, autocast) run here too on short
sequences (more: ``TRITON_INTERPRET=1 pytest -m slow`` on this file).
"""
import importlib
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from _linear_cases import compare, gen, inputs, rope_tables
from _property import settings_for, sizes
from _triton_harness import kernel_module, poison_empty
from hypothesis import given
from hypothesis import strategies as st
from test_linear_props import cases, check, check_autocast_is_cast

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from attnzoo.ops.linear import linear_attention, magnitude_aware_linear_attention  # noqa: E402

_CHILD_FLAG = "_ATTNZOO_LINEAR_TRITON_CHILD"

DEVICE, tri, kernel_test, test_kernels_in_interpreter_subprocess = kernel_module(
    __file__, _CHILD_FLAG, "attnzoo.ops.linear.triton", timeout=600)


F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16

# (B, heads, N, D, dtypes): N not a multiple of the block, D padded (6 -> 16, 24 -> 32),
# N over several chunks (see test_several_chunks for the chunk split itself)
CASES = [
    (2, 3, 70, 8, (F32, F64, BF16, F16)),
    (1, 2, 37, 6, (F32,)),
    (1, 1, 200, 24, (F32, F64)),
]


def _expand():
    params, ids = [], []
    for b, h, n, d, dtypes in CASES:
        for dt in dtypes:
            params.append(((b, h, n, d), dt))
            ids.append(f"B{b}-h{h}-N{n}-D{d}-{str(dt).replace('torch.', '')}")
    return params, ids


PARAMS, IDS = _expand()


def _fn(magnitude_aware):
    def fn(q, k, v, rope, backend):
        return linear_attention(q, k, v, rope, magnitude_aware=magnitude_aware, backend=backend)
    return fn


@pytest.fixture(autouse=True)
def _poisoned_buffers(monkeypatch):
    if tri is not None:
        poison_empty(monkeypatch, tri)


@kernel_test
@pytest.mark.parametrize("shape,dtype", PARAMS, ids=IDS)
@pytest.mark.parametrize("rope", [True, False], ids=["rope", "norope"])
@pytest.mark.parametrize("magnitude_aware", [True, False], ids=["mala", "plain"])
def test_matches_reference(shape, dtype, rope, magnitude_aware):
    q, k, v, tables, dy = inputs(shape, dtype, rope, ("triton", shape, str(dtype), rope, magnitude_aware))
    compare(_fn(magnitude_aware), q, k, v, tables, dy, dtype, DEVICE, "triton")


@kernel_test
def test_several_chunks(monkeypatch):
    """16-token blocks, few programs: each head's summaries are split over several chunks,
    the last one partial."""
    monkeypatch.setattr(tri, "_BLOCK_N", 16)
    monkeypatch.setattr(tri, "_TARGET_PROGRAMS", 8)
    shape = (1, 2, 75, 8)
    *_, nchunks, chunk = tri._geometry(torch.empty(shape))
    assert nchunks == 3 and chunk == 32 and chunk * (nchunks - 1) < 75
    q, k, v, tables, dy = inputs(shape, F64, True, ("chunks",))
    compare(_fn(True), q, k, v, tables, dy, F64, DEVICE, "triton")


@kernel_test
@pytest.mark.parametrize("dtype", [BF16, F16, F32], ids=str)
def test_tiny_and_large_magnitudes(dtype):
    """z ~ 0 (features underflow) and z ~ 1e4: finite, and the reference's answer (fp16
    forward only at z ~ 0: its true dq ~ kv / eps is beyond fp16's range)."""
    shape = (1, 2, 40, 8)
    q, k, v, tables, dy = inputs(shape, dtype, True, ("tiny-tri", str(dtype)), q_shift=-30.0)
    compare(_fn(True), q, k, v, tables, dy, dtype, DEVICE, "triton", grads=dtype != F16)
    q, k, v, tables, dy = inputs(shape, dtype, True, ("large-tri", str(dtype)), q_shift=5.0, k_shift=3.0)
    compare(_fn(True), q, k, v, tables, dy, dtype, DEVICE, "triton")


@kernel_test
def test_strided_inputs_and_partial_gradients():
    """Channel-major views of one buffer (the layer's layout), read in place; a gradient for
    q only and for v only."""
    g = gen("strided-tri")
    B, heads, D, N = 2, 2, 8, 23
    buf = torch.randn(B, 3, heads, D, N, generator=g, dtype=F64)
    cos, sin = rope_tables(N, D, g)
    res = {}
    for backend, device in (("reference", "cpu"), ("triton", DEVICE)):
        x = buf.to(device).requires_grad_()
        q, k, v = x.transpose(-1, -2).unbind(1)
        q, k = F.elu(q) + 1, F.elu(k) + 1
        assert v.stride(-1) != 1
        rope = (cos.to(device), sin.to(device))
        y = magnitude_aware_linear_attention(q, k, v, rope, backend=backend)
        (gx,) = torch.autograd.grad(y.square().sum(), [x])
        qd, kd, vd = (t.detach().requires_grad_() for t in (q, k, v))
        y1 = magnitude_aware_linear_attention(qd, kd.detach(), vd.detach(), rope, backend=backend)
        (gq,) = torch.autograd.grad(y1.sum(), [qd])
        y2 = magnitude_aware_linear_attention(qd.detach(), kd.detach(), vd, rope, backend=backend)
        (gv,) = torch.autograd.grad(y2.sum(), [vd])
        res[backend] = [t.cpu() for t in (y, gx, gq, gv)]
    for a, b in zip(res["triton"], res["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@kernel_test
def test_autocast_changes_nothing():
    q, k, v, tables, dy = inputs((1, 2, 19, 8), BF16, True, ("autocast-tri",))
    res = []
    for enabled in (False, True):
        leaves = [t.to(DEVICE, BF16).requires_grad_() for t in (q, k, v)]
        rope = tuple(t.to(DEVICE, F32) for t in tables)
        with torch.autocast(DEVICE, dtype=BF16, enabled=enabled):
            y = magnitude_aware_linear_attention(*leaves, rope, backend="triton")
            grads = torch.autograd.grad(y, leaves, dy.to(DEVICE, BF16))
        res.append((y, *grads))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# --------------------------------------------------------------------------- properties (Hypothesis)
# The cpu suite's properties on sequences of at most 40 tokens and D <= 8, as the interpreter
# is slow; uninitialised buffers are NaN (the autouse fixture above). 16-token blocks and few
# programs, so that those 40 tokens span several blocks and summary chunks.

@kernel_test
@pytest.mark.parametrize("n", sizes(40, 600))
def test_triton_properties(n, monkeypatch):
    monkeypatch.setattr(tri, "_BLOCK_N", 16)
    monkeypatch.setattr(tri, "_TARGET_PROGRAMS", 4)

    @settings_for(n)
    @given(case=cases(max_n=40))
    def prop(case):
        check(case, "triton", device=DEVICE)
    prop()


@kernel_test
@pytest.mark.parametrize("n", sizes(8, 100))
def test_triton_autocast_bf16(n):
    @settings_for(n)
    @given(case=cases(max_n=40, autocast=True), dtype=st.sampled_from([F32, BF16]))
    def prop(case, dtype):
        check(case, "triton", device=DEVICE, autocast=torch.bfloat16)
        check_autocast_is_cast(case, "triton", dtype, device=DEVICE)
    prop()
