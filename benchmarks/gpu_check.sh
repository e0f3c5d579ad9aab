#!/usr/bin/env bash
# GPU checks for lrpscale, for a machine with one NVIDIA GPU and no network. From the repo root:
#     bash benchmarks/gpu_check.sh
# Steps: environment, install (no deps; zennit from a local wheel dir if one exists), the CUDA
# tests, CUDA vs CPU agreement of the heatmaps, lrp_throughput.py on cuda, the Analyzer on cuda, the k sweep on cuda.
# Each step has a timeout and the whole run a budget (BUDGET_S, default 460 s); a failed step
# does not stop the next. Writes gpu_check.log, summary.txt and JSON to $OUT (or a temp dir):
# at most 8 files, so one log holds every step's output.
# A dry run on a CPU-only machine (small, skips installing):
#     DEVICE=cpu SIZE=32 LRP_BATCHES=1,2 ANALYSIS_BATCHES=2 SWEEP_BATCHES=1 SKIP_INSTALL=1 \
#         PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh
set -u
set -o pipefail

START=$(date +%s)
BUDGET_S=${BUDGET_S:-460}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-224}
LRP_BATCHES=${LRP_BATCHES:-1,8,32,64}
ANALYSIS_BATCHES=${ANALYSIS_BATCHES:-32,64}
SWEEP_BATCHES=${SWEEP_BATCHES:-1,32}
OUT_DIR=${OUT:-$(mktemp -d /tmp/lrpscale-gpu-XXXXXX)}
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
SUMMARY="$OUT_DIR/summary.txt"
: >"$LOG"
: >"$SUMMARY"
export PYTHONUNBUFFERED=1
RESULTS=()

say() { echo "$*" | tee -a "$LOG"; }

# step NAME LIMIT_S CMD...: run with the smaller of LIMIT_S and what is left of the budget.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET_S - ($(date +%s) - START)))
    if ((left < 15)); then
        RESULTS+=("$name: SKIPPED (budget of ${BUDGET_S}s spent)")
        say "=== $name: skipped, budget spent"
        return 1
    fi
    ((limit > left)) && limit=$left
    say "=== $name (timeout ${limit}s): $*"
    local t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=$?
    local secs=$(($(date +%s) - t0))
    local verdict=ok
    ((rc == 124 || rc == 137)) && verdict=TIMEOUT
    ((rc != 0 && rc != 124 && rc != 137)) && verdict=FAILED
    RESULTS+=("$name: $verdict (rc $rc, ${secs}s)")
    say "=== $name: $verdict (rc $rc, ${secs}s)"
    return $rc
}

# --- environment -------------------------------------------------------------------------------
step environment 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
    $PY -c 'import torch; print(\"torch\", torch.__version__, \"cuda available\", torch.cuda.is_available())'"
if ! $PY -c "import torch, torchvision; assert '$DEVICE' == 'cpu' or torch.cuda.is_available()" >>"$LOG" 2>&1; then
    say "torch/torchvision missing or no GPU visible: nothing else can run"
    printf '%s\n' "${RESULTS[@]}" | tee -a "$SUMMARY"
    exit 0
fi

# --- install: the repo without deps (torch, torchvision are there; Ray is not needed here) -------
if [ -n "${SKIP_INSTALL:-}" ]; then
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    step "install lrpscale" 90 $PY -m pip install --quiet --no-deps --no-build-isolation --no-index . \
        || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! $PY -c 'import zennit' >/dev/null 2>&1; then
    WHEELS=""
    for dir in ${WHEEL_DIR:-} .whl wheels shared/wheels; do
        if [ -d "$dir" ] && ls "$dir"/zennit-*.whl >/dev/null 2>&1; then WHEELS=$dir; break; fi
    done
    if [ -n "$WHEELS" ]; then
        # zennit's own needs (numpy, Pillow, torchvision, click) are there already
        step "install zennit from $WHEELS" 60 $PY -m pip install --quiet --no-index --no-deps "$WHEELS"/zennit-*.whl
    else
        RESULTS+=("zennit: missing and no local wheel dir (.whl, wheels, shared/wheels, \$WHEEL_DIR): zennit parts skipped")
        say "zennit missing, no local wheel: zennit-dependent parts are skipped"
    fi
fi

# --- the CUDA tests (they need no Ray: the actor class is used alone) -------------------------------
if [ "$DEVICE" = cuda ]; then
    step "tests/test_cuda.py" 150 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py
fi

# --- CUDA vs CPU agreement -------------------------------------------------------------------------
export AGREEMENT_JSON="$OUT_DIR/agreement.json" DEVICE SIZE
step "$DEVICE vs cpu agreement" 120 $PY - <<'EOF'
import json, os, sys
import torch
sys.path.insert(0, "benchmarks")
import lrpscale
from lrpscale.engine.analyzer import Analyzer
from lrp_throughput import (heatmap_difference, normalized, random_images, zennit, zennit_composite,
                             zennit_heatmap)

def relative_l2(ours, theirs):
    a, b = normalized(ours.cpu()), normalized(theirs.cpu())
    return float((a - b).norm() / b.norm())

device, size = os.environ["DEVICE"], int(os.environ["SIZE"])
torch.set_num_threads(os.cpu_count() or 1)
cpu_model = lrpscale.load_model("vgg16", seed=0)
gpu_model = lrpscale.load_model("vgg16", seed=0).to(device)
x = random_images(cpu_model, 4, size, seed=11)
report = {}
default_tf32 = torch.backends.cudnn.allow_tf32  # torch's default for cuDNN convolutions: True

