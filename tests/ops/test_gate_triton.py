"""Triton gate backend against the reference oracle, forward and every gradient: the
differentiable primitives of ``triton.py`` directly, and the public gates of ``__init__``
(whose fused Function drives ``triton.py``'s raw passes) with backend="triton".

Where the kernels run (in process, or a child pytest under the interpreter): ``_triton_harness.py``.
For fast iteration on this file alone: ``TRITON_INTERPRET=1 pytest tests/ops/test_gate_triton.py``.
"""
import copy
import importlib
import importlib.util
import zlib

import pytest
import torch
import test_gate_props as props
from _property import settings_for, sizes
from _triton_harness import kernel_module, poison_empty
from hypothesis import given
from torch import nn

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from attnzoo.ops import gate  # noqa: E402
from attnzoo.ops.gate import reference  # noqa: E402

_CHILD_FLAG = "_ATTNZOO_GATE_TRITON_CHILD"


DEVICE, tri, kernel_test, test_kernels_in_interpreter_subprocess = kernel_module(
    __file__, _CHILD_FLAG, "attnzoo.ops.gate.triton", timeout=600)


# --------------------------------------------------------------------------- cases

LOW = (torch.bfloat16, torch.float16)
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# |actual - expected| <= atol * max|expected| + rtol * |expected|; low precision is compared
# against an fp32 reference of the same (rounded) inputs, so it is one output rounding off
TOL = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (2e-2, 2e-2),
}

CASES = [
    ((1, 5, 7, 9), "nchw"),
    ((2, 16, 3, 3), "nchw"),
    ((2, 33, 11, 6), "nchw"),
    ((1, 3, 13, 11), "nchw"),  # H*W > 128: pools reduce over several tiles
    ((2, 33, 11, 6), "channels_last"),
    ((2, 5, 7, 9), "cropped"),  # W is a crop of a wider map: H and W do not merge
]


def _case_id(case):
    (B, C, H, W), layout = case
    return f"B{B}-C{C}-H{H}-W{W}" + ("" if layout == "nchw" else f"-{layout}")


cases = pytest.mark.parametrize("shape,layout", CASES, ids=[_case_id(c) for c in CASES])
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _ref_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _untied(shape, g):
    """A map whose max reductions have clear winners in any dtype.

    Low-precision rounding creates exact ties, where the reference splits the max
    gradient but an argmax gives it to one element, and the public gates compute
    ``cscale`` in a different precision than the fp32 reference, which reorders near
    ties. So every pixel has one channel of at least 8 among values of magnitude
    about 1 (winning under any cscale ratio below 8), and every (b, c) row's maximum
    over H, W is raised 25% above the rest.
    """
    B, C, H, W = shape
    x = 0.25 * torch.randn(B, C, H * W, generator=g)
    win = torch.randint(0, C, (B, 1, H * W), generator=g)
    x.scatter_(1, win, 8 + torch.rand(B, 1, H * W, generator=g) * 8)
    top, i = x.max(dim=2, keepdim=True)
    x.scatter_(2, i, torch.where(top > 0, top * 1.25, top * 0.75))
    return x.view(shape)


def _map(shape, layout, dtype, *key):
    """A leaf feature map in ``layout``, ``dtype`` and on DEVICE, plus its reference twin on CPU."""
    g = _gen(shape, layout, dtype, *key)
    B, C, H, W = shape
    x = _untied(shape, g) if dtype in LOW else torch.randn(shape, generator=g, dtype=torch.float64)
    x_ref = x.to(dtype).to(_ref_dtype(dtype)).clone().requires_grad_()
    x = x.to(device=DEVICE, dtype=dtype)  # the layout is made on the device: a copy would not keep it
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "cropped":
        x = torch.cat([x, torch.zeros_like(x[..., :3])], dim=3)[..., :W]
        assert H == 1 or x.stride(2) != W * x.stride(3)
    return x.requires_grad_(), x_ref, g


def _leaf(t, dtype):
    """``t`` as a grad-requiring leaf in ``dtype`` and in the reference precision."""
    t = t.to(dtype)
    return t.clone().to(DEVICE).requires_grad_(), t.to(_ref_dtype(dtype)).clone().requires_grad_()


def _check(actual, expected, dtype, what, slack=0.0):
    assert actual is not None and expected is not None, f"{what}: missing"
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    rtol, atol = TOL[dtype]
    expected = expected.detach()
    actual = actual.detach().cpu().to(expected.dtype)
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale + slack, msg=lambda m: f"{what}: {m}")


def _backward(outs, g):
    """Backpropagate random upstream gradients (the same values into both runs)."""
    total = 0
    for o in outs:
        if o is not None:
            dy = torch.randn(o.shape, generator=g, dtype=torch.float64)
            total = total + (o * dy.to(o.dtype).to(o.device)).sum()
    total.backward()


