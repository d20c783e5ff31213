"""Triton agent-attention backend against the reference oracle: forward and every gradient
(q, k, v, agents, both biases) through the public ``agent_attention`` with backend="triton".

Where the kernels run (in process, or a child pytest under the interpreter): ``_triton_harness.py``.
For fast iteration on this file alone: ``TRITON_INTERPRET=1 pytest tests/ops/test_agent_triton.py``.
The interpreter is slow, so the cases are few and small; each covers a feature (padded A and
D, fewer keys than queries, several query / key blocks, no biases, low precision).
"""
import importlib
import importlib.util
import zlib

import pytest
import torch
from _property import settings_for, sizes
from _triton_harness import kernel_module, poison_empty
from hypothesis import given
from test_agent_props import DEGENERATE, NAMES, Case, cases

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from attnzoo.ops import agent as agent_op  # noqa: E402

_CHILD_FLAG = "_ATTNZOO_AGENT_TRITON_CHILD"
DEVICE, tri, kernel_test, test_kernels_in_interpreter_subprocess = kernel_module(
    __file__, _CHILD_FLAG, "attnzoo.ops.agent.triton", timeout=600)

# |actual - expected| <= atol * max|expected| + rtol * |expected| against float64 on the same inputs
TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-5), torch.float16: (5e-3, 5e-3),
       torch.bfloat16: (3e-2, 3e-2)}
F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16

# (B, heads, N, M, A, D, biases, dtypes)
CASES = [
    (1, 2, 37, 37, 9, 16, True, (F32, F64)),  # 37 queries: a partial query / key block
    (2, 1, 50, 13, 6, 8, True, (F32, BF16, F16)),  # spatial reduction (M < N), A and D padded to 16
    (1, 1, 20, 24, 49, 32, False, (F32,)),  # no biases, A = 49 padded to 64
]
PARAMS = [(*c[:-1], dt) for c in CASES for dt in c[-1]]
IDS = [f"B{b}-h{h}-N{n}-M{m}-A{a}-D{d}-{'bias' if bias else 'nobias'}-{str(dt)[6:]}"
       for b, h, n, m, a, d, bias, dt in PARAMS]


def _gen(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _check(actual, expected, dtype, what):
    assert actual is not None and expected is not None, f"{what}: missing"
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    rtol, atol = TOL[dtype]
    expected = expected.detach()
    actual = actual.detach().cpu().to(expected.dtype)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * expected.abs().max().item(),
                               msg=lambda m: f"{what}: {m}")


def _case(B, heads, N, M, A, D, biases, dtype):
    g = _gen(B, heads, N, M, A, D, biases, str(dtype))
    shapes = {"q": (B, heads, N, D), "k": (B, heads, M, D), "v": (B, heads, M, D), "a": (B, heads, A, D)}
    if biases:
        shapes.update(b1=(heads, A, M), b2=(heads, N, A))
    base = {n: torch.randn(s, generator=g, dtype=torch.float64).to(dtype).double() for n, s in shapes.items()}
    dy = torch.randn(B, heads, N, D, generator=g, dtype=torch.float64).to(dtype).double()
    res = {}
    for backend, dt, device in (("reference", torch.float64, "cpu"), ("triton", dtype, DEVICE)):
        leaves = {n: t.to(device=device, dtype=dt).requires_grad_() for n, t in base.items()}
        y = agent_op.agent_attention(leaves["q"], leaves["k"], leaves["v"], leaves["a"], leaves.get("b1"),
                                     leaves.get("b2"), backend=backend)
        res[backend] = (y, torch.autograd.grad(y, list(leaves.values()), dy.to(device=device, dtype=dt)))
    _check(res["triton"][0], res["reference"][0], dtype, "out")
    for name, a, b in zip(base, res["triton"][1], res["reference"][1]):
        _check(a, b, dtype, "d" + name)


@pytest.fixture(autouse=True)
def _poisoned_buffers(monkeypatch):
    if tri is not None:
        poison_empty(monkeypatch, tri)


@kernel_test
@pytest.mark.parametrize("B,heads,N,M,A,D,biases,dtype", PARAMS, ids=IDS)
def test_agent_attention(B, heads, N, M, A, D, biases, dtype):
    _case(B, heads, N, M, A, D, biases, dtype)


@kernel_test
def test_small_blocks(monkeypatch):
    """16-query / 16-key blocks: several programs add into dA, dV_A and the biases' gradients."""
    monkeypatch.setattr(tri, "_BLOCK_N", 16)
    monkeypatch.setattr(tri, "_BLOCK_M", 16)
    _case(2, 2, 45, 35, 4, 8, True, torch.float64)


@kernel_test
def test_partial_grads():
    """Only the query bias and v ask for gradients: they come back right, the rest stay None."""
    g = _gen("partial")
    q, k, v = (torch.randn(1, 1, 18, 8, generator=g, dtype=torch.float64) for _ in range(3))
    a = torch.randn(1, 1, 4, 8, generator=g, dtype=torch.float64)
    b1, b2 = torch.randn(1, 4, 18, generator=g, dtype=torch.float64), torch.randn(1, 18, 4, generator=g,
                                                                                   dtype=torch.float64)
    res = {}
    for backend, device in (("reference", "cpu"), ("triton", DEVICE)):
        leaves = [t.to(device) for t in (q, k, v, a, b1, b2)]
        leaves[2].requires_grad_()
        leaves[5].requires_grad_()
        y = agent_op.agent_attention(*leaves, backend=backend)
        y.square().sum().backward()
        res[backend] = (y, leaves[2].grad, leaves[5].grad, leaves[4].grad)
    for name, x, ref in zip(("out", "dv", "dquery_bias"), res["triton"][:3], res["reference"][:3]):
        _check(x, ref, torch.float64, name)
    assert res["triton"][3] is None


@kernel_test
def test_dispatch_reaches_triton(monkeypatch):
    calls = []
    real = tri.agent_attention
    monkeypatch.setattr(tri, "agent_attention", lambda *x: calls.append(1) or real(*x))
    x = torch.randn(1, 1, 8, 16, device=DEVICE)
    agent_op.agent_attention(x, x, x, x[:, :, :4], backend="triton")
    assert calls == [1]


# --------------------------------------------------------------------------- properties
# The properties of test_agent_props.py on the Triton backend, on shapes the interpreter runs
# quickly (every size still spans its padded block: A, D -> 16; N, M up to 20 < 64).

@kernel_test
@pytest.mark.parametrize("n", sizes(40, 400))
def test_properties_match_reference(n):
    @settings_for(n)
    @given(case=cases(max_tokens=20, max_agents=6, max_dim=8, max_batch=2))
    def prop(case):
        case.check("triton", device=DEVICE)

    prop()


@kernel_test
@pytest.mark.parametrize("n", sizes(10, 100))
def test_properties_under_bf16_autocast(n):
    @settings_for(n)
    @given(case=cases(dtypes=(torch.float32,), max_tokens=12, max_agents=4, max_dim=8, max_batch=2))
    def prop(case):
        case.check("triton", device=DEVICE, autocast=torch.bfloat16)

    prop()


@kernel_test
@pytest.mark.parametrize("dtype", [F64, F32, BF16, F16], ids=str)
def test_degenerate_sizes(dtype):
    for shape in DEGENERATE:
        Case(*shape, biases=(True, True), scale=None, dtype=dtype, layouts={}, grad_of=NAMES, seed=7).check(
            "triton", device=DEVICE)
