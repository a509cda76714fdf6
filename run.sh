#!/usr/bin/env sh
# kfac_kernels developer entry point. From a fresh clone:
#   ./run.sh demo [demo options]   set up .venv and run the main demo (python -m kfac_kernels demo)
#   ./run.sh test [pytest options] set up .venv and run the test suite
# Environment: PYTHON (interpreter used to create .venv, default python3), VENV (default .venv),
# TORCH_SPEC (what pip installs for torch when the venv has none, default torch==2.13.0; e.g.
# "torch --index-url https://download.pytorch.org/whl/cpu" for a CPU-only build elsewhere).
set -eu
cd "$(dirname "$0")"
cmd="${1:-}"
[ $# -gt 0 ] && shift
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

setup() {  # $1: extra to install (demo | test)
  if [ ! -x "$VENV/bin/python" ]; then
    echo "run.sh: creating $VENV (first run: installing torch and the $1 extra takes a minute or two)" >&2
    "$PYTHON" -m venv "$VENV"
  fi
  py="$VENV/bin/python"
  # the package is installed in editable mode: Python changes need no reinstall; reinstall only
  # when what the install reads changed (packaging files, the C++/CUDA sources) or the extra did
  stamp="$VENV/.kfac_kernels_$1"
  want="$(cat pyproject.toml setup.py CMakeLists.txt csrc/* 2>/dev/null | cksum) ${KFAC_KERNELS_CUDA:-}"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$py" -c "import torch, kfac_kernels" >/dev/null 2>&1; then
    return 0
  fi
  "$py" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  if ! "$py" -c "import torch" >/dev/null 2>&1; then
    echo "run.sh: installing $TORCH_SPEC" >&2
    # shellcheck disable=SC2086
    "$py" -m pip install -q $TORCH_SPEC
  fi
  echo "run.sh: installing kfac_kernels[$1] (editable)" >&2
  "$py" -m pip install -q -e ".[$1]"
  if [ "$1" = "test" ]; then
    # curvlinops (a reference for the factor tests) without its torchvision requirement, which
    # would replace the installed torch; the parts we use do not import torchvision.
    "$py" -m pip install -q --no-deps curvlinops-for-pytorch==3.0.1 backpack-for-pytorch==1.7.1
    "$py" -m pip install -q einops einconv opt-einsum linear-operator unfoldNd scipy
  fi
  echo "$want" > "$stamp"
}

case "$cmd" in
  demo)
    # the demo runs on the CPU: build the CUDA module only where a GPU is present
    if [ -z "${KFAC_KERNELS_CUDA:-}" ] && ! nvidia-smi -L >/dev/null 2>&1; then
      export KFAC_KERNELS_CUDA=0
    fi
    setup demo
    exec "$VENV/bin/python" -m kfac_kernels demo "$@" ;;
  test)
    setup test
    exec "$VENV/bin/python" -m pytest -q "$@" ;;
  *)
    echo "usage: ./run.sh demo [options] | ./run.sh test [pytest options]" >&2
    exit 2 ;;
esac