@pytest.fixture(autouse=True)
def _poisoned_buffers(monkeypatch):
    if tri is not None:
        poison_empty(monkeypatch, tri)


# --------------------------------------------------------------------------- primitives

@kernel_test
@pytest.mark.parametrize("with_max", [True, False], ids=["avg_max", "avg"])
@dtypes
@cases
def test_channel_pool(shape, layout, dtype, with_max):
    x, x_ref, g = _map(shape, layout, dtype, "channel_pool", with_max)
    outs = tri.channel_pool(x, with_max)
    refs = reference.channel_pool(x_ref, with_max)
    assert (outs[1] is None) == (not with_max)
    for name, o, r in zip(("avg", "max"), outs, refs):
        if r is not None:
            _check(o, r, dtype, name)
    state = g.get_state()
    _backward(outs, g)
    g.set_state(state)
    _backward(refs, g)
    _check(x.grad, x_ref.grad, dtype, "dx")


@kernel_test
@pytest.mark.parametrize("use_cscale", [False, True], ids=["x", "x_cscale"])
@dtypes
@cases
def test_spatial_pool(shape, layout, dtype, use_cscale):
    x, x_ref, g = _map(shape, layout, dtype, "spatial_pool", use_cscale)
    cs = cs_ref = None
    if use_cscale:
        cs, cs_ref = _leaf(0.5 + 0.5 * torch.rand(shape[:2], generator=g), dtype)
    out = tri.spatial_pool(x, cs)
    ref = reference.spatial_pool(x_ref, cs_ref)
    _check(out, ref, dtype, "out")
    state = g.get_state()
    _backward([out], g)
    g.set_state(state)
    _backward([ref], g)
    _check(x.grad, x_ref.grad, dtype, "dx")
    if use_cscale:
        _check(cs.grad, cs_ref.grad, dtype, "dcscale")


@kernel_test
@pytest.mark.parametrize("scales", ["c", "s", "cs"])
@dtypes
@cases
def test_gate_scale(shape, layout, dtype, scales):
    B, C, H, W = shape
    x, x_ref, g = _map(shape, layout, dtype, "gate_scale", scales)
    cs = cs_ref = ss = ss_ref = None
    if "c" in scales:
        cs, cs_ref = _leaf(torch.rand(B, C, generator=g), dtype)
    if "s" in scales:
        ss, ss_ref = _leaf(torch.rand(B, H, W, generator=g), dtype)
    out = tri.gate_scale(x, cs, ss)
    ref = reference.gate_scale(x_ref, cs_ref, ss_ref)
    _check(out, ref, dtype, "out")
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    state = g.get_state()
    _backward([out], g)
    g.set_state(state)
    _backward([ref], g)
    _check(x.grad, x_ref.grad, dtype, "dx")
    if cs is not None:
        _check(cs.grad, cs_ref.grad, dtype, "dcscale")
    if ss is not None:
        _check(ss.grad, ss_ref.grad, dtype, "dsscale")


@kernel_test
@pytest.mark.parametrize("wants", ["x", "c", "s", "cs"])
def test_gate_scale_partial_grads(wants):
    """Only the requested gradients are produced, and they are right on their own."""
    B, C, H, W = 2, 5, 7, 9
    g = _gen("partial", wants)
    x0, cs0, ss0 = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((B, C, H, W), (B, C), (B, H, W)))
    leaves = {k: t.clone().to(DEVICE).requires_grad_(k in wants) for k, t in zip("xcs", (x0, cs0, ss0))}
    leaves_ref = {k: t.clone().requires_grad_(k in wants) for k, t in zip("xcs", (x0, cs0, ss0))}
    dy = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    (tri.gate_scale(*leaves.values()) * dy.to(DEVICE)).sum().backward()
    (reference.gate_scale(*leaves_ref.values()) * dy).sum().backward()
    for k in "xcs":
        if k in wants:
            _check(leaves[k].grad, leaves_ref[k].grad, torch.float64, f"d{k}")
        else:
            assert leaves[k].grad is None


@kernel_test
def test_gate_scale_without_scales_is_identity():
    x = torch.randn(1, 3, 4, 5, device=DEVICE)
    assert tri.gate_scale(x) is x


@kernel_test
@pytest.mark.parametrize("used", ["avg", "max"])
def test_channel_pool_one_output_used(used):
    """An unused output's gradient arrives as None; the other still flows."""
    x, x_ref, g = _map((2, 5, 7, 9), "nchw", torch.float64, "one_output", used)
    k = 0 if used == "avg" else 1
    (tri.channel_pool(x)[k] * 3).sum().backward()
    (reference.channel_pool(x_ref)[k] * 3).sum().backward()
    _check(x.grad, x_ref.grad, torch.float64, "dx")


