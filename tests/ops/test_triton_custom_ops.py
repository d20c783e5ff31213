"""The Triton backends' ``torch.library`` custom ops, which make them traceable by ``torch.compile``.

- ``torch.library.opcheck`` (schema, fake tensors, autograd registration, AOT dispatch with
  dynamic shapes) of every ``attnzoo::`` op, on the arguments a forward and backward through the
  Triton module's public functions pass it (recorded with a dispatch mode, so a new op is picked
  up without a list here, and one that no case reaches fails ``test_every_custom_op_is_checked``);
- ``torch.compile(fullgraph=True)`` of each public op with backend="triton": no graph break,
  the forward and backward custom ops in the compiled graphs, and the eager reference's output
  and gradients.

Tiny odd shapes in float64; where the kernels run: ``_triton_harness.py``. For fast iteration on
this file alone: ``TRITON_INTERPRET=1 pytest tests/ops/test_triton_custom_ops.py``.
"""
import importlib
import importlib.util
import zlib

import pytest
import torch
import torch.nn.functional as F
from _triton_harness import kernel_module
from torch.utils._python_dispatch import TorchDispatchMode

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from attnzoo.ops import _dispatch, agent, gate, linear, neighborhood, routing  # noqa: E402

_CHILD_FLAG = "_ATTNZOO_CUSTOM_OPS_TRITON_CHILD"
DEVICE, _, kernel_test, test_kernels_in_interpreter_subprocess = kernel_module(
    __file__, _CHILD_FLAG, "attnzoo.ops.routing.triton", timeout=900)

OPS = ("gate", "neighborhood", "routing", "agent", "linear")
F64 = torch.float64


def _tri(op: str):
    return importlib.import_module(f"attnzoo.ops.{op}.triton")


def _randn(g, *shape, positive=False, grad=True):
    t = torch.randn(shape, generator=g, dtype=F64)
    return (F.elu(t) + 1 if positive else t).to(DEVICE).requires_grad_(grad)


# --------------------------------------------------------------------------- cases
# Each op: ``inputs(g)``: its tensors (those asking for gradients as in a model);
# ``public(backend, *inputs)``: the public op; ``module(*inputs)``: the Triton module's public
# functions (for the gate, its primitives: the public gates compose them only under a capture),
# every custom op reached forward or backward.

def _gate_inputs(g):
    x = _randn(g, 2, 5, 3, 7)
    return [x, _randn(g, 3, 5), _randn(g, 5, 3), _randn(g, 1, 2, 3, 3)]


def _gate_public(backend, x, w1, w2, cw):
    return gate.cbam_gate(x, lambda p: F.linear(F.relu(F.linear(p, w1)), w2), lambda m: F.conv2d(m, cw, padding=1),
                          backend=backend, channel_params=(w1, w2), spatial_params=(cw,))


def _gate_module(x, w1, w2, cw):
    tri = _tri("gate")
    avg, mx = tri.channel_pool(x, True)
    cs = torch.sigmoid(avg * w1[0] + mx * w2[:, 0])  # any differentiable scales
    pooled = tri.spatial_pool(x, cs)
    ss = torch.sigmoid(F.conv2d(pooled, cw, padding=1))[:, 0]
    return tri.gate_scale(x, cs, ss)


def _nbh_inputs(g):
    return [_randn(g, 1, 5, 6, 2, 8) for _ in range(3)] + [_randn(g, 2, 5, 5), _randn(g, 1, 5, 6, 2, 4),
                                                           _randn(g, 1, 5, 6, 2, 4)]


def _nbh_public(backend, q, k, v, rpb, rel_h, rel_w):
    return (neighborhood.na2d(q, k, v, 3, rpb=rpb, backend=backend)
            + neighborhood.na2d(q, k, v, 4, stride=2, border="zero_pad", rel_h=rel_h, rel_w=rel_w, backend=backend))


def _nbh_module(q, k, v, rpb, rel_h, rel_w):
    tri = _tri("neighborhood")
    scale = q.shape[-1] ** -0.5
    y = tri.na2d(q, k, v, (3, 3), (1, 1), (1, 1), rpb, scale)
    # HaloNet's zero-padded windows with per-query biases: the op's optional inputs and outputs
    return y + tri.na2d(q, k, v, (4, 4), (1, 1), (2, 2), None, scale, "zero_pad", rel_h, rel_w)


def _routing_inputs(g):
    return [_randn(g, 1, 5, 7, 2, 8) for _ in range(3)]


def _routing_public(backend, q, k, v):
    return routing.bra(q, k, v, 2, 2, backend=backend)


def _routing_module(q, k, v):
    idx = routing.reference.route(q, k, (2, 2), 2)
    return _tri("routing").bra(q, k, v, idx, (2, 2), 0.3)


def _agent_inputs(g):
    B, heads, N, M, A, D = 1, 2, 11, 9, 5, 8
    return [_randn(g, B, heads, N, D), _randn(g, B, heads, M, D), _randn(g, B, heads, M, D),
            _randn(g, B, heads, A, D), _randn(g, heads, A, M), _randn(g, heads, N, A)]


