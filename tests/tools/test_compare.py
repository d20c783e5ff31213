"""Smoke test of tools/compare.py --quick: the table, the plot, and missing models listed, not fatal."""
import csv

import pytest
import torch

import attnzoo
from tools import compare


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_compare_quick_writes_table_and_plot(tmp_path):
    tiny = attnzoo.list_models("test_*")[:2]
    rows = compare.main(["--quick", "--device", "cpu", "--models", *tiny, "not_a_registered_model",
                         "--sizes", "64", "72", "--out-dir", str(tmp_path)])
    assert [r["model"] for r in rows] == [*tiny, "not_a_registered_model"]
    for r in rows[:2]:
        assert r["status"] == "ok", r
        assert r["params_m"] > 0 and 0 < r["gmacs_64"] < r["gmacs_72"]
        assert all(r[f"{m}_{s}"] > 0 for m in ("infer", "train") for s in (64, 72))
        assert r["mem_64_mb"] > 0 or r["mem_64_mb"] != r["mem_64_mb"]  # NaN where the profiler API is missing
    assert rows[2]["status"].startswith("missing")
    table = list(csv.DictReader(open(tmp_path / "compare.csv")))
    assert [r["model"] for r in table] == [r["model"] for r in rows]
    assert {"infer_72", "train_72", "mem_72_mb", "top1_paper"} <= set(table[0])
    assert (tmp_path / "compare.png").stat().st_size > 1000
    md = (tmp_path / "compare.md").read_text()
    assert "Command: `python tools/compare.py --quick" in md and "| not_a_registered_model" in md


def test_paper_top1_from_the_family_docs():
    # docs/MODELS.md rows first, the peers' constants otherwise, None when nobody knows
    assert compare.paper_top1("dinat_tiny") == 82.7
    assert compare.paper_top1("cbam_resnet50") == 77.34
    assert compare.paper_top1("convnext_tiny") == 82.1
    assert compare.paper_top1("test_nat") is None


def test_compare_no_timing_is_params_and_gmacs(tmp_path):
    name = attnzoo.list_models("test_*")[0]
    rows = compare.main(["--no-timing", "--device", "cpu", "--models", name, "--sizes", "64",
                         "--out-dir", str(tmp_path)])
    assert rows[0]["status"] == "ok" and rows[0]["gmacs_64"] > 0 and "infer_64" not in rows[0]
    assert (tmp_path / "compare.md").is_file() and not (tmp_path / "compare.png").exists()
