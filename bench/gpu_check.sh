#!/usr/bin/env bash
# CUDA paths of anytopo, checked in one prepared run on a lent GPU machine (written for 1 H100; no network).
#
#   bash bench/gpu_check.sh             # run everything (~4-6 min on 1 H100; each step has a timeout)
#   bash bench/gpu_check.sh --dry-run   # print every command, run nothing (works on any machine)
#   bash bench/gpu_check.sh --only=fsdp2-cuda,async-pinned   # those steps (and environment) alone
#
# Steps, each printed as PASS/FAIL/SKIP with its seconds:
#   0  environment: nvidia-smi; which Python has torch (PYTHON env, .venv, python3); torch.cuda.is_available();
#      the project's imports. The device machine has no network, so nothing is installed here: without a Python
#      that has torch with CUDA, every GPU step is SKIPped with the reason.
#   1  ddp-nccl-world1: torchrun --standalone --nproc_per_node=1 scripts/train.py --strategy ddp (nccl) on cuda;
#      summary.json says world_size 1 / strategy ddp, the checkpoint manifest says device_type cuda.
#   2  dp-1gpu:        --strategy dp on one GPU (DataParallel); manifest says strategy dp, device_type cuda.
#   3  amp-bf16:       --amp bf16 (autocast); finite final loss.
#   4  amp-fp16:       --amp fp16 (autocast + GradScaler); finite final loss, the checkpoint holds the scaler.
#   5  channels-last:  --channels-last; finite final loss.
#   6  cuda-to-cpu:    step 1's checkpoint (saved on cuda) in a CUDA_VISIBLE_DEVICES="" process:
#                      `python -m checkpoint verify` passes, and the outputs on CPU equal those on cuda
#                      (bench/_xdevice_check.py; TF32 off; atol/rtol 1e-3).
#   7  fsdp2-cuda:     torchrun --nproc_per_node=1 --strategy fsdp (fully_shard over nccl) with --amp bf16
#                      (FSDP2's MixedPrecisionPolicy) and the default async save; then --save-sharded (every rank
#                      writes its shard file); both entries verify in a CUDA_VISIBLE_DEVICES="" process, and the
#                      sharded one resumes there on CPU (scripts/train.py --resume, 4 more steps).
#   8  syncbn-cuda:    --strategy ddp --sync-bn over nccl (torch's SyncBatchNorm, CUDA only); manifest says ddp.
#   9  async-pinned:   async saves of CUDA state (bench/_async_pinned_check.py, ResNet-50 + AdamW): every snapshot
#                      buffer pinned, reused across saves, each async entry bit-identical to a sync save of the
#                      same state although a real step changed every weight right after save() returned; the
#                      time save() blocks vs a sync save (informational).
#  10  train-loop-r50: ResNet-50 at 224 px, batch 64: images/s of our Trainer.train_step vs the bare loop on
#                      this card (bench/train_loop.py --device cuda), fp32 and bf16. Informational ratio
#                      (target <= 1.03 as on CPU); FAIL only if the run itself fails.
#
# Results go to $OUT (when set, e.g. by the device runner) or bench/results/gpu/: gpu_check.log (everything),
# gpu_check.json (step, status, seconds, detail), per-step outputs. Exit 0 when nothing FAILed.
set -u -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
DRY=0
ONLY=""   # --only=STEP[,STEP]: those steps alone (environment always runs)
for a in "$@"; do
  case "$a" in
    --dry-run|-n) DRY=1 ;;
    --only=*) ONLY=",${a#--only=}," ;;
    -h|--help) sed -n '2,37p' "$0"; exit 0 ;;
    *) echo "unknown argument: $a (use --dry-run)" >&2; exit 2 ;;
  esac
done

RES="${OUT:-$REPO/bench/results/gpu}"
WORK="${OUT:+/tmp/anytopo-gpu-work}"   # under $OUT only what comes back (the device runner returns 8 files)
WORK="${WORK:-$RES/work}"
LOG="$RES/gpu_check.log"
JSON="$RES/gpu_check.json"
if [ "$DRY" = 0 ]; then
  mkdir -p "$RES"; rm -rf "$WORK"; mkdir -p "$WORK"; : > "$LOG"
else
  LOG=/dev/null; JSON=/dev/stdout   # a dry run writes nothing
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"   # the packages without `pip install -e`
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
START=$(date +%s)
STEP_TIMEOUT="${STEP_TIMEOUT:-240}"   # seconds per command
BUDGET="${BUDGET:-450}"               # no step starts after this many seconds: the script stays under ~9 min
RESULTS=()
GPU_OK=0
PY=""

say() { echo "$*" | tee -a "$LOG" 2>/dev/null || echo "$*"; }

