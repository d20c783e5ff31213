"""Helpers shared by the classification tools (train, validate, benchmark, compare, export_onnx, gpu_readiness).

The embedded digits dataset, a corrupt-file tolerant ImageFolder, model creation
with a clear error, untrusted-checkpoint I/O, the eval loop and result tables.
"""
import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, default_collate

import attnzoo  # registers our models with timm
from attnzoo.backbones._helpers import CheckpointError, key_report, load_checkpoint_file
from attnzoo.convert import convert_command, write_safetensors

DIGITS_SPLIT_SEED = 0  # fixed, independent of --seed, so validate.py sees the very split train.py held out
DIGITS_SIZE = 32
_TORCH_THREADS = torch.get_num_threads()  # torch's default (physical cores), before any tool changes it


# ----------------------------------------------------------------------------- data

def _digits_split(split: str) -> Tuple[List[Image.Image], List[int]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()  # 1797 8x8 images with values 0..16, bundled with scikit-learn
    idx_train, idx_val = train_test_split(
        np.arange(len(digits.target)), test_size=0.2, stratify=digits.target, random_state=DIGITS_SPLIT_SEED)
    idx = {"train": idx_train, "val": idx_val}[split]
    images = [
        # upsample once to 32x32 RGB so the timm transforms crop and resize at a useful resolution
        Image.fromarray(np.round(digits.images[i] * (255 / 16)).astype(np.uint8), "L")
        .resize((DIGITS_SIZE, DIGITS_SIZE), Image.BICUBIC).convert("RGB")
        for i in idx
    ]
    return images, [int(digits.target[i]) for i in idx]


class DigitsDataset(Dataset):
    """scikit-learn's handwritten digits as 32x32 RGB PIL images; stratified 80/20 split (1437/360)."""

    classes = [str(i) for i in range(10)]

    def __init__(self, split: str = "train", transform=None):
        self.images, self.targets = _digits_split(split)
        self.transform = transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        img = self.images[i]
        return (self.transform(img) if self.transform else img), self.targets[i]


class SafeImageFolder(Dataset):
    """ImageFolder (``root/<class>/**/<file>``) that never raises on a bad file.

    Every non-hidden file is a candidate, whatever its extension: PIL identifies
    images by content. A file that fails to open, decode or transform yields
    ``(None, path)``, which :func:`collate_skip` drops and counts. Symlinks are
    followed, but no directory is walked twice and no file counted twice (by real
    path), so a link loop or a link back into the tree adds nothing.
    """

    def __init__(self, root, transform=None, class_to_idx: Optional[Mapping[str, int]] = None):
        self.root, self.transform = str(root), transform
        classes = sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise ValueError(f"{self.root}: no class subfolders (expected ImageFolder layout root/<class>/<image>)")
        if class_to_idx is None:  # sorted folder names: the ImageNet synset order
            class_to_idx = {c: i for i, c in enumerate(classes)}
        unknown = sorted(set(classes) - set(class_to_idx))
        if unknown:
            raise ValueError(f"{self.root}: class folders unknown to the model's class list: {unknown[:10]}")
        self.class_to_idx = dict(class_to_idx)
        self.classes = sorted(self.class_to_idx, key=self.class_to_idx.get)
        self.samples = []
        # the root and every class folder up front: a link to one of them from another class is a loop
        seen_dirs = {os.path.realpath(p) for p in [self.root] + [os.path.join(self.root, c) for c in classes]}
        seen_files = set()
        for c in classes:
            for dirpath, dirnames, filenames in os.walk(os.path.join(self.root, c), followlinks=True):
                keep = []
                for d in sorted(d for d in dirnames if not d.startswith(".")):
                    real = os.path.realpath(os.path.join(dirpath, d))
                    if real not in seen_dirs:
                        seen_dirs.add(real)
                        keep.append(d)
                dirnames[:] = keep
                for f in sorted(f for f in filenames if not f.startswith(".")):
                    path = os.path.join(dirpath, f)
                    real = os.path.realpath(path)
                    if real not in seen_files:
                        seen_files.add(real)
                        self.samples.append((path, self.class_to_idx[c]))
        self.targets = [t for _, t in self.samples]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, target = self.samples[i]
        try:
            with open(path, "rb") as f:
                img = Image.open(f).convert("RGB")  # convert() forces the full decode: truncation fails here
            return (self.transform(img) if self.transform else img), target
        except Exception:  # corrupt, truncated, not an image, unreadable, decompression bomb ...
            return None, path


def collate_skip(batch):
    """Collate the good samples; return ``(images, targets, bad_paths)`` (images None if all bad)."""
    good = [s for s in batch if s[0] is not None]
    bad = [s[1] for s in batch if s[0] is None]
    if not good:
        return None, None, bad
    x, y = default_collate(good)
    return x, y, bad


def split_dir(root, split: str) -> str:
    """``root/<split>`` when root holds train/ val/ subsets, else root itself (an ImageNet val folder)."""
    names = {"val": ("val", "validation"), "train": ("train",)}[split]
    for n in names:
        if os.path.isdir(os.path.join(root, n)):
            return os.path.join(root, n)
    if split == "train":
        raise ValueError(f"{root}: no train/ subfolder (expected root/train/<class>/... and root/val/<class>/...)")
    return str(root)


# ----------------------------------------------------------------------------- models

def check_model_name(name: str) -> None:
    if not timm.is_model(name):
        import difflib
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise SystemExit(
            f"error: unknown model {name!r}" + (f" (did you mean {', '.join(close)}?)" if close else "") +
            f". attnzoo models: {', '.join(attnzoo.list_models())}; any timm model name works too.")


def create_model(name: str, img_size: Optional[int] = None, pretrained: bool = False, **kwargs) -> torch.nn.Module:
    """A model, untrained unless ``pretrained`` (the tag's released weights, downloaded into timm's cache and
    converted on load); ``img_size`` reaches only models with a fixed input size (ViT-style grids)."""
    check_model_name(name)
    cfg = timm.models.get_pretrained_cfg(name)
    if img_size and getattr(cfg, "fixed_input_size", False):
        kwargs["img_size"] = img_size
    if pretrained:
        timm.models.set_pretrained_download_progress(True)  # timm's download progress bar
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def default_img_size(name: str) -> int:
    cfg = timm.models.get_pretrained_cfg(name)
    return int(cfg.input_size[-1]) if cfg is not None and cfg.input_size else 224


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_default_classes(name: str) -> int:
    cfg = timm.models.get_pretrained_cfg(name)
    return int(getattr(cfg, "num_classes", None) or 1000)


# ----------------------------------------------------------------------------- checkpoints

META_KEY = "attnzoo_meta"  # json in the safetensors header: train.py's args, classes, preprocessing


def save_checkpoint(path, model: torch.nn.Module, meta: Mapping[str, Any]) -> None:
    # clone: safetensors refuses tensors that share storage (tied weights)
    sd = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    # flat keys as tools/convert_checkpoint.py writes them, plus everything as json
    flat = {k: str(meta[k]) for k in ("model", "num_classes", "img_size") if k in meta}
    write_safetensors(path, sd, metadata={**flat, META_KEY: json.dumps(dict(meta))})


def read_checkpoint_meta(path) -> Dict[str, Any]:
    """Model metadata: the safetensors header (train.py's or the converter's), else an ``args.json``
    beside the file; {} if none."""
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, "pt") as f:
                header = f.metadata() or {}
            if header.get(META_KEY):
                return json.loads(header[META_KEY])
        except FileNotFoundError:
            raise
        except Exception as e:  # SafetensorError, a damaged json header
            raise CheckpointError(f"{path}: not a readable safetensors file, truncated or corrupt ({e})") from e
        if header.get("model"):  # tools/convert_checkpoint.py: model, num_classes (strings)
            meta = {"model": header["model"]}
            for k in ("num_classes", "img_size"):
                if str(header.get(k, "")).isdigit():
                    meta[k] = int(header[k])
            return meta
    side = os.path.join(os.path.dirname(path), "args.json")
    if os.path.isfile(side):
        with open(side) as f:
            return json.load(f)
    return {}


