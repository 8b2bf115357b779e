#!/usr/bin/env bash
# Launch train_ds.py with the DeepSpeed launcher: 1..N local GPUs, or many nodes (docs/launch.md).
#   scripts/train.sh                                              # embedded default, all GPUs (2 CPU ranks if none)
#   scripts/train.sh --num_gpus 2 --zero_stage 3 --config configs/llama-3.2-1b.yaml
#   scripts/train.sh --gpus 2,3 --master_port 29510 --zero_stage 3     # GPUs 2 and 3 only, beside another job
#   scripts/train.sh --hostfile hosts --master_addr 10.0.0.1 --config configs/llama-3.2-3b.yaml  # nodes, ssh (pdsh)
#   scripts/train.sh --nnodes 2 --node_rank 0 --master_addr 10.0.0.1 --config ...   # no ssh: on node 0, and
#   scripts/train.sh --nnodes 2 --node_rank 1 --master_addr 10.0.0.1 --config ...   #         the same on node 1
#   sbatch --nodes 4 scripts/slurm.sbatch --config configs/llama-3.2-3b.yaml        # SLURM (no-ssh mode per node)
# Launcher options (all modes):
#   --num_gpus N | --gpus 0,2    GPUs per node (default: CUDA_VISIBLE_DEVICES if set, else every GPU nvidia-smi lists;
#                                2 CPU processes on a machine without GPUs; with --hostfile: its slots)
#   --master_port P              rendezvous port (default 29500); --master_addr HOST: node 0's address
#   --hostfile FILE [--nnodes N] DeepSpeed hostfile ("host slots=8" per line); the launcher starts every node over
#                                pdsh/ssh and passes on this shell's NCCL_*/GLOO_*/HF_*/WANDB_*/... (not secrets)
#   --nnodes N --node_rank R     no ssh: run this script once on every node, R = 0..N-1, with the same --master_addr
#   --bind_cores_to_rank, --bind_core_list 0-31, --include, --exclude, --launcher, --launcher_args, --ssh_port,
#   --no_ssh_check, --enable_each_rank_log DIR, --venv_script F   go to the DeepSpeed launcher (deepspeed --help)
#   --no_bind_cores              with a CPU-offload config, train.sh binds each local rank to its own cores
#                                (--bind_cores_to_rank, within --bind_core_list if given; when numactl is here and
#                                not over ssh); this turns that off
#   --dry_print                  print the command (and write the launch files) without running it
# A run killed by SIGKILL (exit 137, or 247 through DeepSpeed's launcher) is reported as a likely host out-of-memory,
# with train_ds.py's start-up estimate of the host memory it needs per node (train_ds.py stops with exit 2 before
# loading weights when the estimate is above what the node can give; --check_host_memory false to start anyway).
# Every other argument goes to train_ds.py untouched (also everything after `--`), so hyperparameters live only in
# recipes and flags. GPUs with NVLink multicast issues: export NCCL_NVLS_ENABLE=0 before calling.
set -euo pipefail
caller_dir="$PWD"
cd "$(dirname "$0")/.."  # paths given to train_ds.py are relative to the repository (a --hostfile: to either)

num_gpus="" gpu_ids="" master_port="" master_addr="" hostfile="" nnodes="" node_rank="" dry_print=0 bind_cores=auto
launcher_args=()
args=()
problems=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --num_gpus|--gpus|--master_port|--master_addr|--hostfile|--nnodes|--node_rank|--bind_core_list|--include|\
    --exclude|--launcher|--launcher_args|--ssh_port|--enable_each_rank_log|--venv_script)
      if [[ $# -lt 2 ]]; then echo "train.sh: $1 needs a value" >&2; exit 2; fi
      set -- "$1=$2" "${@:3}"; continue ;;  # one spelling: --flag=value
    --num_gpus=*) num_gpus="${1#*=}" ;;
    --gpus=*) gpu_ids="${1#*=}" ;;
    --master_port=*) master_port="${1#*=}" ;;
    --master_addr=*) master_addr="${1#*=}" ;;
    --hostfile=*) hostfile="${1#*=}" ;;
    --nnodes=*) nnodes="${1#*=}" ;;
    --node_rank=*) node_rank="${1#*=}" ;;
    --bind_core_list=*|--include=*|--exclude=*|--launcher=*|--launcher_args=*|--ssh_port=*|--enable_each_rank_log=*|\
    --venv_script=*|--bind_cores_to_rank|--no_ssh_check) launcher_args+=("$1") ;;
    --dry_print) dry_print=1 ;;
    --no_bind_cores) bind_cores=no ;;
    --) shift; args+=("$@"); break ;;
    *) args+=("$1") ;;
  esac
  shift
