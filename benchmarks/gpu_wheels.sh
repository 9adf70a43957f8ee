#!/usr/bin/env bash
# Wheels of what benchmarks/gpu_check.sh needs beyond a CUDA machine's own PyTorch image (DeepSpeed and
# the config library), for a machine with no package index: Python 3.12 on x86-64 unless PY_VERSION says
# otherwise. The versions are the ones this checkout's virtualenv runs, so the GPU measures what CI tests.
#   bash benchmarks/gpu_wheels.sh [DIR]      (default DIR: .whl, which .git/info/exclude should ignore)
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-.whl}"
py="${VENV:-.venv}/bin/python"
version() { "$py" -c "import importlib.metadata as m; print(m.version('$1'))"; }
mkdir -p "$dir"
platforms=()
for n in 17 27 28 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version "${PY_VERSION:-3.12}" \
  --implementation cp "${platforms[@]}" -d "$dir" \
  "pydantic==$(version pydantic)" "pydantic-core==$(version pydantic-core)" \
  "annotated-types==$(version annotated-types)" "typing-inspection==$(version typing-inspection)" \
  "hjson==$(version hjson)"
# DeepSpeed ships as a source distribution: a pure-Python wheel of it (its CUDA ops are JIT-built on use).
DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$dir" "deepspeed==$(version deepspeed)"
ls -l "$dir"
