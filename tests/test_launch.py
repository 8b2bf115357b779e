"""Launching anywhere (docs/launch.md): scripts/train.sh's command in every mode, SLURM, the offline-install scripts,
and two simulated nodes on this host (no ssh; ssh through a stand-in pdsh) that train exactly like one 2-process run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import FAST, ROOT, check_ok, command, free_port, launch, only_run_dir, read_summary, train_losses

SCRIPTS = ["scripts/train.sh", "scripts/slurm.sbatch", "scripts/wheelhouse.sh", "scripts/install_offline.sh"]
# the training runs: FAST without the final save and held-out generation (a third of the time; same losses)
RUN = [*FAST, "--seed", "0", "--save_final_model", "false", "--heldout_eval", "false"]


def clean_env(**extra: str) -> dict:
    """conftest's environment for 2 ranks, with this venv first on PATH (train.sh looks for DeepSpeed there)."""
    _, env = command([], ROOT, nproc=2, launcher="deepspeed")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return {**env, **extra}


def train_sh(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "scripts" / "train.sh"), *args], cwd=ROOT, env=env or clean_env(),
                          capture_output=True, text=True, timeout=60)


def start(cmd: list[str], env: dict) -> subprocess.Popen:
    """A launcher in its own process group, so that a timeout ends it with every rank it started."""
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: int = 600) -> str:
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


def printed(proc: subprocess.CompletedProcess) -> list[str]:
    """The launcher command train.sh echoed (`+ ...`), as words."""
    check_ok(proc)
    line = next(l for l in proc.stderr.splitlines() if l.startswith("+ ") and "train_ds.py" in l)
    return line[2:].split()


def test_shell_scripts_parse():
    for script in SCRIPTS:
        proc = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
        assert proc.returncode == 0, (script, proc.stderr)
        assert os.access(ROOT / script, os.X_OK), f"{script} is not executable"


# ── train.sh: the command in each mode, without launching ──────────────────

def test_local_modes_build_the_deepspeed_command():
    words = printed(train_sh("--dry_print", "--max_steps", "4"))  # no GPU here: 2 CPU ranks
    assert words[words.index("train_ds.py") - 1] == "--num_gpus=2" and words[-2:] == ["--max_steps", "4"]
    words = printed(train_sh("--dry_print", "--num_gpus", "3", "--master_port=29511", "--lr=1"))
    assert words[1:words.index("train_ds.py")] == ["--num_gpus=3", "--master_port=29511"]
    assert words[-1] == "--lr=1"
    words = printed(train_sh("--dry_print", "--gpus", "0,2", "--bind_cores_to_rank", "--bind_core_list", "0-7",
                             "--zero_stage", "3", "--", "--num_gpus", "9"))
    launcher, script_args = words[:words.index("train_ds.py")], words[words.index("train_ds.py") + 1:]
    assert {"--include=localhost:0,2", "--bind_cores_to_rank", "--bind_core_list=0-7"} <= set(launcher)
    assert script_args == ["--zero_stage", "3", "--num_gpus", "9"]  # after `--`: train_ds.py's, untouched


def test_offload_configs_bind_each_rank_to_its_own_cores(tmp_path):
    """With numactl on PATH, an offload config (flag or recipe) gets --bind_cores_to_rank once (within a user's
    --bind_core_list, which alone binds nothing); --no_bind_cores or a config without offload do not, nor the ssh
    mode (the other nodes' numactl is unknown)."""
    (tmp_path / "numactl").write_text("#!/bin/sh\n")
    (tmp_path / "numactl").chmod(0o755)
    env = clean_env(PATH=f"{tmp_path}{os.pathsep}{clean_env()['PATH']}")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("max_steps: 4\nzero_stage: 3_offload\n")

    def launcher(*args: str, env=env) -> list[str]:
        proc = train_sh("--dry_print", *args, env=env)
        words = printed(proc)
        return words[:words.index("train_ds.py")]

    for args in (["--zero_stage", "3_offload"], ["--zero_stage=2_offload"], ["--config", str(recipe)],
                 ["--deepspeed", "ds_configs/stage3_offload.json"],
                 ["--nnodes", "2", "--node_rank", "1", "--master_addr", "n0", "--zero_stage", "3_offload"]):
        assert "--bind_cores_to_rank" in launcher(*args), args
    for args in (["--zero_stage", "3_offload", "--no_bind_cores"], ["--zero_stage", "3"]):
        assert "--bind_cores_to_rank" not in launcher(*args), args
    for args in (["--zero_stage", "3_offload", "--bind_core_list", "0-7"],
                 ["--zero_stage", "3_offload", "--bind_cores_to_rank"]):
        assert launcher(*args).count("--bind_cores_to_rank") == 1, args
    if not shutil.which("numactl", path=clean_env()["PATH"]):  # and where there is no numactl, nothing to bind with
        assert "--bind_cores_to_rank" not in launcher("--zero_stage", "3_offload", env=clean_env())
    hostfile = tmp_path / "hosts"
    hostfile.write_text("a slots=1\nb slots=1\n")
    assert "--bind_cores_to_rank" not in launcher("--hostfile", str(hostfile), "--zero_stage", "3_offload")