# x CMD...: run (or, with --dry-run, print) one command, its output appended to the log.
x() {
  if [ "$DRY" = 1 ]; then printf '  +'; printf ' %q' "$@"; printf '\n'; return 0; fi
  printf '  +' >>"$LOG"; printf ' %q' "$@" >>"$LOG"; printf '\n' >>"$LOG"
  timeout "$STEP_TIMEOUT" "$@" >>"$LOG" 2>&1
}

# step NAME FUNCTION: time it, record PASS/FAIL (or DRY), never stop the script.
step() {
  local name="$1" fn="$2" t0 t1 rc status detail
  if [ -n "$ONLY" ] && [ "$name" != "environment" ] && [[ "$ONLY" != *",$name,"* ]]; then
    return 0
  fi
  say ""
  say "=== $name"
  if [ "$DRY" = 0 ] && [ "$GPU_OK" = 0 ] && [ "$name" != "environment" ]; then
    RESULTS+=("$name|SKIP|0|no Python with torch and CUDA (see step environment)")
    say "SKIP $name: no Python with torch and CUDA"
    return 0
  fi
  if [ "$DRY" = 0 ] && [ $(( $(date +%s) - START )) -gt "$BUDGET" ]; then
    RESULTS+=("$name|SKIP|0|time budget of ${BUDGET}s spent before this step")
    say "SKIP $name: time budget of ${BUDGET}s spent"
    return 0
  fi
  t0=$(date +%s.%N)
  DETAIL=""
  "$fn"; rc=$?
  t1=$(date +%s.%N)
  local secs; secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}')
  if [ "$DRY" = 1 ]; then status=DRY; elif [ $rc = 0 ]; then status=PASS; else status=FAIL; fi
  detail="${DETAIL//|//}"
  RESULTS+=("$name|$status|$secs|$detail")
  say "$status $name (${secs}s)${detail:+: $detail}"
}

# --------------------------------------------------------------------------------------------- helpers
find_python() {
  local c
  for c in "${PYTHON:-}" "$REPO/.venv/bin/python" "$(command -v python3 || true)" "$(command -v python || true)"; do
    [ -n "$c" ] && [ -x "$c" ] || continue
    if "$c" -c "import torch" >/dev/null 2>&1; then PY="$c"; return 0; fi
  done
  return 1
}

# train NAME ARGS...: one short scripts/train.py run on digits, output in $WORK/NAME.
train_single() {
  local name="$1"; shift
  x "$PY" scripts/train.py --model resnet18 --data digits --max-steps 12 --log-every 4 --batch-size 64 \
     --output-dir "$WORK/$name" --no-tensorboard --no-progress "$@"
}

# check_run NAME STRATEGY WORLD [EXTRA_PY]: summary.json and the checkpoint manifest of a finished run.
check_run() {
  local name="$1" strategy="$2" world="$3" extra="${4:-}"
  [ "$DRY" = 1 ] && echo "  # python on stdin: summary.json world_size=$world strategy=$strategy, finite final_loss;" \
    "manifest topology device_type=cuda strategy=$strategy world_size=$world${extra:+; $extra}"
  x "$PY" - "$WORK/$name" "$strategy" "$world" <<EOF
import json, math, sys
from pathlib import Path
import checkpoint
out, strategy, world = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
s = json.loads((out / "summary.json").read_text())
m = checkpoint.read_manifest(s["checkpoint"])
t = m["topology"]
print("summary:", s)
print("manifest topology:", t, "components:", m.get("components"))
assert s["world_size"] == world and s["strategy"] == strategy, (s["world_size"], s["strategy"])
assert t["device_type"] == "cuda", t
assert t["strategy"] == strategy and t["world_size"] == world, t
assert s["final_loss"] is not None and math.isfinite(s["final_loss"]), s["final_loss"]
$extra
print("OK")
EOF
}

# ----------------------------------------------------------------------------------------------- steps
s_environment() {
  if [ "$DRY" = 1 ]; then
    x nvidia-smi
    find_python || PY='$PY'
    x "$PY" -c "import torch; print(torch.__version__, torch.cuda.is_available())"
    echo "  (found: ${PY}; a real run stops here unless torch.cuda.is_available() is True)"
    return 0
  fi
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi 2>&1 | tee -a "$LOG"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
  else
    say "nvidia-smi: not found"
  fi
  if ! find_python; then
    DETAIL="no Python with torch found (tried \$PYTHON, .venv/bin/python, python3): this machine has no network, so \`make install\` cannot fetch torch; bring a venv or set PYTHON"
    return 1
  fi
  say "python: $PY"
  "$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib, torch
print("torch", torch.__version__, "cuda build", torch.version.cuda, "cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device 0:", p.name, f"{p.total_memory / 2**30:.0f} GiB", "count", torch.cuda.device_count(),
          "bf16", torch.cuda.is_bf16_supported(), "nccl", torch.distributed.is_nccl_available())
missing = []
for m in ("torchvision", "safetensors", "yaml", "sklearn", "matplotlib", "tqdm", "checkpoint", "launcher", "models"):
    try:
        importlib.import_module(m)
    except Exception as e:
        missing.append(f"{m} ({type(e).__name__})")
print("missing imports:", ", ".join(missing) or "none")
EOF
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    DETAIL="$PY has torch but torch.cuda.is_available() is False"
    return 1
  fi
  if ! "$PY" -c "import torchvision, safetensors, yaml, sklearn, matplotlib, tqdm, checkpoint, launcher, models" >/dev/null 2>&1; then
    DETAIL="$PY lacks some of the project's dependencies (see the log); cannot install without network"
    return 1
  fi
  GPU_OK=1
  DETAIL="$PY: $("$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))")"
}

