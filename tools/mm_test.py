#!/usr/bin/env python
"""Evaluate a trained mmdet / mmseg checkpoint on its config's test set through mmengine's Runner.

    python tools/mm_test.py configs/mmdet/toy/retinanet_test_cbam_resnet_fpn_toy.py \
        work_dirs/retinanet_test_cbam_resnet_fpn_toy/iter_600.pth --show-dir vis --out results.pkl

``--show-dir`` draws the predictions beside the ground truth (mmengine's visualiser) into
``<work_dir>/<timestamp>/<show-dir>`` for mmdet and ``<show-dir>`` for mmseg; ``--out`` dumps the raw
predictions (mmdet: a pickle; mmseg: a folder of label PNGs), as mmdet's and mmseg's own test tools do.
"""
if __name__ == "__main__" and not __package__:  # run by path: see tools/_bootstrap.py
    import _bootstrap  # noqa: F401

from tools import _mm  # noqa: E402


def main(argv=None):
    p = _mm.parser(__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="checkpoint file written by mm_train.py")
    p.add_argument("--show-dir", help="draw predictions on the test images into this folder")
    p.add_argument("--out", help="dump predictions: a .pkl file (mmdet) or a folder of PNGs (mmseg)")
    args = p.parse_args(argv)
    cfg = _mm.load_config(args)
    cfg.load_from = args.checkpoint
    dump = _mm.configure_outputs(cfg, args.show_dir, args.out)
    runner = _mm.build_runner(cfg)
    if dump is not None:
        runner.test_evaluator.metrics.append(dump)
    metrics = runner.test()
    return metrics


if __name__ == "__main__":
    main()
