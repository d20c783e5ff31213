"""Gates (CBAM channel / spatial, ECA): Hypothesis properties of every CPU-runnable backend
against the float64 reference (``_property.compare``): the output, the map's gradient and the
gradient of every learned tensor (MLP, spatial conv, ECA weight), over sizes down to 1 (one
channel, 1x1 maps, batch 1), NCHW / channels_last / strided / broadcast maps and weights, the
four float dtypes, and bf16 autocast.

The learned parts are plain callables over tensors passed in ``params``, so the harness can
hand them in any layout and ask for their gradients. The Triton backend runs the same
properties under the interpreter in ``test_gate_triton.py``.
"""
import contextlib
from dataclasses import dataclass
from typing import Dict, Tuple

import pytest
import torch
import torch.nn.functional as F
from _property import (DTYPES, TOL, arrange, check_close, compare, gen, layouts_st, map_layouts_st, randn,
                       settings_for, sizes)
from hypothesis import assume, given
from hypothesis import strategies as st

from attnzoo.ops import gate

GATES = ("channel_gate", "channel_gate_avg", "spatial_gate", "cbam_gate", "eca_gate")
LOW = (torch.bfloat16, torch.float16)


# The learned parts stand for a caller's modules, whose own rounding is not the op's: they
# compute in fp32 at least, as a caller's fp32 gate would, so that a half-precision case
# measures the op's precision alone. With ``fp32_gates`` they also keep out of autocast;
# otherwise they follow it (the op runs them under the caller's state). ``pooled`` is the
# map's dtype: the op hands the callables pooled maps in it, so they round their input to it,
# which is a no-op on the backend and puts the same rounding into the float64 oracle (a
# gradient that cancels, e.g. w2's over the avg and max rows, would amplify it otherwise).
def _gate_fn(fn, fp32_gates, pooled):
    def run(p, *ts):
        p = p.to(pooled).to(p.dtype)
        p, *ts = [t.to(torch.promote_types(t.dtype, torch.float32)) for t in (p, *ts)]
        with torch.autocast("cpu", enabled=False) if fp32_gates else contextlib.nullcontext():
            return fn(p, *ts)
    return run


def _mlp(w1, b1, w2, fp32_gates, pooled):
    # tanh: smooth, and bounded logits keep every channel scale within 8x of the others (see _untied)
    run = _gate_fn(lambda p, w1, b1, w2: F.linear(torch.tanh(F.linear(p, w1, b1)), w2), fp32_gates, pooled)
    return lambda p: run(p, w1, b1, w2)


