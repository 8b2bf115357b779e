#!/usr/bin/env bash
# Build a wheelhouse (a folder of wheels + requirements.txt) of the locked dependencies, for nodes without network.
#   scripts/wheelhouse.sh --out wheelhouse                        # everything uv.lock pins, for CPython 3.12 x86_64
#   scripts/wheelhouse.sh --out .wheelhouse_gpu --python 3.12 --platform manylinux_2_28_x86_64 --no-torch \
#       --exclude transformers,accelerate,peft,numpy              # a node whose image already has these
#   scripts/wheelhouse.sh --out wh --requirements_only            # only wh/requirements.txt (offline, seconds)
# Then, on the node: scripts/install_offline.sh wheelhouse [--venv .venv --system-site-packages] (docs/launch.md).
# Runs on a machine with PyPI and the project's uv environment (it builds DeepSpeed's wheel against its torch).
# Sized: the full set is several GiB (torch and its CUDA wheels); --no-torch with the excludes above 167 MiB, 1 min.
#   --python X.Y[.Z]     target interpreter (default 3.12); --platform P[,P...] target platform tags (default
#                        manylinux_2_28_x86_64, which also takes manylinux_2_17..2_27/2014 wheels; glibc >= 2.28)
#   --no-torch           leave out torch, triton and what only they need (nvidia-*, cuda-*, sympy, networkx...)
#   --exclude a,b        leave out these packages and what only they need (the target has them)
# requirements.txt pins the exact locked versions for that target (markers resolved, no project line); a wheel
# with no binary for the target fails the build with its name. DeepSpeed ships only an sdist: it is built here as
# a pure-Python wheel (DS_BUILD_OPS=0); its ops compile on the node at first use (needs a compiler, and nvcc for
# GPU ops), into TORCH_EXTENSIONS_DIR.
set -euo pipefail
caller_dir="$PWD"
cd "$(dirname "$0")/.."  # uv.lock's folder; --out stays relative to where this was called from

out="" python_version="3.12" platforms="manylinux_2_28_x86_64" no_torch=0 excludes="" requirements_only=0
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out|--python|--platform|--exclude)
      if [[ $# -lt 2 ]]; then echo "wheelhouse.sh: $1 needs a value" >&2; exit 2; fi
      set -- "$1=$2" "${@:3}"; continue ;;
    --out=*) out="${1#*=}" ;;
    --python=*) python_version="${1#*=}" ;;
    --platform=*) platforms="${1#*=}" ;;
    --exclude=*) excludes="${1#*=}" ;;
    --no-torch|--no_torch) no_torch=1 ;;
    --requirements_only|--requirements-only) requirements_only=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "wheelhouse.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
