"""One feature backbone for dense prediction: any attnzoo (or timm) model through timm's ``features_only``.

Stages are the model's feature levels at stride 4 and coarser (``feature_info`` entries with
``reduction >= 4``), numbered from 0 like mmdet's ResNet and Swin: ``out_indices=(0, 1, 2, 3)`` returns
the stride 4, 8, 16 and 32 maps. ``frozen_stages=k`` freezes the stem (everything that runs before
stage 0) and stages 0..k-1; ``-1`` freezes nothing, ``0`` the stem only.
"""
import copy
import functools
import logging
import sys
from typing import Dict, List, Optional, Sequence

import timm
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..backbones._helpers import CheckpointError, load_checkpoint_file
from ..convert import convert_command

_logger = logging.getLogger(__name__)


def stage_info(model_name: str, **model_kwargs) -> List[Dict]:
    """The ``feature_info`` entries of ``model_name``'s stages (stride >= 4), each with its timm ``index``.

    Builds the model on the meta device (no memory, well under a second), once per name and kwargs.
    """
    try:
        key = tuple(sorted(model_kwargs.items()))
        hash(key)
    except TypeError:  # unhashable kwargs (lists): probe without the cache
        return copy.deepcopy(_stage_info(model_name, model_kwargs))
    return copy.deepcopy(_cached_stage_info(model_name, key))


@functools.lru_cache(maxsize=None)
def _cached_stage_info(model_name: str, key: tuple) -> List[Dict]:
    return _stage_info(model_name, dict(key))


def _stage_info(model_name: str, model_kwargs: Dict) -> List[Dict]:
    with torch.device("meta"):
        probe = timm.create_model(model_name, **model_kwargs)
    return [dict(info, index=i) for i, info in enumerate(probe.feature_info) if info["reduction"] >= 4]


def feature_channels(model_name: str, out_indices: Sequence[int] = (0, 1, 2, 3), **model_kwargs) -> List[int]:
    """Channels of the maps ``AttnZooBackbone(model_name, out_indices)`` returns: a neck's ``in_channels``."""
    stages = stage_info(model_name, **model_kwargs)
    return [stages[i]["num_chs"] for i in _check_indices(model_name, out_indices, len(stages))]


def _check_indices(model_name: str, out_indices: Sequence[int], num_stages: int) -> List[int]:
    idx = [int(i) for i in out_indices]
    if not idx or idx != sorted(set(idx)) or idx[0] < 0 or idx[-1] >= num_stages:
        raise ValueError(f"out_indices={tuple(out_indices)} must be increasing stage numbers in "
                         f"[0, {num_stages}) for {model_name} ({num_stages} stages)")
    return idx


def _fit_to_body(sd: Dict[str, torch.Tensor], full: nn.Module, body_sd: Dict[str, torch.Tensor]):
    """Match a state dict in ``full``'s (the classification model's) key names to its features model:
    ``(tensors to load, by body name; missing, unexpected, shape mismatches)``. The classifier and the
    parts the features model drops (final norm, later stages) are neither loaded nor unexpected."""
    to_body = {}
    for k in full.state_dict():
        # FeatureListNet flattens "stages.0.x" to "stages_0.x"; FeatureGetterNet keeps the model as ``model.``
        for candidate in (k, "model." + k, k.replace(".", "_", 1)):
            if candidate in body_sd:
                to_body[k] = candidate
                break
    cfg = full.pretrained_cfg

    def names(v):
        return (v,) if isinstance(v, str) else tuple(v or ())
    classifier = tuple(c + "." for c in names(cfg.get("classifier")))
    first_conv = {c + ".weight" for c in names(cfg.get("first_conv"))}
    known = set(full.state_dict())
    loaded, unexpected, shapes = {}, [], []
    for k, v in sd.items():
        if k not in to_body:
            if k not in known and not k.startswith(classifier):
                unexpected.append(k)
            continue
        want = body_sd[to_body[k]].shape
        if k in first_conv and v.ndim == 4 and v.shape[0] == want[0] and v.shape[1] != want[1]:
            v = timm.models.adapt_input_conv(want[1], v)  # in_chans != 3, as timm's pretrained path does
        if v.shape != want:
            shapes.append(f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(want)}")
        else:
            loaded[to_body[k]] = v
    from_body = {b: k for k, b in to_body.items()}
    # BatchNorm's step counters: absent from old official files, unused unless momentum=None
    missing = [from_body.get(b, b) for b in body_sd
               if b not in loaded and from_body.get(b, b) not in sd and not b.endswith("num_batches_tracked")]
    return loaded, sorted(missing), sorted(unexpected), sorted(shapes)


