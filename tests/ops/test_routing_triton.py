"""Triton bi-level routing attention against the reference oracle: forward and dq / dk / dv
through the public ``bra`` with backend="triton" (odd and padded maps, non-square region
grids, D padding, several tiles per region, topk 1..all), plus the inverse-routing table
the dK / dV kernel walks.

Where the kernels run (in process, or a child pytest under the interpreter): ``_triton_harness.py``.
For fast iteration on this file alone: ``TRITON_INTERPRET=1 pytest tests/ops/test_routing_triton.py``.
``ATTNZOO_SLOW=1`` adds a seeded random sweep. The Hypothesis properties of the cpu suite
(``test_routing_props.py``: every layout, dtype, degenerate geometry, partial gradients,
autocast) run here too on tiny maps (more: ``TRITON_INTERPRET=1 pytest -m slow`` on this file).
"""
import importlib
import importlib.util
import os
import random
import zlib

import pytest
import torch
from _property import settings_for, sizes
from _triton_harness import kernel_module, poison_empty
from hypothesis import given
from hypothesis import strategies as st
from test_routing_props import cases, check, check_autocast_is_cast

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from attnzoo.ops import routing  # noqa: E402
from attnzoo.ops.routing import reference  # noqa: E402

_CHILD_FLAG = "_ATTNZOO_ROUTING_TRITON_CHILD"
SLOW = os.environ.get("ATTNZOO_SLOW") == "1"

DEVICE, tri, kernel_test, test_kernels_in_interpreter_subprocess = kernel_module(
    __file__, _CHILD_FLAG, "attnzoo.ops.routing.triton", timeout=1800 if SLOW else 600)

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
# relative RMS error against a float64 reference on the same (rounded) inputs and routing
TOL = {F64: 1e-12, F32: 1e-5, F16: 5e-3, BF16: 3e-2}

# (B, H, W, heads, D, num_regions, topk, dtype)
CASES = [
    (1, 9, 11, 1, 8, 4, 6, F32),  # padded: a whole row of regions is padding
    (2, 13, 11, 1, 4, (3, 4), 3, F64),  # non-square grid, D=4 padded to 16
    (1, 5, 6, 1, 16, 2, 1, F32),  # topk 1
    (1, 20, 20, 1, 16, 2, 2, BF16),  # 100-token regions: two query tiles, two key chunks
    (1, 12, 10, 2, 24, 3, -1, F32),  # dense (every region), D=24
    (1, 8, 12, 2, 8, (2, 3), 4, F16),  # divisible, 16-token regions
    (1, 7, 9, 1, 8, 3, 9, F64),  # topk == nR, padded
]


def _slow_cases():
    rng = random.Random(4321)
    out = []
    for _ in range(24):
        nr = (rng.randint(1, 5), rng.randint(1, 5))
        H, W = rng.randint(nr[0], 23), rng.randint(nr[1], 23)
        topk = rng.choice([-1, 1, 2, 4, 9, 16])
        out.append((rng.randint(1, 2), H, W, rng.randint(1, 2), rng.choice([3, 8, 16, 24, 40]), nr, topk,
                    rng.choice([F64, F32, BF16, F16])))
    return out


PARAMS = CASES + (_slow_cases() if SLOW else [])
IDS = [f"B{c[0]}-{c[1]}x{c[2]}-h{c[3]}-D{c[4]}-n{c[5]}-k{c[6]}-{str(c[7])[6:]}".replace(" ", "") for c in PARAMS]


def _rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


@kernel_test
@pytest.mark.parametrize("case", PARAMS, ids=IDS)
def test_triton_matches_reference(case, monkeypatch):
    poison_empty(monkeypatch, tri)
    B, H, W, heads, D, nr, topk, dtype = case
    g = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    q, k, v, dy = (torch.randn(B, H, W, heads, D, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
                   for _ in range(4))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    y, idx = routing.bra(*leaves, nr, topk, backend="triton", return_index=True)
    grads = torch.autograd.grad(y, leaves, dy)
    ref_leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    y_ref = reference.bra(*ref_leaves, idx.cpu(), (nr, nr) if isinstance(nr, int) else nr, (heads * D) ** -0.5)
    g_ref = torch.autograd.grad(y_ref, ref_leaves, dy.cpu().double())
    assert y.dtype == dtype and y.shape == q.shape
    assert _rel_err(y.cpu(), y_ref) < TOL[dtype], "out"
    for name, a, b in zip(("dq", "dk", "dv"), grads, g_ref):
        assert a.dtype == dtype, name
        assert torch.isfinite(a).all(), name
        assert _rel_err(a.cpu(), b) < TOL[dtype] * 2, name
    with torch.no_grad():  # the no-grad path skips the autograd Function
        assert _rel_err(routing.bra(q, k, v, nr, topk, backend="triton").cpu(), y_ref) < TOL[dtype]


@kernel_test
def test_triton_non_contiguous_inputs():
    """q, k, v as the layer makes them: views of one qkv tensor."""
    qkv = torch.randn(2, 11, 9, 3, 2, 8, dtype=torch.float64, device=DEVICE, requires_grad=True)
    outs = []
    for backend in ("reference", "triton"):
        y = routing.bra(*qkv.unbind(3), 3, 2, backend=backend)
        outs.append((y,) + torch.autograd.grad(y, qkv, torch.ones_like(y)))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@kernel_test
def test_inverse_routing():
    idx = torch.tensor([[[1, 0], [1, 2], [0, 1]], [[2, 1], [2, 0], [2, 1]]], device=DEVICE)
    off, qreg = tri._inverse_routing(idx)
    assert off.tolist() == [0, 2, 5, 6, 7, 9, 12]
    # batch 0: key region 0 <- queries 0, 2; region 1 <- 0, 1, 2; region 2 <- 1; batch 1 likewise
    assert qreg.tolist() == [0, 2, 0, 1, 2, 1, 1, 0, 2, 0, 1, 2]


# --------------------------------------------------------------------------- properties (Hypothesis)
# The cpu suite's properties on grids of at most 3 x 3 regions of at most 2 x 2 tokens, at most
# 2 heads, as the interpreter is slow; uninitialised buffers are NaN (``poison_empty``).

@kernel_test
@pytest.mark.parametrize("n", sizes(25, 500))
def test_triton_properties(n, monkeypatch):
    poison_empty(monkeypatch, tri)

    @settings_for(n)
    @given(case=cases(max_grid=3, max_region=2, max_heads=2))
    def prop(case):
        check(case, "triton", device=DEVICE)
    prop()


@kernel_test
@pytest.mark.parametrize("n", sizes(6, 100))
def test_triton_autocast_bf16(n, monkeypatch):
    poison_empty(monkeypatch, tri)

    @settings_for(n)
    @given(case=cases(max_grid=3, max_region=2, max_heads=2, autocast=True), dtype=st.sampled_from([F32, BF16]))
    def prop(case, dtype):
        check(case, "triton", device=DEVICE, autocast=torch.bfloat16)
        check_autocast_is_cast(case, "triton", dtype, device=DEVICE)
    prop()
