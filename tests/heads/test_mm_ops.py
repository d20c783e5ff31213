"""The mmcv-lite kernels behind mmcv.ops, and mmengine checkpoint loading under torch's weights_only default."""
import numpy as np
import pytest
import torch
import torchvision

import attnzoo.heads.mm as amm
from attnzoo.heads.mm import mmcv_ops

from mmcv import ops  # noqa: E402  (importable only through the fallback when mmcv is mmcv-lite)


def _boxes(n, g):
    xy = torch.rand(n, 2, generator=g) * 50
    return torch.cat([xy, xy + 5 + torch.rand(n, 2, generator=g) * 30], 1)


def test_fallback_is_in_use_exactly_when_compiled_ops_are_absent():
    assert amm.MMCV_OPS_FALLBACK == (not mmcv_ops.compiled_ops_available())
    assert mmcv_ops.install() == amm.MMCV_OPS_FALLBACK  # idempotent
    assert set(amm.REGISTERED) == {"mmdet", "mmseg"}


@pytest.mark.parametrize("offset", [0, 1])
def test_nms_and_batched_nms(offset):
    g = torch.Generator().manual_seed(0)
    boxes, scores = _boxes(60, g), torch.rand(60, generator=g)
    dets, keep = ops.nms(boxes, scores, iou_threshold=0.5, offset=offset)
    # independent greedy NMS with mmcv's box size convention (x2 - x1 + offset)
    wh = (boxes[:, 2:] - boxes[:, :2] + offset)
    area = wh.prod(1)
    order, want = scores.argsort(descending=True).tolist(), []
    while order:
        i = order.pop(0)
        want.append(i)
        lt, rb = torch.max(boxes[i, :2], boxes[order, :2]), torch.min(boxes[i, 2:], boxes[order, 2:])
        inter = (rb - lt + offset).clamp(min=0).prod(1)
        iou = inter / (area[i] + area[order] - inter)
        order = [j for j, v in zip(order, iou.tolist()) if v <= 0.5]
    assert keep.tolist() == want
    torch.testing.assert_close(dets[:, 4], scores[want])


def test_batched_nms_suppresses_within_classes_only():
    g = torch.Generator().manual_seed(1)
    boxes, scores, idxs = _boxes(60, g), torch.rand(60, generator=g), torch.randint(0, 3, (60,), generator=g)
    _, kept = ops.batched_nms(boxes, scores, idxs, dict(type="nms", iou_threshold=0.5))
    for c in range(3):
        members = torch.nonzero(idxs == c).flatten()
        want = members[torchvision.ops.nms(boxes[members], scores[members], 0.5)]
        assert sorted(kept[idxs[kept] == c].tolist()) == sorted(want.tolist())


def _bilinear_roi_align(x, rois, size, scale, sampling, aligned):
    """Plain-loop RoIAlign (average pooling of bilinear samples), written from the definition."""
    out = x.new_zeros(len(rois), x.shape[1], size, size)
    h, w = x.shape[-2:]
    for r, (b, x1, y1, x2, y2) in enumerate(rois.tolist()):
        off = 0.5 if aligned else 0.0
        x1, y1, x2, y2 = x1 * scale - off, y1 * scale - off, x2 * scale - off, y2 * scale - off
        rw, rh = x2 - x1, y2 - y1
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bw, bh = rw / size, rh / size
        sy = sampling if sampling > 0 else int(np.ceil(rh / size))
        sx = sampling if sampling > 0 else int(np.ceil(rw / size))
        for i in range(size):
            for j in range(size):
                acc = x.new_zeros(x.shape[1])
                for iy in range(sy):
                    for ix in range(sx):
                        yy = y1 + i * bh + (iy + 0.5) * bh / sy
                        xx = x1 + j * bw + (ix + 0.5) * bw / sx
                        if yy < -1 or yy > h or xx < -1 or xx > w:
                            continue
                        yy, xx = max(yy, 0.0), max(xx, 0.0)
                        y0, x0 = min(int(yy), h - 1), min(int(xx), w - 1)
                        yy, xx = (float(y0) if y0 == h - 1 else yy), (float(x0) if x0 == w - 1 else xx)
                        y1_, x1_ = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
                        ly, lx = yy - y0, xx - x0
                        f = x[int(b)]
                        acc += ((1 - ly) * (1 - lx) * f[:, y0, x0] + (1 - ly) * lx * f[:, y0, x1_]
                                + ly * (1 - lx) * f[:, y1_, x0] + ly * lx * f[:, y1_, x1_])
                out[r, :, i, j] = acc / (sy * sx)
    return out


