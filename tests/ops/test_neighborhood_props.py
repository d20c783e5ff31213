"""Property suite for neighborhood attention (``na2d`` / ``na1d``): the cpu backend against the
float64 reference, output and every gradient (q, k, v, rpb, rel_h, rel_w), on cases Hypothesis
draws over

- geometry: per-axis kernel, dilation, stride and query stride (q on a coarser grid than k / v),
  both borders (``clamp`` / ``zero_pad``), with
  weight on the degenerate corners: a map of size 1, kernel 1, a map one stride group wide,
  the window as large as the map, odd and uneven sizes;
- biases: rpb, rel_h, rel_w each present or absent (rel terms with either border, dilation too);
- inputs: every layout of ``_property.LAYOUTS`` (transposed, sliced, permuted, broadcast, ...)
  per tensor, every dtype with its tolerance, autocast bf16, default / zero / negative scale.

The Triton backend runs the same properties under the interpreter on tiny maps
(``test_neighborhood_triton.py``, ``test_triton_matches_reference``). Harness: ``_property.py``;
cases: ``_neighborhood_cases.py``; ``-m slow`` or ``ATTNZOO_PROPERTY_EXAMPLES`` for longer runs.
"""
import pytest
import torch
from _neighborhood_cases import BIASES, cases, check, run_op
from _property import DTYPES, randn, settings_for, sizes
from hypothesis import given
from hypothesis import strategies as st

from attnzoo.ops import neighborhood as nbh


# --------------------------------------------------------------------------- cpu against the reference

@pytest.mark.parametrize("n", sizes(600, 6000))
def test_cpu_matches_reference(n):
    @settings_for(n)
    @given(case=cases(query_stride=True))
    def prop(case):
        check(case, "cpu")
    prop()


@pytest.mark.parametrize("n", sizes(150, 1500))
def test_cpu_autocast_bf16(n):
    """Under ``torch.autocast("cpu", torch.bfloat16)`` float32 inputs (rpb / rel terms included)
    are cast once to bf16: output in bf16, gradients back in float32, at bf16's tolerance."""
    @settings_for(n)
    @given(case=cases(autocast=True, query_stride=True))
    def prop(case):
        check(case, "cpu", autocast=torch.bfloat16)
    prop()


@pytest.mark.parametrize("n", sizes(100, 1000))
def test_reference_layouts(n):
    """The oracle itself on every layout (the other properties give it contiguous float64 inputs).
    float32 / float64 only: in half precision it computes in half (a readable oracle, not a fast
    path), whose softmax-backward cancellations exceed the half tolerances."""
    @settings_for(n)
    @given(case=cases(dtypes=(torch.float64, torch.float32), max_len=10, max_kernel=5, query_stride=True))
    def prop(case):
        check(case, "reference")
    prop()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("border", ["clamp", "zero_pad"])
def test_autocast_policy(backend, border):
    """Under autocast every input, a float32 rpb / rel_h / rel_w included, is cast once to the autocast
    dtype (mixed dtypes raise outside autocast); the output has that dtype, the gradients the callers'."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 6, 7, 2, 4, generator=g).requires_grad_() for _ in range(3))
    rpb = torch.randn(2, 7, 7, generator=g).requires_grad_()
    rel_h = torch.randn(1, 6, 7, 2, 4, generator=g, dtype=torch.float16).requires_grad_()
    kernel, stride = (4, 2) if border == "zero_pad" else (3, 1)
    rpb_k = rpb[:, :2 * kernel - 1, :2 * kernel - 1]
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype):
            y = nbh.na2d(q.to(dtype), k, v, kernel, stride=stride, rpb=rpb_k, border=border,
                         rel_h=rel_h[..., :kernel], backend=backend)
            y1 = nbh.na1d(q[:, 0], k[:, 0], v[:, 0], 3, rpb=rpb[:, 0, :5], backend=backend)
        assert y.dtype == y1.dtype == dtype
        grads = torch.autograd.grad((y.float().square().sum() + y1.float().sum()), (q, k, v, rpb, rel_h))
        assert [t.dtype for t in grads] == [torch.float32] * 4 + [torch.float16]
        assert all(torch.isfinite(t).all() for t in grads)


@pytest.mark.parametrize("n", sizes(10, 100))
def test_float64_gradcheck(n):
    """torch.autograd.gradcheck of the reference and of the cpu backend (its own backward) on
    tiny maps: the oracle's gradients are the true derivatives, not just consistent ones."""
    @settings_for(n)
    @given(case=cases(dtypes=(torch.float64,), max_len=4, max_kernel=4, max_d=2, query_stride=True))
    def prop(case):
        values, geom, _, _, one_d, _ = case
        names = list(values)
        tensors = [values[n].clone().requires_grad_() for n in names]
        for backend in ("reference", "cpu"):
            def f(*ts, backend=backend):
                return run_op(one_d=one_d, backend=backend, **dict(zip(names, ts)), **geom)
            assert torch.autograd.gradcheck(f, tensors), backend
    prop()


