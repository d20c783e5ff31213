"""Property checks shared by every op's property suite (``tests/ops/test_*_props.py``).

One comparison, used for every op and backend: the backend runs on inputs in a given dtype
and memory layout (contiguous, transposed, sliced, permuted, broadcast), optionally under
autocast; the reference runs in float64 on the same values, laid out contiguously. Output and
every gradient are compared by

    max|actual - expected| / (max|expected| + FLOOR)

so a result is judged against its own scale, and an exactly-zero gradient does not fail on
rounding noise. Gradients are taken with respect to the tensors the op received (the strided
views), so a backend that returns a gradient in the wrong layout fails here even where
autograd would later sum it away.

Hypothesis draws the cases, a few hundred per op in the default run and thousands under
``-m slow`` (``ATTNZOO_PROPERTY_EXAMPLES`` overrides the default count). The pattern::

    @pytest.mark.parametrize("n", sizes(200, 3000))
    def test_cpu_matches_reference(n):
        @settings_for(n)
        @given(case=cases())
        def prop(case):
            compare(...)
        prop()
"""
from __future__ import annotations

import os
import zlib
from contextlib import nullcontext
from typing import Callable, Dict, Optional, Sequence

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)

# max-abs error relative to the largest expected value. Half inputs are rounded before the
# float64 reference sees them, so these bound the kernel's own rounding (fp32 accumulation).
TOL = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 6e-2,
}
FLOOR = 1e-3

# Layouts a user can hand an op. "expanded" makes dim 0 stride-0 (the values repeat along it).
LAYOUTS = ("contiguous", "transposed", "last_strided", "sliced", "permuted", "expanded")
# 4-D feature maps (and conv weights) can also be channels_last, as ``model.to(memory_format=...)`` makes them
MAP_LAYOUTS = LAYOUTS + ("channels_last",)


def gen(*key) -> torch.Generator:
    """A generator seeded from any repr-able key (stable across runs and processes)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def randn(shape, key, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=gen("randn", tuple(shape), key), dtype=torch.float64) * scale


def arrange(values: torch.Tensor, layout: str, dtype: torch.dtype, seed: int = 0):
    """``(values64, view)``: the float64 values the reference should use (rounded to ``dtype``;
    for "expanded", repeated along dim 0) and a ``dtype`` tensor holding them in ``layout``,
    a view of a leaf that requires grad (so the op's gradient for it can be asked for)."""
    if layout == "expanded":
        values = values[:1].expand_as(values)
    values = values.to(dtype).double()
    n = values.dim()
    if layout == "contiguous" or n == 0:
        leaf = values.to(dtype).clone().requires_grad_()
        return values, leaf.view_as(leaf)
    if layout == "transposed":
        order = tuple(range(n - 1, -1, -1))
    elif layout == "last_strided":
        order = tuple(range(n - 2)) + (n - 1, n - 2) if n >= 2 else (0,)
    elif layout == "permuted":
        order = tuple(torch.randperm(n, generator=gen("perm", n, seed)).tolist())
    elif layout == "channels_last":
        if n != 4:
            raise ValueError(f"channels_last needs a 4-D tensor, got shape {tuple(values.shape)}")
        order = (0, 2, 3, 1)  # a contiguous NHWC leaf, seen as NCHW: torch.channels_last strides
    elif layout == "sliced":
        big = torch.zeros([2 * s + 1 for s in values.shape], dtype=dtype)
        leaf = big.requires_grad_()
        index = tuple(slice(1, 1 + 2 * s, 2) for s in values.shape)
        with torch.no_grad():
            big[index] = values.to(dtype)
        return values, leaf[index]
    elif layout == "expanded":
        leaf = values[:1].to(dtype).clone().requires_grad_()
        return values, leaf.expand(values.shape)
    else:
        raise ValueError(f"unknown layout {layout!r}")
    inverse = [0] * n
    for i, o in enumerate(order):
        inverse[o] = i
    leaf = values.to(dtype).permute(order).contiguous().requires_grad_()
    return values, leaf.permute(inverse)


def error(actual: torch.Tensor, expected: torch.Tensor, floor: float = FLOOR) -> float:
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if a.shape != e.shape:
        raise AssertionError(f"shape {tuple(a.shape)}, expected {tuple(e.shape)}")
    if a.numel() == 0:
        return 0.0
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - e).abs().max() / (e.abs().max() + floor)).item()


