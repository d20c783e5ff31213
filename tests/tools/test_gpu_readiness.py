"""GPU readiness without a GPU: tools/gpu_readiness.py compiles the Triton kernels for sm_80 / sm_90
(the quick subset here, the full matrix under -m slow); tools/gpu_check.sh refuses to run without CUDA.

Subprocesses: the tool must run without TRITON_INTERPRET (which a test session may have set), and
it patches the dispatch and the kernels' launchers while it records."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]


def _run(cmd, timeout, **env):
    base = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(cmd, cwd=ROOT, env=dict(base, OMP_NUM_THREADS="1", **env), capture_output=True,
                          text=True, timeout=timeout)


def _readiness(tmp_path, *args, timeout=900):
    out = tmp_path / "rows.csv"
    proc = _run([sys.executable, "tools/gpu_readiness.py", *args, "--out", str(out)], timeout)
    rows = list(csv.DictReader(out.open())) if out.exists() else []
    return proc, rows


def test_quick_matrix_compiles_every_kernel(tmp_path):
    proc, rows = _readiness(tmp_path, "--quick", "--arch", "80", "90")
    log = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, log
    assert "kernels no model launched" not in proc.stdout, log  # the quick models reach every kernel
    assert len({r["kernel"] for r in rows}) >= 20 and {r["arch"] for r in rows} == {"sm_80", "sm_90"}, log
    assert all(r["status"] == "ok" for r in rows), log
    # half-precision flash-style kernels lower their dots to tensor cores (HMMA on sm_80, wgmma on sm_90)
    fwd = {r["arch"]: r["sass_mma"] for r in rows if r["kernel"] == "neighborhood.fwd_kernel"}
    assert fwd["sm_80"] == "HMMA" and "HGMMA" in fwd["sm_90"], log


@pytest.mark.slow
def test_full_matrix(tmp_path):
    proc, rows = _readiness(tmp_path, "--arch", "80", "90", "--jobs", "2", timeout=4 * 3600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "kernels no model launched" not in proc.stdout and rows


def test_readiness_refuses_the_interpreter():
    proc = _run([sys.executable, "tools/gpu_readiness.py", "--quick"], 60, TRITON_INTERPRET="1")
    assert proc.returncode != 0 and "TRITON_INTERPRET" in proc.stderr and "Traceback" not in proc.stderr


def test_gpu_check_without_cuda_says_so_in_one_line(tmp_path):
    out = tmp_path / "gpu_check"
    proc = _run(["bash", "tools/gpu_check.sh", str(out)], 120, CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "CUDA" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()
