"""tools/train.py at scale: DDP equivalence, resume, augmentation pipelines, layer decay, and
(slow) every tiny family learning the digits."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import attnzoo
from tools import _common as C
from tools import _train_utils as T
from tools import train

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / "tools"

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DATA_CFG = dict(input_size=(3, 32, 32), interpolation="bicubic", mean=MEAN, std=STD)


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _rows(out):
    return list(csv.DictReader(open(out / "metrics.csv")))


# ----------------------------------------------------------------------------- data and augmentation


def test_epoch_sampler_shards_are_the_single_process_batches():
    """Rank r's i-th batch is its round-robin share of the one-process i-th batch (same global batch)."""
    n, batch, world = 50, 4, 2
    single = list(T.EpochSampler(n, seed=3, global_batch=batch * world))
    shards = [list(T.EpochSampler(n, rank=r, world=world, seed=3, global_batch=batch * world)) for r in range(world)]
    assert len(single) == 48 and all(len(s) == 24 for s in shards)  # cut to whole global batches
    for i in range(0, 24, batch):
        assert sorted(shards[0][i:i + batch] + shards[1][i:i + batch]) == sorted(single[2 * i:2 * i + 2 * batch])
    s = T.EpochSampler(n, seed=3, global_batch=8)
    s.set_epoch(1)
    again = list(T.EpochSampler(n, seed=3, global_batch=8))
    assert list(s) != single and again == single and {e for e, _ in s} == {1}


def test_rng_state_round_trips_weights_only(tmp_path):
    np.random.seed(1)
    torch.manual_seed(1)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    state = T.rng_state()
    want = (np.random.rand(3), torch.rand(3), __import__("random").random())
    T.save_state(tmp_path / "s.pth", {"rng": [state]})
    T.set_rng_state(T.load_state(tmp_path / "s.pth")["rng"][0])
    got = (np.random.rand(3), torch.rand(3), __import__("random").random())
    assert np.array_equal(want[0], got[0]) and torch.equal(want[1], got[1]) and want[2] == got[2]


@pytest.mark.parametrize("aug", T.AUGS)
def test_train_transform_is_a_function_of_the_sample_key(aug):
    ds = C.DigitsDataset("val")
    ds.transform = T.train_transform(aug, DATA_CFG, T.recipe(digits=False))  # flips + jitter: visible randomness
    seeded = T.SeededDataset(ds, seed=0)
    x, y = seeded[(0, 5)]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == ds.targets[5]
    torch.manual_seed(123)  # the global RNGs don't matter
    assert torch.equal(seeded[(0, 5)][0], x)
    assert not torch.equal(seeded[(1, 5)][0], x)  # another epoch, another augmentation


def test_timm_and_albumentations_pipelines_agree_without_randomness():
    """Same recipe, same normalisation: with the random parts switched off the libraries agree."""
    img = C.DigitsDataset("val").images[0]
    r = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, color_jitter=None)
    a = T.train_transform("timm", DATA_CFG, r)(img)
    b = T.train_transform("albumentations", DATA_CFG, r)(img)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_randaugment_mixup_and_albumentations_config(tmp_path):
    import albumentations as A
    from albumentations.pytorch import ToTensorV2

    img = C.DigitsDataset("val").images[0]
    ra = T.train_transform("timm", DATA_CFG, T.recipe(True), auto_augment="rand-m9-mstd0.5-inc1")
    assert "RandAugment" in repr(ra) and ra(img).shape == (3, 32, 32)
    A.save(A.Compose([A.Resize(24, 24), A.Normalize(), ToTensorV2()]), str(tmp_path / "p.json"))
    own = T.train_transform("albumentations", DATA_CFG, T.recipe(True), albumentations_config=str(tmp_path / "p.json"))
    assert own(img).shape == (3, 24, 24)
    with pytest.raises(SystemExit, match="--aug timm"):
        T.train_transform("albumentations", DATA_CFG, T.recipe(True), auto_augment="rand-m9")
    mix = T.build_mixup(0.8, 1.0, 1.0, 0.5, 0.1, num_classes=10)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    xm, ym = mix(x, y)
    assert xm.shape == x.shape and ym.shape == (4, 10) and torch.allclose(ym.sum(1), torch.ones(4))
    assert T.build_mixup(0.0, 0.0, 1.0, 0.5, 0.1, 10) is None


