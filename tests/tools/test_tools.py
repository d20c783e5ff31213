"""Smoke tests of tools/train.py, validate.py and benchmark.py, run in-process through main(argv)."""
import csv
import json

import pytest
import timm
import torch
from PIL import Image

from tools import benchmark, train, validate

# attnzoo's tiny test variant once registered (tools import attnzoo); a small timm model otherwise
MODEL = "test_cbam_resnet" if timm.is_model("test_cbam_resnet") else "resnet18"


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    # the tools pick a thread count for the whole process: give the rest of the session its own back
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    summary = train.main(["--model", MODEL, "--epochs", "1", "--limit", "64", "--batch-size", "32",
                          "--output", str(out), "--no-progress", "--seed", "0"])
    return out, summary


def test_train_writes_checkpoint_metrics_and_plot(trained):
    out, summary = trained
    for name in ("checkpoint.safetensors", "args.json", "metrics.csv", "curves.png", "summary.json"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == 1 and {"train_loss", "val_top1", "val_top5"} <= set(rows[0])
    assert summary["model"] == MODEL and 0 <= summary["val_top1"] <= 100
    meta = json.load(open(out / "args.json"))
    assert (meta["model"], meta["num_classes"], meta["img_size"]) == (MODEL, 10, 32)


def test_validate_reads_model_and_sizes_from_checkpoint(trained, tmp_path):
    out, _ = trained
    results = tmp_path / "r.json"
    row = validate.main(["--checkpoint", str(out / "checkpoint.safetensors"), "--results-file", str(results),
                         "--no-progress"])
    assert (row["model"], row["num_classes"], row["img_size"]) == (MODEL, 10, 32)
    assert row["images"] == 360 and row["skipped"] == 0  # the whole digits val split
    assert 0 <= row["top1"] <= row["top5"] <= 100 and row["img_per_s"] > 0
    assert json.load(open(results))["top1"] == row["top1"]


def test_validate_pth_wrapped_state_dict(trained, tmp_path):
    """{'state_dict': ...} with a DataParallel 'module.' prefix loads and scores like the safetensors."""
    out, _ = trained
    from safetensors.torch import load_file
    sd = load_file(out / "checkpoint.safetensors")
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 1}, tmp_path / "ckpt.pth")
    kw = ["--model", MODEL, "--num-classes", "10", "--img-size", "32", "--no-progress"]
    a = validate.main(kw + ["--checkpoint", str(tmp_path / "ckpt.pth"), "--results-file", str(tmp_path / "a.csv")])
    b = validate.main(kw + ["--checkpoint", str(out / "checkpoint.safetensors"),
                            "--results-file", str(tmp_path / "b.csv")])
    assert a["top1"] == b["top1"]


class _CallsOnLoad:
    def __reduce__(self):  # unpickling would call print(...): any callable could be here
        return print, ("checkpoint code ran",)


def test_validate_reads_converter_metadata(trained, tmp_path):
    """A safetensors with tools/convert_checkpoint.py's flat header names its model and classes."""
    out, _ = trained
    from safetensors.torch import load_file, save_file
    save_file(load_file(out / "checkpoint.safetensors"), tmp_path / "conv.safetensors",
              metadata={"model": MODEL, "family": "x", "num_classes": "10", "source": "official.pth"})
    row = validate.main(["--checkpoint", str(tmp_path / "conv.safetensors"), "--results-file",
                         str(tmp_path / "r.csv"), "--no-progress"])
    assert (row["model"], row["num_classes"], row["images"]) == (MODEL, 10, 360)


def test_validate_refuses_pickled_code(tmp_path, capsys):
    torch.save({"model": {}, "obj": _CallsOnLoad()}, tmp_path / "evil.pth")
    with pytest.raises(SystemExit, match="not a weights-only checkpoint"):
        validate.main(["--model", MODEL, "--checkpoint", str(tmp_path / "evil.pth"),
                       "--results-file", str(tmp_path / "r.csv"), "--no-progress"])
    assert "checkpoint code ran" not in capsys.readouterr().out


