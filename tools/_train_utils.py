"""Training helpers for tools/train.py: distributed set-up, deterministic sharded data,
the augmentation pipelines (declared once, for timm and albumentations), and resumable
training state that loads with ``torch.load(weights_only=True)``.

Determinism is by construction rather than by luck: the epoch's sample order is a
function of (seed, epoch), and each sample's augmentation a function of (seed, epoch,
index). So a run gives the same batches whatever the number of processes, loader
workers or restarts, which is what lets a 2-process DDP run match a 1-process run and
a resumed run match an unbroken one.
"""
import os
import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from timm.utils.distributed import init_distributed_device_so
from torch.utils.data import Dataset, Sampler

# ----------------------------------------------------------------------------- distributed


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str, backend: Optional[str] = None) -> DistInfo:
    """Join the process group that ``torchrun`` (or SLURM) describes in the environment, through timm.

    nccl for CUDA, gloo for CPU; one device per process. Without those variables (or with WORLD_SIZE=1)
    it is a no-op.
    """
    r = init_distributed_device_so(device, backend)
    return DistInfo(rank=r["global_rank"], world=r["world_size"], local_rank=r["local_rank"], device=r["device"])


def all_reduce_sum(values: Sequence[float], info: DistInfo) -> List[float]:
    """Sum floats over all processes in float64, so counts stay exact (timm's reduce_tensor averages in the
    tensor's dtype)."""
    if not info.distributed:
        return list(values)
    dev = info.device if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(list(values), dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return t.tolist()


# ----------------------------------------------------------------------------- deterministic data


# not timm's create_loader: one process shuffles from the global RNG and several use a padded
# DistributedSampler (other orders), and it seeds augmentation per worker, not per (seed, epoch, index)
class EpochSampler(Sampler):
    """Yields ``(epoch, index)`` keys for :class:`SeededDataset`, sharded over processes.

    The epoch's order is ``randperm(n)`` seeded by (seed, epoch), cut to a whole number of
    optimizer batches (``global_batch`` = per-process batch x processes x accumulation) when the
    data holds one, and dealt round-robin: process ``r`` takes positions ``r, r + world, ...``.
    Its i-th loader batch is then exactly its share of the one-process run's i-th batch, so the
    averaged DDP gradient equals the one-process gradient. The epoch travels inside the key
    because persistent loader workers hold a stale copy of any attribute set on the dataset.
    """

    def __init__(self, n: int, rank: int = 0, world: int = 1, seed: int = 0, shuffle: bool = True,
                 global_batch: Optional[int] = None):
        if n < world:
            raise ValueError(f"{n} samples cannot be shared by {world} processes")
        self.n, self.rank, self.world, self.seed, self.shuffle = n, rank, world, seed, shuffle
        self.global_batch, self.epoch = global_batch, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _used(self) -> int:
        if self.global_batch and self.n >= self.global_batch:
            return self.n // self.global_batch * self.global_batch  # drop_last at the optimizer batch
        return self.n // self.world * self.world if self.shuffle else self.n

    def __len__(self) -> int:
        return len(range(self.rank, self._used(), self.world))

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g)[:self._used()].tolist()
        else:
            order = list(range(self._used()))
        return iter((self.epoch, i) for i in order[self.rank::self.world])