@pytest.mark.parametrize("name", attnzoo.list_models("test_*"))
def test_layer_decay_groups_follow_group_matcher(name):
    """Layer-wise lr decay: the stem gets the smallest scale, the head 1.0, and there are several layers."""
    from timm.optim import create_optimizer_v2

    model = C.create_model(name, num_classes=10)
    opt = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    scales = sorted({g["lr_scale"] for g in opt.param_groups})  # stem (smallest) to head
    assert len(scales) >= 3 and scales[-1] == 1.0, scales
    scale_of = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    head = [id(p) for p in model.get_classifier().parameters()]
    assert head and all(scale_of[i] == 1.0 for i in head)
    assert scale_of[id(next(model.parameters()))] == scales[0]  # the first parameter is the stem's


# ----------------------------------------------------------------------------- training runs


def _argv(out, *extra, model="test_cbam_resnet"):
    return ["--model", model, "--output", str(out), "--no-progress", "--threads", "1", "--seed", "0", *extra]


def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    """torchrun with 2 CPU processes (gloo) x batch 8 x 2 accumulation steps == 1 process x batch 32.

    test_nat because it has no BatchNorm: per-process batch statistics would differ by design and torch's
    SyncBatchNorm has no CPU kernel. Drop path off: each process draws its own masks.
    """
    common = ["--epochs", "2", "--limit", "96", "--drop-path", "0", "--model-ema"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(TOOLS / "train.py"), *_argv(tmp_path / "ddp", *common, "--batch-size", "8", "--grad-accum", "2",
                                           model="test_nat")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "batch 32 (2 proc x 8 x 2 accum)" in proc.stdout
    train.main(_argv(tmp_path / "one", *common, "--batch-size", "32", model="test_nat"))

    ddp, one = _rows(tmp_path / "ddp"), _rows(tmp_path / "one")
    for a, b in zip(ddp, one):
        for k in ("train_loss", "val_loss", "ema_val_loss"):
            assert float(a[k]) == pytest.approx(float(b[k]), rel=1e-5), k
        assert a["val_top1"] == b["val_top1"]
    sd_ddp = torch.load(tmp_path / "ddp" / "last.pth", weights_only=True)
    sd_one = torch.load(tmp_path / "one" / "last.pth", weights_only=True)
    for part in ("model", "ema"):
        for k, v in sd_one[part].items():
            torch.testing.assert_close(sd_ddp[part][k], v, atol=2e-6, rtol=1e-5, msg=f"{part}.{k}")
    assert len(sd_ddp["rng"]) == 2 and sd_ddp["updates"] == sd_one["updates"] == 6


RESUME = ["--epochs", "2", "--limit", "64", "--batch-size", "16", "--grad-accum", "2", "--aug", "albumentations",
          "--mixup", "0.2", "--cutmix", "1.0", "--model-ema", "--drop-path", "0.1", "--layer-decay", "0.8"]


def test_resume_after_a_kill_equals_the_unbroken_run(tmp_path):
    """2 epochs straight vs 1 epoch, stop, --resume: bit-identical weights, optimizer, EMA and metrics
    (BatchNorm, drop path, mixup/cutmix and albumentations all draw random numbers). The broken run
    loads with 2 worker processes: augmentation does not depend on which process draws it."""
    full = train.main(_argv(tmp_path / "full", *RESUME))
    half = train.main(_argv(tmp_path / "cut", *RESUME, "--stop-epoch", "1", "--workers", "2"))
    assert half["epochs"] == 1 and not (tmp_path / "cut" / "last.pth.tmp").exists()
    resumed = train.main(_argv(tmp_path / "cut", *RESUME, "--resume", "--workers", "2"))
    assert resumed["epochs"] == full["epochs"] == 2

    a = torch.load(tmp_path / "full" / "last.pth", weights_only=True)
    b = torch.load(tmp_path / "cut" / "last.pth", weights_only=True)
    for part in ("model", "ema"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), f"{part}.{k}"
    for s_a, s_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(s_a[k], s_b[k]) for k in s_a)
    assert a["rows"][-1]["train_loss"] == b["rows"][-1]["train_loss"] and a["scheduler"] == b["scheduler"]
    assert _rows(tmp_path / "full") == [dict(r, epoch_s=f["epoch_s"]) for r, f in
                                        zip(_rows(tmp_path / "cut"), _rows(tmp_path / "full"))]
    # what the run leaves: last (EMA) weights for validate.py, best weights, curves
    last = load_file(tmp_path / "cut" / "checkpoint.safetensors")
    assert all(torch.equal(last[k], b["ema"][k]) for k in last)
    assert (tmp_path / "cut" / "best.safetensors").is_file() and (tmp_path / "cut" / "curves.png").is_file()
    assert C.read_checkpoint_meta(tmp_path / "cut" / "checkpoint.safetensors")["weights"] == "ema"