s_ddp_nccl() {
  x "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 scripts/train.py --strategy ddp \
     --model resnet18 --data digits --max-steps 12 --log-every 4 --batch-size 64 \
     --output-dir "$WORK/ddp1" --no-tensorboard --no-progress || return 1
  check_run ddp1 ddp 1
}

s_dp() {
  train_single dp1 --strategy dp || return 1
  check_run dp1 dp 1 'assert "DataParallel" in (t.get("wrappers") or []) or t["strategy"] == "dp", t'
}

s_bf16() { train_single bf16 --amp bf16 && check_run bf16 single 1; }

s_fp16() {
  train_single fp16 --amp fp16 || return 1
  check_run fp16 single 1 'assert "scaler" in (m.get("components") or []), m.get("components")'
}

s_channels_last() { train_single cl --channels-last && check_run cl single 1; }

s_cuda_to_cpu() {
  local ck
  if [ "$DRY" = 1 ]; then ck='$(checkpoint from summary.json of step ddp-nccl-world1)'; else
    ck=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['checkpoint'])" "$WORK/ddp1/summary.json" 2>>"$LOG") || return 1
  fi
  x "$PY" bench/_xdevice_check.py reference "$ck" "$WORK/xdev_ref.pt" --device cuda || return 1
  x env CUDA_VISIBLE_DEVICES="" "$PY" -m checkpoint verify "$ck" --json || return 1
  x env CUDA_VISIBLE_DEVICES="" "$PY" bench/_xdevice_check.py compare "$ck" "$WORK/xdev_ref.pt" || return 1
  [ "$DRY" = 1 ] || DETAIL="$(grep -h '"phase": "compare"' "$LOG" | tail -1)"
}

s_fsdp() {
  local ck cks
  x "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 scripts/train.py --strategy fsdp --amp bf16 \
     --model resnet18 --data digits --max-steps 12 --log-every 4 --batch-size 64 \
     --output-dir "$WORK/fsdp1" --no-tensorboard --no-progress || return 1
  check_run fsdp1 fsdp 1 || return 1
  x "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 scripts/train.py --strategy fsdp --save-sharded \
     --model resnet18 --data digits --max-steps 12 --log-every 4 --batch-size 64 \
     --output-dir "$WORK/fsdp1s" --no-tensorboard --no-progress || return 1
  check_run fsdp1s fsdp 1 'assert m.get("sharded"), "the --save-sharded entry is not sharded"' || return 1
  if [ "$DRY" = 1 ]; then ck='$(fsdp1 checkpoint)'; cks='$(fsdp1s checkpoint)'; else
    ck=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['checkpoint'])" "$WORK/fsdp1/summary.json" 2>>"$LOG") || return 1
    cks=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['checkpoint'])" "$WORK/fsdp1s/summary.json" 2>>"$LOG") || return 1
  fi
  x env CUDA_VISIBLE_DEVICES="" "$PY" -m checkpoint verify "$ck" --json || return 1
  x env CUDA_VISIBLE_DEVICES="" "$PY" -m checkpoint verify "$cks" --json || return 1
  x env CUDA_VISIBLE_DEVICES="" "$PY" scripts/train.py --resume "$cks" --output-dir "$WORK/fsdp1s_cpu" \
     --model resnet18 --data digits --max-steps 16 --log-every 4 --batch-size 64 --no-tensorboard --no-progress || return 1
  check_run_cpu fsdp1s_cpu
}

# check_run_cpu NAME: a CPU run resumed from a CUDA one finished at step 16 with a finite loss.
check_run_cpu() {
  [ "$DRY" = 1 ] && echo "  # python on stdin: manifest device_type=cpu, step 16, finite final_loss"
  x "$PY" - "$WORK/$1" <<'EOF'
import json, math, sys
from pathlib import Path
import checkpoint
s = json.loads((Path(sys.argv[1]) / "summary.json").read_text())
m = checkpoint.read_manifest(s["checkpoint"])
print("summary:", s)
assert m["topology"]["device_type"] == "cpu", m["topology"]
assert m["step"] == 16, m["step"]
assert s["final_loss"] is not None and math.isfinite(s["final_loss"]), s["final_loss"]
print("OK")
EOF
}

