#!/usr/bin/env bash
# The device check, one script: on a GPU it runs the device-sensitive tests, the step
# comparisons, a lockstep stream of 4 SAEs on the embedded SmolLM2 (no network needed) and
# `dictbench eval` of 8 SAEs in one call against 8 calls, in under 8 minutes, and writes its figures under $OUT (default results/perf/gpu; for the
# CPU fallback runs/gpu-check-cpu, which is not committed).
#   bash scripts/gpu_check.sh            # on the GPU machine (device cuda)
#   bash scripts/gpu_check.sh --device cpu   # the CPU fallback at tiny sizes (CI runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
if [ "${1:-}" = "--device" ]; then DEVICE="$2"; fi
PY=${PYTHON:-.venv/bin/python}
if [ "$DEVICE" = cpu ]; then OUT=${OUT:-runs/gpu-check-cpu}; else OUT=${OUT:-results/perf/gpu}; fi
mkdir -p "$OUT"
if [ "$DEVICE" = cpu ]; then
  TOKENS=16384; DSAE=512; BATCH=512; ROUNDS=1; SIZES=(--d-sae 512 --batch 256 --rounds 1 --matmul-n 256)
else
  TOKENS=2000000; DSAE=16384; BATCH=4096; ROUNDS=5; SIZES=()
fi
echo "== device-sensitive tests ($DEVICE)"
"$PY" -m pytest -q tests/test_fake_accelerator.py tests/test_lockstep.py tests/test_autocast.py
echo "== step precision ($DEVICE)"
"$PY" scripts/perf/step_precision.py --device "$DEVICE" --out "$OUT" "${SIZES[@]}" \
  --methods l1 topk batchtopk
if "$PY" -c "import sae_lens" 2>/dev/null; then
  echo "== vs SAELens ($DEVICE)"
  "$PY" scripts/vs_saelens.py --device "$DEVICE" --out "$OUT"
else
  echo "== vs SAELens skipped: sae-lens is not installed in $PY's environment (make bench-setup)"
fi
echo "== lockstep stream of 4 SAEs on the embedded model ($DEVICE)"
"$PY" scripts/perf/lockstep_sweep.py --mode stream --saes 4 --device "$DEVICE" \
  --tokens "$TOKENS" --d-sae "$DSAE" --batch "$BATCH" | tee "$OUT/lockstep_stream_$DEVICE.json"
echo "== dictbench eval: one call for several SAEs against one call each ($DEVICE)"
if [ "$DEVICE" = cpu ]; then
  EVAL_SIZES=(--saes 2 --d-sae 512 --set eval.tokens=1024 --set eval.downstream_tokens=512)
else
  EVAL_SIZES=(--saes 8)
fi
"$PY" scripts/perf/eval_many.py --rounds 1 --out "$OUT" --set "model.device=$DEVICE" "${EVAL_SIZES[@]}"
