"""attnzoo's view of timm's model registry.

``register_model`` wraps timm's decorator: it records the name as ours and refuses
any name timm already owns, so importing attnzoo can never replace a timm model.
It also reads a ``pretrained_cfg_overlay=dict(file=...)`` with attnzoo's safe loader
(:func:`_read_pretrained_file`), so a bad local weights file is a clear error.
"""
import fnmatch
import functools
import os
from typing import Callable, Dict, List

from timm.models import is_model
from timm.models import register_model as _timm_register_model

_OUR_MODELS: set = set()


def register_model(fn: Callable) -> Callable:
    name = fn.__name__
    if name not in _OUR_MODELS and is_model(name):
        raise RuntimeError(f"attnzoo model {name!r} would shadow timm's model of the same name")
    _OUR_MODELS.add(name)

    @functools.wraps(fn)  # keeps __module__: timm finds the family's default_cfgs through it
    def entrypoint(pretrained: bool = False, **kwargs):
        if pretrained:
            _read_pretrained_file(name, kwargs)
        return fn(pretrained=pretrained, **kwargs)
    return _timm_register_model(entrypoint)


def _read_pretrained_file(name: str, kwargs: Dict) -> None:
    """Swap ``pretrained_cfg_overlay=dict(file=path)`` in ``kwargs`` for the tensors of ``path``, read
    by attnzoo's loader: timm's would raise a bare ``FileNotFoundError`` or a ``SafetensorError``
    that names no file. Check the classifier first: timm either fails on a size mismatch or, when
    ``num_classes`` differs from the cfg's, silently drops the file's classifier."""
    from timm.models import resolve_pretrained_cfg

    from .backbones._helpers import CheckpointError, load_checkpoint_file
    from .convert import convert_command

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


def list_models(filter: str = "") -> List[str]:
    """Sorted attnzoo model names, optionally filtered by a wildcard pattern such as ``'cbam_*'``."""
    names = sorted(_OUR_MODELS)
    if filter:
        names = [n for n in names if fnmatch.fnmatch(n, filter)]
    return names
