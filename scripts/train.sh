#!/usr/bin/env bash
# Launch train_ds.py with the DeepSpeed launcher on 1..N local GPUs (all of them by default).
#   scripts/train.sh                                              # embedded default, all GPUs (2 CPU ranks if none)
#   scripts/train.sh --num_gpus 2 --zero_stage 3 --config configs/llama-3.2-1b.yaml
#   scripts/train.sh --config configs/llama-3.2-3b.yaml --deepspeed ds_configs/stage3_offload.json --max_steps 100
#   scripts/train.sh --gpus 2,3 --master_port 29510 --zero_stage 3     # GPUs 2 and 3 only, beside another job
# --num_gpus N picks the GPU count (default: every visible GPU, counted with nvidia-smi), --gpus a list of
# GPU ids, --master_port the rendezvous port (default 29500); every other argument goes to train_ds.py
# untouched, so hyperparameters live only in recipes and flags.
# Multi-GPU hosts with NVLink multicast issues: export NCCL_NVLS_ENABLE=0 before calling.
set -euo pipefail
cd "$(dirname "$0")/.."

num_gpus=""
gpu_ids=""
launcher_args=()
args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --num_gpus) num_gpus="$2"; shift 2 ;;
    --num_gpus=*) num_gpus="${1#*=}"; shift ;;
    --gpus) gpu_ids="$2"; shift 2 ;;
    --gpus=*) gpu_ids="${1#*=}"; shift ;;
    --master_port) launcher_args+=("--master_port=$2"); shift 2 ;;
    --master_port=*) launcher_args+=("$1"); shift ;;
    *) args+=("$1"); shift ;;
  esac
done

if [[ -n "$gpu_ids" ]]; then
  launcher_args+=("--include=localhost:$gpu_ids")  # these GPU ids only (the launcher ignores CUDA_VISIBLE_DEVICES)
elif [[ -z "$num_gpus" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    num_gpus=$(nvidia-smi -L | wc -l)
  else
    num_gpus=2  # no GPU: 2 CPU processes over gloo, the same code path
    echo "train.sh: no GPU found; running $num_gpus CPU processes" >&2
  fi
fi

# the project's uv environment, unless this shell's python already has DeepSpeed (an active venv, a cluster image)
if python3 -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('deepspeed') is None)" 2>/dev/null; then
  if command -v deepspeed >/dev/null 2>&1; then launcher=(deepspeed); else launcher=(python3 -m deepspeed.launcher.runner); fi
elif command -v uv >/dev/null 2>&1; then
  launcher=(uv run deepspeed)
else
  echo "train.sh: DeepSpeed not found: install uv (pip install uv) and rerun, or activate an environment with deepspeed" >&2
  exit 1
fi
if [[ -n "$num_gpus" ]]; then launcher_args+=("--num_gpus=$num_gpus"); fi
cmd=("${launcher[@]}" "${launcher_args[@]}" train_ds.py "${args[@]}")
echo "+ ${cmd[*]}" >&2
exec "${cmd[@]}"
