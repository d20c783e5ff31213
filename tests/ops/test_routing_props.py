"""Property suite for bi-level routing attention (``bra``): every CPU backend against the float64
reference, output and dq / dk / dv, on cases Hypothesis draws over

- geometry: square or rectangular region grids of 1..4 per side, regions of 1..3 tokens per
  side, padded maps (the last region short), a grid larger than the map; ``topk`` from 1 to
  all (``-1``, ``nR`` and beyond), half the cases sparse; batch 1..2, heads 1..3, D 1..8;
- inputs: every layout of ``_property.LAYOUTS`` per tensor (transposed, sliced, permuted,
  broadcast over the batch), every dtype with its tolerance, autocast bf16, a custom scale,
  gradients of all, some or none of q, k, v.

Routing (level 1) is computed once from the inputs and is not differentiable; a case whose
float64 routing has a near-tie (the k-th and (k+1)-th affinity of a row within 1e-4 of the row's
scale) is skipped, since rounding may then pick either region. Any other disagreement between the
routing of the backend's inputs and the float64 one fails the output comparison.

The Triton backend runs the same properties under the interpreter on tiny maps
(``test_routing_triton.py``). Shared harness: ``_property.py``; ``-m slow`` or
``ATTNZOO_PROPERTY_EXAMPLES`` for longer runs.
"""
import math

import pytest
import torch
from _property import DTYPES, LAYOUTS, arrange, compare, randn, settings_for, sizes
from hypothesis import assume, given
from hypothesis import strategies as st

from attnzoo.ops import routing

GRADS = (("q", "k", "v"), ("q", "k", "v"), ("q", "k", "v"), ("q",), ("k", "v"), ())


def run_op(q, k, v, *, backend, num_regions, topk, scale):
    """The public op, as ``compare`` calls it (tensors and arguments by keyword)."""
    return routing.bra(q, k, v, num_regions, topk, scale=scale, backend=backend)


@st.composite
def side(draw, regions: int, max_region: int):
    """A map side for ``regions`` regions along it: mostly ``regions`` regions of 1..max_region
    tokens, the last one short (padded) or not; sometimes a grid larger than the map."""
    if draw(st.integers(0, 5)) == 0:
        return draw(st.integers(1, regions))
    size = draw(st.integers(1, max_region))
    return regions * size - draw(st.integers(0, size - 1))


