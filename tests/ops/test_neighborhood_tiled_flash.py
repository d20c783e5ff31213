"""The cpu backend's training path (``cpu._TiledNA``) in both logits layouts it picks by tile
shape (``S^T`` for 16-query tiles, ``S`` otherwise) against the float64 reference, on
NAT-Tiny-like geometry (kernel 7, rpb, a tile size that does not divide the map): the
output and every gradient."""
import pytest
import torch

from attnzoo.ops.neighborhood import cpu, reference

TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tile", [(4, 4), (5, 14), (3, 5)], ids=lambda t: f"tile{t[0]}x{t[1]}")
@pytest.mark.parametrize("dilation", [1, 2], ids=lambda d: f"dil{d}")
def test_tiled_layouts_match_reference(tile, dtype, dilation):
    g = torch.Generator().manual_seed(3)
    B, H, W, heads, D, k = 2, 14, 14, 2, 8, 7
    if dilation == 2:
        H, W = 29, 28  # sub-grids of 15 and 14 rows
    q, k_, v = (torch.randn(B, H, W, heads, D, generator=g, dtype=torch.float64) for _ in range(3))
    rpb = torch.randn(heads, 2 * k - 1, 2 * k - 1, generator=g, dtype=torch.float64)
    dy = torch.randn(B, H, W, heads, D, generator=g, dtype=torch.float64)
    args = ((k, k), (dilation, dilation), (1, 1))
    ref = [t.clone().requires_grad_() for t in (q, k_, v, rpb)]
    y_ref = reference.na2d(*ref[:3], *args, ref[3], D ** -0.5)
    g_ref = torch.autograd.grad(y_ref, ref, dy)
    leaves = [t.to(dtype).requires_grad_() for t in (q, k_, v, rpb)]
    y = cpu.na2d(*leaves[:3], *args, leaves[3], D ** -0.5, tile=tile)
    grads = torch.autograd.grad(y, leaves, dy.to(dtype))
    for name, a, b in zip(("out", "dq", "dk", "dv", "drpb"), (y, *grads), (y_ref, *g_ref)):
        err = (a.double() - b).norm() / b.norm()
        assert err < TOL[dtype], f"{name}: relative L2 error {err:.2e} (tile {tile}, {dtype})"
