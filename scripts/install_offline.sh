#!/usr/bin/env bash
# Install a wheelhouse made by scripts/wheelhouse.sh on a node without network: pip, no index, exact pins.
#   scripts/install_offline.sh wheelhouse                          # into the active venv / this python3
#   scripts/install_offline.sh .wheelhouse_gpu --venv .venv --system-site-packages   # new venv over the image's
#                                                                  # torch (for a --no-torch/--exclude wheelhouse)
#   source .venv/bin/activate && scripts/train.sh ...              # then train (HF_HUB_OFFLINE=1: docs/launch.md)
#   --venv DIR              create DIR with `python -m venv` (ensurepip, offline) and install into it
#   --system-site-packages  the new venv also sees the base python's packages (a preinstalled torch, CUDA, ...)
#   --python PY             the base interpreter (default python3: the active venv's, if any)
# Checks the interpreter against the wheelhouse's target (Python X.Y) and, for a wheelhouse without torch or with
# --exclude, that those packages are installed, before installing; then imports the stack and prints versions.
# A base python that is itself a venv gets its packages into the new venv through a .pth file; a python without
# ensurepip gets a venv --without-pip that its own pip fills. With --venv, the base is left untouched.
set -euo pipefail

dir="" venv="" system_site=0 python="python3"
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --venv|--python)
      if [[ $# -lt 2 ]]; then echo "install_offline.sh: $1 needs a value" >&2; exit 2; fi
      set -- "$1=$2" "${@:3}"; continue ;;
    --venv=*) venv="${1#*=}" ;;
    --python=*) python="${1#*=}" ;;
    --system-site-packages|--system_site_packages) system_site=1 ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "install_offline.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) if [[ -n "$dir" ]]; then echo "install_offline.sh: one wheelhouse folder, got $dir and $1" >&2; exit 2; fi
       dir="$1" ;;
  esac
  shift
done
problems=()
if [[ -z "$dir" ]]; then
  problems+=("give the wheelhouse folder: scripts/install_offline.sh DIR (made by scripts/wheelhouse.sh)")
elif [[ ! -f "$dir/requirements.txt" ]]; then
  problems+=("$dir/requirements.txt: not found; is $dir a wheelhouse made by scripts/wheelhouse.sh?")
fi
command -v "$python" >/dev/null 2>&1 || problems+=("--python $python: not found")
if [[ $system_site == 1 && -z "$venv" ]]; then problems+=("--system-site-packages goes with --venv DIR"); fi
if [[ ${#problems[@]} -gt 0 ]]; then printf 'install_offline.sh: %s\n' "${problems[@]}" >&2; exit 2; fi
dir=$(cd "$dir" && pwd)

# what the wheelhouse was built for (scripts/wheelhouse.sh writes target.txt: python=, no_torch=, exclude=)
target_value() { sed -n "s/^$1=//p" "$dir/target.txt" 2>/dev/null; }
want_python=$(target_value python | cut -d. -f1,2)
have_python=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [[ -n "$want_python" && "$want_python" != "$have_python" ]]; then
  echo "install_offline.sh: the wheelhouse is for Python $want_python, $python is $have_python: rebuild it with" \
       "scripts/wheelhouse.sh --python $have_python, or pass --python python$want_python" >&2
  exit 2
fi
needed=()  # left out of the wheelhouse: the base must have them
if [[ $(target_value no_torch) == 1 ]]; then needed+=(torch); fi
IFS=',' read -r -a excluded <<<"$(target_value exclude)"
for p in "${excluded[@]}"; do if [[ -n "$p" ]]; then needed+=("$p"); fi; done
if [[ ${#needed[@]} -gt 0 ]]; then
  if [[ -n "$venv" && $system_site == 0 ]]; then
    echo "install_offline.sh: this wheelhouse leaves out ${needed[*]}: add --system-site-packages so the venv sees" \
         "the base python's copies" >&2
    exit 2
  fi
  if ! "$python" - "${needed[@]}" <<'PY'
import importlib.metadata as md, sys
missing = []
for name in sys.argv[1:]:
    try:
        print(f"  preinstalled: {name} {md.version(name)}", file=sys.stderr)
    except md.PackageNotFoundError:
        missing.append(name)
if missing:
    sys.exit(f"install_offline.sh: the wheelhouse leaves out {missing} and {sys.executable} does not have them: "
             "install them, or build the wheelhouse without --no-torch/--exclude")
PY
  then exit 2; fi
fi

pip=("$python" -m pip)
if [[ -n "$venv" ]]; then
  flags=()
  if [[ $system_site == 1 ]]; then flags+=(--system-site-packages); fi
  echo "+ $python -m venv ${flags[*]} $venv" >&2
  if ! "$python" -m venv "${flags[@]}" "$venv"; then
    # Debian/Ubuntu pythons without python3-venv have no ensurepip: a venv without pip, filled by the base's pip
    echo "install_offline.sh: retrying without ensurepip (the base python's pip installs into the venv)" >&2
    rm -rf "$venv"
    "$python" -m venv --without-pip "${flags[@]}" "$venv"
    pip=("$python" -m pip --python "$venv/bin/python")
  else
    pip=("$venv/bin/python" -m pip)
  fi
  # a venv's python as the base (the image's /opt/x/.venv/bin/python3): --system-site-packages reaches only the
  # interpreter under that venv, so the base venv's own site-packages joins the new one's path through a .pth file
  base_site=$("$python" -c 'import site, sys; print(sys.prefix != sys.base_prefix and site.getsitepackages()[0] or "")')
  if [[ $system_site == 1 && -n "$base_site" ]]; then
    site_dir=$("$venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')
    echo "$base_site" > "$site_dir/_base_venv.pth"
    echo "+ echo $base_site > $site_dir/_base_venv.pth  # the base is a venv: see its packages too" >&2
  fi
  python="$venv/bin/python"
fi
if ! "${pip[@]}" --version >/dev/null 2>&1; then
  echo "install_offline.sh: no pip for $python: run \`$python -m ensurepip\` (offline) and rerun" >&2
  exit 1
fi
cmd=("${pip[@]}" install --no-index --find-links "$dir" -r "$dir/requirements.txt")
echo "+ ${cmd[*]}" >&2
PIP_DISABLE_PIP_VERSION_CHECK=1 "${cmd[@]}"
"${pip[@]}" check || echo "install_offline.sh: pip check found the conflicts above (base packages vs the lock)" >&2
"$python" - <<'PY'
import importlib, sys
for name in ["torch", "transformers", "trl", "deepspeed", "datasets", "accelerate", "peft", "wandb"]:
    module = importlib.import_module(name)
    print(f"{name} {module.__version__}", file=sys.stderr)
import torch
print(f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s) visible; ready: {sys.executable}",
      file=sys.stderr)
PY
