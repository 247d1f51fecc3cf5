#!/usr/bin/env bash
# Validates lmtrain's GPU paths on a machine with one CUDA GPU and prints a short table:
# compiled FlexAttention (ALiBi score_mod; softmax, adaptive span, sparse patterns with a
# BlockMask from the rule) forward+backward against the reference, bf16
# SDPA, bf16-mixed training, ACT in bf16, the Triton kernels of kernelized attention
# (performer, rfa, linear) against their PyTorch reference, and DeepSpeed ZeRO-2 / ZeRO-3 in
# bf16 on one GPU (train, resume from a sharded checkpoint, export), and vLLM serving the
# native HF exports (MPT, GPT-NeoX, Llama; skipped unless vLLM is installed). Results go into
# docs/benchmarks.md.
#
#   scripts/gpu_check.sh          run the checks (needs CUDA)
#   scripts/gpu_check.sh --dry    run the same script on a CPU machine: installs, collects
#                                 and runs the GPU tests, which skip, to check the plumbing
#
# Packages the GPU machine lacks travel as wheels in .whl/ (see docs/benchmarks.md); they
# are installed into /tmp/site and put on PYTHONPATH. The project itself is used from the
# working tree (PYTHONPATH=.), so nothing is installed into the machine's Python.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry" ] && DRY=1
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ $DRY = 1 ] && PY=.venv/bin/python

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}

$PY - <<'PY'
import platform, torch
print(f"python {platform.python_version()}  torch {torch.__version__}  cuda {torch.cuda.is_available()}"
      + (f"  {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
PY
if [ $DRY = 0 ] && ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device (use --dry on a CPU machine)"; exit 2
fi

log=$(mktemp)
$PY -m pytest tests/integration/test_gpu.py tests/unit/test_kernelized.py -m gpu -rA -q -p no:cacheprovider 2>&1 | tee "$log" | tail -n 3
rc=${PIPESTATUS[0]}
echo
echo "| check | result |"
echo "|---|---|"
grep -E "^(PASSED|FAILED|SKIPPED|ERROR)" "$log" | sed -E 's/^(PASSED|FAILED|ERROR) (tests\/[a-z]*\/test_[a-z_]*.py::)?([^ ]*).*/| \3 | \1 |/; s/^SKIPPED \[[0-9]+\] ([^:]*):[0-9]+: (.*)/| \1 | SKIPPED (\2) |/'
[ $DRY = 1 ] && [ $rc = 5 ] && rc=0
exit $rc