def test_hostfile_mode_passes_the_environment_but_no_secrets(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two nodes\nnode-a slots=8\n\nnode-b slots=8\n")
    env = clean_env(TMPDIR=str(tmp_path), NCCL_SOCKET_IFNAME="eth0", NCCL_IB_HCA="mlx5", HF_TOKEN="hf_secret",
                    WANDB_API_KEY="wandb_secret", HF_HOME="/shared/hf cache", TOKENIZERS_PARALLELISM="false")
    proc = train_sh("--dry_print", "--hostfile", str(hostfile), "--master_addr", "10.0.0.1", "--master_port", "29600",
                    "--gpus", "0,2", "--max_steps", "4", env=env)
    words = printed(proc)
    assert words[0].startswith("DS_ENV_FILE=") and words[1] == "deepspeed"
    assert {f"--hostfile={hostfile}", "--master_addr=10.0.0.1", "--master_port=29600",
            "--include=node-a:0,2@node-b:0,2"} <= set(words[:words.index("train_ds.py")])
    env_file = Path(words[0].split("=", 1)[1])
    lines = env_file.read_text().splitlines()
    assert {"NCCL_SOCKET_IFNAME=eth0", "NCCL_IB_HCA=mlx5", "HF_HOME=/shared/hf cache", "HF_HUB_OFFLINE=1",
            "TOKENIZERS_PARALLELISM=false"} <= set(lines)
    assert all(line and "=" in line for line in lines)  # DeepSpeed's reader breaks on blank lines
    assert "secret" not in env_file.read_text() and "HF_TOKEN is not passed" in proc.stderr


def test_no_ssh_mode_writes_a_hostfile_of_equal_nodes(tmp_path):
    words = printed(train_sh("--dry_print", "--nnodes", "3", "--node_rank", "2", "--master_addr", "node0",
                             "--num_gpus", "4", "--max_steps", "4", env=clean_env(TMPDIR=str(tmp_path))))
    launcher = words[:words.index("train_ds.py")]
    assert {"--no_ssh", "--node_rank=2", "--master_addr=node0", "--num_gpus=4"} <= set(launcher)
    hostfile = Path(next(w for w in launcher if w.startswith("--hostfile=")).split("=", 1)[1])
    assert hostfile.read_text().splitlines() == ["node-0 slots=4", "node-1 slots=4", "node-2 slots=4"]
    words = printed(train_sh("--dry_print", "--nnodes", "2", "--node_rank", "0", "--master_addr", "node0",
                             "--gpus", "1,3", env=clean_env(TMPDIR=str(tmp_path))))
    assert "--include=node-0:1,3@node-1:1,3" in words


def test_gpus_come_from_nvidia_smi_or_cuda_visible_devices(tmp_path):
    """A stand-in nvidia-smi lists 4 GPUs: all of them by default; CUDA_VISIBLE_DEVICES indices pick some (also per
    node without ssh, as SLURM sets it); UUIDs there leave the choice to the GPU count."""
    (tmp_path / "nvidia-smi").write_text("#!/bin/sh\nfor i in 0 1 2 3; do echo \"GPU $i: NVIDIA H100\"; done\n")
    (tmp_path / "nvidia-smi").chmod(0o755)
    path = f"{tmp_path}{os.pathsep}{clean_env()['PATH']}"
    assert "--num_gpus=4" in printed(train_sh("--dry_print", env=clean_env(PATH=path)))
    assert "--include=localhost:1,3" in printed(train_sh("--dry_print", env=clean_env(PATH=path,
                                                                                      CUDA_VISIBLE_DEVICES="1,3")))
    assert "--num_gpus=4" in printed(train_sh("--dry_print", env=clean_env(PATH=path, CUDA_VISIBLE_DEVICES="GPU-1")))
    words = printed(train_sh("--dry_print", "--nnodes", "2", "--node_rank", "1", "--master_addr", "n0",
                             env=clean_env(PATH=path, CUDA_VISIBLE_DEVICES="2,3", TMPDIR=str(tmp_path))))
    assert "--include=node-0:2,3@node-1:2,3" in words and not any(w.startswith("--num_gpus") for w in words)


@pytest.mark.parametrize("args, message", [
    (["--node_rank", "1", "--nnodes", "2"], "--node_rank needs --master_addr"),
    (["--nnodes", "2"], "--nnodes 2 without ssh needs --node_rank"),
    (["--node_rank", "2", "--nnodes", "2", "--master_addr", "h"], "must be below --nnodes 2"),
    (["--num_gpus", "2", "--gpus", "0,1"], "give one of them"),
    (["--gpus", "0;1"], "GPU ids separated by commas"),
    (["--hostfile", "/no/such/hosts"], "no such file"),
    (["--master_port"], "--master_port needs a value"),
])
def test_bad_launch_arguments_exit_2_with_the_fix(args, message):
    proc = train_sh("--dry_print", *args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_slurm_script_runs_train_sh_once_per_node_without_ssh(tmp_path):
    """slurm.sbatch under stand-in scontrol/srun: node 0 is the rendezvous, each task gets its SLURM_NODEID."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-node-7\\ngpu-node-9\\n'\n")
    (bin_dir / "srun").write_text(textwrap.dedent("""\
        #!/bin/bash
        echo "srun $*" >&2
        while [[ "$1" == -* ]]; do shift; done   # srun's own options
        for id in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$id "$@" || exit; done
        """))
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = clean_env(TMPDIR=str(tmp_path), PATH=f"{bin_dir}{os.pathsep}{clean_env()['PATH']}", SLURM_NNODES="2",
                    SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="gpu-node-[7,9]", SLURM_JOB_ID="1234",
                    SLURM_SUBMIT_DIR=str(ROOT), SLURM_CPUS_ON_NODE="32")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "slurm.sbatch"), "--dry_print", "--max_steps", "4"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    check_ok(proc)
    assert "srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1 --cpus-per-task=32 bash -c" in proc.stderr
    commands = [l[2:].split() for l in proc.stderr.splitlines() if l.startswith("+ ")]
    assert len(commands) == 2
    for rank, words in enumerate(commands):
        assert {"--no_ssh", f"--node_rank={rank}", "--master_addr=gpu-node-7", "--master_port=29734"} <= set(words)
        assert words[-3:] == ["train_ds.py", "--max_steps", "4"]


# ── offline install scripts: arguments and the requirements export, no network ──

@pytest.mark.skipif(shutil.which("uv") is None, reason="wheelhouse.sh exports uv.lock with uv")
def test_wheelhouse_requirements_are_the_lock_for_the_target(tmp_path):
    proc = subprocess.run([str(ROOT / "scripts" / "wheelhouse.sh"), "--out", str(tmp_path), "--requirements_only",
                           "--no-torch", "--exclude", "transformers,peft", "--python", "3.12"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    check_ok(proc)
    pins = dict(l.split("==") for l in (tmp_path / "requirements.txt").read_text().split())
    lock = (ROOT / "uv.lock").read_text()
    assert pins["deepspeed"] in lock and pins["trl"] and pins["datasets"]  # exact pins
    assert not {"torch", "triton", "transformers", "peft", "tokenizers"} & set(pins)  # and what only they need
    assert not any(n.startswith(("nvidia-", "cuda-")) for n in pins)
    assert "colorama" not in pins  # markers resolved for Linux, no `; sys_platform` left
    assert (tmp_path / "target.txt").read_text().splitlines()[:3] == [
        "python=3.12", "platform=manylinux_2_28_x86_64", "no_torch=1"]
    bad = subprocess.run([str(ROOT / "scripts" / "wheelhouse.sh"), "--out", str(tmp_path), "--exclude", "torchh",
                          "--requirements_only"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--exclude torchh: no such package in uv.lock" in bad.stderr


def test_install_offline_checks_before_installing(tmp_path):
    script = str(ROOT / "scripts" / "install_offline.sh")
    proc = subprocess.run([script], capture_output=True, text=True)
    assert proc.returncode == 2 and "give the wheelhouse folder" in proc.stderr
    proc = subprocess.run([script, str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "requirements.txt: not found" in proc.stderr
    (tmp_path / "requirements.txt").write_text("trl==1.16.0\n")
    (tmp_path / "target.txt").write_text("python=2.7\nno_torch=1\nexclude=\n")
    proc = subprocess.run([script, str(tmp_path), "--python", sys.executable], capture_output=True, text=True)
    assert proc.returncode == 2 and "the wheelhouse is for Python 2.7" in proc.stderr
    version = "%d.%d" % sys.version_info[:2]
    (tmp_path / "target.txt").write_text(f"python={version}\nno_torch=1\nexclude=nosuchpackage\n")
    proc = subprocess.run([script, str(tmp_path), "--python", sys.executable, "--venv", str(tmp_path / "v")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "add --system-site-packages" in proc.stderr
    proc = subprocess.run([script, str(tmp_path), "--python", sys.executable], capture_output=True, text=True)
    assert proc.returncode == 2 and "leaves out ['nosuchpackage']" in proc.stderr  # torch is here, that one is not
    assert not (tmp_path / "v").exists()


# ── two nodes on this host, each one rank, against one node of two ranks ──

@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory) -> list[float]:
    """`deepspeed --num_gpus=2` on one node (CPU: 2 processes over gloo)."""
    out = tmp_path_factory.mktemp("one_node")
    check_ok(launch(RUN, out, nproc=2, launcher="deepspeed"))
    assert read_summary(out)["world_size"] == 2
    losses = train_losses(only_run_dir(out))
    assert len(losses) == 4
    return losses


def two_nodes(gpus_of, results_dir: Path, env: dict) -> list[str]:
    """Two train.sh launchers on this host as two nodes without ssh (node ranks 0 and 1, master 127.0.0.1), each
    with the GPU flags gpus_of(rank); both must succeed. Their logs."""
    port = str(free_port())
    nodes = [start([str(ROOT / "scripts" / "train.sh"), "--nnodes", "2", "--node_rank", str(rank), "--master_addr",
                    "127.0.0.1", "--master_port", port, *gpus_of(rank), *RUN, "--results_dir", str(results_dir)], env)
             for rank in (0, 1)]
    try:
        logs = [finish(node) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    for node, log in zip(nodes, logs):
        assert node.returncode == 0, log[-6000:]
    for rank, log in enumerate(logs):
        assert f"nnodes=2, num_local_procs=1, node_rank={rank}" in log
    return logs


@pytest.mark.slow
def test_two_nodes_without_ssh_train_like_one_node_of_two(tmp_path, reference_losses):
    """Two train.sh launchers (--nnodes 2 --node_rank 0|1, master 127.0.0.1), as SLURM starts them: same losses."""
    logs = two_nodes(lambda rank: ["--num_gpus", "1"], tmp_path, clean_env())
    assert all("--no_ssh" in log for log in logs)
    summary = read_summary(tmp_path)  # one run folder, written by global rank 0 only
    assert summary["world_size"] == 2 and summary["global_step"] == 4
    assert train_losses(only_run_dir(tmp_path)) == pytest.approx(reference_losses, rel=1e-6, abs=0)


FAKE_PDSH = """\
#!{python}
# pdsh stand-in: runs the remote command of every -w host here, in a login-like environment (HOME, PATH only),
# with %n -> the host's index, as `pdsh -S` does; logs what it was asked to run.
import os, subprocess, sys
args, hosts = sys.argv[1:], []
while args and args[0].startswith("-"):
    flag = args.pop(0)
    if flag in ("-f", "-w", "-R", "-l"):
        value = args.pop(0)
        hosts = value.split(",") if flag == "-w" else hosts
remote = " ".join(args)
with open(os.environ["FAKE_PDSH_LOG"], "a") as log:
    log.write(remote + "\\n")
login = {{"HOME": os.environ["HOME"], "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}}
procs = [subprocess.Popen(["bash", "-c", remote.replace("%n", str(i))], env=login) for i in range(len(hosts))]
sys.exit(max(p.wait() for p in procs))
"""


@pytest.mark.slow
def test_hostfile_over_ssh_trains_like_one_node_and_carries_the_environment(tmp_path, reference_losses):
    """--hostfile through DeepSpeed's pdsh runner (a stand-in pdsh that starts each 'node' with a bare login
    environment): the variables train.sh lists reach the nodes, secrets do not, and the losses are the same."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "pdsh").write_text(FAKE_PDSH.format(python=sys.executable))
    (bin_dir / "pdsh").chmod(0o755)
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    cache = tmp_path / "datasets_cache"
    env = clean_env(PATH=f"{bin_dir}{os.pathsep}{clean_env()['PATH']}", TMPDIR=str(tmp_path),
                    FAKE_PDSH_LOG=str(tmp_path / "pdsh.log"), HF_DATASETS_CACHE=str(cache),
                    NCCL_SOCKET_IFNAME="lo", HF_TOKEN="hf_not_to_be_copied")
    proc = start([str(ROOT / "scripts" / "train.sh"), "--hostfile", str(hostfile), "--master_addr", "127.0.0.1",
                  "--master_port", str(free_port()), "--no_ssh_check", *RUN,
                  "--results_dir", str(tmp_path / "results")],
                 env)
    log = finish(proc)
    assert proc.returncode == 0, log[-6000:]
    assert "--venv_script=" in log  # the nodes' login shell gets the venv (ninja for DeepSpeed's op builds)
    remote = (tmp_path / "pdsh.log").read_text()
    assert "export NCCL_SOCKET_IFNAME=lo;" in remote and "export OMP_NUM_THREADS=1;" in remote
    assert "hf_not_to_be_copied" not in remote
    assert any(cache.iterdir()), "HF_DATASETS_CACHE did not reach the nodes"
    summary = read_summary(tmp_path / "results")
    assert summary["world_size"] == 2 and summary["global_step"] == 4
    assert train_losses(only_run_dir(tmp_path / "results")) == pytest.approx(reference_losses, rel=1e-6, abs=0)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.xdist_group("gpu")
def test_two_nodes_of_one_gpu_train_like_one_node_of_two_gpus(tmp_path):
    """On a 2-GPU host: two train.sh launchers without ssh, node 0 on GPU 0 and node 1 on GPU 1 (NCCL between them),
    against `train.sh --num_gpus 2`: the same losses (bf16; the same two ranks, only the launch differs)."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    env = clean_env(NCCL_NVLS_ENABLE="0")
    one = start([str(ROOT / "scripts" / "train.sh"), "--num_gpus", "2", "--master_port", str(free_port()), *RUN,
                 "--results_dir", str(tmp_path / "one")], env)
    log = finish(one)
    assert one.returncode == 0, log[-6000:]
    logs = two_nodes(lambda rank: ["--gpus", str(rank)], tmp_path / "two", env)
    for rank, log in enumerate(logs):
        assert f"CUDA_VISIBLE_DEVICES={rank}" in log
    one_summary, two_summary = read_summary(tmp_path / "one"), read_summary(tmp_path / "two")
    assert one_summary["world_size"] == two_summary["world_size"] == 2 and two_summary["precision"] == "bf16"
    reference, losses = train_losses(only_run_dir(tmp_path / "one")), train_losses(only_run_dir(tmp_path / "two"))
    print(f"one node of 2 GPUs: {reference}\ntwo nodes of 1 GPU: {losses}")
    assert losses == pytest.approx(reference, rel=1e-3, abs=0)
