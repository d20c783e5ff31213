#!/usr/bin/env bash
# One-shot validation on a CUDA machine (budget: 8 minutes on one H100-class GPU).
#   bash tools/gpu_check.sh [OUT_DIR]        # default OUT_DIR: output/gpu_check/<UTC date-time>
#
# Steps, each logged to OUT_DIR/<step>.log, with its status and time in OUT_DIR/summary.txt:
#   env         nvidia-smi, torch / triton / CUDA versions
#   tests       tests/ops/test_*_triton.py on the GPU (junit XML in tests.xml)
#   compile     a torch.compile(fullgraph=True) training step of each tiny test_* model (compile.csv)
#   readiness   tools/gpu_readiness.py for this GPU's arch (readiness.md, readiness.csv)
#   benchmark   tools/benchmark.py --ops ... --device cuda (ops.csv)
# tests, compile and readiness run side by side (mostly CPU-bound compiles); benchmark runs last, alone.
# Exit status: 0 when every step passed; 1 otherwise; 2 without CUDA (one line on stderr).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device visible to torch (torch.cuda.is_available() is False); run it on a GPU machine" >&2
    exit 2
fi

OUT=${1:-output/gpu_check/$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET ATTNZOO_BACKEND  # the kernels compile and run on the GPU, the dispatch picks triton
echo "gpu_check: writing $OUT" >&2
: > "$OUT/summary.txt"

# run NAME TIMEOUT_S CMD...: CMD's output to OUT/NAME.log, one summary line
run() {
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    finish "$name" "$rc" $((SECONDS - t0))
}

finish() {  # also from background steps: the final status is read back from summary.txt
    local status=ok
    [ "$2" -eq 0 ] || status="FAILED (exit $2$([ "$2" -eq 124 ] && echo ', timed out'))"
    printf '%-10s %-30s %4ss  %s\n' "$1" "$status" "$3" "$OUT/$1.log" | tee -a "$OUT/summary.txt" >&2
}

run env 30 bash -c "nvidia-smi; '$PY' -c 'import torch, triton; c = torch.cuda;
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__,
      c.get_device_name(), \"sm_%d%d\" % c.get_device_capability())'"

ARCH=$("$PY" -c "import torch; print('%d%d' % torch.cuda.get_device_capability())")
run readiness 300 bash -c "'$PY' tools/gpu_readiness.py --arch $ARCH --jobs 6 --markdown \
    --out '$OUT/readiness.csv' > '$OUT/readiness.md'" &
run tests 240 "$PY" -m pytest tests/ops/test_*_triton.py -q -p no:cacheprovider -n 6 --junitxml="$OUT/tests.xml" &
run compile 240 "$PY" - "$OUT/compile.csv" <<'EOF' &
"""torch.compile(fullgraph=True) forward + backward + SGD step of each tiny model, against eager."""
import csv, sys, time
import timm, torch
import torch._inductor.config
import attnzoo

torch._inductor.config.fallback_random = True  # compiled drop-path draws as eager's, so outputs compare

rows, failed = [], 0
for name in attnzoo.list_models("test_*"):
    t0, row = time.time(), {"model": name}
    try:
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = timm.create_model(name).cuda().train()
        x = torch.randn(4, *model.pretrained_cfg["input_size"], device="cuda")
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        outs = []
        for fn in (model, torch.compile(model, fullgraph=True)):
            torch.manual_seed(0)  # the same drop-path draws
            out = fn(x)
            out.float().square().mean().backward()
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            assert all(torch.isfinite(g).all() for g in grads), "non-finite gradient"
            outs.append(out.detach().float())
            opt.zero_grad(set_to_none=True)
        opt.step()
        # eager and compiled may take different backends (custom ops or the reference): a loose check
        err = ((outs[1] - outs[0]).abs().max() / outs[0].abs().max().clamp_min(1e-6)).item()
        row.update(status="ok" if err < 1e-2 else "mismatch", max_rel_err=f"{err:.2e}")
    except Exception as e:  # the row says why; the step fails at the end
        row.update(status=f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    row["seconds"] = f"{time.time() - t0:.1f}"
    failed += row["status"] != "ok"
    rows.append(row)
    print(row, flush=True)
with open(sys.argv[1], "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=["model", "status", "max_rel_err", "seconds"])
    w.writeheader()
    w.writerows(rows)
sys.exit(1 if failed else 0)
EOF

wait

run benchmark 150 "$PY" tools/benchmark.py --ops gate neighborhood halo routing agent linear --device cuda \
    --batch-size 8 --steps 10 --results-file "$OUT/ops.csv"

if grep -q FAILED "$OUT/summary.txt"; then
    echo "gpu_check: some steps FAILED, see $OUT/summary.txt" >&2
    exit 1
fi
echo "gpu_check: all steps passed, see $OUT/summary.txt" >&2