def _agent_public(backend, q, k, v, a, b1, b2):
    return agent.agent_attention(q, k, v, a, b1, b2, backend=backend)


def _agent_module(q, k, v, a, b1, b2):
    return _tri("agent").agent_attention(q, k, v, a, b1, b2, 0.3)


def _linear_inputs(g):
    N, D = 19, 6
    ang = torch.rand(N, D // 2, generator=g, dtype=F64) * 20
    return [_randn(g, 1, 2, N, D, positive=True), _randn(g, 1, 2, N, D, positive=True), _randn(g, 1, 2, N, D),
            ang.cos().to(DEVICE), ang.sin().to(DEVICE)]  # RoPE tables: constants in the layers


def _linear_public(backend, q, k, v, cos, sin):
    return linear.magnitude_aware_linear_attention(q, k, v, (cos, sin), backend=backend)


def _linear_module(q, k, v, cos, sin):
    return _tri("linear").linear_attention(q, k, v, cos, sin, 0.4, 1e-6, True)


CASES = {
    "gate": (_gate_inputs, _gate_public, _gate_module),
    "neighborhood": (_nbh_inputs, _nbh_public, _nbh_module),
    "routing": (_routing_inputs, _routing_public, _routing_module),
    "agent": (_agent_inputs, _agent_public, _agent_module),
    "linear": (_linear_inputs, _linear_public, _linear_module),
}


def _leaves(op):
    return CASES[op][0](torch.Generator().manual_seed(zlib.crc32(op.encode())))


def _backward(y, leaves):
    dy = torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).view_as(y)
    return torch.autograd.grad(y, [t for t in leaves if t.requires_grad], dy)


# --------------------------------------------------------------------------- opcheck

class _Recorder(TorchDispatchMode):
    """The first call of each ``attnzoo::`` op: ``{OpOverload: (args, kwargs)}``, copied, the
    tensors asking for gradients where the forward's did (the backward's ops are not differentiable)."""

    def __init__(self):
        super().__init__()
        self.calls, self.backward = {}, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "attnzoo" and func not in self.calls:
            self.calls[func] = _fresh((args, kwargs), grad=not self.backward)
        return func(*args, **kwargs)


def _fresh(x, grad):
    if isinstance(x, torch.Tensor):
        return x.detach().clone().requires_grad_(grad and x.requires_grad)
    if isinstance(x, (list, tuple)):
        return type(x)(_fresh(v, grad) for v in x)
    if isinstance(x, dict):
        return {k: _fresh(v, grad) for k, v in x.items()}
    return x


@pytest.fixture(scope="module")
def recorded():
    """``{op: {OpOverload: (args, kwargs)}}`` of a forward and backward through each Triton module."""
    out = {}
    for op in OPS:
        leaves = _leaves(op)
        with _Recorder() as rec:
            y = CASES[op][2](*leaves)
            rec.backward = True
            _backward(y, leaves)
        out[op] = rec.calls
    return out


@kernel_test
@pytest.mark.parametrize("op", OPS)
def test_opcheck(recorded, op):
    calls = recorded[op]
    assert len(calls) >= 2, f"{op}: forward and backward custom ops expected, got {list(calls)}"
    for func, (args, kwargs) in calls.items():
        torch.library.opcheck(func, args, kwargs)


@kernel_test
def test_every_custom_op_is_checked(recorded):
    for op in OPS:
        assert _tri(op).__name__ in _dispatch._COMPILE_TRACEABLE, f"{op}: not registered as compile-traceable"
    registered = {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("attnzoo::")}
    checked = {f._schema.name for calls in recorded.values() for f in calls}
    assert registered and registered <= checked, f"custom ops no case reaches: {sorted(registered - checked)}"


# --------------------------------------------------------------------------- torch.compile

def _recording_aot_eager(seen: set):
    """aot_eager that also notes the ``attnzoo::`` ops of the forward and backward graphs."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def compiler(gm, _inputs):
        seen.update(n.target._schema.name for n in gm.graph.nodes
                    if isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "attnzoo")
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=compiler, bw_compiler=compiler)


@kernel_test
@pytest.mark.parametrize("op", OPS)
def test_compile_fullgraph(recorded, op):
    """torch.compile(fullgraph=True) of the public op with backend="triton" traces it as its
    custom ops, forward and backward, and gives the eager reference's output and gradients."""
    _, public, _ = CASES[op]
    seen = set()
    torch._dynamo.reset()
    compiled = torch.compile(public, fullgraph=True, backend=_recording_aot_eager(seen))
    res = {}
    for backend, fn in (("reference", public), ("triton", compiled)):
        leaves = _leaves(op)
        y = fn(backend, *leaves)
        res[backend] = [y, *_backward(y, leaves)]
    assert seen == {f._schema.name for f in recorded[op]}  # the forward's and the backward's custom ops
    for i, (a, b) in enumerate(zip(res["triton"], res["reference"])):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"{op} output {i}: {m}")
