"""Shared by tools/mm_train.py and mm_test.py: arguments and an mmengine Runner from a config."""
import argparse
import os
import os.path as osp
import sys
import warnings
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.append(str(_ROOT))  # source checkout without `pip install -e .`; an installed attnzoo wins

# mmengine imports pkg_resources, which setuptools<81 deprecates loudly on every import
warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)

import attnzoo.heads.mm as attnzoo_mm  # noqa: E402  (registers AttnZooBackbone; mmcv-lite kernels; checkpoints)
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
    if args.work_dir:
        cfg.work_dir = args.work_dir
    elif cfg.get("work_dir") is None:
        cfg.work_dir = osp.join("work_dirs", osp.splitext(osp.basename(args.config))[0])
    return cfg


def build_runner(cfg: Config) -> Runner:
    if "runner_type" in cfg:
        from mmengine.registry import RUNNERS
        runner = RUNNERS.build(cfg)
    else:
        runner = Runner.from_cfg(cfg)
    runner.logger.info("mmcv ops: " + ("torchvision/torch fallback for mmcv-lite (nms, RoIAlign, focal loss)"
                                       if attnzoo_mm.MMCV_OPS_FALLBACK else "compiled mmcv"))
    return runner
