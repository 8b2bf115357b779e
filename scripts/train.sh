#!/usr/bin/env bash
# Launch train_ds.py with the DeepSpeed launcher on 1..N local GPUs (all of them by default).
#   scripts/train.sh                                              # embedded default, all GPUs (2 CPU ranks if none)
#   scripts/train.sh --num_gpus 2 --zero_stage 3 --config configs/llama-3.2-1b.yaml
#   scripts/train.sh --config configs/llama-3.2-3b.yaml --deepspeed ds_configs/stage3_offload.json --max_steps 100
# --num_gpus N picks the GPU count (default: every visible GPU, counted with nvidia-smi); every other
# argument goes to train_ds.py untouched, so hyperparameters live only in recipes and flags.
# Multi-GPU hosts with NVLink multicast issues: export NCCL_NVLS_ENABLE=0 before calling.
set -euo pipefail
cd "$(dirname "$0")/.."

num_gpus=""
args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --num_gpus) num_gpus="$2"; shift 2 ;;
    --num_gpus=*) num_gpus="${1#*=}"; shift ;;
    *) args+=("$1"); shift ;;
  esac
done

if [[ -z "$num_gpus" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    num_gpus=$(nvidia-smi -L | wc -l)
  else
    num_gpus=2  # no GPU: 2 CPU processes over gloo, the same code path
    echo "train.sh: no GPU found; running $num_gpus CPU processes" >&2
  fi
fi

runner=()
if command -v uv >/dev/null 2>&1; then runner=(uv run); fi
cmd=("${runner[@]}" deepspeed "--num_gpus=$num_gpus" train_ds.py "${args[@]}")
echo "+ ${cmd[*]}" >&2
exec "${cmd[@]}"