done

if [[ -n "$hostfile" && "$hostfile" != /* && -f "$caller_dir/$hostfile" ]]; then hostfile="$caller_dir/$hostfile"; fi

# an ERE over the launcher's flags (grep reads them all, not -q: an early exit could fail printf under pipefail)
has_launcher_flag() { printf '%s\n' "${launcher_args[@]}" | grep -E -- "$1" >/dev/null; }
has_filter=0
if has_launcher_flag '^--(include|exclude)='; then has_filter=1; fi

# ── check everything at once, each problem with its fix (exit 2, as train_ds.py does) ──
for pair in "num_gpus:$num_gpus" "master_port:$master_port" "nnodes:$nnodes" "node_rank:$node_rank"; do
  if [[ -n "${pair#*:}" && ! "${pair#*:}" =~ ^[0-9]+$ ]]; then
    problems+=("--${pair%%:*} ${pair#*:}: not a whole number")
  fi
done
if [[ -n "$gpu_ids" && ! "$gpu_ids" =~ ^[0-9]+(,[0-9]+)*$ ]]; then
  problems+=("--gpus $gpu_ids: give GPU ids separated by commas, e.g. --gpus 0,2")
fi
if [[ -n "$num_gpus" && -n "$gpu_ids" ]]; then problems+=("--num_gpus and --gpus: give one of them"); fi
if [[ -n "$num_gpus$gpu_ids" && $has_filter == 1 ]]; then
  problems+=("--include/--exclude pick GPUs themselves: drop --num_gpus/--gpus")
fi
if [[ -n "$hostfile" && ! -f "$hostfile" ]]; then problems+=("--hostfile $hostfile: no such file"); fi
if [[ -n "$node_rank" ]]; then
  [[ -n "$master_addr" ]] || problems+=("--node_rank needs --master_addr (node 0's address, the same on every node)")
  [[ -n "$nnodes$hostfile" ]] || problems+=("--node_rank needs --nnodes N (or a --hostfile listing the nodes)")
  if [[ "$nnodes" =~ ^[0-9]+$ && "$node_rank" =~ ^[0-9]+$ && "$node_rank" -ge "$nnodes" ]]; then
    problems+=("--node_rank $node_rank: must be below --nnodes $nnodes (0..$((nnodes - 1)))")
  fi
elif [[ -n "$nnodes" && -z "$hostfile" && "$nnodes" != 1 ]]; then
  problems+=("--nnodes $nnodes without ssh needs --node_rank R and --master_addr HOST on every node (or a --hostfile)")
fi
if [[ ${#problems[@]} -gt 0 ]]; then
  printf 'train.sh: %s\n' "${problems[@]}" >&2
  exit 2
fi

local_gpu_count() {  # GPUs on this node, or nothing without nvidia-smi
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then nvidia-smi -L | grep -c '^GPU'; fi
}
offload_run() {  # does train_ds.py get an offload config (--zero_stage/--deepspeed, or in the --config recipe)?
  local i a next
  for ((i = 0; i < ${#args[@]}; i++)); do
    a="${args[i]}" next="${args[i + 1]:-}"
    case "$a" in
      --zero_stage=*offload*|--deepspeed=*offload*) return 0 ;;
      --zero_stage|--deepspeed) if [[ "$next" == *offload* ]]; then return 0; fi ;;
      --config=*) next="${a#*=}" ;&
      --config) if grep -qsE '^[[:space:]]*(zero_stage|deepspeed):.*offload' "$next"; then return 0; fi ;;
    esac
  done
  return 1
}
hosts_of() { awk '!/^[[:space:]]*(#|$)/ {print $1}' "$1"; }
include_for() {  # --include value: the GPU ids $gpu_ids on each host named on stdin
  local spec="" host
  while read -r host; do spec+="${spec:+@}$host:$gpu_ids"; done
  printf '%s' "$spec"
}

# ── the launch mode: local, nodes over ssh (hostfile), or one launcher per node without ssh ──
work=""
if [[ -n "$node_rank$hostfile" ]]; then work=$(mktemp -d "${TMPDIR:-/tmp}/train_sh.XXXXXX"); fi
env_prefix=()
if [[ -n "$node_rank" ]]; then
  # No ssh: this node's launcher starts its own ranks; every node runs this with its --node_rank. The DeepSpeed
  # launcher takes the node list from a hostfile, so without one we write N placeholder nodes of equal size.
  if [[ -z "$gpu_ids$num_gpus" && $has_filter == 0 ]]; then
    if [[ "${CUDA_VISIBLE_DEVICES:-}" =~ ^[0-9]+(,[0-9]+)*$ && -n "$(local_gpu_count)" ]]; then
      gpu_ids="$CUDA_VISIBLE_DEVICES"  # SLURM's GPUs for this job (with a hostfile the launcher would ignore it)
    elif [[ -z "$hostfile" ]]; then
      num_gpus=$(local_gpu_count)
      if [[ -z "$num_gpus" ]]; then num_gpus=2; echo "train.sh: no GPU found; running $num_gpus CPU processes" >&2; fi
    fi
  fi
  if [[ -z "$hostfile" ]]; then
    hostfile="$work/hostfile"
    slots="${num_gpus:-1}"
    if [[ -n "$gpu_ids" ]]; then slots=$(( $(tr ',' '\n' <<<"$gpu_ids" | sort -n | tail -1) + 1 )); fi
    for ((i = 0; i < nnodes; i++)); do echo "node-$i slots=$slots"; done > "$hostfile"
  elif [[ -n "$nnodes" && -z "$gpu_ids" ]]; then
    launcher_args+=("--num_nodes=$nnodes")  # the first N hosts (with --gpus, --include names them)
  fi
  launcher_args+=("--hostfile=$hostfile" "--no_ssh" "--node_rank=$node_rank" "--master_addr=$master_addr")
elif [[ -n "$hostfile" ]]; then
  # Over ssh: pdsh runs `cd $PWD; <this python> -m deepspeed.launcher.launch ...` on every host, so the same code,
  # environment and paths must exist there. It carries only exported variables; .deepspeed_env lists them.
  launcher_args+=("--hostfile=$hostfile")
  if [[ -n "$nnodes" && -z "$gpu_ids" ]]; then launcher_args+=("--num_nodes=$nnodes"); fi
  if [[ -n "$master_addr" ]]; then launcher_args+=("--master_addr=$master_addr"); fi
  # What the other nodes get: this shell's variables of these families, then ~/.deepspeed_env and ./.deepspeed_env
  # (theirs win). DeepSpeed itself adds NCCL_*, PYTHON*, UCX_*, MLFLOW_*. Names that look like credentials
  # (HF_TOKEN, WANDB_API_KEY, *KEY*, *TOKEN*, *SECRET*, *PASSWORD*) are never written: they would travel on the
  # pdsh command line, readable in `ps` and in the launcher's log. Log in on each node instead (docs/launch.md).
  env_file="$work/deepspeed_env"
  user_env_name="${DS_ENV_FILE:-.deepspeed_env}"
  pass_on='^(NCCL_|GLOO_|HF_|HUGGINGFACE_|TRANSFORMERS_|WANDB_|TORCH_|PYTORCH_|TRITON_|DS_)'
  pass_on+='|^(CUDA_HOME|CUDA_DEVICE_MAX_CONNECTIONS|OMP_NUM_THREADS|TOKENIZERS_PARALLELISM)$'
  secret='(^|_)(TOKEN|KEY|SECRET|PASSWORD|PASSWD)(_|$)'
  {
    env -0 | while IFS= read -r -d '' kv; do
      name="${kv%%=*}"
      [[ "$name" =~ $pass_on && ! "$name" =~ $secret && "$name" != DS_ENV_FILE && "$kv" != *$'\n'* ]] || continue
      printf '%s\n' "$kv"
    done
    for f in "$HOME/$user_env_name" "$user_env_name"; do
      if [[ -f "$f" ]]; then grep -vE '^[[:space:]]*(#|$)' "$f" || true; fi  # the launcher breaks on blank lines
    done
  } > "$env_file"
  env_prefix=("DS_ENV_FILE=$env_file")
  for credential in HF_TOKEN HUGGING_FACE_HUB_TOKEN WANDB_API_KEY; do
    if [[ -n "${!credential:-}" ]]; then
      echo "train.sh: $credential is not passed to the other nodes; give it to them as docs/launch.md says" >&2
    fi
  done
else
  # Local. DeepSpeed ignores CUDA_VISIBLE_DEVICES once --num_gpus is given, so a set one becomes the GPU list.
  if [[ -z "$gpu_ids$num_gpus" && $has_filter == 0 ]]; then
    n_local=$(local_gpu_count)
    if [[ "${CUDA_VISIBLE_DEVICES:-}" =~ ^[0-9]+(,[0-9]+)*$ && -n "$n_local" ]]; then  # (indices; UUIDs: all GPUs)
      gpu_ids="$CUDA_VISIBLE_DEVICES"
    elif [[ -n "$n_local" ]]; then
      num_gpus="$n_local"
    else
      num_gpus=2  # no GPU: 2 CPU processes over gloo, the same code path
      echo "train.sh: no GPU found; running $num_gpus CPU processes" >&2
    fi
  fi
  if [[ -n "$gpu_ids" ]]; then launcher_args+=("--include=localhost:$gpu_ids"); gpu_ids=""; fi
fi
if [[ -n "$gpu_ids" ]]; then  # nodes: these GPU ids on each of the (first --nnodes) hosts
  launcher_args+=("--include=$(hosts_of "$hostfile" | head -n "${nnodes:-1000000}" | include_for)")
fi
if [[ -n "$num_gpus" ]]; then launcher_args+=("--num_gpus=$num_gpus"); fi
if [[ $bind_cores == auto && ! ( -n "$hostfile" && -z "$node_rank" ) ]] && offload_run && command -v numactl >/dev/null \
   && [[ -z "${KMP_AFFINITY:-}" ]] && ! has_launcher_flag '^--bind_cores_to_rank$'; then
  # CPU offload: the ranks of a node share its cores for the optimizer step; each on its own slice ran stage3_offload
  # 1.2-1.45x as fast on 4 H200s, 1.03x on 1 (docs/launch.md). Over ssh the other nodes' numactl is unknown: not there.
  launcher_args+=("--bind_cores_to_rank")
  echo "train.sh: CPU offload: each rank bound to its own cores (--bind_cores_to_rank; --no_bind_cores to not)" >&2
fi
if [[ -n "$master_port" ]]; then launcher_args+=("--master_port=$master_port"); fi

# the project's uv environment, unless this shell's python already has DeepSpeed (an active venv, a cluster image)
if python3 -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('deepspeed') is None)" 2>/dev/null; then
  if command -v deepspeed >/dev/null 2>&1; then launcher=(deepspeed); else launcher=(python3 -m deepspeed.launcher.runner); fi
elif command -v uv >/dev/null 2>&1; then
  launcher=(uv run deepspeed)
else
  echo "train.sh: DeepSpeed not found: install uv (pip install uv) and rerun, or activate an environment with deepspeed" >&2
  exit 1
fi
if [[ -n "${env_file:-}" ]] && ! has_launcher_flag '^--venv_script='; then
  # pdsh's login shell on the nodes has no venv on PATH (ninja, for DeepSpeed's op builds): activate it there
  if [[ "${launcher[0]}" == uv ]]; then pyrun=(uv run python); else pyrun=(python3); fi
  venv=$("${pyrun[@]}" -c 'import sys; print(sys.prefix if sys.prefix != sys.base_prefix else "")' 2>/dev/null || true)
  if [[ -n "$venv" && -f "$venv/bin/activate" ]]; then launcher_args+=("--venv_script=$venv/bin/activate"); fi
fi
cmd=("${launcher[@]}" "${launcher_args[@]}" train_ds.py "${args[@]}")
shown=()
for a in "${env_prefix[@]}" "${cmd[@]}"; do  # a command to copy: quoted only where the shell needs it
  if [[ "$a" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then shown+=("$a"); else shown+=("$(printf '%q' "$a")"); fi
done
echo "+ ${shown[*]}" >&2
if [[ -n "${env_file:-}" ]]; then
  names=$(cut -d= -f1 "$env_file" | sort -u | tr '\n' ' ')
  echo "+ passed to every node ($env_file): ${names:-none but those DeepSpeed adds (NCCL_*, PYTHON*, UCX_*)}" >&2
fi
if [[ $dry_print == 1 ]]; then exit 0; fi
if [[ ${#env_prefix[@]} -gt 0 ]]; then export "${env_prefix[@]}"; fi

# Run it and wait (not exec): a rank killed by SIGKILL leaves only DeepSpeed's "exits with return code = -9", so say
# what that most likely was. train_ds.py's local rank 0 writes its start-up host-memory verdict (the estimate and
# what this node could give) to $RECIPE_HOST_MEMORY_REPORT. TERM/HUP are passed on; Ctrl-C reaches the launcher
# through the terminal's process group.
report_dir="$work"
if [[ -z "$report_dir" ]]; then report_dir=$(mktemp -d "${TMPDIR:-/tmp}/train_sh.XXXXXX"); fi
export RECIPE_HOST_MEMORY_REPORT="$report_dir/host_memory.txt"
"${cmd[@]}" <&0 &
child=$!
trap 'kill -TERM "$child" 2>/dev/null || true' TERM HUP
trap 'kill -INT "$child" 2>/dev/null || true' INT
status=0
wait "$child" || status=$?
while kill -0 "$child" 2>/dev/null; do  # a trapped signal ends `wait` early: wait for the launcher itself
  status=0
  wait "$child" || status=$?
done
# 137: killed by SIGKILL (128 + 9); 247: DeepSpeed's launcher passing on a rank's -9 (sys.exit(-9) is 247)
if [[ $status == 137 || $status == 247 ]]; then
  {
    echo "train.sh: a training process was killed by SIGKILL (exit $status; DeepSpeed: \"exits with return code = -9\")"
    echo "train.sh: the recipe never sends it: unless you did, this is most likely a host out-of-memory, the kernel's"
    echo "train.sh: OOM killer ending the largest process (check: dmesg | grep -iE 'out of memory|killed process')."
    if [[ -s "$RECIPE_HOST_MEMORY_REPORT" ]]; then
      echo "train.sh: at start, train_ds.py said: $(cat "$RECIPE_HOST_MEMORY_REPORT")"
      echo "train.sh: an estimate near the limit, or other jobs on this node, can still run out: pick a config"
      echo "train.sh: with less host memory (uv run python train_ds.py <the same arguments> --dry_run lists them)."
    else
      echo "train.sh: it died before its host-memory check; uv run python train_ds.py <the same arguments> --dry_run"
      echo "train.sh: prints the host memory each config needs per node and what this node can give."
    fi
  } >&2
fi
rm -f "$RECIPE_HOST_MEMORY_REPORT"
if [[ -z "$work" ]]; then rmdir "$report_dir" 2>/dev/null || true; fi
exit "$status"
