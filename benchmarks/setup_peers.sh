#!/usr/bin/env bash
# Create .venv-bench: cleanse (editable, pinned by constraints.txt) plus the peer tools that
# benchmarks/quality.py compares against (captum, dattri, kronfluence, cleanlab).
#   benchmarks/setup_peers.sh            create or update .venv-bench
#   VENV=/path benchmarks/setup_peers.sh another location
# torch comes from pip first (pip honours PIP_FIND_LINKS, where a CPU build lives on machines that
# ship one); the rest goes through uv with the project's constraints, so torch is never replaced.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VENV:-.venv-bench}"
python="${PYTHON:-python3}"
reqs=benchmarks/requirements-peers.txt
[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip uv
torch_pin="$(grep -E '^torch==' constraints.txt | sed 's/+cpu//')"
"$venv/bin/python" -c "import torch" 2>/dev/null || "$venv/bin/python" -m pip install -q "$torch_pin"
find_links=()
[[ -n "${PIP_FIND_LINKS:-}" ]] && find_links=(--find-links "$PIP_FIND_LINKS")
uv=("$venv/bin/uv" pip install -q --python "$venv/bin/python" "${find_links[@]}")
"${uv[@]}" -c constraints.txt -e .
# Lines marked "# --no-deps" (kronfluence: its torchvision requirement would pull a CUDA torch).
nodeps=$(grep -E '#\s*--no-deps' "$reqs" | sed 's/#.*//' | xargs)
normal=$(mktemp)
trap 'rm -f "$normal"' EXIT
grep -vE '#\s*--no-deps' "$reqs" > "$normal"
"${uv[@]}" -c constraints.txt -r "$normal"
[[ -n "$nodeps" ]] && "${uv[@]}" --no-deps $nodeps
# Only kronfluence's torchvision requirement may be unmet; torch must still be the pinned build.
check=$("$venv/bin/python" -m pip check 2>&1 || true)
unexpected=$(echo "$check" | grep -v -i torchvision | grep -v '^No broken requirements' || true)
if [[ -n "$unexpected" ]]; then
  echo "pip check reports more than the expected torchvision gap:" >&2
  echo "$check" >&2
  exit 1
fi
"$venv/bin/python" - "$torch_pin" <<'PY'
import sys
import torch, captum, dattri, kronfluence, cleanlab, cleanse  # noqa: F401
want = sys.argv[1].split("==")[1]
assert torch.__version__.split("+")[0] == want, f"torch {torch.__version__} replaced the pinned {want}"
print(f"peers installed: torch {torch.__version__}, captum {captum.__version__}, cleanlab {cleanlab.__version__}, "
      f"dattri, kronfluence {getattr(kronfluence, '__version__', '1.0.1')}")
PY
echo "pip check: ${check:-clean}"