problems=()
[[ -n "$out" ]] || problems+=("--out DIR is required (the wheelhouse folder)")
[[ "$python_version" =~ ^3\.[0-9]+(\.[0-9]+)?$ ]] || problems+=("--python $python_version: give X.Y or X.Y.Z (3.12)")
[[ "$platforms" =~ ^[a-z0-9_]+(,[a-z0-9_]+)*$ ]] || problems+=("--platform $platforms: e.g. manylinux_2_28_x86_64")
command -v uv >/dev/null 2>&1 || problems+=("uv not found: pip install uv")
if [[ ${#problems[@]} -gt 0 ]]; then printf 'wheelhouse.sh: %s\n' "${problems[@]}" >&2; exit 2; fi
if [[ "$out" != /* ]]; then out="$caller_dir/$out"; fi

# ── requirements.txt: the lock, pruned, with markers resolved for the target ──
prune=()
# triton is torch's compiler, versioned with it: a node's torch brings its own
if [[ $no_torch == 1 ]]; then prune+=(--prune torch --prune triton); fi
IFS=',' read -r -a excluded <<<"$excludes"
for p in "${excluded[@]}"; do if [[ -n "$p" ]]; then prune+=(--prune "$p"); fi; done
mkdir -p "$out"
locked="$out/requirements.locked.txt"
uv export --frozen --no-hashes --no-dev --no-emit-project --no-annotate --no-header > "$locked"
for p in "${excluded[@]}"; do
  if [[ -n "$p" ]] && ! grep -qiE "^${p//[-_.]/[-_.]}==" "$locked"; then
    echo "wheelhouse.sh: --exclude $p: no such package in uv.lock (names as in pyproject.toml/uv.lock)" >&2; exit 2
  fi
done
export_cmd=(uv export --frozen --no-hashes --no-dev --no-emit-project --no-annotate --no-header "${prune[@]}")
echo "+ $(printf '%q ' "${export_cmd[@]}")> $locked" >&2
"${export_cmd[@]}" > "$locked"
py=(uv run --frozen --with pip python)  # the project's environment (torch, packaging) with pip beside it
platform_flags=$("${py[@]}" - "$platforms" <<'PY'
import re, sys
flags = []
for p in sys.argv[1].split(","):
    m = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", p)
    # pip takes an explicit --platform literally; a glibc 2.N system also runs 2.17..2.N (and manylinux2014) wheels
    tags = [f"manylinux_2_{n}_{m[2]}" for n in range(int(m[1]), 16, -1)] + [f"manylinux2014_{m[2]}"] if m else [p]
    flags += [f"--platform={t}" for t in tags]
print(" ".join(dict.fromkeys(flags)))
PY
)
"${py[@]}" - "$locked" "$out/requirements.txt" "$python_version" "$platforms" <<'PY'
import sys
from packaging.requirements import Requirement

locked, dest, version, platforms = sys.argv[1:]
machine = "aarch64" if "aarch64" in platforms else "x86_64"
full = version if version.count(".") == 2 else version + ".0"
target = {"python_version": ".".join(version.split(".")[:2]), "python_full_version": full, "sys_platform": "linux",
          "platform_system": "Linux", "os_name": "posix", "platform_machine": machine, "implementation_name": "cpython",
          "platform_python_implementation": "CPython", "extra": ""}
pins = []
for line in open(locked):
    line = line.strip()
    if not line or line.startswith("#"):
        continue
    req = Requirement(line)
    if req.marker is None or req.marker.evaluate(target):
        pins.append(f"{req.name}{req.specifier}")
open(dest, "w").write("\n".join(pins) + "\n")
print(f"wheelhouse.sh: {len(pins)} packages for CPython {version} on {platforms} -> {dest}", file=sys.stderr)
PY
rm "$locked"
printf 'python=%s\nplatform=%s\nno_torch=%s\nexclude=%s\n' "$python_version" "$platforms" "$no_torch" "$excludes" \
  > "$out/target.txt"  # what install_offline.sh checks the node against
if [[ $requirements_only == 1 ]]; then exit 0; fi

# ── wheels: binaries for the target; DeepSpeed (sdist only) built here as py3-none-any ──
binary_reqs="$out/.binary-requirements.txt"
grep -v '^deepspeed==' "$out/requirements.txt" > "$binary_reqs"
abi="cp$(tr -d . <<<"$(cut -d. -f1,2 <<<"$python_version")")"
# shellcheck disable=SC2206  # one flag per word
download=("${py[@]}" -m pip download --no-deps --only-binary=:all: --dest "$out" --python-version "$python_version"
          --implementation cp --abi "$abi" --abi abi3 --abi none $platform_flags -r "$binary_reqs")
echo "+ ${download[*]}" >&2
"${download[@]}"
rm "$binary_reqs"
ds_pin=$(grep '^deepspeed==' "$out/requirements.txt" || true)
if [[ -n "$ds_pin" ]]; then
  build=("${py[@]}" -m pip wheel --no-deps --no-build-isolation --wheel-dir "$out" "$ds_pin")
  echo "+ DS_BUILD_OPS=0 ${build[*]}" >&2
  DS_BUILD_OPS=0 "${build[@]}"
  if ! ls "$out"/deepspeed-*-py3-none-any.whl >/dev/null 2>&1; then
    echo "wheelhouse.sh: the DeepSpeed wheel is not py3-none-any (ops were compiled?): unset DS_BUILD_* and rerun" >&2
    exit 1
  fi
fi
# every pin has its wheel (pip would otherwise stop on the node, without network to fetch it); wheels of an earlier
# build that the pins no longer name are removed
"${py[@]}" - "$out" <<'PY'
import pathlib, re, sys
out = pathlib.Path(sys.argv[1])
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
pins = dict(line.split("==") for line in (out / "requirements.txt").read_text().split())
pins = {norm(name): version for name, version in pins.items()}
have = set()
for wheel in out.glob("*.whl"):
    name, version = wheel.name.split("-")[:2]
    if pins.get(norm(name)) == version:
        have.add(norm(name))
    else:
        print(f"wheelhouse.sh: removing {wheel.name} (not in this lock's pins)", file=sys.stderr)
        wheel.unlink()
missing = sorted(set(pins) - have)
if missing:
    sys.exit(f"wheelhouse.sh: no wheel for {missing} in {out}")
size = sum(w.stat().st_size for w in out.glob("*.whl")) / 2**20
print(f"wheelhouse.sh: {len(pins)} wheels, {size:.0f} MiB in {out}; on the node: scripts/install_offline.sh {out}",
      file=sys.stderr)
PY
