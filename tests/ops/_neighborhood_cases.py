"""Hypothesis cases for the neighborhood-attention property suites, shared by the cpu suite
(``test_neighborhood_props.py``) and the Triton one (``test_neighborhood_triton.py``)."""
import torch
from _property import DTYPES, LAYOUTS, compare, randn
from hypothesis import strategies as st

from attnzoo.ops import neighborhood as nbh

BIASES = ("rpb", "rel_h", "rel_w")


def run_op(q, k, v, rpb=None, rel_h=None, rel_w=None, *, one_d, backend, **geom):
    """The public op, as ``compare`` calls it (tensors and geometry by keyword)."""
    if one_d:
        return nbh.na1d(q, k, v, rpb=rpb, backend=backend, **geom)
    return nbh.na2d(q, k, v, rpb=rpb, rel_h=rel_h, rel_w=rel_w, backend=backend, **geom)


@st.composite
def axes(draw, border: str, max_len: int, max_kernel: int):
    """One axis: (length, kernel, dilation, stride), corners first (Hypothesis shrinks towards them)."""
    if border == "clamp":
        k = draw(st.sampled_from([x for x in (1, 3, 5, 7, 9) if x <= max_kernel]))
        d = draw(st.integers(1, max(1, min(3, max_len // k))))
        # length k * d: the window is the whole (sub-)map; a few more: clamped borders
        length = k * d + draw(st.integers(0, max(0, max_len - k * d)))
    else:
        k = draw(st.integers(1, max_kernel))  # even kernels too (HaloNet: block + 2 * halo)
        d = 1
        length = draw(st.integers(1, max_len))  # smaller than the kernel or a stride group too
    s = draw(st.integers(1, k))
    return length, k, d, s


@st.composite
def cases(draw, dtypes=DTYPES, max_len: int = 18, max_kernel: int = 9, max_d: int = 16, autocast: bool = False,
          query_stride: bool = False):
    """A case: ``(values, geometry kwargs, layouts, dtype, one_d, seed)``. With ``query_stride`` (2-D
    cases): a per-axis query stride in 1..4, q and rel_h / rel_w on its coarser grid; half the
    time it divides the stride (the cpu backend's flash path with ``zero_pad``, HaloNet's case)."""
    one_d = draw(st.integers(0, 4)) == 0
    border = "clamp" if one_d else draw(st.sampled_from(nbh.BORDERS))
    ax_h = draw(axes(border, max_len, max_kernel))
    ax_w = (1, 1, 1, 1) if one_d else draw(axes(border, max_len, max_kernel))
    (H, kh, dh, sh), (W, kw, dw, sw) = ax_h, ax_w
    B, heads = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    D = draw(st.sampled_from([x for x in (1, 2, 3, 4, 8, 16) if x <= max_d]))
    seed = draw(st.integers(0, 2 ** 16))
    qs = (1, 1)
    if query_stride and not one_d:
        qs = tuple(draw(st.sampled_from([d for d in range(1, 5) if s % d == 0])) if draw(st.booleans())
                   else draw(st.integers(1, 4)) for s in (sh, sw))
    shape = (B, H, W, heads, D)
    q_shape = (B, -(-H // qs[0]), -(-W // qs[1]), heads, D)
    values = {n: randn(q_shape if n == "q" else shape, (n, seed)) for n in "qkv"}
    present = {n: draw(st.booleans()) for n in BIASES}
    if present["rpb"]:
        values["rpb"] = randn((heads, 2 * kh - 1, 2 * kw - 1), ("rpb", seed), 0.5)
    if not one_d:
        for name, kk in (("rel_h", kh), ("rel_w", kw)):
            if present[name]:
                values[name] = randn(q_shape[:-1] + (kk,), (name, seed), 0.5)
    layouts = {n: draw(st.sampled_from(LAYOUTS)) for n in values}
    scale = draw(st.sampled_from([None, None, None, None, 0.0, -0.6, 1.3]))
    if one_d:
        values = {n: t.squeeze(2) if n in "qkv" else t[..., 0] for n, t in values.items()}
        geom = dict(kernel_size=kh, dilation=dh, stride=sh)
    else:
        geom = dict(kernel_size=(kh, kw), dilation=(dh, dw), stride=(sh, sw), border=border)
        if query_stride:
            geom["query_stride"] = qs
    geom["scale"] = scale
    dtype = torch.float32 if autocast else draw(st.sampled_from(dtypes))
    return values, geom, layouts, dtype, one_d, seed


def zero_grad_floors(geom) -> dict:
    """Gradients that are zero in exact arithmetic, judged against terms of size ~1 (see
    ``compare``'s ``floors``): a bias constant over a softmax row (rel_h with kh = 1, rel_w with
    kw = 1) has none, and with a one-key window (out = v) neither have q, k and the biases."""
    kh, kw = (geom["kernel_size"], 1) if isinstance(geom["kernel_size"], int) else geom["kernel_size"]
    floors = {}
    if kh == 1:
        floors["rel_h"] = 1.0
    if kw == 1:
        floors["rel_w"] = 1.0
    if kh * kw == 1:
        floors.update(q=1.0, k=1.0, rpb=1.0)
    return floors


def check(case, backend: str, device: str = "cpu", autocast=None) -> None:
    values, geom, layouts, dtype, one_d, seed = case
    compare(lambda **kw: run_op(one_d=one_d, **kw), values, list(values), backend, dtype, layouts, geom,
            device=device, autocast=autocast, seed=seed, floors=zero_grad_floors(geom))
