#!/usr/bin/env bash
# The lm GPU check (issue 21, docs/lm-gpu.md), as one prepared command for a lent GPU worker:
#   scripts/gpu_lm.sh              on the worker: llama-8b-shaped LoRA step, plain and checkpointed,
#                                  per-sample adapter gradients and their projection; JSON to $OUT
#   scripts/gpu_lm.sh --dry-run    here, on the CPU: the same parts at a tiny shape, plus the lm flow
# The worker's image has torch, transformers and peft but not cleanse's own dependencies (polars,
# pydantic), so the device run uses only benchmarks/gpu_lm.py's estimate and step parts; the flow
# part (the lm family, on CUDA when present) runs where cleanse is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-$(mktemp -d)}"
python="${PYTHON:-python3}"
[[ -x .venv/bin/python && -z "${PYTHON:-}" && "${1:-}" == "--dry-run" ]] && python=.venv/bin/python
if [[ "${1:-}" == "--dry-run" ]]; then
  "$python" benchmarks/gpu_lm.py --dry-run --out "$out/gpu_lm_dry.json"
  exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/nvidia_smi.csv"
"$python" -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'cuda', torch.cuda.is_available())"
# each part bounded so that one hang cannot spend the whole lease
timeout 240 "$python" benchmarks/gpu_lm.py --shape llama-8b --parts estimate step --out "$out/gpu_lm_8b.json"
timeout 180 "$python" benchmarks/gpu_lm.py --shape llama-8b --parts estimate step --checkpointing --steps 3 --samples 8 \
  --out "$out/gpu_lm_8b_ckpt.json"
echo "results in $out"