@pytest.mark.parametrize("aligned,sampling", [(True, 0), (False, 2)])
def test_roi_align_forward_and_backward(aligned, sampling):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 12, 10, generator=g, dtype=torch.float64)
    boxes = _boxes(5, g).double() / 4
    rois = torch.cat([torch.tensor([0, 1, 0, 1, 1.0], dtype=torch.float64)[:, None], boxes], 1)
    layer = ops.RoIAlign(output_size=3, spatial_scale=0.5, sampling_ratio=sampling, aligned=aligned)
    torch.testing.assert_close(layer(x, rois), _bilinear_roi_align(x, rois, 3, 0.5, sampling, aligned))
    xg = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: layer(t, rois), (xg,))


def test_roi_align_max_mode_and_other_ops_explain_themselves():
    x, rois = torch.randn(1, 2, 8, 8), torch.tensor([[0, 0, 0, 4, 4.0]])
    with pytest.raises(NotImplementedError, match="pool_mode='max'.*compiled|compiled.*"):
        ops.RoIAlign(2, 1.0, pool_mode="max")(x, rois)
    with pytest.raises(NotImplementedError, match="deform_conv_forward.*mmcv.*c\\+\\+20"):
        ops.DeformConv2d(2, 2, 3)(x, torch.zeros(1, 18, 6, 6))


def test_sigmoid_focal_loss_matches_mmdet_python_loss():
    from mmdet.models.losses.focal_loss import py_sigmoid_focal_loss
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 5, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 6, (40,), generator=g)  # 5 = background
    ours = ops.sigmoid_focal_loss(logits, target, 2.0, 0.25, None, "none")
    onehot = torch.nn.functional.one_hot(target, 6)[:, :5].to(logits)
    ref = py_sigmoid_focal_loss(logits, onehot, None, 2.0, 0.25, "none")
    torch.testing.assert_close(ours, ref)
    (g1,) = torch.autograd.grad(ours.sum(), logits)
    (g2,) = torch.autograd.grad(ref.sum(), logits)
    torch.testing.assert_close(g1, g2)


def test_mmengine_loads_message_hub_checkpoints_but_not_arbitrary_pickles(tmp_path):
    from mmengine.logging import HistoryBuffer
    from mmengine.runner.checkpoint import CheckpointLoader

    buf = HistoryBuffer()
    buf.update(1.5)
    good = tmp_path / "iter_1.pth"
    torch.save({"meta": {"iter": 1}, "state_dict": {"w": torch.ones(2)},
                "message_hub": {"log_scalars": {"loss": buf}, "runtime_info": {"lr": np.float64(0.1)}}}, good)
    ckpt = CheckpointLoader.load_checkpoint(str(good), map_location="cpu")
    assert ckpt["message_hub"]["log_scalars"]["loss"].current() == 1.5

    bad = tmp_path / "bad.pth"
    torch.save({"state_dict": {}, "payload": _Opaque()}, bad)
    with pytest.raises(Exception, match="weights_only|Unsupported global"):
        CheckpointLoader.load_checkpoint(str(bad), map_location="cpu")
    sneaky = tmp_path / "sneaky.pth"  # getattr is allowed for HistoryBuffer's statistics methods only
    torch.save({"state_dict": {}, "f": _GetattrPayload()}, sneaky)
    with pytest.raises(Exception, match="only HistoryBuffer methods"):
        CheckpointLoader.load_checkpoint(str(sneaky), map_location="cpu")
    # the fix is scoped: torch.load elsewhere keeps its own default
    with pytest.raises(Exception):
        torch.load(good)


class _Opaque:
    pass


class _GetattrPayload:
    def __reduce__(self):
        return getattr, (np.ndarray, "tofile")
