"""Agent attention: Hypothesis properties of every CPU-runnable backend against the float64
reference (``_property.compare``): the output and the gradient of every input (q, k, v, the
agent tokens, both biases), over sizes down to 1 (one agent, one query, one key, ``M != N``,
``D = 1``), strided / broadcast layouts, the four float dtypes, and bf16 autocast.

The Triton backend runs the same properties under the interpreter in ``test_agent_triton.py``.
``-m slow`` runs thousands of cases; ``ATTNZOO_PROPERTY_EXAMPLES`` overrides the default count.
"""
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import pytest
import torch
from _property import DTYPES, TOL, compare, layouts_st, randn, settings_for, sizes
from hypothesis import given
from hypothesis import strategies as st

from attnzoo.ops.agent import agent_attention

NAMES = ("q", "k", "v", "agent_tokens", "agent_bias", "query_bias")


@dataclass
class Case:
    B: int
    heads: int
    N: int  # queries
    M: int  # keys
    A: int  # agents
    D: int
    biases: Tuple[bool, bool]
    scale: Optional[float]
    dtype: torch.dtype
    layouts: Dict[str, str]
    grad_of: Tuple[str, ...]
    seed: int

    def values(self):
        shapes = {"q": (self.B, self.heads, self.N, self.D), "k": (self.B, self.heads, self.M, self.D),
                  "v": (self.B, self.heads, self.M, self.D), "agent_tokens": (self.B, self.heads, self.A, self.D),
                  "agent_bias": (self.heads, self.A, self.M), "query_bias": (self.heads, self.N, self.A)}
        present = dict(zip(NAMES, (True,) * 4 + self.biases))
        return {n: randn(s, (n, self.seed), 0.5 if "bias" in n else 1.0) if present[n] else None
                for n, s in shapes.items()}

    def floors(self):
        # Gradients that are exactly zero, each the difference of two ~1 terms in the backend:
        # one agent makes P2 = 1 (dq, the query bias's); one key makes P1 = 1 and every agent's
        # V_A the same value, so neither softmax matters (all but dv).
        floors = {}
        if self.A == 1:
            floors.update(q=1.0, query_bias=1.0)
        if self.M == 1:
            floors.update({n: 1.0 for n in NAMES if n != "v"})
        return floors

    def check(self, backend: str, autocast: Optional[torch.dtype] = None, device: str = "cpu"):
        values = self.values()
        grad_of = tuple(n for n in self.grad_of if values[n] is not None)
        compare(agent_attention, values, grad_of, backend, self.dtype, layouts=self.layouts,
                kwargs=dict(scale=self.scale), autocast=autocast, seed=self.seed, device=device,
                floors=self.floors())


@st.composite
def cases(draw, dtypes=DTYPES, max_tokens=20, max_agents=10, max_dim=12, max_batch=3):
    tokens = st.integers(1, max_tokens)
    biases = (draw(st.booleans()), draw(st.booleans()))
    present = [n for n, p in zip(NAMES, (True,) * 4 + biases) if p]
    # mostly every gradient; sometimes a subset (the backward skips what is not asked for)
    grad_of = tuple(present) if draw(st.integers(0, 3)) else tuple(
        draw(st.lists(st.sampled_from(present), min_size=1, max_size=len(present), unique=True)))
    return Case(
        B=draw(st.integers(1, max_batch)), heads=draw(st.integers(1, 3)), N=draw(tokens), M=draw(tokens),
        A=draw(st.integers(1, max_agents)), D=draw(st.integers(1, max_dim)), biases=biases,
        scale=draw(st.none() | st.floats(0.05, 1.5)), dtype=draw(st.sampled_from(dtypes)),
        layouts={n: draw(layouts_st) for n in NAMES}, grad_of=grad_of, seed=draw(st.integers(0, 2 ** 16)))


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
    """float32 inputs under bf16 autocast, forward and backward, against the float64 reference."""
    @settings_for(n)
    @given(case=cases(dtypes=(torch.float32,)))
    def prop(case):
        case.check(backend, autocast=torch.bfloat16)

    prop()


@pytest.mark.parametrize("n", sizes(40, 500))
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_autocast_is_cast(n, backend):
    """The attention ops' autocast policy: under bf16 autocast every input, biases included, is cast
    to bf16 and the op runs with autocast off: the same output, bit for bit, as the op on pre-cast
    inputs, and the gradients through that cast, in the inputs' dtype. The cpu backend's own
    backward also runs inside the autocast region; the reference's autograd graph follows the
    ambient state there, so its backward runs after the region, as in training."""
    @settings_for(n)
    @given(case=cases(dtypes=(torch.float32, torch.bfloat16, torch.float16)))
    def prop(case):
        values = case.values()
        dy = randn((case.B, case.heads, case.N, case.D), ("dy", case.seed)).to(torch.bfloat16)
        runs = []
        for enabled in (False, True):
            leaves = {n: (t.to(case.dtype).requires_grad_() if t is not None else None) for n, t in values.items()}
            wrt = [t for t in leaves.values() if t is not None]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
                ins = {n: (t if enabled or t is None else t.to(torch.bfloat16)) for n, t in leaves.items()}
                y = agent_attention(**ins, scale=case.scale, backend=backend)
                grads = torch.autograd.grad(y, wrt, dy, retain_graph=True) if backend == "cpu" else ()
            grads = grads or torch.autograd.grad(y, wrt, dy)
            runs.append((y, *grads))
        for i, (a, b) in enumerate(zip(*runs)):
            assert a.dtype == (torch.bfloat16 if i == 0 else case.dtype)
            torch.testing.assert_close(a, b, rtol=0, atol=0)

    prop()


# (B, heads, N, M, A, D): the degenerate corners, run on every dtype whatever Hypothesis draws
DEGENERATE = [(1, 1, 1, 1, 1, 1), (2, 1, 1, 5, 1, 3), (1, 2, 7, 1, 3, 2), (1, 1, 5, 3, 1, 1), (3, 2, 1, 1, 4, 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", DEGENERATE, ids=["B{}-h{}-N{}-M{}-A{}-D{}".format(*s) for s in DEGENERATE])
def test_degenerate_sizes(shape, dtype):
    for biases in ((True, True), (False, False)):
        Case(*shape, biases=biases, scale=None, dtype=dtype, layouts={}, grad_of=NAMES, seed=7).check("cpu")


def test_tolerances_cover_every_dtype():
    assert set(TOL) >= set(DTYPES)
