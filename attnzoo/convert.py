"""Official checkpoint -> attnzoo conversion, keyed by family.

Each family module in ``attnzoo.backbones`` owns a ``checkpoint_filter_fn`` that
renames official keys to ours by name. The family of a model is the module that
registered it, so a new family joins the registry by defining that function.
"""
from typing import Dict, Optional

import timm
import torch
from timm.models._registry import _model_to_module

from . import backbones
from ._registry import list_models
from .backbones._helpers import check_keys, load_checkpoint_file, unwrap_state_dict

CONVERTERS = {
    name: getattr(backbones, name).checkpoint_filter_fn
    for name in dir(backbones)
    if not name.startswith("_") and hasattr(getattr(backbones, name), "checkpoint_filter_fn")
}


def family_of(model_name: str) -> str:
    if model_name not in list_models():
        raise ValueError(f"{model_name!r} is not an attnzoo model; choose from {list_models()}")
    return _model_to_module[model_name]


def convert_state_dict(checkpoint, model: torch.nn.Module, family: str) -> Dict[str, torch.Tensor]:
    """Convert an official checkpoint (any supported wrapper) for ``model`` and check every key."""
    if family not in CONVERTERS:
        raise ValueError(f"no converter for family {family!r}; known: {sorted(CONVERTERS)}")
    sd = CONVERTERS[family](unwrap_state_dict(checkpoint), model)
    check_keys(sd, model)
    return sd


def convert_checkpoint(path: str, model_name: str, num_classes: Optional[int] = None, **model_kwargs):
    """Load an official checkpoint file and return ``(model, state_dict)`` with the weights loaded.

    ``num_classes`` defaults to what the checkpoint's classifier holds.
    """
    family = family_of(model_name)
    raw = load_checkpoint_file(path)
    if num_classes is None:
        probe = timm.create_model(model_name, pretrained=False, **model_kwargs)
        classifier = probe.pretrained_cfg["classifier"]
        converted = CONVERTERS[family](raw, probe)
        key = f"{classifier}.weight"
        num_classes = converted[key].shape[0] if key in converted else probe.num_classes
    model = timm.create_model(model_name, pretrained=False, num_classes=num_classes, **model_kwargs)
    sd = convert_state_dict(raw, model, family)
    model.load_state_dict(sd)
    return model, sd
