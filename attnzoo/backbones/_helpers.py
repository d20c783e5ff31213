"""Checkpoint helpers shared by every family's ``checkpoint_filter_fn`` and the converter."""
import argparse
import re
from typing import Any, Dict, Iterable, Mapping, Tuple

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def unwrap_state_dict(checkpoint: Any) -> Dict[str, torch.Tensor]:
    """Return the tensors of an official checkpoint.

    Accepts a raw state_dict, ``{'model': sd}`` (BiFormer, Agent, MALA),
    ``{'state_dict': sd}`` (CBAM, ECA) and a DataParallel ``module.`` prefix.
    """
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"checkpoint must be a mapping of tensors, got {type(checkpoint).__name__}")
    for key in ("state_dict", "model", "model_ema", "state_dict_ema"):
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            checkpoint = checkpoint[key]
            break
    sd = {}
    for k, v in checkpoint.items():
        if not isinstance(v, torch.Tensor):
            continue  # optimizer steps, epochs, args ...
        sd[k[len("module."):] if k.startswith("module.") else k] = v
    if not sd:
        raise ValueError("checkpoint holds no tensors")
    return sd


def remap_keys(state_dict: Mapping[str, torch.Tensor], rules: Iterable[Tuple[str, str]]) -> Dict[str, torch.Tensor]:
    """Rename keys by name with ``re.sub`` rules applied in order; never by key order."""
    rules = [(re.compile(p), r) for p, r in rules]
    out = {}
    for k, v in state_dict.items():
        for pattern, repl in rules:
            k = pattern.sub(repl, k)
        out[k] = v
    return out


def load_checkpoint_file(path: str) -> Dict[str, torch.Tensor]:
    """Read a checkpoint without unpickling arbitrary objects (safetensors or ``weights_only``)."""
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    try:
        # argparse.Namespace: timm training checkpoints keep their args in one; it is data, not code
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle with non-tensor objects: refuse rather than execute it
        raise ValueError(f"{path}: not a weights-only checkpoint ({e.__class__.__name__}: {e})") from e
    return unwrap_state_dict(obj)


def key_report(state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module) -> str:
    """Missing / unexpected keys and shape mismatches of ``state_dict`` against ``model``; '' if it fits."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items() if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape))
    if not (missing or unexpected or shapes):
        return ""

    def fmt(xs):
        return ", ".join(xs[:20]) + (f" ... (+{len(xs) - 20})" if len(xs) > 20 else "")
    return f"missing keys [{fmt(missing)}]; unexpected keys [{fmt(unexpected)}]; shape mismatches [{fmt(shapes)}]"


def check_keys(state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Raise a ``ValueError`` listing missing / unexpected keys and shape mismatches."""
    report = key_report(state_dict, model)
    if report:
        raise ValueError(f"checkpoint does not match {type(model).__name__}: {report}")


def cfg(url: str = "", **kwargs) -> Dict[str, Any]:
    """ImageNet-1k defaults shared by the families' ``_cfg``."""
    return {
        "url": url, "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bilinear", "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
        **kwargs,
    }


class ClassifierHeadMixin:
    """The timm classifier contract for a model whose ``head`` is a timm ``ClassifierHead``
    and whose ``forward_features`` output feeds it."""

    @torch.jit.ignore
    def get_classifier(self) -> torch.nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool=None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
