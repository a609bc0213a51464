#!/usr/bin/env bash
# The GPU check of issue #21, on one cuda machine, in under 10 minutes:
#   1. benchmarks/gpu_check.py: the tour and condition_number on a GPT-2 XL-shaped random model on cuda
#      (through kelib reproduce, preflight first), statistics accumulated on the device;
#   2. the device-sensitive tests with KELIB_TEST_DEVICE=cuda (the model fixtures on cuda).
# Results under $OUT (default: a temporary folder): summary.txt, gpu_check.log, gpu_check.json,
# pytest.log and the executed notebooks in $OUT/gpu/. Offline; every step has its own time limit.
#
#   OUT=/some/dir PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
PY=${PYTHON:-python}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export KELIB_CACHE=${KELIB_CACHE:-/tmp/kelib-gpu-cache}
export KELIB_TEST_CACHE=$KELIB_CACHE  # the tests reuse the micro model step 1 built
summary="$OUT/summary.txt"
: >"$summary"

step() {  # step NAME SECONDS LOG COMMAND...
  local name=$1 limit=$2 log=$3; shift 3
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  local rc=$?
  echo "$name: rc=$rc in $((SECONDS - start)) s (limit $limit s)" | tee -a "$summary"
  tail -n 5 "$log" | sed 's/^/    /' | tee -a "$summary"
}

$PY -c "import torch; assert torch.cuda.is_available(), 'no cuda'; print(torch.__version__, torch.cuda.get_device_name(0))" \
  2>&1 | tee -a "$summary" || { echo "no cuda device: stopping" | tee -a "$summary"; exit 2; }

step notebooks 330 "$OUT/gpu_check.log" $PY benchmarks/gpu_check.py --device cuda --out "$OUT"
step tests 210 "$OUT/pytest.log" env KELIB_TEST_DEVICE=cuda OMP_NUM_THREADS=4 $PY -m pytest -q -p no:cacheprovider \
  --maxfail=25 tests/test_devices.py tests/test_stats.py tests/test_runner.py tests/test_regularizers.py \
  tests/test_editors.py tests/test_models.py tests/test_half_precision.py
rm -rf notebooks/gpt2-xl gpt2-xl  # 6 GB of random weights
echo "results in $OUT" | tee -a "$summary"