def test_resume_accumulates_train_time_and_a_finished_run_stays_finished(tmp_path, capsys):
    """train_s counts every process of the run; --resume of a finished run trains nothing, says so and
    leaves summary.json alone."""
    run = ["--epochs", "2", "--limit", "32", "--batch-size", "16"]
    half = train.main(_argv(tmp_path, *run, "--stop-epoch", "1"))
    assert half["train_s"] == torch.load(tmp_path / "last.pth", weights_only=True)["train_s"] > 0
    full = train.main(_argv(tmp_path, *run, "--resume"))
    assert full["epochs"] == 2 and full["train_s"] > half["train_s"]
    assert full["train_s"] == torch.load(tmp_path / "last.pth", weights_only=True)["train_s"]
    saved = (tmp_path / "summary.json").read_text()
    capsys.readouterr()
    again = train.main(_argv(tmp_path, *run, "--resume"))
    assert "already finished at epoch 2" in capsys.readouterr().out
    assert again == full and (tmp_path / "summary.json").read_text() == saved


class _CallsOnLoad:
    def __reduce__(self):
        return print, ("training state code ran",)


def test_resume_is_weights_only_and_checks_args(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    torch.save({"model": {}, "obj": _CallsOnLoad()}, tmp_path / "run" / "last.pth")
    with pytest.raises(SystemExit, match="not a weights-only training state"):
        train.main(_argv(tmp_path / "run", "--resume"))
    assert "training state code ran" not in capsys.readouterr().out
    train.main(_argv(tmp_path / "ok", "--epochs", "1", "--limit", "32", "--batch-size", "16", "--amp",
                     "--channels-last"))
    assert np.isfinite(float(_rows(tmp_path / "ok")[0]["train_loss"]))
    with pytest.raises(SystemExit, match="'lr': \\(0.002, 0.1\\)"):
        train.main(_argv(tmp_path / "ok", "--epochs", "1", "--limit", "32", "--batch-size", "16", "--lr", "0.1",
                         "--resume"))



@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="--device cuda but CUDA is not available"):
        train.main(_argv(tmp_path, "--device", "cuda"))


# ----------------------------------------------------------------------------- learning check

LEARN = ["--epochs", "20", "--img-size", "32", "--batch-size", "64", "--lr", "3e-3"]


@pytest.mark.slow
@pytest.mark.parametrize("name", attnzoo.list_models("test_*"))
def test_tiny_family_learns_digits(tmp_path, name):
    """The tiny variant of each family reaches >= 95% val top-1 on the digits (CPU)."""
    summary = train.main(["--model", name, "--output", str(tmp_path), "--no-progress", *LEARN])
    print(f"{name}: val top-1 {summary['val_top1']:.2f}% in {summary['train_s']:.0f}s")
    assert summary["val_top1"] >= 95.0, summary
