"""``pretrained=True`` the timm way for checkpoints in an official layout.

:func:`build_model` is timm's ``build_model_with_cfg``: timm resolves the tag's ``pretrained_cfg``,
downloads ``url`` into its cache (``$TORCH_HOME/hub/checkpoints``, progress bar with
``timm.models.set_pretrained_download_progress()``) and loads with ``weights_only=True``; the
family's ``checkpoint_filter_fn`` converts the official layout on load. It closes three gaps:

- timm caches a download under the URL's last path segment, which is empty for Tsinghua
  Cloud's ``/f/<id>/?dl=1`` and ``content`` for every OneDrive link; such URLs are downloaded
  here with timm's cache, progress and hash settings under a name made from model, tag and URL;
- the official training scripts pickle their ``args`` (``argparse.Namespace``) or yacs ``config``
  (``CfgNode``) beside the weights; both are read as plain data (:func:`official_checkpoint_globals`),
  anything else that is not a tensor is refused, never executed;
- a checkpoint that does not fit, or has no direct download, fails with a message naming it.
"""
import argparse
import collections
import contextlib
import functools
import hashlib
import os
import pickle
import urllib.error
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional
from urllib.parse import urlparse

import torch
from timm.models import build_model_with_cfg, resolve_pretrained_cfg
from timm.models import _builder as _timm_builder
from timm.models._hub import download_cached_file

__all__ = ["build_model", "cache_file_name", "official_checkpoint_globals", "OFFICIAL_GLOBALS"]

# Data the official scripts pickle beside the weights: Swin-style `config` (yacs CfgNode, a dict
# subclass) is rebuilt as an OrderedDict, so neither yacs nor any code of it is needed.
OFFICIAL_GLOBALS = (argparse.Namespace, (collections.OrderedDict, "yacs.config.CfgNode"))


@contextlib.contextmanager
def official_checkpoint_globals():
    """Allow ``torch.load(weights_only=True)`` to read the official checkpoints' ``args`` / ``config``."""
    with torch.serialization.safe_globals(list(OFFICIAL_GLOBALS)):
        yield


def cache_file_name(url: str, architecture: str, tag: Optional[str]) -> Optional[str]:
    """The cache file name for ``url`` when its own last path segment is not a file name, else None.

    The name holds no ``-<hex>.`` (timm's hash-check pattern) and a digest of the URL, so a
    ``pretrained_cfg_overlay`` URL never reuses the file of the registered one."""
    if "." in os.path.basename(urlparse(url).path):
        return None
    digest = hashlib.sha256(url.encode()).hexdigest()[:12]
    return f"{architecture}.{tag or 'default'}_{digest}.pth"


