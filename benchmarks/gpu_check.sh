#!/usr/bin/env bash
# The GPU check of issue 20, for a fresh CUDA machine: brings what the trainer needs beyond the machine's
# PyTorch image, then runs benchmarks/train_gpu.py (--plan check: GPT-2 124M and 350M, lmforge's trainer at
# ZeRO 1/2/3 against a plain PyTorch + torch.compile loop) and writes its JSON lines to OUT_DIR/train_gpu.jsonl.
# Finishes in under 8 minutes (LMFORGE_GPU_CHECK_S, default 470): the plan stops before a run that would not
# fit and a timeout ends one that overruns. Without an NVIDIA GPU it writes one "skipped" line and exits 0.
#   bash benchmarks/gpu_check.sh OUT_DIR [WHEEL_DIR]
# WHEEL_DIR (default .whl): wheels from benchmarks/gpu_wheels.sh, installed with no package index; without it
# pip installs from the index.
set -euo pipefail
start=$SECONDS
repo="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR [WHEEL_DIR]}"
wheels="${2:-$repo/.whl}"
limit="${LMFORGE_GPU_CHECK_S:-470}"
py="${PYTHON:-python3}"
mkdir -p "$out"
lines="$out/train_gpu.jsonl"

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo '{"bench": "gpu_check", "skipped": "no NVIDIA GPU on this machine", "ok": false}' | tee -a "$lines"
  exit 0
fi
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true

# What the trainer imports that the machine's Python may lack.
missing="$("$py" - <<'PY'
import importlib.util
need = {"deepspeed": "deepspeed", "pydantic": "pydantic", "hjson": "hjson", "transformers": "transformers",
        "tokenizers": "tokenizers", "pyarrow": "pyarrow", "yaml": "pyyaml"}
print(" ".join(pkg for module, pkg in need.items() if importlib.util.find_spec(module) is None))
PY
)"
if [ -n "$missing" ]; then
  echo "installing: $missing"
  site=/tmp/lmforge-gpu-site
  if [ -d "$wheels" ] && compgen -G "$wheels/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" "$wheels"/*.whl
  else
    # shellcheck disable=SC2086
    "$py" -m pip install -q --target "$site" $missing
  fi
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$py" -c "import torch, deepspeed, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())" \
  | tee "$out/versions.txt"

left=$((limit - (SECONDS - start)))
budget=$((left - 40))  # a run's export and cleanup, and the interpreter's exit
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS="${TORCHINDUCTOR_COMPILE_THREADS:-$(nproc)}"
status=0
timeout --kill-after=10 "$left" "$py" "$repo/benchmarks/train_gpu.py" --plan "${LMFORGE_GPU_PLAN:-check}" \
  --budget-s "$budget" --out "$lines" > "$out/train_gpu.log" 2>&1 || status=$?
tail -n 3 "$out/train_gpu.log"
echo "gpu_check: exit $status after $((SECONDS - start)) s; results in $lines"
exit "$status"
