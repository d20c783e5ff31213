"""Agent attention op: the cpu backend against the reference (forward and every gradient,
biases included), the reference's float64 gradcheck, the reference against an independent
dense oracle, input validation and backend dispatch."""
import pytest
import torch

from attnzoo.ops import agent as agent_op
from attnzoo.ops.agent import cpu, reference

# relative L2 error allowed against a float64 reference run on the same inputs
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2}

# (B, heads, N, M, A, D, biases)
CASES = [
    (1, 1, 12, 12, 4, 8, True),
    (2, 3, 35, 35, 9, 16, True),  # 5 x 7 map, 3 x 3 agents
    (2, 2, 63, 16, 6, 8, True),  # spatial reduction: fewer keys than queries, 2 x 3 agents
    (1, 2, 20, 20, 49, 32, True),  # more agents than a key map side
    (2, 1, 17, 9, 5, 3, False),
]
IDS = [f"B{b}-h{h}-N{n}-M{m}-A{a}-D{d}-{'bias' if bias else 'nobias'}" for b, h, n, m, a, d, bias in CASES]


def _inputs(B, heads, N, M, A, D, biases, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, heads, N, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, heads, M, D, generator=g, dtype=torch.float64) for _ in range(2))
    a = torch.randn(B, heads, A, D, generator=g, dtype=torch.float64)
    b1 = torch.randn(heads, A, M, generator=g, dtype=torch.float64) if biases else None
    b2 = torch.randn(heads, N, A, generator=g, dtype=torch.float64) if biases else None
    return [t.to(dtype) if t is not None else None for t in (q, k, v, a, b1, b2)]


def _rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


def _run(inputs, backend, dy):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    y = agent_op.agent_attention(*leaves, backend=backend)
    wrt = [t for t in leaves if t is not None]
    return y, torch.autograd.grad(y, wrt, dy.to(y.dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_cpu_matches_reference(case, dtype):
    inputs = _inputs(*case, dtype=dtype)
    dy = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y_ref, g_ref = _run([t.double() if t is not None else None for t in inputs], "reference", dy)
    y, g = _run(inputs, "cpu", dy)
    assert y.dtype == dtype
    assert _rel_err(y, y_ref) < TOL[dtype], "forward"
    names = [n for n, t in zip(("dq", "dk", "dv", "dagent", "dagent_bias", "dquery_bias"), inputs) if t is not None]
    assert len(g) == len(g_ref) == len(names)
    for name, a, b in zip(names, g, g_ref):
        assert a.dtype == dtype, name
        assert _rel_err(a, b) < TOL[dtype], name


@pytest.mark.parametrize("case", CASES[:3], ids=IDS[:3])
def test_reference_gradcheck(case):
    B, heads, N, M, A, D, biases = case
    inputs = [t.requires_grad_() for t in _inputs(min(B, 1), heads, min(N, 12), min(M, 12), min(A, 4), min(D, 4),
                                                 biases) if t is not None]

    def fn(q, k, v, a, *bias):
        return reference.agent_attention(q, k, v, a, *(bias or (None, None)), 0.7)

    assert torch.autograd.gradcheck(fn, inputs)


def test_cpu_gradcheck():
    """The hand-written backward, directly against finite differences."""
    inputs = [t.requires_grad_() for t in _inputs(1, 2, 10, 7, 3, 4, True)]
    assert torch.autograd.gradcheck(lambda *x: cpu.agent_attention(*x, 0.9), inputs)


def test_reference_against_dense_oracle():
    """Element-wise definition: each agent a softmax-weighted mean of v, each query one of V_A."""
    q, k, v, a, b1, b2 = _inputs(1, 1, 6, 5, 3, 4, True)
    s = 0.5
    agent_v = torch.zeros(3, 4, dtype=torch.float64)
    for i in range(3):
        w = torch.tensor([s * (a[0, 0, i] @ k[0, 0, j]) + b1[0, i, j] for j in range(5)]).exp()
        agent_v[i] = (w[:, None] * v[0, 0]).sum(0) / w.sum()
    out = torch.zeros(6, 4, dtype=torch.float64)
    for n in range(6):
        w = torch.tensor([s * (q[0, 0, n] @ a[0, 0, i]) + b2[0, n, i] for i in range(3)]).exp()
        out[n] = (w[:, None] * agent_v).sum(0) / w.sum()
    y = agent_op.agent_attention(q, k, v, a, b1, b2, scale=s, backend="reference")
    torch.testing.assert_close(y[0, 0], out, rtol=1e-12, atol=1e-12)


def test_default_scale_and_partial_grads():
    q, k, v, a, b1, b2 = _inputs(1, 2, 9, 9, 4, 16, True)
    y = agent_op.agent_attention(q, k, v, a, b1, b2, backend="cpu")
    torch.testing.assert_close(y, reference.agent_attention(q, k, v, a, b1, b2, 16 ** -0.5))
    # only v and the query bias ask for gradients
    vv, bb = v.clone().requires_grad_(), b2.clone().requires_grad_()
    vr, br = v.clone().requires_grad_(), b2.clone().requires_grad_()
    agent_op.agent_attention(q, k, vv, a, b1, bb, backend="cpu").square().sum().backward()
    agent_op.agent_attention(q, k, vr, a, b1, br, backend="reference").square().sum().backward()
    torch.testing.assert_close(vv.grad, vr.grad)
    torch.testing.assert_close(bb.grad, br.grad)


def test_validation_names_shapes():
    q, k, v, a, b1, b2 = _inputs(1, 2, 9, 9, 4, 8, True, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"agent_bias must have shape \[heads, A, M\] = \(2, 4, 9\)"):
        agent_op.agent_attention(q, k, v, a, b1[:, :3], b2)
    with pytest.raises(ValueError, match=r"query_bias must have shape \[heads, N, A\]"):
        agent_op.agent_attention(q, k, v, a, b1, b2.transpose(1, 2))
    with pytest.raises(ValueError, match="k and v"):
        agent_op.agent_attention(q, k, v[:, :, :5], a, None, None)
    with pytest.raises(ValueError, match="agent_tokens"):
        agent_op.agent_attention(q, k, v, a[..., :4], None, None)
    with pytest.raises(ValueError, match=r"\[B, heads, tokens, D\]"):
        agent_op.agent_attention(q[0], k, v, a, None, None)
    with pytest.raises(ValueError, match="dtype"):
        agent_op.agent_attention(q.double(), k, v, a, None, None)
    with pytest.raises(ValueError, match="query_bias must have"):
        agent_op.agent_attention(q, k, v, a, b1, b2.double())
    with pytest.raises(ValueError, match="one floating dtype"):
        agent_op.agent_attention(*(t.long() for t in (q, k, v, a)), None, None)


def test_dispatch(monkeypatch):
    q, k, v, a, b1, b2 = _inputs(1, 1, 4, 4, 2, 4, True, dtype=torch.float32)
    calls = []
    monkeypatch.setattr(cpu, "agent_attention", lambda *x: calls.append("cpu") or reference.agent_attention(*x))
    agent_op.agent_attention(q, k, v, a, b1, b2)  # CPU tensors: triton cannot run, cpu is next
    assert calls == ["cpu"]
    monkeypatch.setenv("ATTNZOO_BACKEND", "reference")
    agent_op.agent_attention(q, k, v, a, b1, b2)
    assert calls == ["cpu"]
    with pytest.raises(ValueError, match="unknown backend"):
        agent_op.agent_attention(q, k, v, a, b1, b2, backend="cuda")