def load_state_dict_file(path, model: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Tensors of a local checkpoint, never unpickling code (``attnzoo``'s safe loader)."""
    path = str(path)
    if not os.path.isfile(path):
        raise SystemExit(f"error: {missing_checkpoint_hint(path, model)}")
    try:
        return load_checkpoint_file(path)
    except ValueError as e:  # CheckpointError: corrupt, truncated, pickled code; the message names the file
        raise SystemExit(f"error: {e}") from e


def missing_checkpoint_hint(path, model: Optional[str]) -> str:
    """The one line for a checkpoint that is not there, with the commands that write one."""
    model = model or "<model>"
    return (f"checkpoint not found: {path}; train one with python tools/train.py --model {model} "
            f"(writes output/train/{model}/checkpoint.safetensors), or convert official weights with "
            f"{convert_command(model, path)}")


def load_weights(model: torch.nn.Module, sd: Dict[str, torch.Tensor], model_name: str) -> None:
    """Strict load; if the keys don't match, retry through the model module's ``checkpoint_filter_fn``
    (timm convention, which our families follow to map official checkpoints)."""
    if not key_report(sd, model):
        model.load_state_dict(sd)
        return
    report = key_report(sd, model)
    module = sys.modules.get(timm.models.model_entrypoint(model_name).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            mapped = filter_fn(sd, model)
            if not key_report(mapped, model):
                model.load_state_dict(mapped)
                return
            report = key_report(mapped, model)
        except Exception as e:
            report += f" (checkpoint_filter_fn failed: {type(e).__name__}: {e})"
    raise SystemExit(f"error: checkpoint does not fit {model_name}: {report}")


# ----------------------------------------------------------------------------- eval

@torch.no_grad()
def evaluate(model, loader, device="cpu", amp=False, channels_last=False, progress=True, desc="eval") -> Dict[str, Any]:
    """Top-1/top-5 (%), mean loss, images evaluated, bad files skipped, end-to-end images/s."""
    from tqdm import tqdm

    model.eval()
    # counts, not timm's accuracy (a float32 % per batch): sums over batches and processes stay exact
    n = correct1 = correct5 = 0
    loss_sum = 0.0
    skipped: List[str] = []
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp)
    start = time.perf_counter()
    for x, y, bad in tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
        skipped += bad
        if x is None:
            continue
        x, y = x.to(device), y.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast:
            logits = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top.eq(y[:, None])
        correct1 += hit[:, 0].sum().item()
        correct5 += hit.any(dim=1).sum().item()
        n += y.numel()
    seconds = time.perf_counter() - start
    num_classes = getattr(model, "num_classes", None) or 0
    return {
        "top1": 100.0 * correct1 / max(n, 1),
        "top5": 100.0 * correct5 / max(n, 1) if num_classes >= 5 else None,
        "loss": loss_sum / max(n, 1),
        "images": n,
        "skipped": len(skipped),
        "skipped_files": skipped,
        "img_per_s": n / seconds if seconds > 0 else 0.0,
        "seconds": seconds,
    }


# ----------------------------------------------------------------------------- misc

def _cpu_ticks() -> Optional[Tuple[int, int, int]]:
    """(all, idle, this process's) CPU ticks so far, from Linux /proc; None elsewhere."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()  # fields after the command name
        return sum(v), v[3] + v[4], int(own[11]) + int(own[12])  # idle + iowait; utime + stime
    except (OSError, ValueError, IndexError):
        return None


class ThreadPicker:
    """Torch threads = torch's default (physical cores) less the cores other processes keep busy.

    An OpenMP thread that shares its core with another process stalls every parallel
    region of every op: on 2 cores with a neighbour holding one, 2 threads ran a training
    step 3x slower than 1 thread. ``update()`` re-picks from the CPU time others took
    since the last call (a training epoch), so a run adapts when neighbours come and go.
    """

    def __init__(self, threads: Optional[int] = None):
        self.fixed, self.last = threads, _cpu_ticks()
        if not threads and self.last is not None:
            time.sleep(0.25)  # a first look at the neighbours
        self.update()

    def update(self) -> int:
        now, threads = _cpu_ticks(), self.fixed or _TORCH_THREADS
        if not self.fixed and now is not None and self.last is not None:
            total, idle, own = (a - b for a, b in zip(now, self.last))
            others = max(0, total - idle - own) / max(total, 1) * (os.cpu_count() or 1)
            threads = max(1, min(_TORCH_THREADS, round((os.cpu_count() or 1) - others)))
        self.last = now
        torch.set_num_threads(threads)
        return threads


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: ...)`` only where the help doesn't already explain the default and it isn't
    None (which these tools use for "derived": the help says from what)."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str) -> None:
    """One line, not torch's lazy-init traceback, for ``--device cuda`` on a machine without CUDA."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {device} but CUDA is not available")


def fmt(v, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}e}" if 0 < abs(v) < 0.01 else f"{v:.{digits}f}"  # learning rates
    return str(v)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], markdown: bool = False,
                 digits: int = 2) -> str:
    """Aligned text table (or a GitHub markdown table); numbers right-aligned."""
    cells = [[fmt(r.get(c), digits) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    numeric = [all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows) for c in columns]

    def line(vals):
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(vals, widths, numeric)]
        return ("| " + " | ".join(parts) + " |") if markdown else "  ".join(parts)

    out = [line(list(columns))]
    out.append("|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2))
                              for w, num in zip(widths, numeric)) + "|" if markdown
               else "  ".join("-" * w for w in widths))
    out += [line(r) for r in cells]
    return "\n".join(out)


def write_rows(path, rows: Sequence[Mapping[str, Any]], columns: Optional[Sequence[str]] = None) -> None:
    """Write rows as .json (a list, or one object for a single row) or .csv (anything else)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        with open(path, "w") as f:
            json.dump(rows[0] if len(rows) == 1 else list(rows), f, indent=2)
            f.write("\n")
        return
    columns = list(columns or rows[0].keys())
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