@kernel_test
def test_pools_of_negative_maps():
    """Masked lanes read as -inf for the max: a padding zero must never win."""
    shape = (2, 5, 7, 9)
    x = -1 - torch.rand(shape, generator=_gen("negative"), dtype=torch.float64)
    avg, mx = tri.channel_pool(x.to(DEVICE))
    _check(mx, x.amax(dim=(2, 3)), torch.float64, "channel max")
    _check(tri.spatial_pool(x.to(DEVICE)), reference.spatial_pool(x), torch.float64, "spatial pool")


@kernel_test
def test_pool_maxima_in_later_tiles():
    """The running argmax carries across tiles: maxima sit in the last tile of each reduction."""
    x0 = torch.randn(1, 33, 13, 11, generator=_gen("later_tiles"), dtype=torch.float64)  # 143 pixels, 33 channels
    x0[..., -1, -1] += 10  # channel pool: last pixel of every (b, c) row
    x0[:, -1] += 20  # spatial pool: last channel at every pixel
    for pool in ("channel_pool", "spatial_pool"):
        x, x_ref = x0.clone().to(DEVICE).requires_grad_(), x0.clone().requires_grad_()
        out, ref = getattr(tri, pool)(x), getattr(reference, pool)(x_ref)
        out = out[1] if pool == "channel_pool" else out[:, 0]  # the max only
        ref = ref[1] if pool == "channel_pool" else ref[:, 0]
        _check(out, ref, torch.float64, pool)
        out.sum().backward()
        ref.sum().backward()
        _check(x.grad, x_ref.grad, torch.float64, f"{pool} dx")


# --------------------------------------------------------------------------- public gates