def _image_folder(root, bad=None):
    """Two classes of three 40x40 PNGs, plus one bad file in the second class."""
    for c, colour in (("n01", (255, 0, 0)), ("n02", (0, 0, 255))):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 40), colour).save(root / c / f"{i}.png")
    good = (root / "n01" / "0.png").read_bytes()
    if bad:
        (root / "n02" / "broken.png").write_bytes(good[:len(good) // 2] if bad == "truncated" else b"not an image\n")


@pytest.mark.parametrize("bad", ["truncated", "not_an_image"])
def test_validate_skips_corrupt_files(tmp_path, bad):
    _image_folder(tmp_path / "val", bad)
    results = tmp_path / "r.csv"
    row = validate.main(["--model", MODEL, "--num-classes", "2", "--data-dir", str(tmp_path), "--img-size", "32",
                         "--batch-size", "4", "--workers", "0", "--results-file", str(results), "--no-progress"])
    assert row["images"] == 6 and row["skipped"] == 1
    assert row["top5"] is None  # fewer than 5 classes
    saved = next(csv.DictReader(open(results)))
    assert saved["skipped"] == "1" and saved["images"] == "6"


def test_train_on_image_folder(tmp_path):
    _image_folder(tmp_path / "data" / "train", bad="truncated")
    _image_folder(tmp_path / "data" / "val")
    summary = train.main(["--model", MODEL, "--data-dir", str(tmp_path / "data"), "--img-size", "32", "--epochs", "1",  # batch 8 > 7 files: all in
                          "--batch-size", "8", "--workers", "0", "--output", str(tmp_path / "out"), "--no-progress"])
    meta = json.load(open(tmp_path / "out" / "args.json"))
    assert (meta["num_classes"], meta["classes"]) == (2, ["n01", "n02"])
    assert next(csv.DictReader(open(tmp_path / "out" / "metrics.csv")))["skipped"] == "1"
    assert summary["val_top5"] is None


def test_benchmark_rows_with_peer_ratio(tmp_path):
    results = tmp_path / "bench.csv"
    peer = [] if MODEL in benchmark.PEERS else ["resnet18"]
    rows = benchmark.main(["--models", MODEL, "--img-size", "32", "--batch-size", "2", "--steps", "1",
                           "--warmup", "0", "--results-file", str(results), "--peer", *peer])
    (row,) = rows
    assert row["params_m"] > 0 and row["gmacs"] > 0 and row["peer_gmacs"] > 0
    assert row["infer_ratio"] > 0 and row["train_ratio"] > 0 and row["train_mem_mb"] > 0
    saved = next(csv.DictReader(open(results)))
    assert saved["model"] == MODEL and float(saved["infer_ratio"]) > 0


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="unknown model 'no_such_model'"):
        train.main(["--model", "no_such_model", "--output", str(tmp_path)])


def test_benchmark_no_timing(tmp_path):
    rows = benchmark.main(["--models", "eca_resnet50", "--no-timing", "--results-file", str(tmp_path / "m.csv")])
    assert rows[0]["params_m"] == pytest.approx(25.557112) and rows[0]["peer"] == "resnet50"
    assert rows[0]["gmacs"] == pytest.approx(4.089, abs=0.005)  # ECA paper's 4.12 (fvcore) within 3%


def test_benchmark_ops_checks_before_reporting(tmp_path):
    rows = benchmark.main(["--ops", "gate", "--batch-size", "1", "--steps", "1", "--warmup", "0",
                           "--results-file", str(tmp_path / "ops.csv")])
    assert {r["method"] for r in rows} == {"reference", "cpu"}
    assert all(r["max_rel_err"] < 1e-4 and isinstance(r["fwd_bwd_speedup"], float) for r in rows)