def check_close(actual, expected, dtype: torch.dtype, what: str, tol: Optional[float] = None,
                floor: float = FLOOR) -> None:
    assert actual is not None, f"{what}: no gradient"
    err = error(actual, expected, floor)
    limit = TOL[dtype] if tol is None else tol
    assert err <= limit, f"{what}: error {err:.3g} > {limit:.3g} ({dtype})"


def compare(
        op: Callable[..., torch.Tensor],
        values: Dict[str, Optional[torch.Tensor]],
        grad_of: Sequence[str],
        backend: str,
        dtype: torch.dtype,
        layouts: Optional[Dict[str, str]] = None,
        kwargs: Optional[dict] = None,
        device: str = "cpu",
        autocast: Optional[torch.dtype] = None,
        tol: Optional[float] = None,
        seed: int = 0,
        floors: Optional[Dict[str, float]] = None,
) -> None:
    """Run ``op(**tensors, **kwargs, backend=...)`` on ``backend`` and on the float64 reference,
    and compare the output and the gradients of ``grad_of`` (names in ``values``).

    ``values``: float64 tensors (or None for an absent optional input). ``layouts`` maps a name
    to one of ``LAYOUTS`` (default contiguous). With ``autocast``, the backend's inputs are
    float32 (``dtype`` is ignored for them) and the run is under ``torch.autocast(device, autocast)``;
    the tolerance is that of the autocast dtype.

    ``floors`` overrides ``FLOOR`` by name (``"out"`` or a name in ``grad_of``): for a result
    that is zero in exact arithmetic but computed from terms of size ~1 (e.g. the gradient of
    a bias that shifts every logit of a softmax row equally), a floor of 1 judges its rounding
    against the size of those terms.
    """
    floors = floors or {}
    layouts = layouts or {}
    kwargs = kwargs or {}
    in_dtype = torch.float32 if autocast is not None else dtype
    ref_in, ours_in = {}, {}
    for name, t in values.items():
        if t is None:
            ref_in[name] = ours_in[name] = None
            continue
        v64, view = arrange(t, layouts.get(name, "contiguous"), in_dtype, seed)
        ref_in[name] = v64.clone().requires_grad_(name in grad_of)
        view = view.to(device) if device != "cpu" else view
        ours_in[name] = view if name in grad_of else view.detach()

    y_ref = op(**ref_in, **kwargs, backend="reference")
    ctx = torch.autocast(device, dtype=autocast) if autocast is not None else nullcontext()
    with ctx:
        y = op(**ours_in, **kwargs, backend=backend)
    out_dtype = autocast if autocast is not None else dtype
    limit_dtype = out_dtype
    assert y.shape == y_ref.shape, f"output shape {tuple(y.shape)}, expected {tuple(y_ref.shape)}"
    assert y.device.type == device, f"output on {y.device}, expected {device}"
    check_close(y, y_ref, limit_dtype, "out", tol, floors.get("out", FLOOR))

    if not grad_of:
        return
    dy = randn(y_ref.shape, ("dy", seed)).to(y.dtype).double()
    g_ref = torch.autograd.grad(y_ref, [ref_in[n] for n in grad_of], dy)
    g = torch.autograd.grad(y, [ours_in[n] for n in grad_of], dy.to(device=device, dtype=y.dtype))
    for name, a, b in zip(grad_of, g, g_ref):
        assert a.dtype == ours_in[name].dtype, f"d{name}: dtype {a.dtype}, expected {ours_in[name].dtype}"
        check_close(a, b, limit_dtype, f"d{name}", tol, floors.get(name, FLOOR))


def examples(default: int) -> int:
    """Examples per property: ``default`` normally, ``ATTNZOO_PROPERTY_EXAMPLES`` when set."""
    return int(os.environ.get("ATTNZOO_PROPERTY_EXAMPLES", default))


def sizes(default: int, slow: int):
    """``pytest.mark.parametrize("n", sizes(...))``: a default-run size and a ``slow`` one."""
    import pytest

    return [pytest.param(examples(default), id=f"n{default}"),
            pytest.param(max(slow, examples(default)), id=f"n{slow}", marks=pytest.mark.slow)]


def settings_for(default: int) -> settings:
    return settings(
        max_examples=examples(default), deadline=None, derandomize=True, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


layouts_st = st.sampled_from(LAYOUTS)
map_layouts_st = st.sampled_from(MAP_LAYOUTS)
dtypes_st = st.sampled_from(DTYPES)