def _gate_modules(C, seed):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hidden = max(C // 4, 2)
        mlp = nn.Sequential(nn.Linear(C, hidden), nn.ReLU(), nn.Linear(hidden, C))
        # bias-free as in CBAM: BN would cancel a bias, leaving it a gradient of pure round-off
        spatial = nn.Sequential(nn.Conv2d(2, 1, 7, padding=3, bias=False), nn.BatchNorm2d(1))
        eca = nn.Module()
        eca.weight = nn.Parameter(0.5 * torch.randn(1, 1, 3))
    return nn.ModuleDict({"mlp": mlp, "spatial": spatial, "eca": eca})


GATES = {
    "channel_gate": lambda x, m, backend: gate.channel_gate(x, m["mlp"], backend=backend),
    "spatial_gate": lambda x, m, backend: gate.spatial_gate(x, m["spatial"], backend=backend),
    "cbam_gate": lambda x, m, backend: gate.cbam_gate(x, m["mlp"], m["spatial"], backend=backend),
    "eca_gate": lambda x, m, backend: gate.eca_gate(x, m["eca"].weight, backend=backend),
}
# the learned parameters each gate must send gradients to
GATE_PARAMS = {"channel_gate": ("mlp",), "spatial_gate": ("spatial",), "cbam_gate": ("mlp", "spatial"),
               "eca_gate": ("eca",)}


def _gate_run(op, x, mods, backend, g):
    """One forward and backward of a gate: the output and every gradient, by name."""
    out = GATES[op](x, mods, backend)
    _backward([out], g)
    res = {"out": out, "dx": x.grad}
    for prefix in GATE_PARAMS[op]:
        for name, p in mods[prefix].named_parameters():
            res[f"{prefix}.{name}.grad"] = p.grad
    return res


@kernel_test
@pytest.mark.parametrize("op", list(GATES))
@dtypes
@cases
def test_public_gate(op, shape, layout, dtype):
    x, x_ref, g = _map(shape, layout, dtype, op)
    mods_ref = _gate_modules(shape[1], zlib.crc32(op.encode())).to(_ref_dtype(dtype))
    mods = copy.deepcopy(mods_ref).to(device=DEVICE, dtype=dtype)
    mods_same = copy.deepcopy(mods_ref).to(dtype)
    state = g.get_state()

    def run(x, mods, backend):
        g.set_state(state)  # the same upstream gradient for every run
        return _gate_run(op, x, mods, backend, g)

    got = run(x, mods, "triton")
    want = run(x_ref, mods_ref, "reference")
    slack = {}
    if dtype in LOW:
        # The MLP, conv and BN run in low precision too, which costs far more than the
        # kernels' one rounding: allow twice the error of the reference backend in this dtype.
        same = run(x.detach().cpu().clone().requires_grad_(), mods_same, "reference")
        slack = {k: 2 * (same[k].detach().to(want[k].dtype) - want[k].detach()).abs().max().item() for k in want}
    assert got.keys() == want.keys()
    for k in want:
        _check(got[k], want[k], dtype, k, slack.get(k, 0.0))


@kernel_test
@pytest.mark.parametrize("op", list(GATES))
def test_public_gate_no_grad(op):
    """Inference skips the autograd Function: the forward passes alone must match."""
    x, x_ref, _ = _map((2, 33, 11, 6), "channels_last", torch.float64, op, "no_grad")
    mods_ref = _gate_modules(33, zlib.crc32(op.encode())).double()
    mods = copy.deepcopy(mods_ref).to(DEVICE)
    with torch.no_grad():
        _check(GATES[op](x, mods, "triton"), GATES[op](x_ref, mods_ref, "reference"), torch.float64, "out")


# --------------------------------------------------------------------------- torch.compile

@kernel_test
@pytest.mark.parametrize("op", list(GATES))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_compile_traces_the_custom_ops(monkeypatch, op, layout):
    """torch.compile(fullgraph=True) of a gate with backend="triton": the gate is composed from
    the primitives' custom ops (the fused Function cannot be traced), and its output and every
    gradient equal the eager reference's."""
    calls = []
    for name in ("pool_channels", "pool_spatial", "scale"):
        monkeypatch.setattr(tri, name, lambda *a, _f=getattr(tri, name), _n=name: calls.append(_n) or _f(*a))
    shape = (2, 33, 11, 6)
    x, x_ref, g = _map(shape, layout, torch.float64, op, "compile")
    mods_ref = _gate_modules(shape[1], zlib.crc32(op.encode())).double()
    mods = copy.deepcopy(mods_ref).to(DEVICE)
    state = g.get_state()
    torch._dynamo.reset()
    compiled = torch.compile(GATES[op], fullgraph=True, backend="aot_eager")
    g.set_state(state)  # the same upstream gradient for both runs
    out = compiled(x, mods, "triton")
    _backward([out], g)
    got = {"out": out, "dx": x.grad}
    g.set_state(state)
    want = _gate_run(op, x_ref, mods_ref, "reference", g)
    for prefix in GATE_PARAMS[op]:
        for name, p in mods[prefix].named_parameters():
            got[f"{prefix}.{name}.grad"] = p.grad
    assert calls and set(calls) <= {"pool_channels", "pool_spatial", "scale"}  # the kernels ran
    assert got.keys() == want.keys()
    for k in want:
        _check(got[k], want[k], torch.float64, k)


# --------------------------------------------------------------------------- properties
# The properties of test_gate_props.py on the Triton backend, on shapes the interpreter runs
# quickly (still spanning partial tiles: C up to 20 of 16-channel tiles, H*W up to 42 of 16..64).

# The interpreter truncates fp32 -> bf16 on every store (even with fp_downcast_rounding="rtne"),
# where a GPU rounds to nearest: a bias of up to one bf16 ulp on the pooled maps the gate
# callables see, which a gradient that cancels (the spatial conv's weight) amplifies past any
# fixed tolerance (25% seen; the cpu backend with the same truncation gives the same error).
# So the interpreter's properties leave bf16 out; on a GPU they run every dtype.
_PROPERTY_DTYPES = DTYPES if DEVICE == "cuda" else [d for d in DTYPES if d != torch.bfloat16]


@kernel_test
@pytest.mark.parametrize("n", sizes(60, 600))
def test_properties_match_reference(n):
    @settings_for(n)
    @given(case=props.cases(dtypes=_PROPERTY_DTYPES, max_channels=20, max_side=7, max_batch=2))
    def prop(case):
        case.check("triton", device=DEVICE)

    prop()


@kernel_test
@pytest.mark.parametrize("n", sizes(10, 100))
def test_properties_under_bf16_autocast(n):
    @settings_for(n)
    @given(case=props.cases(dtypes=(torch.float32,), max_channels=12, max_side=5, max_batch=2))
    def prop(case):
        case.check("triton", device=DEVICE, autocast=torch.bfloat16, tol=props.TOL[torch.float32])

    prop()


@kernel_test
@pytest.mark.parametrize("n", sizes(30, 300))
def test_scaled_pool_finds_the_true_maximum(n):
    @settings_for(n)
    @given(case=props.scaled_pools(max_channels=40, max_side=5))
    def prop(case):
        props.check_scaled_pool(tri.pool_spatial, **case, device=DEVICE)

    prop()


@kernel_test
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_degenerate_sizes(dtype):
    for shape in props.DEGENERATE:
        for which in props.GATES:
            props.Case(which, shape, hidden=1, kernel=3, eca_k=3, dtype=dtype, layouts={},
                       grad_of=("x", "w1", "b1", "w2", "cw", "cb", "ew"), seed=3).check("triton", device=DEVICE)
