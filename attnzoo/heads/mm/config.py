"""Point an OpenMMLab config at another backbone, keeping the heads' ``in_channels`` consistent;
check its backbone checkpoint before a run builds anything."""
import os

from ...convert import convert_command
from ..backbone import feature_channels


def use_backbone(cfg, model_name: str, **backbone_kwargs):
    """Set ``cfg.model.backbone`` to ``model_name`` (plus ``backbone_kwargs``) and rewrite the
    ``in_channels`` of the neck, decode head and auxiliary head that read the backbone's maps.

    Works on an mmengine ``Config`` in place and returns it.
    """
    model = cfg.model
    model.backbone.update(model_name=model_name, **backbone_kwargs)
    extra = {k: v for k, v in model.backbone.items()
             if k not in ("type", "model_name", "out_indices", "frozen_stages", "norm_eval", "drop_path_rate",
                          "checkpoint", "strict")}
    channels = feature_channels(model_name, model.backbone.get("out_indices", (0, 1, 2, 3)), **extra)
    # the neck reads the backbone when there is one; otherwise the heads do
    readers = [model["neck"]] if model.get("neck") else [model[k] for k in ("decode_head", "auxiliary_head")
                                                          if model.get(k)]
    for reader in readers:
        index = reader.get("in_index")
        reader.in_channels = channels[index] if isinstance(index, int) else (
            [channels[i] for i in index] if index is not None else channels)
    return cfg


def check_backbone_checkpoint(cfg) -> None:
    """Raise ``FileNotFoundError`` in one line, with the commands that fix it, when ``cfg``'s
    ``model.backbone.checkpoint`` names a file that is not there: the tools call this before
    mmengine builds the runner, whose traceback would bury the cause."""
    backbone = (cfg.get("model") or {}).get("backbone") or {}
    path = backbone.get("checkpoint")
    if path and not os.path.isfile(path):
        raise FileNotFoundError(
            f"model.backbone.checkpoint not found: {path}; make it with: "
            f"{convert_command(backbone.get('model_name', '<model>'), path)}, "
            f"or train from scratch with --cfg-options model.backbone.checkpoint=None")
