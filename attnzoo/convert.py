"""Official checkpoint -> attnzoo conversion, keyed by family.

Each family module in ``attnzoo.backbones`` owns a ``checkpoint_filter_fn`` that
renames official keys to ours by name. The family of a model is the module that
registered it, so a new family joins the registry by defining that function.
"""
import os
from typing import Dict, Mapping, Optional

import timm
import torch
from timm.models import split_model_name_tag
from timm.models._hub import save_config_for_hf
from timm.models import model_entrypoint

from . import backbones
from ._registry import list_models
from .backbones._helpers import CheckpointError, check_keys, load_checkpoint_file, unwrap_state_dict

CONVERTERS = {
    name: getattr(backbones, name).checkpoint_filter_fn
    for name in dir(backbones)
    if not name.startswith("_") and hasattr(getattr(backbones, name), "checkpoint_filter_fn")
}


def write_safetensors(path, tensors: Mapping[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> None:
    """``safetensors`` ``save_file`` through a temp file and a rename (an interrupted write never leaves a
    half-written file), with the mode any other output gets: ``save_file`` creates its file 0600."""
    from safetensors.torch import save_file

    tmp = f"{path}.tmp"
    open(tmp, "wb").close()  # created the usual way: 0666 less the umask (and default ACLs)
    mode = os.stat(tmp).st_mode & 0o777
    save_file(dict(tensors), tmp, metadata=metadata)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def convert_command(model_name: str, output: str) -> str:
    """The command that writes ``output`` for ``model_name`` from an official checkpoint (error hints)."""
    return f"python tools/convert_checkpoint.py --model {model_name} --input <official checkpoint> --output {output}"


def family_of(model_name: str) -> str:
    arch = split_model_name_tag(model_name)[0]  # a pretrained tag ('name.tag') picks a cfg, not a family
    if arch not in list_models():
        raise ValueError(f"{model_name!r} is not an attnzoo model; choose from {list_models()}")
    return model_entrypoint(arch).__module__.rsplit(".", 1)[-1]  # the family file that registered it


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
    try:
        sd = convert_state_dict(raw, model, family)
    except ValueError as e:  # the keys don't fit: name the file
        raise CheckpointError(f"{path}: {e}") from e
    model.load_state_dict(sd)
    return model, sd


def save_local_dir(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], directory, source: str = "") -> str:
    """Write a timm model folder: ``model.safetensors`` and ``config.json`` (architecture, model args and
    the pretrained cfg of the model's tag: input size, crop, mean / std, classes). Load it with
    ``timm.create_model("local-dir:<directory>", pretrained=True)``; returns the weights' path."""
    os.makedirs(directory, exist_ok=True)
    weights = os.path.join(directory, "model.safetensors")
    write_safetensors(weights, {k: v.contiguous() for k, v in state_dict.items()})
    notes = (f"converted from {source} by tools/convert_checkpoint.py",) if source else None
    # timm's own writer (as push_to_hf_hub's); it drops the source url / file from the cfg
    save_config_for_hf(model, os.path.join(directory, "config.json"),
                       model_config=dict(pretrained_cfg=dict(notes=notes)))
    return weights