@contextmanager
def seeded_rng(seed: int):
    """Seed python, numpy and torch (CPU) RNGs inside the block; restore them afterwards."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


class SeededDataset(Dataset):
    """Runs ``dataset[index]`` (with its transform) under RNGs seeded by (seed, epoch, index).

    Keys are the ``(epoch, index)`` pairs that :class:`EpochSampler` yields; a plain index means epoch 0.
    """

    def __init__(self, dataset: Dataset, seed: int = 0):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        seed = int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1, np.uint64)[0] >> 1)
        with seeded_rng(seed):
            return self.dataset[index]


# ----------------------------------------------------------------------------- augmentation

AUGS = ("timm", "albumentations")


def recipe(digits: bool, hflip: Optional[float] = None, color_jitter: Optional[float] = None) -> Dict[str, Any]:
    """The train-time augmentation, declared once; :func:`train_transform` builds it with either library.

    Digits fill their frame and flipping changes them: mild crops, no flip, no colour jitter.
    Image folders get the ImageNet recipe (Inception crop, flip, colour jitter).
    """
    if digits:
        r = dict(scale=(0.7, 1.0), ratio=(0.9, 1.1), hflip=0.0, color_jitter=None)
    else:
        r = dict(scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5, color_jitter=0.4)
    if hflip is not None:
        r["hflip"] = hflip
    if color_jitter is not None:
        r["color_jitter"] = color_jitter or None
    return r


class AlbumentationsTransform:
    """PIL image -> albumentations ``Compose`` -> CHW float tensor.

    albumentations 2 draws from its own generators, not the global ones, so each call reseeds
    them from torch's RNG: under :class:`SeededDataset` the result is a function of the sample key.
    """

    def __init__(self, compose):
        self.compose = compose

    def __call__(self, img):
        self.compose.set_random_seed(int(torch.randint(2**31 - 1, ())))
        return self.compose(image=np.asarray(img.convert("RGB")))["image"]

    def __repr__(self):
        return f"{type(self).__name__}({self.compose!r})"


def _albumentations_pipeline(size: int, r: Dict[str, Any], data_cfg: Dict[str, Any]):
    try:
        import albumentations as A
        import cv2
        from albumentations.pytorch import ToTensorV2
    except ImportError as e:
        raise SystemExit("error: --aug albumentations needs `pip install albumentations` "
                         "(or `pip install -e .[train]`)") from e
    interp = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC, "nearest": cv2.INTER_NEAREST}.get(
        data_cfg.get("interpolation"), cv2.INTER_LINEAR)
    ops = [A.RandomResizedCrop(size=(size, size), scale=r["scale"], ratio=r["ratio"], interpolation=interp)]
    if r["hflip"]:
        ops.append(A.HorizontalFlip(p=r["hflip"]))
    if r["color_jitter"]:
        cj = r["color_jitter"]
        ops.append(A.ColorJitter(brightness=cj, contrast=cj, saturation=cj, hue=0.0, p=1.0))
    ops += [A.Normalize(mean=data_cfg["mean"], std=data_cfg["std"], max_pixel_value=255.0), ToTensorV2()]
    return A.Compose(ops)


def train_transform(aug: str, data_cfg: Dict[str, Any], r: Dict[str, Any], auto_augment: Optional[str] = None,
                    re_prob: float = 0.0, albumentations_config: Optional[str] = None):
    """The train transform: ``aug`` 'timm' (timm's create_transform; RandAugment through ``auto_augment``,
    e.g. 'rand-m9-mstd0.5-inc1', random erasing through ``re_prob``) or 'albumentations' (the same
    recipe in albumentations, or a pipeline serialised with ``A.save`` when ``albumentations_config``
    names one). Mixup and cutmix act on batches: see :func:`build_mixup`."""
    size = data_cfg["input_size"][-1]
    if aug == "timm":
        from timm.data import create_transform

        return create_transform(
            data_cfg["input_size"], is_training=True, scale=r["scale"], ratio=r["ratio"], hflip=r["hflip"],
            color_jitter=r["color_jitter"], auto_augment=auto_augment, re_prob=re_prob,
            interpolation=data_cfg["interpolation"], mean=data_cfg["mean"], std=data_cfg["std"])
    if aug == "albumentations":
        if auto_augment or re_prob:
            raise SystemExit("error: --aa / --reprob are timm transforms: use them with --aug timm")
        if albumentations_config:
            import albumentations as A
            return AlbumentationsTransform(A.load(albumentations_config,
                                                  data_format="yaml" if albumentations_config.endswith(
                                                      (".yaml", ".yml")) else "json"))
        return AlbumentationsTransform(_albumentations_pipeline(size, r, data_cfg))
    raise ValueError(f"unknown augmentation {aug!r}; choose from {AUGS}")


def build_mixup(mixup: float, cutmix: float, prob: float, switch_prob: float, smoothing: float,
                num_classes: int):
    """timm's batch-level Mixup/CutMix (pairs within each process's batch), or None when both are off."""
    if not (mixup > 0 or cutmix > 0) or prob <= 0:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=prob, switch_prob=switch_prob, mode="batch",
                 label_smoothing=smoothing, num_classes=num_classes)


# ----------------------------------------------------------------------------- resumable state


# not timm's CheckpointSaver: it keeps no RNG or scheduler state and pickles the args Namespace, so its
# files are neither exactly resumable nor weights_only-loadable
def rng_state() -> Dict[str, Any]:
    """Every global RNG as tensors and plain numbers (loadable with weights_only=True)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states(info: DistInfo) -> List[Dict[str, Any]]:
    """Each process's RNG states, in rank order (on every rank)."""
    own = rng_state()
    if not info.distributed:
        return [own]
    out: List[Any] = [None] * info.world
    dist.all_gather_object(out, own)  # between our own processes: trusted
    return out


def save_state(path, state: Dict[str, Any]) -> None:
    """``torch.save`` to a temp file, then rename: a kill mid-write leaves the old file intact."""
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path) -> Dict[str, Any]:
    """A training state written by :func:`save_state`; never unpickles code (weights_only=True)."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: --resume: no training state at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError for anything but tensors and plain containers
        raise SystemExit(f"error: --resume {path} is not a weights-only training state: {e}") from e
