#!/usr/bin/env python
"""Train an mmdet / mmseg model from a config through mmengine's Runner.

    python tools/mm_train.py configs/mmdet/toy/retinanet_test_cbam_resnet_fpn_toy.py
    python tools/mm_train.py configs/mmseg/upernet_nat_tiny_160k_ade20k_512x512.py --work-dir work_dirs/nat
    bash tools/dist_train.sh configs/mmdet/mask_rcnn_nat_tiny_fpn_1x_coco.py 8   # 8 GPUs

Besides mmengine's logs and checkpoints, the work dir gets ``curves.png``: training loss, learning
rate and validation metrics against the iteration, read from the run's ``scalars.json``.
"""
if __name__ == "__main__" and not __package__:  # run by path: see tools/_bootstrap.py
    import _bootstrap  # noqa: F401

from tools import _mm  # noqa: E402


def main(argv=None):
    p = _mm.parser(__doc__.splitlines()[0])
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="resume from the latest checkpoint in --work-dir, or from the given checkpoint")
    p.add_argument("--amp", action="store_true", help="mixed-precision training (AmpOptimWrapper)")
    args = p.parse_args(argv)
    cfg = _mm.load_config(args)
    if args.amp:
        cfg.optim_wrapper.type = "AmpOptimWrapper"
        cfg.optim_wrapper.setdefault("loss_scale", "dynamic")
    if args.resume == "auto":
        cfg.resume, cfg.load_from = True, None
    elif args.resume:
        cfg.resume, cfg.load_from = True, args.resume
    runner = _mm.build_runner(cfg)
    runner.train()
    _mm.plot_curves(runner)
    return runner


if __name__ == "__main__":
    main()
