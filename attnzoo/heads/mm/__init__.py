"""OpenMMLab glue: ``import attnzoo.heads.mm`` (or ``custom_imports=dict(imports=['attnzoo.heads.mm'])``
in a config) registers :class:`~attnzoo.heads.AttnZooBackbone` in mmdet's and mmseg's ``MODELS``.

Importing it also, before any mmdet/mmseg model code loads:
- gives mmcv-lite the few kernels these heads need (:mod:`.mmcv_ops`), if compiled mmcv ops are absent;
- lets mmengine resume its own checkpoints under torch >= 2.6 (:mod:`.checkpoint`).
"""
import importlib
import importlib.util
import warnings

from ..backbone import AttnZooBackbone, feature_channels, stage_info
from . import checkpoint, mmcv_ops

if importlib.util.find_spec("mmengine") is None or importlib.util.find_spec("mmcv") is None:
    raise ImportError('attnzoo.heads.mm needs the OpenMMLab stack: pip install -e ".[mm]"')

# mmengine's package_utils imports (and reloads) pkg_resources on every `mmdet::` config lookup, and
# setuptools warns each time. Only those two call sites are silenced: a user's own import still warns.
for _module in (r"mmengine\.utils\.package_utils", r"importlib"):
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning, module=_module)

MMCV_OPS_FALLBACK = mmcv_ops.install()
checkpoint.install()

REGISTERED = []  # the scopes AttnZooBackbone is registered in
for _scope in ("mmdet", "mmseg"):
    if importlib.util.find_spec(_scope) is None:
        continue
    _models = importlib.import_module(f"{_scope}.registry").MODELS
    if "AttnZooBackbone" not in _models.module_dict:
        _models.register_module(module=AttnZooBackbone)
    REGISTERED.append(_scope)
if not REGISTERED:
    raise ImportError('attnzoo.heads.mm needs mmdet and/or mmsegmentation: pip install -e ".[mm]"')

__all__ = ["AttnZooBackbone", "feature_channels", "stage_info", "MMCV_OPS_FALLBACK", "REGISTERED"]