def compare(tf32: bool):
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    for composite in lrpscale.COMPOSITES:
        ours_cpu = lrpscale.Explainer(cpu_model, composite).explain(x, keep_layers=False)
        ours_gpu = lrpscale.Explainer(gpu_model, composite).explain(x.to(device), keep_layers=False)
        key = f"{composite} tf32={tf32}"
        report[key] = {"same_targets": bool(torch.equal(ours_cpu.target, ours_gpu.target.cpu())),
                       "heatmap_difference": heatmap_difference(ours_gpu.relevance, ours_cpu.relevance),
                       "relative_l2": relative_l2(ours_gpu.relevance, ours_cpu.relevance)}
        print(f"{key}: same targets {report[key]['same_targets']}, normalised heatmaps {device} vs cpu: "
              f"max difference / largest value {report[key]['heatmap_difference']:.2e}, "
              f"relative L2 {report[key]['relative_l2']:.2e}")

compare(tf32=False)
if default_tf32 and device == "cuda":
    compare(tf32=True)
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
explainer = lrpscale.Explainer(gpu_model)
batch = explainer.explain(x.to(device), keep_layers=False).relevance
alone = torch.cat([explainer.explain(x[i:i + 1].to(device), keep_layers=False).relevance for i in range(len(x))])
report["batch invariance"] = heatmap_difference(alone, batch)
print(f"{device}: one image alone vs inside the batch: {report['batch invariance']:.2e}")
if zennit is not None:
    for p in gpu_model.parameters():
        p.requires_grad_(False)
    theirs = zennit_heatmap(gpu_model, zennit_composite("epsilon-gamma-box", gpu_model, x.shape, device), x.to(device))
    report["lrpscale vs zennit (epsilon-gamma-box)"] = heatmap_difference(batch, theirs)
    print(f"{device}: lrpscale vs zennit EpsilonGammaBox: {report['lrpscale vs zennit (epsilon-gamma-box)']:.2e}")
two = x[:2]
on_cpu, on_gpu = Analyzer(cpu_model)(two), Analyzer(gpu_model)(two.to(device))
same_k = all(torch.equal(on_cpu.sweeps[l].chosen_k.cpu(), on_gpu.sweeps[l].chosen_k.cpu()) for l in on_cpu.sweeps)
same_neurons = all(on_cpu.selected[l].neurons(i) == on_gpu.selected[l].neurons(i)
                   for l in on_cpu.selected for i in range(len(two)))
report[f"analyzer {device} vs cpu"] = {"same_chosen_k": same_k, "same_selected_neurons": same_neurons}
print(f"Analyzer {device} vs cpu (2 images): same chosen k {same_k}, same selected neurons {same_neurons}")
# the criterion of tests/test_cuda.py: summation order differs between devices, and over 16
# layers that moves pixels where contributions cancel; a wrong rule moves the heatmap by O(1)
fp32 = [v for k, v in report.items() if k.endswith("tf32=False")]
worst_l2, worst_max = max(v["relative_l2"] for v in fp32), max(v["heatmap_difference"] for v in fp32)
verdict = "PASS" if worst_l2 < 5e-3 and worst_max < 2e-2 and same_k else "FAIL"
print(f"{verdict}: {device} vs cpu, fp32 (tf32 off): worst relative L2 {worst_l2:.2e} (want < 5e-3), "
      f"worst max difference {worst_max:.2e} (want < 2e-2), same chosen k {same_k}")
with open(os.environ["AGREEMENT_JSON"], "w") as handle:
    json.dump(report, handle, indent=2)
EOF

# --- throughput ------------------------------------------------------------------------------------
step "lrp_throughput $DEVICE" 150 $PY benchmarks/lrp_throughput.py --device "$DEVICE" --size "$SIZE" \
    --batch-sizes "$LRP_BATCHES" --repeats 5 --warmup 2 --json "$OUT_DIR/lrp_throughput_$DEVICE.json"
step "analysis $DEVICE" 120 $PY benchmarks/selection_throughput.py --device "$DEVICE" --size "$SIZE" \
    --parts analysis --batch-sizes "$ANALYSIS_BATCHES" --repeats 3 --json "$OUT_DIR/analysis_$DEVICE.json"
step "k sweep $DEVICE" 90 $PY benchmarks/selection_throughput.py --device "$DEVICE" --size "$SIZE" \
    --parts sweep --batch-sizes "$SWEEP_BATCHES" --repeats 3 --json "$OUT_DIR/sweep_$DEVICE.json"

# --- summary ---------------------------------------------------------------------------------------
{
    echo "gpu_check summary ($(date -Is), $(($(date +%s) - START))s of ${BUDGET_S}s budget)"
    printf '  %s\n' "${RESULTS[@]}"
    echo "key lines:"
    grep -E '^ *(PASS|FAIL)|^[0-9]+ (passed|failed)|^FAILED|^(epsilon|cuda|cpu|Analyzer)|^(method|lrpscale|zennit|forward|plain) |^\(|^  (heatmap|analysis|lrpscale|zennit-crp) |^    (forward|full|sweep|critical|deconv|other|records)|same top-k|^    (end to end|zennit-crp cond|conditional)' \
        "$LOG" | sed 's/^/  /'
} | tee "$SUMMARY"
exit 0