# --------------------------------------------------------------------------- validation

@pytest.mark.parametrize("n", sizes(40, 400))
def test_mixed_bias_dtype_is_rejected_by_every_backend(n):
    """A bias (rpb, rel_h, rel_w) in another dtype than q: one ValueError naming both dtypes, for
    every backend (the check precedes dispatch); under autocast the cast makes them agree."""
    @settings_for(n)
    @given(case=cases(max_len=6, max_kernel=3, max_d=4), data=st.data())
    def prop(case, data):
        values, geom, _, dtype, one_d, _ = case
        biases = [n for n in BIASES if n in values]
        if not biases:
            return
        name = data.draw(st.sampled_from(biases))
        other = data.draw(st.sampled_from([d for d in DTYPES if d != dtype]))
        ins = {n: t.to(other if n == name else dtype) for n, t in values.items()}
        for backend in ("reference", "cpu", "triton"):
            with pytest.raises(ValueError, match=f"{name} must have q's dtype {dtype}, got {other}"):
                run_op(one_d=one_d, backend=backend, **ins, **geom)
        if dtype != torch.float64 and other != torch.float64:
            with torch.autocast("cpu", torch.bfloat16):
                y = run_op(one_d=one_d, backend="cpu", **ins, **geom)
            assert y.dtype == torch.bfloat16
    prop()


# --------------------------------------------------------------------------- regressions

def test_halo_flash_kernel_width_one_and_one_group_wide():
    """zero_pad + rel terms on the flash path, where the key-window ``reshape`` of the overlapping
    ``unfold`` used to be a view that the one-hot channels were written through (kernel width 1;
    a map one stride group wide; HaloNet-h0 at 97 x 31)."""
    for shape, kernel, stride in (((1, 2, 3, 1, 2), (2, 1), (1, 1)), ((1, 5, 4, 2, 3), (6, 6), (4, 4)),
                                  ((1, 97, 31, 1, 4), (14, 14), (8, 8))):
        values = {n: randn(shape, (n, shape)) for n in "qkv"}
        values["rel_h"] = randn(shape[:-1] + (kernel[0],), ("rel_h", shape))
        values["rel_w"] = randn(shape[:-1] + (kernel[1],), ("rel_w", shape))
        geom = dict(kernel_size=kernel, dilation=(1, 1), stride=stride, border="zero_pad", scale=None)
        check((values, geom, {}, torch.float64, False, 0), "cpu")


def test_autocast_backward_cpu_tiled_path():
    """``tools/train.py --amp`` (nat_mini): bf16 q / k / v from autocast's linear layers, a float32
    rpb parameter, the backward outside autocast; used to fail with "Input dtypes must be the same"."""
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 9, 9, 3, 2, 8, generator=g).requires_grad_()
    rpb = torch.randn(2, 9, 9, generator=g).requires_grad_()
    with torch.autocast("cpu", torch.bfloat16):
        q, k, v = qkv.bfloat16().unbind(3)
        y = nbh.na2d(q, k, v, 5, rpb=rpb, backend="cpu")
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert qkv.grad.dtype == rpb.grad.dtype == torch.float32
    assert torch.isfinite(qkv.grad).all() and torch.isfinite(rpb.grad).all()
    ref = nbh.na2d(*(t.detach().double() for t in (q, k, v)), 5, rpb=rpb.detach().bfloat16().double(),
                   backend="reference")
    assert (y.double() - ref).abs().max() < 3e-2 * ref.abs().max()


def test_cpu_dilated_rel_terms_compute_in_float32():
    """clamp + rel terms + dilation runs the reference inside the cpu backend; with half inputs it
    used to run it in half (found by the properties: the bf16 rpb gradient, a sum over every query,
    drifted past bf16's tolerance). Now it is the float32 reference, rounded once."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 9, 8, 2, 4, generator=g).bfloat16() for _ in range(3))
    rpb = torch.randn(2, 9, 5, generator=g).bfloat16()
    rel_h = torch.randn(1, 9, 8, 2, 5, generator=g).bfloat16()
    leaves = [t.requires_grad_() for t in (q, k, v, rpb, rel_h)]
    y = nbh.na2d(q, k, v, (5, 3), (1, 2), rpb=rpb, rel_h=rel_h, backend="cpu")
    dy = torch.randn(y.shape, generator=g).bfloat16()
    grads = torch.autograd.grad(y, leaves, dy)
    leaves32 = [t.detach().float().requires_grad_() for t in leaves]
    y32 = nbh.na2d(*leaves32[:3], (5, 3), (1, 2), rpb=leaves32[3], rel_h=leaves32[4], backend="reference")
    grads32 = torch.autograd.grad(y32, leaves32, dy.float())
    assert torch.equal(y, y32.bfloat16())
    for a, b in zip(grads, grads32):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b.bfloat16())
