"""attnzoo's view of timm's model registry.

``register_model`` wraps timm's decorator: it records the name as ours and refuses
any name timm already owns, so importing attnzoo can never replace a timm model.
"""
import fnmatch
from typing import Callable, List

from timm.models import is_model
from timm.models import register_model as _timm_register_model

_OUR_MODELS: set = set()


def register_model(fn: Callable) -> Callable:
    name = fn.__name__
    if name not in _OUR_MODELS and is_model(name):
        raise RuntimeError(f"attnzoo model {name!r} would shadow timm's model of the same name")
    _OUR_MODELS.add(name)
    return _timm_register_model(fn)


def list_models(filter: str = "") -> List[str]:
    """Sorted attnzoo model names, optionally filtered by a wildcard pattern such as ``'cbam_*'``."""
    names = sorted(_OUR_MODELS)
    if filter:
        names = [n for n in names if fnmatch.fnmatch(n, filter)]
    return names
