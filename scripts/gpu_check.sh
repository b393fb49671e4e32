#!/usr/bin/env bash
# The GPU check: everything lorakit runs on CUDA, in one script, well under 8 minutes on one GPU.
#
#   scripts/gpu_check.sh [OUTPUT_DIR]          (PYTHON=... to choose the interpreter; default .venv/bin/python)
#
#   1. the machine: torch, CUDA, the GPUs
#   2. the CUDA test subset (pytest -m cuda): the engine's batched multi-adapter decoding against the CPU
#      tokens, bf16 serving, bitsandbytes NF4 on CUDA, a bf16 `lorakit train` run
#   3. with 2 GPUs or more: `torchrun --nproc_per_node 2 -m lorakit train` with --strategy ddp and fsdp, each
#      compared with one process at twice the gradient accumulation (max relative difference of the adapters)
#   4. the training and serving benchmarks against PEFT on a random ~0.5B Llama (hidden 1280, 24 layers)
#
# Then one summary table (step, status, seconds, figure), also written to OUTPUT_DIR/summary.txt with every
# step's log and JSON beside it. Without a GPU the CUDA tests skip and the benchmarks run their --quick CPU
# form, so the script itself is checked anywhere.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
OUT=${1:-$(mktemp -d -t lorakit-gpu-check-XXXX)}
mkdir -p "$OUT"
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
ROWS=()

run_step() {  # name, timeout seconds, figure command (prints one line), then the command
  local name=$1 limit=$2 figure=$3; shift 3
  local start=$SECONDS status
  echo "== $name: $*" | tee "$OUT/$name.log"
  if timeout "$limit" "$@" >>"$OUT/$name.log" 2>&1; then status=ok; else status="FAIL($?)"; fi
  tail -5 "$OUT/$name.log"
  ROWS+=("$(printf '%-14s %-9s %6ss  %s' "$name" "$status" "$((SECONDS - start))" "$(eval "$figure" 2>/dev/null)")")
}

run_step machine 60 "grep -m1 '^device:' '$OUT/machine.log'" "$PY" -c "
import torch, platform
print('torch', torch.__version__, 'python', platform.python_version())
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f'device: {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}')
else:
    print('device: none (CPU only): CUDA tests skip, benchmarks run --quick on the CPU')
"

run_step cuda-tests 300 "grep -Eo '[0-9]+ (passed|skipped|failed)' '$OUT/cuda-tests.log' | paste -sd' '" \
  "$PY" -m pytest -q -m cuda tests/

if [ "$GPUS" -ge 2 ]; then
  TRAIN=(--max-steps 20 --precision fp32 --eval-steps 20 --eval-samples 0 --no-progress --report-to none
         --batch-size 2 --max-length 64 --seed 0)
  run_step one-process 240 "echo reference" "$PY" -m lorakit.cli train "${TRAIN[@]}" --gradient-accumulation-steps 2 \
    --output "$OUT/one" --overwrite
  for strategy in ddp fsdp; do
    run_step "$strategy" 240 "$PY scripts/compare_adapters.py '$OUT/one' '$OUT/$strategy'" \
      "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 -m lorakit train "${TRAIN[@]}" \
      --strategy "$strategy" --output "$OUT/$strategy" --overwrite
  done
fi

if [ "$GPUS" -ge 1 ]; then
  SIZE=(--hidden 1280 --layers 24)
  run_step train-bench 420 "$PY -c \"import json; d=json.load(open('$OUT/train.json')); print(d.get('summary', d))\" | cut -c1-160" \
    "$PY" benchmarks/train_vs_peft.py --device cuda "${SIZE[@]}" --json "$OUT/train.json"
  run_step serve-bench 300 "$PY -c \"import json; d=json.load(open('$OUT/serve.json')); print(d.get('summary', d))\" | cut -c1-160" \
    "$PY" benchmarks/serve_vs_peft.py --device cuda --dtype bf16 "${SIZE[@]}" --json "$OUT/serve.json"
else
  run_step train-bench 600 "grep -m1 -i 'speed-up\|x PEFT' '$OUT/train-bench.log'" \
    "$PY" benchmarks/train_vs_peft.py --quick --json "$OUT/train.json"
  run_step serve-bench 600 "grep -m1 -i 'ratio\|x PEFT' '$OUT/serve-bench.log'" \
    "$PY" benchmarks/serve_vs_peft.py --quick --json "$OUT/serve.json"
fi

{
  echo "lorakit GPU check, $(date -u +%Y-%m-%dT%H:%MZ), $GPUS GPU(s), logs in $OUT"
  printf '%-14s %-9s %7s  %s\n' step status time figure
  printf '%s\n' "${ROWS[@]}"
} | tee "$OUT/summary.txt"
! grep -q FAIL "$OUT/summary.txt"
