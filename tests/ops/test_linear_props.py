"""Property suite for linear attention (``linear_attention``, plain and magnitude-aware): every
CPU backend against the float64 reference, output and dq / dk / dv, on cases Hypothesis draws over

- sizes: batch 1..2, heads 1..3, N 1..70 (N = 1 and block-odd lengths), D 1..8 (odd D without
  RoPE; RoPE turns channel pairs, so D is even with it);
- maths: plain and magnitude-aware, with and without RoPE, default and custom scale and eps,
  feature magnitudes from ``elu(x - 2) + 1`` to ``elu(x + 1.5) + 1``;
- inputs: every layout of ``_property.LAYOUTS`` per tensor, the RoPE tables included
  (transposed, sliced, permuted, broadcast), every dtype with its tolerance, autocast bf16,
  gradients of all, some or none of q, k, v.

The Triton backend runs the same properties under the interpreter (``test_linear_triton.py``).
Shared harness: ``_property.py``; ``-m slow`` or ``ATTNZOO_PROPERTY_EXAMPLES`` for longer runs.
"""
import pytest
import torch
import torch.nn.functional as F
from _property import DTYPES, LAYOUTS, arrange, compare, randn, settings_for, sizes
from hypothesis import given
from hypothesis import strategies as st

from attnzoo.ops.linear import linear_attention

GRADS = (("q", "k", "v"), ("q", "k", "v"), ("q", "k", "v"), ("q",), ("k",), ("v",), ("k", "v"), ())


def run_op(q, k, v, cos=None, sin=None, *, backend, magnitude_aware, scale, eps):
    """The public op, as ``compare`` calls it (tensors and arguments by keyword)."""
    rope = None if cos is None else (cos, sin)
    return linear_attention(q, k, v, rope, magnitude_aware=magnitude_aware, scale=scale, eps=eps, backend=backend)


