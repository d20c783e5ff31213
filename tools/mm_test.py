#!/usr/bin/env python
"""Evaluate a trained mmdet / mmseg checkpoint on its config's test set through mmengine's Runner.

    python tools/mm_test.py configs/mmdet/toy/retinanet_test_cbam_resnet_fpn_toy.py \
        work_dirs/retinanet_test_cbam_resnet_fpn_toy/iter_600.pth
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _mm, also when imported by path (tests)
import _mm  # noqa: E402


def main(argv=None):
    p = _mm.parser(__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="checkpoint file written by mm_train.py")
    args = p.parse_args(argv)
    cfg = _mm.load_config(args)
    cfg.load_from = args.checkpoint
    runner = _mm.build_runner(cfg)
    metrics = runner.test()
    return metrics


if __name__ == "__main__":
    main()
