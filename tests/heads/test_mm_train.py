"""CPU training through tools/mm_train.py on the toy shapes set: RetinaNet and Mask R-CNN validated with
CocoMetric, UPerNet with mIoU, each on two attnzoo families; resume and tools/mm_test.py on the result."""
import itertools
import math
from pathlib import Path

import pytest

from attnzoo.heads import feature_channels
from tools import make_toy_data, mm_test, mm_train

ROOT = Path(__file__).resolve().parents[2]
TOY = {
    "retinanet": ROOT / "configs/mmdet/toy/retinanet_test_cbam_resnet_fpn_toy.py",
    "mask_rcnn": ROOT / "configs/mmdet/toy/mask_rcnn_test_nat_fpn_toy.py",
    "upernet": ROOT / "configs/mmseg/toy/upernet_test_nat_toy.py",
}
_counter = itertools.count()


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    make_toy_data.main(["--out", str(out), "--num-train", "8", "--num-val", "2", "--size", "128"])
    return out


def _options(head, toy, model_name, iters, work_dir, batch_size=2):
    """--cfg-options pointing a toy config at ``toy`` and ``model_name`` for ``iters`` iterations."""
    opts = [f"experiment_name=t{next(_counter)}_{work_dir.name}",
            f"train_cfg.max_iters={iters}", f"train_cfg.val_interval={iters}",
            f"default_hooks.checkpoint.interval={iters}", "default_hooks.logger.interval=1",
            f"train_dataloader.batch_size={batch_size}", f"model.backbone.model_name={model_name}"]
    channels = feature_channels(model_name)
    if head == "upernet":
        root = toy / "ade"
        opts += [f"model.decode_head.in_channels={channels}".replace(" ", ""),
                 f"model.auxiliary_head.in_channels={channels[2]}"]
    else:
        root = toy / "coco"
        opts += [f"model.neck.in_channels={channels}".replace(" ", ""),
                 f"val_evaluator.ann_file={root}/annotations/instances_val.json",
                 f"test_evaluator.ann_file={root}/annotations/instances_val.json"]
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        opts.append(f"{loader}.dataset.data_root={root}" + ("" if head == "upernet" else "/"))
    return opts


def _train(head, toy, model_name, iters, work_dir, *extra, batch_size=2):
    runner = mm_train.main([str(TOY[head]), "--work-dir", str(work_dir), *extra,
                            "--cfg-options", *_options(head, toy, model_name, iters, work_dir, batch_size)])
    return runner, {k[len("val/"):]: v.current() for k, v in runner.message_hub.log_scalars.items()
                    if k.startswith("val/")}


def _check_metrics(head, metrics):
    if head == "upernet":
        assert 0 <= metrics["mIoU"] <= 100, metrics
        return
    kinds = ("bbox", "segm") if head == "mask_rcnn" else ("bbox",)
    for kind in kinds:  # score_thr=0 keeps every box: AP is computed (not -1) even after 3 iterations
        assert 0 <= metrics[f"coco/{kind}_mAP"] <= 1 and 0 <= metrics[f"coco/{kind}_mAP_50"] <= 1, metrics


@pytest.mark.parametrize("head,model_name", [
    ("retinanet", "test_cbam_resnet"), ("retinanet", "test_nat"),
    ("mask_rcnn", "test_nat"), ("mask_rcnn", "test_eca_resnet"),
    ("upernet", "test_nat"), ("upernet", "test_cbam_resnet"),
])
def test_train_a_few_iterations_and_validate(head, model_name, toy, tmp_path):
    runner, metrics = _train(head, toy, model_name, 3, tmp_path)
    assert runner.iter == 3 and (tmp_path / "iter_3.pth").is_file()
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert math.isfinite(runner.message_hub.get_scalar("train/loss").current())
    _check_metrics(head, metrics)


def test_resume_and_test_tool(toy, tmp_path):
    # resume reads mmengine's own checkpoint (message hub included) under torch's weights_only default
    _train("retinanet", toy, "test_cbam_resnet", 2, tmp_path)
    runner, _ = _train("retinanet", toy, "test_cbam_resnet", 3, tmp_path, "--resume")
    assert runner.iter == 3
    assert len(runner.message_hub.get_scalar("train/loss").data[0]) == 3  # 2 restored + 1 new
    metrics = mm_test.main([str(TOY["retinanet"]), str(tmp_path / "iter_3.pth"), "--work-dir", str(tmp_path),
                            "--show-dir", "vis", "--out", str(tmp_path / "results.pkl"),
                            "--cfg-options", *_options("retinanet", toy, "test_cbam_resnet", 3, tmp_path)])
    _check_metrics("retinanet", metrics)
    assert (tmp_path / "results.pkl").stat().st_size > 0
    drawn = list(tmp_path.glob("*/vis/*.jpg")) + list(tmp_path.glob("*/vis/*.png"))
    assert len(drawn) == 2, drawn  # one per val image


@pytest.mark.slow
def test_retinanet_learns_the_toy_set(tmp_path):
    # the default toy set and schedule (128 train images, 600 iterations, ~5 min on 2 cores)
    make_toy_data.main(["--out", str(tmp_path / "toy")])
    _, metrics = _train("retinanet", tmp_path / "toy", "test_cbam_resnet", 600, tmp_path / "run", batch_size=4)
    print("toy RetinaNet:", {k: v for k, v in metrics.items() if k.startswith("coco/")})
    assert metrics["coco/bbox_mAP_50"] > 0.5 and metrics["coco/bbox_mAP"] > 0.3, metrics
