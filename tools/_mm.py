"""Shared by tools/mm_train.py and mm_test.py: arguments and an mmengine Runner from a config.

Apart from tools/_common.py because it needs the OpenMMLab stack (``.[mm]``), which the other tools do not.
"""
import argparse
import os
import os.path as osp
import warnings

# mmengine imports pkg_resources, which setuptools<81 deprecates loudly on every import
warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)

import attnzoo.heads.mm as attnzoo_mm  # noqa: E402  (registers AttnZooBackbone; mmcv-lite kernels; checkpoints)
from attnzoo.backbones._helpers import CheckpointError  # noqa: E402
from attnzoo.heads.mm.config import check_backbone_checkpoint  # noqa: E402
from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.runner import Runner  # noqa: E402


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("config", help="mmdet or mmseg config file (configs/mmdet/..., configs/mmseg/...)")
    p.add_argument("--work-dir", help="where logs and checkpoints go (default: work_dirs/<config name>)")
    p.add_argument("--cfg-options", nargs="+", action=DictAction, default={},
                   help="override config keys, e.g. model.backbone.checkpoint=None train_cfg.max_iters=100")
    p.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none",
                   help="job launcher; tools/dist_train.sh uses pytorch (torchrun)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=0)  # older launchers pass it
    return p


def load_config(args) -> Config:
    if "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    cfg.merge_from_dict(args.cfg_options)
    vis = cfg.get("visualizer")
    if isinstance(vis, dict) and vis.get("name") == "visualizer":
        # mmengine keeps one visualizer per name for the process: a fixed name makes a second run in
        # the same process (tests, notebooks) log into the first run's folder. Its default is the
        # run's unique experiment name.
        vis.pop("name")
    if args.work_dir:
        cfg.work_dir = args.work_dir
    elif cfg.get("work_dir") is None:
        cfg.work_dir = osp.join("work_dirs", osp.splitext(osp.basename(args.config))[0])
    return cfg


def build_runner(cfg: Config) -> Runner:
    # a missing or unusable backbone checkpoint in one line, not under mmengine's build traceback
    try:
        check_backbone_checkpoint(cfg)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from e
    try:
        if "runner_type" in cfg:
            from mmengine.registry import RUNNERS
            runner = RUNNERS.build(cfg)
        else:
            runner = Runner.from_cfg(cfg)
    except CheckpointError as e:  # corrupt, or keys that don't fit the backbone
        raise SystemExit(f"error: {e}") from e
    runner.logger.info("mmcv ops: " + ("torchvision/torch fallback for mmcv-lite (nms, RoIAlign, focal loss)"
                                       if attnzoo_mm.MMCV_OPS_FALLBACK else "compiled mmcv"))
    return runner


def _is_seg(cfg: Config) -> bool:
    return cfg.get("default_scope") == "mmseg" or "decode_head" in cfg.model


def configure_outputs(cfg: Config, show_dir=None, out=None):
    """``--show-dir`` and ``--out`` as mmdet's and mmseg's test tools set them; returns the metric
    to append to the runner's evaluator for an mmdet ``--out`` (None otherwise)."""
    seg = _is_seg(cfg)
    if show_dir:
        hooks = cfg.setdefault("default_hooks", {})
        vis = hooks.get("visualization") or dict(type="SegVisualizationHook" if seg else "DetVisualizationHook")
        vis.update(draw=True, interval=1)
        if seg:
            cfg.visualizer["save_dir"] = show_dir
        else:
            vis["test_out_dir"] = show_dir
        hooks["visualization"] = vis
    if out and seg:
        cfg.test_evaluator.update(output_dir=out, keep_results=True)
    elif out:
        if not out.endswith((".pkl", ".pickle")):
            raise SystemExit(f"error: --out must be a .pkl file for mmdet, got {out!r}")
        from mmdet.evaluation import DumpDetResults
        return DumpDetResults(out_file_path=out)
    return None


def plot_curves(runner, path=None):
    """``<work_dir>/curves.png`` from the run's ``scalars.json``: loss terms, learning rate and
    validation metrics against the iteration. Returns the path, or None when nothing was logged."""
    import json

    scalars = osp.join(runner.log_dir, "vis_data", "scalars.json")
    if runner.rank != 0 or not osp.isfile(scalars):
        return None
    train, val = {}, {}
    last = 0  # a validation record's own step counts validation batches: plot it at the training step
    with open(scalars) as f:
        for line in f:
            rec = json.loads(line)
            is_val = not any(k.startswith("loss") or k == "lr" for k in rec)
            if not is_val:
                last = rec.get("step", rec.get("iter", last))
            for k, v in rec.items():
                if k in ("step", "iter", "epoch", "time", "data_time", "memory", "eta"):
                    continue
                if isinstance(v, (int, float)) and not (is_val and v < 0):  # COCO writes -1 for "no such objects"
                    (val if is_val else train).setdefault(k, []).append((last, v))
    if not train:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("loss", {k: v for k, v in train.items() if k.startswith("loss")}),
              ("learning rate", {k: v for k, v in train.items() if k == "lr"}),
              ("validation", val)]
    panels = [(t, d) for t, d in panels if d]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels):
        for k, pts in sorted(series.items()):
            ax.plot(*zip(*pts), marker="o" if len(pts) < 20 else None, label=k)
        ax.set_xlabel("iteration")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(osp.basename(runner.work_dir.rstrip("/")) or "mm run")
    fig.tight_layout()
    path = path or osp.join(runner.work_dir, "curves.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
