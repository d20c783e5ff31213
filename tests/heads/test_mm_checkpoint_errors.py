"""tools/mm_train.py with a backbone checkpoint that is missing, damaged or another model's: one line that names
the file and the fix, before or instead of mmengine's build traceback."""
from pathlib import Path

import pytest
import timm
import torch
from mmengine.config import Config
from safetensors.torch import save_file

from attnzoo.heads.mm.config import use_backbone
from tools import mm_train

ROOT = Path(__file__).resolve().parents[2]
COCO = ROOT / "configs/mmdet/retinanet_nat_tiny_fpn_1x_coco.py"
TOY = ROOT / "configs/mmdet/toy/retinanet_test_cbam_resnet_fpn_toy.py"


def test_coco_config_without_converted_weights_says_how_to_make_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no checkpoints/ here
    with pytest.raises(SystemExit, match=r"^error: model\.backbone\.checkpoint not found: checkpoints/nat_tiny"
                                         r"\.safetensors; make it with: python tools/convert_checkpoint\.py --model "
                                         r"nat_tiny .*--output checkpoints/nat_tiny\.safetensors, or train from "
                                         r"scratch with --cfg-options model\.backbone\.checkpoint=None$"):
        mm_train.main([str(COCO), "--work-dir", str(tmp_path / "w")])
    assert not (tmp_path / "w").exists()  # stopped before the runner made anything


@pytest.mark.parametrize("bad", ["truncated", "other_model"])
def test_unusable_backbone_checkpoint_is_one_line(tmp_path, bad):
    path = tmp_path / "w.safetensors"
    name = "test_cbam_resnet" if bad == "truncated" else "test_nat"
    save_file({k: v.contiguous() for k, v in timm.create_model(name).state_dict().items()}, str(path))
    if bad == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    want = "truncated or corrupt" if bad == "truncated" else "does not fit test_cbam_resnet: missing keys"
    with pytest.raises(SystemExit, match=rf"^error: .*{path.name}.*{want}"):
        mm_train.main([str(TOY), "--work-dir", str(tmp_path / "w"),
                       "--cfg-options", f"model.backbone.checkpoint={path}"])


def test_use_backbone_keeps_strict_out_of_the_model_kwargs(tmp_path):
    model = timm.create_model("test_nat")
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("gamma1")}
    save_file(sd, str(tmp_path / "partial.safetensors"))
    cfg = use_backbone(Config.fromfile(str(TOY)), "test_nat", checkpoint=str(tmp_path / "partial.safetensors"),
                       strict=False)
    from attnzoo.heads import AttnZooBackbone
    backbone = AttnZooBackbone(**{k: v for k, v in cfg.model.backbone.items() if k != "type"})
    assert len(backbone(torch.randn(1, 3, 64, 64))) == len(cfg.model.neck.in_channels)