s_syncbn() {
  x "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 scripts/train.py --strategy ddp --sync-bn \
     --model resnet18 --data digits --max-steps 12 --log-every 4 --batch-size 64 \
     --output-dir "$WORK/syncbn" --no-tensorboard --no-progress || return 1
  check_run syncbn ddp 1
}

s_async_pinned() {
  x "$PY" bench/_async_pinned_check.py --device cuda --model resnet50 --image-size 64 --saves 4 --out "$WORK/async" \
    || { [ "$DRY" = 1 ] || DETAIL="$(tail -c 600 "$WORK/async/async_pinned.json" 2>/dev/null)"; return 1; }
  [ "$DRY" = 1 ] && return 0
  DETAIL="$("$PY" - "$WORK/async/async_pinned.json" <<'EOF' 2>/dev/null
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{r['model']} {r['model_mb']} MB: pinned {r['pinned']}/{r['from_cuda']} buffers of CUDA tensors "
      f"({r['snapshot_buffers']} in all), exact {r['exact']}, "
      f"save() blocks {r['async_save_blocks_ms']} ms vs sync {r['sync_save_ms']} ms "
      f"(state_dict to pageable CPU {r['state_dict_to_pageable_cpu_ms']} ms)")
EOF
)"
  cp "$WORK/async/async_pinned.json" "$RES/" 2>/dev/null || true
}

s_train_loop() {
  local ok=0
  x "$PY" bench/train_loop.py --device cuda --model resnet50 --image-size 224 --batch-size 64 \
     --warmup-steps 5 --block-steps 10 --blocks 5 --threads "${OMP_NUM_THREADS}" \
     --results-dir "$RES" --result-name train_loop_cuda_resnet50_fp32 || ok=1
  x "$PY" bench/train_loop.py --device cuda --model resnet50 --image-size 224 --batch-size 64 --amp bf16 \
     --warmup-steps 5 --block-steps 10 --blocks 5 --threads "${OMP_NUM_THREADS}" \
     --results-dir "$RES" --result-name train_loop_cuda_resnet50_bf16 || ok=1
  if [ "$DRY" = 0 ]; then
    DETAIL="$("$PY" - "$RES" <<'EOF' 2>/dev/null
import json, sys
from pathlib import Path
parts = []
for amp in ("fp32", "bf16"):
    p = Path(sys.argv[1]) / f"train_loop_cuda_resnet50_{amp}.json"
    if p.exists():
        r = json.loads(p.read_text())
        ours, bare = r["rows"][0]["img_s"], r["rows"][1]["img_s"]
        parts.append(f"{amp}: ours {ours:.0f} img/s, bare {bare:.0f} img/s, ratio {r['ratio']:.3f} {r['verdict']}")
print("; ".join(parts))
EOF
)"
  fi
  return $ok
}

# ------------------------------------------------------------------------------------------------ run
say "gpu_check: $(date -Is 2>/dev/null || date) on $(hostname) (repo $REPO)$([ "$DRY" = 1 ] && echo ' [dry run]')"
step environment s_environment
step ddp-nccl-world1 s_ddp_nccl
step dp-1gpu s_dp
step amp-bf16 s_bf16
step amp-fp16 s_fp16
step channels-last s_channels_last
step cuda-to-cpu s_cuda_to_cpu
step fsdp2-cuda s_fsdp
step syncbn-cuda s_syncbn
step async-pinned s_async_pinned
step train-loop-r50 s_train_loop

TOTAL=$(( $(date +%s) - START ))
say ""
say "=== summary (${TOTAL}s)"
FAILED=0
{
  echo "{\"total_s\": $TOTAL, \"dry_run\": $([ "$DRY" = 1 ] && echo true || echo false), \"python\": \"${PY}\", \"steps\": ["
  sep=""
  for r in "${RESULTS[@]}"; do
    IFS='|' read -r n s t d <<<"$r"
    d="${d//\\/\\\\}"; d="${d//\"/\\\"}"
    printf '%s{"step": "%s", "status": "%s", "seconds": %s, "detail": "%s"}\n' "$sep" "$n" "$s" "$t" "$d"
    sep=","
  done
  echo "]}"
} > "$JSON.tmp" && mv "$JSON.tmp" "$JSON"
for r in "${RESULTS[@]}"; do
  IFS='|' read -r n s t d <<<"$r"
  say "$(printf '%-16s %-5s %6ss  %s' "$n" "$s" "$t" "$d")"
  [ "$s" = FAIL ] && FAILED=1
done
say "results: $JSON, log: $LOG"
exit $FAILED
