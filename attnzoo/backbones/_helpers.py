"""Checkpoint helpers shared by every family's ``checkpoint_filter_fn`` and the converter,
and the timm-contract mixins shared by the hierarchical backbones."""
import os
import pickle
import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn
from timm.layers import trunc_normal_
from timm.models._features import feature_take_indices

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


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: corrupt, truncated, pickled code, or keys that don't fit.
    The message names the file."""


def load_checkpoint_file(path: str) -> Dict[str, torch.Tensor]:
    """Read a checkpoint without unpickling arbitrary objects (safetensors or ``weights_only``).

    Raises ``FileNotFoundError`` for a missing file and :class:`CheckpointError` for one that is
    truncated, corrupt, refused (pickled objects) or holds no tensors.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(9)
    # by content too: a safetensors file starts with its header length, then the JSON header
    if path.endswith(".safetensors") or head[8:9] == b"{":
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except Exception as e:  # SafetensorError (not importable by name in every release), OSError
            raise CheckpointError(f"{path}: not a readable safetensors file, truncated or corrupt ({e})") from e
    from ._pretrained import official_checkpoint_globals

    try:
        # the args / config that training scripts pickle beside the weights: data, not code
        with official_checkpoint_globals():
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is a page long: keep its one line of substance
        why = str(e).split("WeightsUnpickler error:", 1)[-1].strip()
        why = why.splitlines()[0].split(". ")[0] if why else e.__class__.__name__
        if not head.startswith((b"PK", b"\x80")):  # neither torch's zip nor a pickle (protocol >= 2)
            raise CheckpointError(f"{path}: neither a torch checkpoint nor a safetensors file, "
                                  f"or corrupt ({why})") from e
        # pickle with non-tensor objects: refuse rather than execute it
        raise CheckpointError(f"{path}: not a weights-only checkpoint, refused to unpickle it ({why})") from e
    except Exception as e:  # EOFError, OSError, RuntimeError from a cut-off or damaged zip / pickle
        why = f"{e.__class__.__name__}: {e}" if str(e) else e.__class__.__name__
        raise CheckpointError(f"{path}: not a readable torch checkpoint, truncated or corrupt ({why})") from e
    try:
        return unwrap_state_dict(obj)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e


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


def init_linear_layernorm(m: nn.Module, linear_types: Tuple[type, ...] = (nn.Linear,)) -> None:
    """The official init of most transformer families: trunc_normal(0.02) weights and zero
    biases for ``linear_types``, LayerNorm (1, 0); anything else keeps its own init."""
    if isinstance(m, linear_types):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class StagedFeaturesMixin:
    """``forward_features``, ``forward_intermediates``, ``prune_intermediate_layers`` and
    ``set_grad_checkpointing`` for a stem -> stages -> neck backbone.

    Every stage has a ``grad_checkpointing`` flag. With ``trailing_downsample`` a stage ends
    in an optional ``downsample`` and has ``forward_blocks``: its feature map is taken before
    the downsampler (NAT, MAViT). ``forward_features`` always calls the stage modules
    themselves, so hooks on them see the same calls as before.
    """

    stages_attr = "stages"  # the nn.ModuleList of stages
    trailing_downsample = False
    feature_fmt = "NHWC"  # layout of the maps between stages
    output_fmts = ("NCHW", "NHWC")
    final_norm = True  # ``norm`` of the last stage's map; False: ``norm=`` and ``prune_norm`` do nothing

    def _forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _stage_input(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return x

    def _neck(self, x: torch.Tensor) -> torch.Tensor:
        """What follows the last stage in ``forward_features``."""
        return self.norm(x) if self.final_norm else x

    def _final_features(self, x: torch.Tensor, complete: bool) -> torch.Tensor:
        """``forward_intermediates``' features; a pass stopped early skips the neck."""
        return self._neck(x) if complete else x

    def _prune_stages(self, num_stages: int) -> None:
        setattr(self, self.stages_attr, getattr(self, self.stages_attr)[:num_stages])
        if self.trailing_downsample:
            getattr(self, self.stages_attr)[-1].downsample = None

    def _prune_head(self) -> None:
        self.reset_classifier(0, "")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in getattr(self, self.stages_attr):
            stage.grad_checkpointing = enable

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Each stage's map (NCHW or NHWC) and, unless ``intermediates_only``, the final features.
        ``norm`` applies the final norm to the last stage's map (where the model has one)."""
        if output_fmt not in self.output_fmts:
            raise ValueError(f"output_fmt must be {' or '.join(map(repr, self.output_fmts))}, got {output_fmt!r}")
        stages = getattr(self, self.stages_attr)
        take_indices, max_index = feature_take_indices(len(stages), indices)
        last_stage = len(stages) - 1
        last = max_index if stop_early or intermediates_only else last_stage
        intermediates = []
        x = self._forward_stem(x)
        for i, stage in enumerate(stages[:last + 1]):
            x = self._stage_input(i, x)
            x = stage.forward_blocks(x) if self.trailing_downsample else stage(x)
            if i in take_indices:
                y = self.norm(x) if norm and self.final_norm and i == last_stage else x
                if output_fmt != self.feature_fmt:
                    y = y.permute(0, 3, 1, 2) if self.feature_fmt == "NHWC" else y.permute(0, 2, 3, 1)
                intermediates.append(y)
            if self.trailing_downsample and i < last and stage.downsample is not None:
                x = stage.downsample(x)
        if intermediates_only:
            return intermediates
        return self._final_features(x, last == last_stage), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True):
        take_indices, max_index = feature_take_indices(len(getattr(self, self.stages_attr)), indices)
        self._prune_stages(max_index + 1)
        if prune_norm and self.final_norm:
            self.norm = nn.Identity()
        if prune_head:
            self._prune_head()
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._forward_stem(x)
        for i, stage in enumerate(getattr(self, self.stages_attr)):
            x = stage(self._stage_input(i, x))
        return self._neck(x)
