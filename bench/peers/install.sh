#!/usr/bin/env bash
# Install the peer servers into their own virtual environments under bench/peers/ (git-ignored).
#   bench/peers/install.sh            # both
#   bench/peers/install.sh litserve   # one of: litserve torchserve
# torch is pinned at 2.13.0 (the same as tinyserve's .venv); TorchServe also needs Java 17 (`java -version`).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
PY="${PYTHON:-python3}"
want="${*:-litserve torchserve}"

mkvenv() {  # mkvenv NAME PACKAGES...
  local name="$1"; shift
  local venv="$HERE/.venv-$name"
  if [ ! -x "$venv/bin/python" ]; then
    "$PY" -m venv "$venv"
  fi
  "$venv/bin/pip" install --quiet --upgrade pip
  "$venv/bin/pip" install --quiet "torch==2.13.0" numpy "$@"
  "$venv/bin/python" -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__; print('$name: torch', torch.__version__)"
}

for w in $want; do
  case "$w" in
    litserve)
      mkvenv litserve "litserve==0.2.19"
      "$HERE/.venv-litserve/bin/python" -c "import litserve; print('litserve', litserve.__version__)"
      ;;
    torchserve)
      java -version 2>&1 | head -1 | grep -q '"17' || { echo "TorchServe needs Java 17: $(java -version 2>&1 | head -1)" >&2; exit 1; }
      mkvenv torchserve "torchserve==0.12.0" "torch-model-archiver==0.12.0" pyyaml
      "$HERE/.venv-torchserve/bin/torchserve" --version || true
      ;;
    *) echo "unknown peer: $w (litserve | torchserve)" >&2; exit 2 ;;
  esac
done