@st.composite
def cases(draw, dtypes=DTYPES, max_n: int = 70, max_d: int = 8, autocast: bool = False):
    """A case: ``(values, kwargs, layouts, dtype, grad_of, seed)``."""
    rope = draw(st.booleans())
    B, heads = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    N = draw(st.integers(1, 12) | st.integers(1, max_n))
    D = 2 * draw(st.integers(1, max_d // 2)) if rope else draw(st.integers(1, max_d))
    seed = draw(st.integers(0, 2 ** 16))
    shape = (B, heads, N, D)
    shift = draw(st.sampled_from([0.0, 0.0, -2.0, 1.5]))
    values = {n: F.elu(randn(shape, (n, seed)) + shift) + 1 for n in "qk"}  # features: non-negative
    values["v"] = randn(shape, ("v", seed))
    if rope:
        angle = torch.rand(N, D // 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 20
        values.update(cos=angle.cos(), sin=angle.sin())
    layouts = {n: draw(st.sampled_from(LAYOUTS)) for n in values}
    dtype = torch.float32 if autocast else draw(st.sampled_from(dtypes))
    kwargs = dict(magnitude_aware=draw(st.booleans()), scale=draw(st.sampled_from([None, None, 0.3, 1.7])),
                  eps=draw(st.sampled_from([1e-6, 1e-6, 1e-2])))
    return values, kwargs, layouts, dtype, draw(st.sampled_from(GRADS)), seed


def check(case, backend: str, device: str = "cpu", autocast=None) -> None:
    values, kwargs, layouts, dtype, grad_of, seed = case
    N, D = values["q"].shape[-2:]
    # Gradients that are ~eps in exact arithmetic but computed as differences of terms of size
    # ~1, judged against that size: with one token the output is v z / (z + eps) whatever q and k
    # (RoPE turns both alike); the plain form is invariant to q's scale, so with D = 1, to q.
    floors = {}
    if N == 1:
        floors.update(q=1.0, k=1.0)
    if D == 1 and not kwargs["magnitude_aware"]:
        floors.update(q=1.0)
    compare(run_op, values, grad_of, backend, dtype, layouts, kwargs, device=device, autocast=autocast, seed=seed,
            floors=floors)


def check_autocast_is_cast(case, backend: str, dtype: torch.dtype, device: str = "cpu") -> None:
    """Under bf16 autocast (backward inside it) the output is exactly that of the op on q, k, v cast
    to bf16 without autocast, and the gradients those through that cast (in the inputs' dtype); the
    reference's backward (its autograd graph) alone follows the ambient autocast."""
    values, kwargs, layouts, _, _, seed = case
    runs = []
    for enabled in (False, True):
        ins = {n: arrange(t, layouts[n], dtype, seed)[1].to(device) for n, t in values.items()}
        ins.update({n: ins[n].detach() for n in ("cos", "sin") if n in ins})
        with torch.autocast(device, torch.bfloat16, enabled=enabled):
            cast = {n: t if enabled or n not in "qkv" else t.to(torch.bfloat16) for n, t in ins.items()}
            y = run_op(**cast, **kwargs, backend=backend)
            grads = torch.autograd.grad(y, [ins[n] for n in "qkv"], torch.ones_like(y))
        runs.append((y, *grads))
    for i, (a, b) in enumerate(zip(*runs)):
        assert a.dtype == b.dtype == (torch.bfloat16 if i == 0 else dtype)
        assert torch.equal(a, b) or (backend == "reference" and i > 0), ("out", "dq", "dk", "dv")[i]


# --------------------------------------------------------------------------- cpu against the reference

@pytest.mark.parametrize("n", sizes(400, 5000))
def test_cpu_matches_reference(n):
    @settings_for(n)
    @given(case=cases())
    def prop(case):
        check(case, "cpu")
    prop()


@pytest.mark.parametrize("n", sizes(100, 1000))
def test_reference_low_precision_and_layouts(n):
    """The oracle itself on every layout and dtype (the other properties give it float64
    contiguous inputs only)."""
    @settings_for(n)
    @given(case=cases(max_n=30))
    def prop(case):
        check(case, "reference")
    prop()


@pytest.mark.parametrize("n", sizes(100, 1000))
def test_autocast_bf16(n):
    """Under ``torch.autocast("cpu", torch.bfloat16)``: against the float64 reference (fp32 inputs),
    and exactly the op on inputs cast to bf16 (the attention ops' autocast policy), bf16 and fp32
    inputs, the backward run inside the autocast region too."""
    @settings_for(n)
    @given(case=cases(autocast=True), backend=st.sampled_from(["cpu", "cpu", "reference"]),
           dtype=st.sampled_from([torch.float32, torch.bfloat16]))
    def prop(case, backend, dtype):
        check(case, backend, autocast=torch.bfloat16)
        check_autocast_is_cast(case, backend, dtype)
    prop()


@pytest.mark.parametrize("n", sizes(10, 100))
def test_float64_gradcheck(n):
    """torch.autograd.gradcheck of the cpu backend's hand-written backward on tiny inputs."""
    @settings_for(n)
    @given(case=cases(dtypes=(torch.float64,), max_n=6, max_d=4))
    def prop(case):
        values, kwargs, *_ = case
        rope = (values["cos"], values["sin"]) if "cos" in values else ()
        tensors = [values[n].clone().requires_grad_() for n in "qkv"]
        assert torch.autograd.gradcheck(lambda q, k, v: run_op(q, k, v, *rope, backend="cpu", **kwargs), tensors)
    prop()


# --------------------------------------------------------------------------- regressions (found by the properties)

@pytest.mark.parametrize("magnitude_aware", [True, False], ids=["mala", "plain"])
@pytest.mark.parametrize("rope", [True, False], ids=["rope", "norope"])
def test_cpu_dk_with_token_major_query(rope, magnitude_aware):
    """q laid out ``[B, N, heads, D]`` (a transposed view): the cpu backward's dk buffer took q's
    layout, ``out=`` then wrote dk's main term into a reshape copy, and dk came back wrong."""
    g = torch.Generator().manual_seed(0)
    q = (torch.rand(2, 5, 2, 4, generator=g, dtype=torch.float64) + 0.5).transpose(1, 2).requires_grad_()
    k = (torch.rand(2, 2, 5, 4, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    v = torch.randn(2, 2, 5, 4, generator=g, dtype=torch.float64).requires_grad_()
    ang = torch.rand(5, 2, generator=g, dtype=torch.float64) * 5
    tables = (ang.cos(), ang.sin()) if rope else None
    res = []
    for backend in ("reference", "cpu"):
        y = linear_attention(q, k, v, tables, magnitude_aware=magnitude_aware, backend=backend)
        res.append((y, *torch.autograd.grad(y, (q, k, v), torch.ones_like(y))))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