def _names(entry) -> Iterable[str]:
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def _misfit(state_dict: Dict[str, torch.Tensor], model: torch.nn.Module) -> str:
    """What keeps ``state_dict`` from a strict load, ignoring what timm adapts after the filter:
    the classifier when ``num_classes`` differs from the cfg's, the first conv's input channels."""
    cfg = model.pretrained_cfg
    skip = set()
    if getattr(model, "num_classes", None) != cfg.get("num_classes"):
        skip = {f"{c}.{p}" for c in _names(cfg.get("classifier")) for p in ("weight", "bias")}
    adapted = {f"{c}.weight" for c in _names(cfg.get("first_conv"))}
    own = {k: v for k, v in model.state_dict().items() if k not in skip}
    got = {k: v for k, v in state_dict.items() if k not in skip}
    missing = sorted(set(own) - set(got))
    unexpected = sorted(set(got) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(got[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items()
                    if k in got and k not in adapted and got[k].shape != v.shape)

    def fmt(xs):
        return ", ".join(xs[:10]) + (f" ... (+{len(xs) - 10})" if len(xs) > 10 else "")
    parts = [f"{label} [{fmt(xs)}]" for label, xs in
             (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if xs]
    return "; ".join(parts)


def _fitting(filter_fn: Optional[Callable], source: str, state_dict, model):
    """``filter_fn``, then a strict check whose error names the checkpoint."""
    arch = model.pretrained_cfg.get("architecture")
    try:
        sd = filter_fn(state_dict, model) if filter_fn is not None else state_dict
    except (KeyError, ValueError) as e:
        raise RuntimeError(f"{source}: cannot convert it for {arch}: {e}") from e
    report = _misfit(sd, model)
    if report:
        raise RuntimeError(f"{source} does not fit {arch}: {report} (another variant's or resolution's "
                           f"checkpoint? docs/MODELS.md, 'Pretrained weights', lists each tag's)")
    return sd


def _source(cfg) -> Dict[str, Any]:
    """timm's choice of weight source for ``cfg`` (without copying a state_dict in it)."""
    keys = ("source", "url", "file", "state_dict", "hf_hub_id", "hf_hub_filename")
    load_from, loc = _timm_builder._resolve_pretrained_source({k: getattr(cfg, k) for k in keys})
    return dict(load_from=load_from, loc=loc)


def build_model(model_cls, variant: str, pretrained: bool, pretrained_filter_fn: Optional[Callable] = None,
                size_from_cfg: bool = False, **kwargs) -> torch.nn.Module:
    """``timm.models.build_model_with_cfg`` for a family whose checkpoints are in an official layout.

    ``pretrained_filter_fn`` (the family's ``checkpoint_filter_fn``) converts them on load.
    ``size_from_cfg``: build at the pretrained cfg's ``input_size`` unless ``img_size`` is given
    (checkpoints whose biases or position embeddings are sized for their training resolution).
    """
    if pretrained:
        _read_pretrained_file(variant, kwargs)
    cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
    if size_from_cfg:
        kwargs.setdefault("img_size", tuple(cfg.input_size[-2:]))
    registered_url = None
    source = "the given state_dict"
    if pretrained:
        src = _source(cfg)
        name = f"{variant}.{cfg.tag}" if cfg.tag else variant
        if not src["load_from"]:
            how = " ".join(_names(cfg.notes)) or (
                f"Convert a checkpoint (python tools/convert_checkpoint.py --model {name} --input <file> "
                f"--output <out>.safetensors), then pass pretrained_cfg_overlay=dict(file=<out>.safetensors).")
            raise RuntimeError(f"{name}: no weights to download. {how}")
        source = str((cfg.file or "the given state_dict") if src["load_from"] == "state_dict" else src["loc"])
        if src["load_from"] == "url":
            registered_url = official_url = src["loc"]
            if isinstance(official_url, (tuple, list)):  # timm's (url, cache file name)
                official_url, cached = official_url
            else:
                cached = cache_file_name(official_url, variant, cfg.tag)
            if cached:
                path = _download(official_url, cached, cfg, kwargs.get("cache_dir"))
                source = f"{official_url} (cached as {path})"
                # timm's loader finds it in the cache: a file URL's last segment is the cached file's name
                kwargs["pretrained_cfg_overlay"] = dict(kwargs.get("pretrained_cfg_overlay") or {},
                                                        url=Path(path).as_uri())
    kwargs["pretrained_filter_fn"] = functools.partial(_fitting, pretrained_filter_fn, source)
    try:
        with official_checkpoint_globals():
            model = build_model_with_cfg(model_cls, variant, pretrained, **kwargs)
    except pickle.UnpicklingError as e:
        why = (str(e).split("WeightsUnpickler error:", 1)[-1].strip().splitlines() or [type(e).__name__])[0]
        raise RuntimeError(f"{source}: not a weights-only checkpoint, refused to unpickle it ({why})") from e
    except urllib.error.URLError as e:
        raise RuntimeError(f"could not download {source} ({e}). {' '.join(_names(cfg.notes))}") from e
    if registered_url is not None:
        model.pretrained_cfg["url"] = registered_url  # not the file URL of the cache
    return model


def _read_pretrained_file(name: str, kwargs: Dict) -> None:
    """Swap ``pretrained_cfg_overlay=dict(file=path)`` in ``kwargs`` for the tensors of ``path``, read
    by attnzoo's loader: timm's would raise a bare ``FileNotFoundError`` or a ``SafetensorError``
    that names no file. Check the classifier first: timm either fails on a size mismatch or, when
    ``num_classes`` differs from the cfg's, silently drops the file's classifier."""
    from ..convert import convert_command  # attnzoo.convert imports the backbones
    from ._helpers import CheckpointError, load_checkpoint_file

    overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
    path = overlay.get("file")
    if not path or overlay.get("state_dict") is not None:
        return
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained file not found: {path}; make it with: {convert_command(name, path)}, "
                                f"or train one with python tools/train.py --model {name}")
    sd = load_checkpoint_file(path)
    cfg = resolve_pretrained_cfg(name, kwargs.get("pretrained_cfg"), overlay)  # the tag's, with the overlay
    overlay["state_dict"] = sd
    classifier = None if kwargs.get("features_only") else cfg.classifier
    weight = sd.get(f"{classifier}.weight") if isinstance(classifier, str) else None
    if weight is not None:  # in attnzoo's layout (train.py, convert_checkpoint.py): its class count is known
        n = weight.shape[0]
        if "num_classes" not in kwargs and n != cfg.num_classes:
            raise CheckpointError(f"{path}: its classifier {classifier} has {n} classes, {name} has "
                                  f"{cfg.num_classes} by default: pass num_classes={n} to timm.create_model")
        if kwargs.get("num_classes") == n:
            overlay["num_classes"] = n  # so timm loads the classifier instead of dropping it
    kwargs["pretrained_cfg_overlay"] = overlay


def _download(url: str, file_name: str, cfg, cache_dir) -> str:
    try:
        return download_cached_file((url, file_name), check_hash=_timm_builder._CHECK_HASH,
                                    progress=_timm_builder._DOWNLOAD_PROGRESS, cache_dir=cache_dir)
    except urllib.error.URLError as e:
        raise RuntimeError(f"could not download {url} ({e}). {' '.join(_names(cfg.notes))}") from e
