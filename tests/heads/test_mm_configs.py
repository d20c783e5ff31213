"""Every config under configs/mmdet and configs/mmseg, found on disk: it loads, its heads read the channels the
backbone gives, and it builds with its family's tiny model. Every family has RetinaNet and UPerNet configs."""
import copy
import functools
from pathlib import Path

import pytest
import torch

import attnzoo
import attnzoo.heads.mm  # noqa: F401  (registers AttnZooBackbone)
from attnzoo.convert import family_of
from attnzoo.heads import feature_channels
from attnzoo.heads.mm.config import use_backbone

from mmengine.config import Config
from mmengine.registry import DefaultScope, init_default_scope

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DET = sorted((CONFIGS / "mmdet").glob("*.py"))
SEG = sorted((CONFIGS / "mmseg").glob("*.py"))
TOY = sorted((CONFIGS / "mmdet" / "toy").glob("*.py")) + sorted((CONFIGS / "mmseg" / "toy").glob("*.py"))
TINY = {}  # family -> its first tiny model
for _name in attnzoo.list_models("test_*"):
    TINY.setdefault(family_of(_name), _name)


def _ids(paths):
    return [p.name for p in paths]


def _load(path):
    return copy.deepcopy(_load_once(path))


@functools.lru_cache(maxsize=None)
def _load_once(path):
    return Config.fromfile(str(path))


def _readers(model):
    return [model.neck] if model.get("neck") else [model.decode_head, model.auxiliary_head]


def _build(cfg):
    scope = cfg.default_scope
    init_default_scope(scope)
    from mmengine.registry import MODELS
    with DefaultScope.overwrite_default_scope(scope):
        return MODELS.build(cfg.model)


def test_configs_are_found():
    assert len(DET) >= 10 and len(SEG) >= 5 and len(TOY) >= 3


@pytest.mark.parametrize("path", DET + SEG + TOY, ids=_ids(DET + SEG + TOY))
def test_config_heads_read_the_backbone_channels(path):
    cfg = _load(path)
    backbone = cfg.model.backbone
    assert backbone.type == "AttnZooBackbone" and backbone.model_name in attnzoo.list_models()
    assert "attnzoo.heads.mm" in cfg.custom_imports.imports
    assert f"_{backbone.model_name}_" in path.stem, f"{path.name} does not name its model {backbone.model_name}"
    channels = feature_channels(backbone.model_name, backbone.get("out_indices", (0, 1, 2, 3)))
    for reader in _readers(cfg.model):
        index = reader.get("in_index")
        want = channels[index] if isinstance(index, int) else channels
        assert reader.in_channels == want, f"{path.name}: in_channels {reader.in_channels} != {want}"


@pytest.mark.parametrize("path", DET + SEG, ids=_ids(DET + SEG))
def test_config_builds_with_its_family_tiny_model(path):
    cfg = _load(path)
    family = family_of(cfg.model.backbone.model_name)
    assert family in TINY, f"family {family} has no test_* model"
    use_backbone(cfg, TINY[family], checkpoint=None)
    model = _build(cfg).eval()
    with torch.no_grad():
        feats = model.extract_feat(torch.randn(1, 3, 64, 64))
    assert all(torch.isfinite(f).all() for f in feats)


@pytest.mark.parametrize("family", sorted(TINY))
def test_every_family_has_retinanet_and_upernet_configs_and_builds_in_both(family):
    def of_family(paths, head):
        return [p for p in paths if p.name.startswith(head + "_")
                and family_of(_load(p).model.backbone.model_name) == family]
    retinanet, upernet = of_family(DET, "retinanet"), of_family(SEG, "upernet")
    assert retinanet and upernet, f"{family}: add configs/mmdet/retinanet_* and configs/mmseg/upernet_* configs"
    for name in attnzoo.list_models("test_*"):
        if family_of(name) != family:
            continue
        for path in (retinanet[0], upernet[0]):
            cfg = use_backbone(_load(path), name, checkpoint=None)
            model = _build(cfg).eval()
            with torch.no_grad():
                out = model._forward(torch.randn(1, 3, 64, 64))  # head outputs (class / box maps, seg logits)
            assert _all_finite(out), f"{name} in {path.name}"


def _all_finite(out):
    if isinstance(out, torch.Tensor):
        return bool(torch.isfinite(out).all())
    return all(_all_finite(o) for o in out)


def test_loading_a_config_prints_no_pkg_resources_warning():
    # mmengine re-imports pkg_resources on every `mmdet::` lookup; a user script should not see it
    import subprocess
    import sys

    code = ("import attnzoo.heads.mm\nfrom mmengine.config import Config\n"
            f"Config.fromfile({str(CONFIGS / 'mmdet/toy/retinanet_test_cbam_resnet_fpn_toy.py')!r})\n")
    proc = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "pkg_resources" not in proc.stderr, proc.stderr[-2000:]
