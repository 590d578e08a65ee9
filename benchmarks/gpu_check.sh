#!/usr/bin/env bash
# The checks that need a GPU, in one run of a few minutes on one GPU (under 8 on an H100/H200):
#   1. the CUDA-only tests (tests/test_cuda.py: bf16 autocast training, FSDP2's bf16 policy, flash
#      attention, greedy generation on CUDA equal to the CPU's);
#   2. the gpt2 preset (124M) trained for 50 steps in bf16, eager and with torch.compile: tokens/s and MFU
#      against the GPU's data-sheet peak, beside Hugging Face GPT-2 under the same autocast;
#   3. decode at batch 1, 8 and 64 against Hugging Face `generate` on the same GPU, both in bf16.
# Everything it prints also goes to $OUT/gpu_check.txt when OUT is set. Without CUDA it says so and exits 0.
#
#     bash benchmarks/gpu_check.sh        # uses .venv/bin/python if there is one, else python3 ($PYTHON overrides)
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3
  [ -x .venv/bin/python ] && PYTHON=.venv/bin/python
fi
if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "no CUDA device: nothing to check (benchmarks/gpu_check.sh needs a GPU)"
  exit 0
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT" && exec > >(tee "$OUT/gpu_check.txt") 2>&1
fi
threads=$(( $(nproc) < 8 ? $(nproc) : 8 ))
gpt2=(--layers 12 --hidden 768 --heads 12 --seq 1024 --batch 16 --steps 50 --threads "$threads" --device cuda --dtype bf16)

failed=0
step() {  # run one check, note a failure, go on with the next
  echo; echo "== $1"; shift
  "$@" || { echo "!! failed (exit $?): $*"; failed=1; }
}
date -u +"%Y-%m-%d %H:%M UTC"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
"$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'transformers', transformers.__version__)"
step "CUDA tests" "$PYTHON" -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider
step "training, gpt2 preset, bf16, eager" "$PYTHON" benchmarks/train_throughput.py "${gpt2[@]}"
step "training, gpt2 preset, bf16, torch.compile" "$PYTHON" benchmarks/train_throughput.py "${gpt2[@]}" --compile
step "decode, GPT-2 124M shape, bf16" "$PYTHON" benchmarks/generate_throughput.py --device cuda --batches 1 8 64 \
  --rounds 2 --threads "$threads"
echo; [ "$failed" = 0 ] && echo "gpu_check: all passed" || echo "gpu_check: some checks failed"
exit "$failed"
