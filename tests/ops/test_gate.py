"""Gate op: every CPU-runnable backend against the reference, forward and every gradient.

The Triton backend's interpreter run lives in test_gate_triton.py.
"""
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnzoo.ops import gate
from attnzoo.ops.gate import cpu, reference

SHAPES = [(1, 5, 7, 9), (2, 16, 3, 3), (2, 33, 11, 6), (3, 64, 1, 13)]
IDS = [f"B{b}-C{c}-H{h}-W{w}" for b, c, h, w in SHAPES]
# max abs error allowed, relative to the reference's scale
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2}


def _rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


def _gate_fns(C, dtype):
    mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(C, max(C // 4, 1)), act=nn.ReLU(), fc2=nn.Linear(max(C // 4, 1), C)))
    conv = nn.Sequential(nn.Conv2d(2, 1, 7, padding=3, bias=False), nn.BatchNorm2d(1))
    with torch.no_grad():
        conv[1].weight.fill_(0.7)  # the official init (zero) would hide the spatial path
    eca_w = torch.randn(1, 1, 3, dtype=dtype, requires_grad=True)
    return mlp.to(dtype), conv.to(dtype), eca_w


OPS = {
    "channel_gate": lambda x, f, b: gate.channel_gate(x, f[0], backend=b),
    "spatial_gate": lambda x, f, b: gate.spatial_gate(x, f[1], backend=b),
    "cbam_gate": lambda x, f, b: gate.cbam_gate(x, f[0], f[1], backend=b),
    "eca_gate": lambda x, f, b: gate.eca_gate(x, f[2], backend=b),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_cpu_matches_reference(op, shape, dtype, channels_last):
    fns = _gate_fns(shape[1], dtype)
    x = torch.randn(shape, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    params = [x] + list(fns[0].parameters()) + list(fns[1].parameters()) + [fns[2]]
    results = {}
    for backend in ("reference", "cpu"):
        xb = x.detach().clone().requires_grad_()
        y = OPS[op](xb, fns, backend)
        dy = torch.randn(y.shape, dtype=dtype, generator=torch.Generator().manual_seed(3))
        grads = torch.autograd.grad(y, [xb] + params[1:], dy, allow_unused=True)
        results[backend] = (y, grads)
    (y_ref, g_ref), (y_cpu, g_cpu) = results["reference"], results["cpu"]
    assert _rel_err(y_cpu, y_ref) < TOL[dtype]
    for i, (a, b) in enumerate(zip(g_cpu, g_ref)):
        assert (a is None) == (b is None), i
        if a is not None:
            assert _rel_err(a, b) < TOL[dtype] * (10 if dtype == torch.bfloat16 else 1), f"grad {i}"


@pytest.mark.parametrize("chunk", [1, 50, 400], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_cpu_blocks_match_reference(monkeypatch, chunk, dtype, channels_last):
    """The cpu passes work one block of ``cpu._CHUNK`` elements at a time (channel ranges of one
    sample, or several whole samples); small blocks put the test shapes through every split,
    which a model's maps take and the property suite's small maps do not."""
    monkeypatch.setattr(cpu, "_CHUNK", chunk)
    for op in sorted(OPS):
        for shape in SHAPES:
            test_cpu_matches_reference(op, shape, dtype, channels_last)


def test_reference_primitives_gradcheck():
    impl = reference
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    cs = torch.rand(2, 5, dtype=torch.float64, generator=g).add(0.5).requires_grad_()
    ss = torch.rand(2, 4, 3, dtype=torch.float64, generator=g).add(0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: impl.channel_pool(a, True), (x,))
    assert torch.autograd.gradcheck(lambda a: impl.channel_pool(a, False)[0], (x,))
    assert torch.autograd.gradcheck(impl.spatial_pool, (x, cs))
    assert torch.autograd.gradcheck(impl.spatial_pool, (x, None))
    assert torch.autograd.gradcheck(impl.gate_scale, (x, cs, ss))
    assert torch.autograd.gradcheck(lambda a, c: impl.gate_scale(a, c, None), (x, cs))
    assert torch.autograd.gradcheck(lambda a, s: impl.gate_scale(a, None, s), (x, ss))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_public_ops_gradcheck(backend):
    mlp, conv, w = _gate_fns(6, torch.float64)
    conv.eval()
    x = torch.randn(2, 6, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: gate.cbam_gate(a, mlp, conv, backend=backend), (x,))
    assert torch.autograd.gradcheck(lambda a: gate.channel_gate(a, mlp, backend=backend), (x,))
    assert torch.autograd.gradcheck(lambda a: gate.spatial_gate(a, conv, backend=backend), (x,))
    assert torch.autograd.gradcheck(lambda a, k: gate.eca_gate(a, k, backend=backend), (x, w))


def test_bn_statistics_update_once():
    """The fused backward reuses the forward's gate graph, so BN running stats move once per step."""
    mlp, conv, _ = _gate_fns(6, torch.float32)
    x = torch.randn(2, 6, 5, 4, requires_grad=True)
    stats = {}
    for backend in ("reference", "cpu"):
        conv[1].reset_running_stats()
        gate.cbam_gate(x, mlp, conv, backend=backend).sum().backward()
        stats[backend] = (conv[1].running_mean.clone(), conv[1].num_batches_tracked.item())
    torch.testing.assert_close(stats["cpu"][0], stats["reference"][0])
    assert stats["cpu"][1] == stats["reference"][1] == 1


def test_no_grad_path_matches():
    mlp, conv, _ = _gate_fns(6, torch.float32)
    x = torch.randn(2, 6, 5, 4)
    with torch.no_grad():
        torch.testing.assert_close(gate.cbam_gate(x, mlp, conv, backend="cpu"),
                                   gate.cbam_gate(x, mlp, conv, backend="reference"))


def test_cbam_is_channel_then_spatial():
    mlp, conv, _ = _gate_fns(8, torch.float32)
    x = torch.randn(2, 8, 5, 6)
    for backend in ("reference", "cpu"):
        fused = gate.cbam_gate(x, mlp, conv, backend=backend)
        seq = gate.spatial_gate(gate.channel_gate(x, mlp, backend=backend), conv, backend=backend)
        torch.testing.assert_close(fused, seq)


def test_spatial_pool_order_is_max_then_mean():
    x = torch.randn(1, 4, 3, 3)
    p, _ = cpu.pool_spatial(x, None)
    torch.testing.assert_close(p[:, 0], x.amax(1))
    torch.testing.assert_close(p[:, 1], x.mean(1))


def test_dispatch(monkeypatch):
    x = torch.randn(1, 4, 3, 3)
    chosen = gate._dispatch.choose_backend("t", gate.BACKENDS, [x])
    assert chosen.name == "cpu"
    monkeypatch.setenv("ATTNZOO_BACKEND", "reference")
    assert gate._dispatch.choose_backend("t", gate.BACKENDS, [x]).name == "reference"
    monkeypatch.setenv("ATTNZOO_BACKEND", "nope")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        gate.eca_gate(x, torch.ones(1, 1, 3))
    monkeypatch.delenv("ATTNZOO_BACKEND")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="cannot run: .*CUDA"):
        gate.eca_gate(x, torch.ones(1, 1, 3), backend="triton")


def test_bad_inputs():
    mlp, conv, w = _gate_fns(4, torch.float32)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\], got shape \(4, 3\)"):
        gate.channel_gate(torch.randn(4, 3), mlp)
    with pytest.raises(ValueError, match=r"got shape \(10,\)"):
        gate.eca_gate(torch.randn(10), w)
    with pytest.raises(ValueError, match=r"gate_fn returned shape \(2, 3\), expected \(2, 5\)"):
        gate.channel_gate(torch.randn(1, 5, 3, 3), lambda p: p[:, :3])
    with pytest.raises(ValueError, match=r"spatial_fn returned shape \(1, 2, 3, 3\), expected \(1, 1, 3, 3\)"):
        gate.cbam_gate(torch.randn(1, 4, 3, 3), mlp, lambda p: p)
    with pytest.raises(ValueError, match=r"odd k, got shape \(1, 1, 4\)"):
        gate.eca_gate(torch.randn(1, 4, 3, 3), torch.ones(1, 1, 4))
    with pytest.raises(ValueError, match="empty"):
        gate.eca_gate(torch.randn(0, 4, 3, 3), w)


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool, torch.complex64], ids=str)
def test_non_float_maps_are_refused_up_front(dtype):
    """Not torch's "could not infer output dtype" from deep inside: the op, the argument, the dtype."""
    mlp, conv, w = _gate_fns(4, torch.float32)
    x = torch.ones(1, 4, 3, 3, dtype=dtype)
    for backend in ("reference", "cpu"):
        with pytest.raises(ValueError, match=rf"eca_gate: x must be a floating-point feature map, got dtype {dtype}"):
            gate.eca_gate(x, w, backend=backend)
        with pytest.raises(ValueError, match="channel_gate: x must be a floating-point"):
            gate.channel_gate(x, mlp, backend=backend)
        with pytest.raises(ValueError, match="spatial_gate: x must be a floating-point"):
            gate.spatial_gate(x, conv, backend=backend)
        with pytest.raises(ValueError, match="cbam_gate: x must be a floating-point"):
            gate.cbam_gate(x, mlp, conv, backend=backend)
    with pytest.raises(ValueError, match=r"eca_gate: weight must be a floating-point tensor .* got torch.int64"):
        gate.eca_gate(torch.randn(1, 4, 3, 3), torch.ones(1, 1, 3, dtype=torch.int64))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_cbam_gate_params_of_plain_callables(backend):
    """Plain callables' tensors passed in channel_params / spatial_params get their gradients
    from the fused backends too (before, cbam_gate had no way to name them: none came back)."""
    g = torch.Generator().manual_seed(0)
    w1, w2 = (torch.randn(4, 4, generator=g, requires_grad=True) for _ in range(2))
    cw = torch.randn(1, 2, 3, 3, generator=g, requires_grad=True)
    x = torch.randn(2, 4, 5, 5, generator=g, requires_grad=True)
    y = gate.cbam_gate(x, lambda p: torch.tanh(p @ w1) @ w2, lambda p: F.conv2d(p, cw, padding=1), backend=backend,
                       channel_params=[w1, w2], spatial_params=[cw])
    got = torch.autograd.grad(y.square().sum(), [x, w1, w2, cw])
    y = gate.cbam_gate(x, lambda p: torch.tanh(p @ w1) @ w2, lambda p: F.conv2d(p, cw, padding=1), backend="reference")
    want = torch.autograd.grad(y.square().sum(), [x, w1, w2, cw])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_nan_propagates(backend):
    mlp, conv, w = _gate_fns(4, torch.float32)
    x = torch.randn(1, 4, 5, 5)
    x[0, 1, 2, 2] = float("nan")
    assert torch.isnan(gate.cbam_gate(x, mlp, conv, backend=backend)).any()
    assert torch.isnan(gate.eca_gate(x, w, backend=backend)).any()