def _conv(cw, cb, fp32_gates, pooled):
    run = _gate_fn(lambda p, cw, cb: F.conv2d(p, cw, cb, padding=cw.shape[-1] // 2), fp32_gates, pooled)
    return lambda p: run(p, cw, cb)


def gate_op(x, w1=None, b1=None, w2=None, cw=None, cb=None, ew=None, *, which, backend, fp32_gates=False,
            pooled=None):
    """One public gate with its learned parts built from the given tensors."""
    pooled = pooled or x.dtype
    if which in ("channel_gate", "channel_gate_avg"):
        return gate.channel_gate(x, _mlp(w1, b1, w2, fp32_gates, pooled), use_max=which == "channel_gate",
                                 backend=backend, params=[w1, b1, w2])
    if which == "spatial_gate":
        return gate.spatial_gate(x, _conv(cw, cb, fp32_gates, pooled), backend=backend, params=[cw, cb])
    if which == "cbam_gate":
        return gate.cbam_gate(x, _mlp(w1, b1, w2, fp32_gates, pooled), _conv(cw, cb, fp32_gates, pooled),
                              backend=backend, channel_params=[w1, b1, w2], spatial_params=[cw, cb])
    return gate.eca_gate(x, ew, backend=backend)


def _untied(shape, key) -> torch.Tensor:
    """A map whose max reductions have clear winners after rounding to half precision, and
    under any channel scales within 8x of each other (CBAM's spatial max of ``x * cscale``).

    The reference's amax splits a tied maximum's gradient where an argmax gives it to one
    element, and a backend computing cscale in low precision reorders near ties: either is a
    right answer, neither is comparable. Every pixel gets one channel of at least 8 among
    values of magnitude ~0.25, and every (b, c) row's maximum over H, W is raised by 25%.
    """
    B, C, H, W = shape
    g = gen("untied", tuple(shape), key)
    x = 0.25 * torch.randn(B, C, H * W, generator=g, dtype=torch.float64)
    win = torch.randint(0, C, (B, 1, H * W), generator=g)
    x.scatter_(1, win, 8 + 8 * torch.rand(B, 1, H * W, generator=g, dtype=torch.float64))
    top, i = x.max(dim=2, keepdim=True)
    x.scatter_(2, i, torch.where(top > 0, top * 1.25, top * 0.75))
    return x.view(shape)


@dataclass
class Case:
    which: str
    shape: Tuple[int, int, int, int]
    hidden: int
    kernel: int  # spatial conv
    eca_k: int
    dtype: torch.dtype
    layouts: Dict[str, str]
    grad_of: Tuple[str, ...]
    seed: int

    def values(self, untied: bool):
        B, C, H, W = self.shape
        key = (self.which, self.seed)
        x = _untied(self.shape, key) if untied else randn(self.shape, ("x", key))
        # weights scaled to the pooled values (~16 in an untied map): a saturated tanh or sigmoid
        # has a gradient that low-precision callables round to zero
        mag = 16.0 if untied else 1.0
        params = {
            "w1": randn((self.hidden, C), ("w1", key), 0.5 / C ** 0.5 / mag),
            "b1": randn((self.hidden,), ("b1", key), 0.1),
            "w2": randn((C, self.hidden), ("w2", key), 0.3 / self.hidden ** 0.5),
            "cw": randn((1, 2, self.kernel, self.kernel), ("cw", key), 0.3 / self.kernel / mag),
            "cb": randn((1,), ("cb", key), 0.1), "ew": randn((1, 1, self.eca_k), ("ew", key), 0.5),
        }
        used = {"channel_gate": ("w1", "b1", "w2"), "channel_gate_avg": ("w1", "b1", "w2"),
                "spatial_gate": ("cw", "cb"), "cbam_gate": ("w1", "b1", "w2", "cw", "cb"), "eca_gate": ("ew",)}
        return {"x": x, **{n: params[n] for n in used[self.which]}}

    def check(self, backend: str, autocast=None, device: str = "cpu", tol=None):
        uses_max = self.which not in ("channel_gate_avg", "eca_gate")
        # half precision rounds enough to flip near ties
        values = self.values(untied=uses_max and self.dtype in LOW)
        grad_of = tuple(n for n in self.grad_of if n in values)
        compare(gate_op, values, grad_of, backend, self.dtype, layouts=self.layouts,
                kwargs=dict(which=self.which, fp32_gates=True, pooled=torch.float32 if autocast else self.dtype),
                autocast=autocast, seed=self.seed, device=device, tol=tol)


@st.composite
def cases(draw, dtypes=DTYPES, gates=GATES, max_channels=12, max_side=9, max_batch=3):
    which = draw(st.sampled_from(gates))
    shape = (draw(st.integers(1, max_batch)), draw(st.integers(1, max_channels)),
             draw(st.integers(1, max_side)), draw(st.integers(1, max_side)))
    names = ("x", "w1", "b1", "w2", "cw", "cb", "ew")
    # mostly every gradient; sometimes a subset (the map's or the gate parameters' alone)
    grad_of = names if draw(st.integers(0, 3)) else tuple(
        draw(st.lists(st.sampled_from(names), min_size=1, max_size=len(names), unique=True)))
    layouts = {n: draw(map_layouts_st if n == "x" else layouts_st) for n in names}
    # a conv weight comes contiguous, channels_last (model.to(memory_format=...)) or as a view:
    # torch's fallback conv (slow_conv2d) cannot take the backward of some other permutations of
    # a [1, 2, k, k] weight (its size-1 dim's stride) with the channels_last map the cpu backend
    # hands the spatial conv (a PyTorch limitation, not reachable from a module's weight)
    layouts["cw"] = draw(st.sampled_from(("contiguous", "channels_last", "sliced", "expanded")))
    return Case(which=which, shape=shape, hidden=draw(st.integers(1, 4)), kernel=draw(st.sampled_from((1, 3, 7))),
                eca_k=draw(st.sampled_from((1, 3, 5))), dtype=draw(st.sampled_from(dtypes)), layouts=layouts,
                grad_of=grad_of, seed=draw(st.integers(0, 2 ** 16)))


@pytest.mark.parametrize("n", sizes(500, 5000))
def test_cpu_matches_reference(n):
    @settings_for(n)
    @given(case=cases())
    def prop(case):
        case.check("cpu")

    prop()


@pytest.mark.parametrize("n", sizes(60, 800))
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_under_bf16_autocast(n, backend):
    """float32 maps under bf16 autocast, with fp32 gate callables kept out of it: the op's own
    passes turn autocast off, so the result holds float32's tolerance, not bf16's."""
    @settings_for(n)
    @given(case=cases(dtypes=(torch.float32,)))
    def prop(case):
        case.check(backend, autocast=torch.bfloat16, tol=TOL[torch.float32])

    prop()


@pytest.mark.parametrize("n", sizes(40, 500))
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_callables_follow_autocast(n, backend):
    """Under bf16 autocast the gate callables run in bf16 (the caller's state), forward and
    backward run, and every gate returns the map's dtype, also for fp16 maps (whose bf16 logits
    would otherwise promote the product to fp32). ECA, whose conv is the op's own, is unchanged
    bit for bit, backward included."""
    @settings_for(n)
    @given(case=cases(dtypes=(torch.float32, torch.bfloat16, torch.float16)))
    def prop(case):
        values = case.values(untied=True)
        runs = []
        for enabled in (False, True):
            leaves = {n: t.to(case.dtype).requires_grad_() for n, t in values.items()}
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
                y = gate_op(**leaves, which=case.which, backend=backend)
            assert y.dtype == case.dtype, (case.which, y.dtype)
            grads = torch.autograd.grad(y.float().sum(), list(leaves.values()))
            assert all(g.dtype == t.dtype and torch.isfinite(g).all() for g, t in zip(grads, leaves.values()))
            runs.append((y, *grads))
        if case.which == "eca_gate":
            for a, b in zip(*runs):
                torch.testing.assert_close(a, b, rtol=0, atol=0)

    prop()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gate_callables_see_the_callers_autocast(backend):
    seen = []

    def mlp(p):
        seen.append(torch.is_autocast_enabled("cpu"))
        return p * 0.5

    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gate.cbam_gate(x, mlp, lambda p: p[:, :1] + p[:, 1:], backend=backend).sum().backward()
    gate.channel_gate(x, mlp, backend=backend)
    assert seen == [True, False]


# (B, C, H, W): the degenerate corners, on every gate and dtype whatever Hypothesis draws
DEGENERATE = [(1, 1, 1, 1), (2, 1, 3, 1), (1, 5, 1, 1), (3, 2, 1, 4), (1, 1, 6, 7)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", DEGENERATE, ids=["B{}-C{}-H{}-W{}".format(*s) for s in DEGENERATE])
def test_degenerate_sizes(shape, dtype):
    for which in GATES:
        Case(which, shape, hidden=1, kernel=3, eca_k=3, dtype=dtype, layouts={},
             grad_of=("x", "w1", "b1", "w2", "cw", "cb", "ew"), seed=3).check("cpu")


@st.composite
def scaled_pools(draw, max_channels=64, max_side=6):
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, max_channels)), draw(st.integers(1, max_side)),
             draw(st.integers(1, max_side)))
    dtypes = (torch.bfloat16, torch.bfloat16, torch.float16, torch.float32)  # half maps tie the most
    return dict(shape=shape, dtype=draw(st.sampled_from(dtypes)),
                layout=draw(map_layouts_st), spread=draw(st.sampled_from((1e-3, 1e-3, 1e-2, 1.0))),
                seed=draw(st.integers(0, 2 ** 16)))