@st.composite
def cases(draw, dtypes=DTYPES, max_grid: int = 4, max_region: int = 3, max_heads: int = 3, max_d: int = 8,
          autocast: bool = False):
    """A case: ``(values, kwargs, layouts, dtype, grad_of, seed)``. About half route sparsely
    (``topk`` below the number of regions with real tokens), the others densely."""
    nh = draw(st.integers(1, max_grid))
    square = draw(st.booleans())
    nw = nh if square else draw(st.integers(1, max_grid))
    H, W = draw(side(nh, max_region)), draw(side(nw, max_region))
    nR = nh * nw
    real = -(-H // -(-H // nh)) * -(-W // -(-W // nw))  # regions with a real token
    topk = draw(st.integers(1, max(1, real - 1)) | st.sampled_from([-1, real, nR, nR + 1]))
    B, heads = draw(st.integers(1, 2)), draw(st.integers(1, max_heads))
    D = draw(st.integers(1, max_d))
    seed = draw(st.integers(0, 2 ** 16))
    shape = (B, H, W, heads, D)
    values = {n: randn(shape, (n, seed)) for n in "qkv"}
    layouts = {n: draw(st.sampled_from(LAYOUTS)) for n in values}
    dtype = torch.float32 if autocast else draw(st.sampled_from(dtypes))
    kwargs = dict(num_regions=nh if square else (nh, nw), topk=topk,
                  scale=draw(st.sampled_from([None, None, None, 0.7, -0.5])))
    return values, kwargs, layouts, dtype, draw(st.sampled_from(GRADS)), seed


def routing_margin(q: torch.Tensor, k: torch.Tensor, num_regions, topk: int) -> float:
    """Smallest gap, relative to the row's scale, between the ``topk``-th and the next affinity of
    a query region with real tokens, in float64 (written token by token: independent of ``route``)."""
    B, H, W = q.shape[:3]
    nh, nw = (num_regions, num_regions) if isinstance(num_regions, int) else num_regions
    nR = nh * nw
    if topk == -1 or topk >= nR:
        return math.inf
    h, w = -(-H // nh), -(-W // nw)
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    region = ((ys // h) * nw + xs // w).reshape(-1)
    count = torch.bincount(region, minlength=nR).double()
    means = []
    for t in (q, k):
        s = torch.zeros(B, nR, t[0, 0, 0].numel(), dtype=torch.float64)
        s.index_add_(1, region, t.double().reshape(B, H * W, -1))
        means.append(s / count.clamp(min=1)[:, None])
    aff = means[0] @ means[1].transpose(1, 2)
    aff[:, :, count == 0] = -math.inf
    rows = aff.sort(-1, descending=True).values[:, count > 0]  # the other query regions are cropped
    a, b = rows[..., topk - 1], rows[..., topk]
    scale = rows[..., 0].abs().clamp(min=1e-30)
    gap = torch.where(torch.isinf(b) | torch.isinf(a), torch.full_like(a, math.inf), (a - b) / scale)
    return gap.min().item()


def values_seen(case, autocast=None):
    """The float64 values the reference sees (rounded to the input dtype; repeated for "expanded").
    Under autocast the op itself sees them rounded on to the autocast dtype (its input cast)."""
    values, _, layouts, dtype, _, seed = case
    in_dtype = torch.float32 if autocast is not None else dtype
    seen = {n: arrange(t, layouts[n], in_dtype, seed)[0] for n, t in values.items()}
    if autocast is not None:
        return seen, {n: t.to(autocast).double() for n, t in seen.items()}
    return seen, seen


def same_routing(a, b, num_regions, topk) -> bool:
    """Whether float64 routing picks the same regions from two roundings of q and k."""
    nr, topk, _ = routing._validate(a["q"], a["k"], a["v"], num_regions, topk, None)
    return torch.equal(routing.reference.route(a["q"], a["k"], nr, topk),
                       routing.reference.route(b["q"], b["k"], nr, topk))


def term_floors(seen, scale) -> dict:
    """Floors for ``compare``: a tenth of the size of the terms each result is a sum of, so that a
    result much smaller than its terms (softmax gradients cancel: ``dS = P (dP - rowsum(dO O))``
    sums to zero over a row; one key per query makes dq and dk exactly zero) is judged by its
    rounding relative to them. ``out = P V`` and ``dV = P^T dO`` are convex-ish sums;
    ``|dS_i.| <= 2 P_i. max|dP|`` with ``dP = dO V^T``, so dq, dk are at most
    ``2 scale max|dO| |V| max|K or Q|`` per row."""
    q, k, v, dy = seen["q"], seen["k"], seen["v"], seen["dy"]
    heads, D = q.shape[-2:]
    s = abs(scale) if scale is not None else (heads * D) ** -0.5
    dp = dy.norm(dim=-1).max().item() * v.norm(dim=-1).max().item()
    c = 0.1
    return dict(out=c * v.abs().max().item(), v=c * dy.abs().max().item(),
                q=c * 2 * s * dp * k.abs().max().item(), k=c * 2 * s * dp * q.abs().max().item())


def check(case, backend: str, device: str = "cpu", autocast=None) -> None:
    values, kwargs, layouts, dtype, grad_of, seed = case
    seen, seen_op = values_seen(case, autocast)
    for s in (seen, seen_op):
        assume(routing_margin(s["q"], s["k"], kwargs["num_regions"], kwargs["topk"]) > 1e-4)
    # under autocast the op routes on its cast inputs, the float64 reference on the uncast ones
    assume(seen_op is seen or same_routing(seen, seen_op, kwargs["num_regions"], kwargs["topk"]))
    seen["dy"] = randn(values["q"].shape, ("dy", seed))  # compare's upstream gradient
    compare(run_op, values, grad_of, backend, dtype, layouts, kwargs, device=device, autocast=autocast, seed=seed,
            floors=term_floors(seen, kwargs["scale"]))


def check_autocast_is_cast(case, backend: str, dtype: torch.dtype, device: str = "cpu") -> None:
    """Under bf16 autocast (backward inside it) the output and routing are exactly those of the op
    on q, k, v cast to bf16 without autocast, and the gradients those through that cast (in the
    inputs' dtype); the reference's backward (its autograd graph) alone follows the ambient autocast."""
    values, kwargs, layouts, _, _, seed = case
    runs = []
    for enabled in (False, True):
        ins = {n: arrange(t, layouts[n], dtype, seed)[1].to(device) for n, t in values.items()}
        with torch.autocast(device, torch.bfloat16, enabled=enabled):
            cast = {n: t if enabled else t.to(torch.bfloat16) for n, t in ins.items()}
            y, idx = routing.bra(**cast, **kwargs, backend=backend, return_index=True)
            grads = torch.autograd.grad(y, [ins[n] for n in "qkv"], torch.ones_like(y))
        runs.append((y, idx, *grads))
    for i, (a, b) in enumerate(zip(*runs)):
        assert a.dtype == b.dtype and a.dtype == (torch.bfloat16, torch.long, dtype, dtype, dtype)[i]
        assert torch.equal(a, b) or (backend == "reference" and i > 1), ("out", "idx", "dq", "dk", "dv")[i]


# --------------------------------------------------------------------------- cpu against the reference

@pytest.mark.parametrize("n", sizes(400, 4000))
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
    @given(case=cases(max_region=2))
    def prop(case):
        check(case, "reference")
    prop()


@pytest.mark.parametrize("n", sizes(100, 1000))
def test_autocast_bf16(n):
    """Under ``torch.autocast("cpu", torch.bfloat16)``: against the float64 reference (fp32 inputs),
    and exactly the op on inputs cast to bf16 (routing and attention alike: the attention ops'
    autocast policy), bf16 and fp32 inputs, the backward run inside the autocast region too."""
    @settings_for(n)
    @given(case=cases(autocast=True), backend=st.sampled_from(["cpu", "cpu", "reference"]),
           dtype=st.sampled_from([torch.float32, torch.bfloat16]))
    def prop(case, backend, dtype):
        check(case, backend, autocast=torch.bfloat16)
        check_autocast_is_cast(case, backend, dtype)
    prop()


@pytest.mark.parametrize("n", sizes(10, 100))
def test_float64_gradcheck(n):
    """torch.autograd.gradcheck of the cpu backend's own backward on tiny maps (routing is
    piecewise constant, so finite differences see the attention alone away from near-ties)."""
    @settings_for(n)
    @given(case=cases(dtypes=(torch.float64,), max_grid=3, max_region=2, max_d=3))
    def prop(case):
        values, kwargs, *_ = case
        assume(routing_margin(values["q"], values["k"], kwargs["num_regions"], kwargs["topk"]) > 1e-3)
        tensors = [values[n].clone().requires_grad_() for n in "qkv"]
        assert torch.autograd.gradcheck(lambda q, k, v: run_op(q, k, v, backend="cpu", **kwargs), tensors)
    prop()


# --------------------------------------------------------------------------- regressions (found by the properties)

def test_cpu_query_with_strided_channels():
    """A q whose channel dim is not unit-stride: the cpu backend gathered it with advanced
    indexing (which keeps the source's stride order) into the aten flash kernel, which reads
    the channel dim as unit-stride without checking. Likewise an upstream gradient so laid out."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 5, 7, 3, 2, generator=g, dtype=torch.float64).transpose(-1, -2).requires_grad_()
    k, v = (torch.randn(1, 5, 7, 2, 3, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    dy = torch.randn(1, 5, 7, 3, 2, generator=g, dtype=torch.float64).transpose(-1, -2)
    res = []
    for backend in ("reference", "cpu"):
        y = routing.bra(q, k, v, 2, 2, backend=backend)
        res.append((y, *torch.autograd.grad(y, (q, k, v), dy)))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_half_routing_accumulates_in_fp32():
    """Region means of bf16 inputs are summed in fp32: the routing of bf16 inputs is that of the
    same values in float64 (bf16 sums of 64 tokens used to reorder near-equal regions)."""
    for seed in range(6):  # each used to mismatch with probability ~1/2
        g = torch.Generator().manual_seed(seed)
        q, k = (torch.randn(2, 32, 32, 2, 8, generator=g).bfloat16() for _ in range(2))
        idx16 = routing.reference.route(q, k, (4, 4), 4)
        idx64 = routing.reference.route(q.double(), k.double(), (4, 4), 4)
        assert torch.equal(idx16, idx64), seed
