"""Kernels for mmcv-lite, which ships ``mmcv.ops`` without its compiled ``mmcv._ext``.

``import mmdet.models`` imports ``mmcv.ops``, and every op module there resolves its kernels from
``mmcv._ext`` at import time. When that extension is absent, :func:`install` puts a stand-in module
in its place: mmcv's own Python wrappers (argument handling, autograd Functions) stay in use and
call these kernels instead, so results match compiled mmcv.

- ``nms``: ``torchvision.ops.nms`` (RetinaNet, FCOS, RPN; ``batched_nms`` goes through it);
- ``roi_align_forward`` / ``roi_align_backward``: torchvision's RoIAlign and its registered backward
  (Mask R-CNN's box and mask RoI extractors), average pooling;
- ``sigmoid_focal_loss_forward`` / ``_backward``: plain torch (mmdet's FocalLoss calls mmcv's op on
  CUDA tensors only; CPU runs use mmdet's Python loss);
- anything else raises ``NotImplementedError`` naming the op, when it is called.
"""
import importlib.machinery
import importlib.util
import sys
import types

import torch
import torch.nn.functional as F
import torchvision  # also registers torch.ops.torchvision (RoIAlign's backward)

MODULE = "mmcv._ext"
HOW_TO_INSTALL = (
    "mmcv-lite has no compiled ops; install full mmcv 2.1.0 built from source "
    "(see the README, 'Detection and segmentation': it needs -std=c++20)")


def nms(boxes, scores, iou_threshold, offset=0):
    if offset:  # legacy "+1" box sizes: widen the boxes so torchvision's IoU equals mmcv's
        boxes = torch.cat([boxes[:, :2], boxes[:, 2:] + offset], dim=1)
    return torchvision.ops.nms(boxes.float(), scores.float(), float(iou_threshold))


def _avg_only(pool_mode):
    if pool_mode == 0:
        raise NotImplementedError(f"mmcv op RoIAlign(pool_mode='max'): {HOW_TO_INSTALL}")


def roi_align_forward(input, rois, output, argmax_y, argmax_x, aligned_height, aligned_width,
                      spatial_scale, sampling_ratio, pool_mode, aligned):
    _avg_only(pool_mode)
    output.copy_(torchvision.ops.roi_align(input, rois, (aligned_height, aligned_width), spatial_scale,
                                           sampling_ratio, aligned))


def roi_align_backward(grad_output, rois, argmax_y, argmax_x, grad_input, aligned_height, aligned_width,
                       spatial_scale, sampling_ratio, pool_mode, aligned):
    _avg_only(pool_mode)
    b, c, h, w = grad_input.shape
    grad_input.copy_(torch.ops.torchvision._roi_align_backward(
        grad_output, rois, spatial_scale, aligned_height, aligned_width, b, c, h, w, sampling_ratio, aligned))


def _sigmoid_focal_loss(input, target, weight, gamma, alpha):
    # elementwise, as mmcv's kernel: target holds class ids, num_classes meaning background
    num_classes = input.shape[1]
    positive = F.one_hot(target, num_classes + 1)[:, :num_classes].to(input.dtype)
    p = input.sigmoid()
    loss = (-alpha * (1 - p).pow(gamma) * F.logsigmoid(input) * positive
            - (1 - alpha) * p.pow(gamma) * F.logsigmoid(-input) * (1 - positive))
    if weight.numel():
        loss = loss * torch.cat([weight, weight.new_ones(1)])[target].unsqueeze(1)
    return loss


def sigmoid_focal_loss_forward(input, target, weight, output, gamma, alpha):
    output.copy_(_sigmoid_focal_loss(input, target, weight, gamma, alpha))


def sigmoid_focal_loss_backward(input, target, weight, grad_input, gamma, alpha):
    with torch.enable_grad():
        x = input.detach().requires_grad_(True)
        loss = _sigmoid_focal_loss(x, target, weight, gamma, alpha)
        grad_input.copy_(torch.autograd.grad(loss.sum(), x)[0])


PROVIDED = ("nms", "roi_align_forward", "roi_align_backward",
            "sigmoid_focal_loss_forward", "sigmoid_focal_loss_backward")


class _FallbackExt(types.ModuleType):
    """``mmcv._ext`` stand-in: the kernels above, and a raising stub for any other name (mmcv checks
    with ``hasattr`` at import time that each op module's kernels exist)."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def missing(*args, **kwargs):
            raise NotImplementedError(f"mmcv op {name!r} is not available: {HOW_TO_INSTALL}")
        missing.__name__ = name
        return missing


def compiled_ops_available() -> bool:
    module = sys.modules.get(MODULE)
    if module is not None:
        return not isinstance(module, _FallbackExt)
    return importlib.util.find_spec(MODULE) is not None


def install() -> bool:
    """Put the fallback in place of ``mmcv._ext`` unless compiled mmcv ops exist; True if it is in use."""
    if compiled_ops_available():
        return False
    if MODULE not in sys.modules:
        ext = _FallbackExt(MODULE, __doc__)
        # a spec without a loader: importlib is satisfied, and mmengine's pkgutil.find_loader("mmcv._ext")
        # still reports no compiled mmcv (it picks torch's SyncBatchNorm, not mmcv's)
        ext.__spec__ = importlib.machinery.ModuleSpec(MODULE, None)
        for name in PROVIDED:
            setattr(ext, name, globals()[name])
        sys.modules[MODULE] = ext
    return True