def _first(xs: List[str], n: int = 20) -> str:
    return ", ".join(xs[:n]) + (f" ... (+{len(xs) - n})" if len(xs) > n else "")


class AttnZooBackbone(nn.Module):
    """Multi-scale features of a registered model, for detection and segmentation necks.

    Args:
        model_name: any model ``timm.create_model`` knows (``attnzoo.list_models()``).
        out_indices: stages to return (0 = stride 4 ... 3 = stride 32).
        frozen_stages: freeze the stem and stages ``< frozen_stages`` (``requires_grad=False`` and eval
            mode, kept through ``train()``); ``-1`` freezes nothing.
        norm_eval: keep every BatchNorm in eval mode during training (frozen running statistics).
        drop_path_rate: stochastic depth; ``None`` keeps the model's default.
        checkpoint: local weights file, safetensors or a weights-only ``torch.load`` file, in attnzoo's
            layout or the official one (the family's ``checkpoint_filter_fn`` converts it); the classifier
            and whatever else the stages don't use (final norm, later stages) are dropped.
        strict: with a ``checkpoint``, raise :class:`~attnzoo.backbones._helpers.CheckpointError` listing
            the missing and unexpected keys and shape mismatches unless every stage weight is in the file
            and every file tensor belongs to the model. ``False`` loads the tensors that fit (at least one
            must) and logs the same report as a warning.
        **model_kwargs: passed to the model, e.g. ``kernel_size`` or ``dilations`` for NAT/DiNAT.
    """

    def __init__(self, model_name: str, out_indices: Sequence[int] = (0, 1, 2, 3), frozen_stages: int = -1,
                 norm_eval: bool = False, drop_path_rate: Optional[float] = None, checkpoint: Optional[str] = None,
                 strict: bool = True, **model_kwargs):
        super().__init__()
        if drop_path_rate is not None:
            model_kwargs["drop_path_rate"] = drop_path_rate
        stages = stage_info(model_name, **model_kwargs)
        self.out_indices = tuple(_check_indices(model_name, out_indices, len(stages)))
        if not -1 <= frozen_stages <= len(stages):
            raise ValueError(f"frozen_stages={frozen_stages} must be in [-1, {len(stages)}] for {model_name}")
        self.model_name, self.frozen_stages, self.norm_eval = model_name, frozen_stages, norm_eval
        self.checkpoint = checkpoint

        self.body = timm.create_model(model_name, features_only=True,
                                      out_indices=[stages[i]["index"] for i in self.out_indices], **model_kwargs)
        if checkpoint:
            self._load_checkpoint(str(checkpoint), strict, model_kwargs)
        self.out_channels = [stages[i]["num_chs"] for i in self.out_indices]
        self.strides = [stages[i]["reduction"] for i in self.out_indices]
        # names, not objects: SyncBN conversion (mmengine's sync_bn, DDP set-ups) swaps the BN modules
        self._frozen_names = self._freeze([s["module"] for s in stages])
        self.train()

    def _load_checkpoint(self, path: str, strict: bool, model_kwargs: Dict) -> None:
        """Load ``path`` into the features model, after the family's ``checkpoint_filter_fn`` (official
        layouts). Not through timm's pretrained path: that loads a ``features_only`` model non-strictly,
        whatever the file holds."""
        try:
            sd = load_checkpoint_file(path)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e}; make it with: {convert_command(self.model_name, path)} "
                                    f"(or pass checkpoint=None to train from scratch)") from e
        with torch.device("meta"):  # the classification model the file describes, without memory
            full = timm.create_model(self.model_name, **model_kwargs)
        module = sys.modules.get(timm.models.model_entrypoint(full.pretrained_cfg["architecture"]).__module__)
        filter_fn = getattr(module, "checkpoint_filter_fn", None)
        if filter_fn is not None:
            try:
                sd = filter_fn(sd, full)
            except Exception as e:
                raise CheckpointError(f"{path}: {module.__name__}.checkpoint_filter_fn failed "
                                      f"({type(e).__name__}: {e})") from e
        loaded, missing, unexpected, shapes = _fit_to_body(sd, full, self.body.state_dict())
        if missing or unexpected or shapes:
            report = f"checkpoint {path} does not fit {self.model_name}: " + "; ".join(
                f"{what} [{_first(xs)}]" for what, xs in (
                    ("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if xs)
            if not loaded:
                raise CheckpointError(f"{report}; none of its tensors fit: is it a {self.model_name} checkpoint?")
            if strict:
                raise CheckpointError(f"{report}; pass strict=False to load the tensors that fit")
            _logger.warning(f"{report}; strict=False: loading the {len(loaded)} tensors that fit")
        self.body.load_state_dict(loaded, strict=False)

    def _submodule(self, name: str) -> nn.Module:
        # FeatureListNet flattens "stages.0" to "stages_0"; FeatureGetterNet keeps the model as ``.model``
        for candidate in (name, name.replace(".", "_"), "model." + name):
            try:
                return self.body.get_submodule(candidate)
            except AttributeError:
                continue
        raise RuntimeError(f"stage module {name!r} of {self.model_name} not found in its features_only model")

    def _freeze(self, stage_modules: List[str]) -> List[str]:
        """Freeze every parameter registered up to the end of stage ``frozen_stages - 1`` (the stem: up to
        the start of stage 0); return the modules to hold in eval mode. Registration order is execution
        order in timm's feature wrappers. A stage's ``feature_info`` module may be its last part only
        (HaloNet's ``final_conv``), so stage ends, not starts, bound the frozen prefix."""
        if self.frozen_stages < 0:
            return []
        params = list(self.body.parameters())
        if self.frozen_stages == 0:
            first = {id(p) for p in self._submodule(stage_modules[0]).parameters()}
            end = min(i for i, p in enumerate(params) if id(p) in first)
        elif self.frozen_stages == len(stage_modules):  # the whole backbone
            end = len(params)
        else:
            last = {id(p) for p in self._submodule(stage_modules[self.frozen_stages - 1]).parameters()}
            end = max(i for i, p in enumerate(params) if id(p) in last) + 1
        frozen = {id(p) for p in params[:end]}
        for p in params[:end]:
            p.requires_grad_(False)
        modules = list(self.body.named_modules())
        owners = [i for i, (_, m) in enumerate(modules)
                  if any(id(p) in frozen for p in m.parameters(recurse=False))]
        if not owners:
            return []
        # parameter-free modules inside the frozen prefix (dropout, drop path) stop training too
        return [n for n, m in modules[:owners[-1] + 1] if all(id(p) in frozen for p in m.parameters())]

    @property
    def frozen_modules(self) -> List[nn.Module]:
        """The modules of the frozen stages, which ``train()`` keeps in eval mode."""
        return [self.body.get_submodule(n) for n in self._frozen_names]

    def train(self, mode: bool = True) -> "AttnZooBackbone":
        super().train(mode)
        if mode:
            for m in self.frozen_modules:
                m.eval()
            if self.norm_eval:
                for m in self.modules():
                    if isinstance(m, _BatchNorm):
                        m.eval()
        return self

    def init_weights(self) -> None:
        """Weights are final after ``__init__`` (timm init, then ``checkpoint``). OpenMMLab runners call
        this on every child; defining it stops them from re-initialising the timm submodules."""

    def forward(self, x: torch.Tensor):
        return tuple(self.body(x))
