#!/usr/bin/env python
"""Convert an official checkpoint to an attnzoo .safetensors file.

    python tools/convert_checkpoint.py --model cbam_resnet50 --input RESNET50_CBAM_new_name_wrap.pth \
        --output cbam_resnet50.safetensors

The family's converter renames keys by name; a checkpoint that does not match
the model fails with the missing and unexpected keys listed. Load the result with
``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))``
or ``tools/validate.py --checkpoint``.
"""
import argparse
import json
import sys

from safetensors.torch import save_file

import attnzoo  # noqa: F401  (registers models)
from attnzoo.convert import CONVERTERS, convert_checkpoint, family_of


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="attnzoo model name, e.g. cbam_resnet50")
    p.add_argument("--input", required=True, help="official checkpoint (.pth/.pth.tar/.safetensors)")
    p.add_argument("--output", required=True, help="output .safetensors path")
    p.add_argument("--num-classes", type=int, default=None, help="default: from the checkpoint's classifier")
    p.add_argument("--model-kwargs", type=json.loads, default={}, help='JSON dict of extra model args')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    family = family_of(args.model)
    model, sd = convert_checkpoint(args.input, args.model, args.num_classes, **args.model_kwargs)
    sd = {k: v.contiguous() for k, v in sd.items()}
    meta = {"model": args.model, "family": family, "num_classes": str(model.num_classes),
            "source": str(args.input)}
    save_file(sd, args.output, metadata=meta)
    n = sum(p.numel() for p in model.parameters())
    print(f"{args.model} ({family}): {len(sd)} tensors, {n:,} parameters -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