def check_scaled_pool(pool_spatial, shape, dtype, layout, spread, seed, device="cpu"):
    """``pool_spatial(x, cscale)``'s max and argmax over the channels are those of the exact
    products ``x * cscale``, whatever x's dtype."""
    x64, x = arrange(randn(shape, ("x", seed)), layout, dtype, seed)
    # nearly equal scales (an untrained MLP's) separate values that tie in half precision
    cs = (0.5 + spread * torch.rand(shape[:2], generator=gen("cs", seed), dtype=torch.float64)).float()
    prod = x64 * cs.double()[:, :, None, None]
    top2 = prod.topk(min(2, shape[1]), dim=1).values
    # a true maximum that float32 products resolve (the fused passes' precision for every dtype)
    assume(shape[1] == 1 or bool(((top2[:, 0] - top2[:, 1]) > 1e-5 * top2[:, 0].abs()).all()))
    x = x.detach().to(device) if device != "cpu" else x.detach()
    pooled, idx = pool_spatial(x, cs.to(device), True)
    assert pooled.dtype == dtype and pooled.shape == (shape[0], 2, *shape[2:])
    assert torch.equal(idx.view(shape[0], *shape[2:]).long().cpu(), prod.argmax(dim=1)), "argmax"
    check_close(pooled[:, 0], prod.amax(dim=1), dtype, "max")
    check_close(pooled[:, 1], prod.mean(dim=1), dtype, "mean")


@pytest.mark.parametrize("n", sizes(60, 800))
def test_spatial_pool_of_scaled_map_finds_the_true_maximum(n):
    """CBAM's spatial pool of ``x * cscale`` (a raw pass of the fused backends): its max and argmax
    are those of the exact products, for half maps too. Rounded to half, the products tie where
    the true maximum does not, and the max's gradient would go elsewhere."""
    @settings_for(n)
    @given(case=scaled_pools())
    def prop(case):
        check_scaled_pool(gate.cpu.pool_spatial, **case)

    prop()
