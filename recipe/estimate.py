"""Memory estimates per GPU and per node for a model shape x DeepSpeed config x hardware, and the
recommendation: the fastest shipped config that fits, with its micro-batch.

Per GPU, the peak is the larger of two phases (measured on H200s, results/memory/):
  forward/backward = model states without the fp32 gradients + activations + loss head + buffers
  optimizer step   = model states (DeepSpeed's estimator) + the bf16->fp32 gradient copy + buffers
Model states come from DeepSpeed's own estimators (estimate_zero2/3_model_states_mem_needs), which
count 18 bytes per trained parameter sharded by ZeRO (16-bit gradients 2 + fp32 gradients 4 + fp32
master 4 + Adam moments 8) plus the 16-bit weights. The fp32 gradients exist only during the step.
Activations are counted tensor by tensor for a Llama decoder layer (what autograd saves), the LM-head
loss by what the fused loss keeps. Everything is in bytes; tables print GiB.

Host memory per node is the larger of loading the weights and what offload keeps there (DeepSpeed's estimate for
CPU offload; DeepSpeed's own pinned allocations for NVMe; the CPU share of DeepSpeed's estimate for partial
offload), plus ~3 GiB per process. What a node can give a run is read_host_memory(): MemAvailable and the cgroup
limit, never MemTotal.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from recipe.long_context import activation_offload_wanted

GiB = 2**30
# A GPU is "fitting" below this share of its memory, less CUDA context and NCCL (not in PyTorch's counters):
# the caching allocator needs room (reserved ran 5-28% above allocated in our measurements).
USABLE_FRACTION, CONTEXT_GIB = 0.90, 1.0
CPU_PROCESS_GIB = 3.0  # one training process outside the model states (Python, CUDA, libraries; measured ~2-4)
# A node "fits" below this share of the host memory it can give (MemAvailable / the cgroup's headroom): the offload
# estimates ran 4-27% above the measured peak RSS (results/memory), and pinned buffers cannot be swapped out.
HOST_USABLE_FRACTION = 0.90
# Partial offload (offload_optimizer.ratio): the share of the optimizer states on the CPU is chosen in steps of this.
# DeepSpeed moves whole sub-groups (sub_group_size elements; the last ones go to the CPU), so finer steps are noise.
RATIO_STEP = 0.05

# Relative throughput, for ranking only (1B shape, seq 2048, H100/H200, results/memory and results/benchmarks):
# stages 0-2 within 1% of each other; ZeRO-3 0.94x stage 2 (H100, batch 16); offload 0.39x / 0.26x
# (H200, batch 8); gradient checkpointing 0.82x (stage 2, batch 8). NVMe: not measured, assumed below CPU offload.
# Partial offload (stage3_partial_offload, 8B shape, 1 H200, checkpointing, micro-batch 4): ratio 0.4 at accumulation
# 2 ran 2,247 tokens/s, about stage3_offload's 3,243 at micro-batch 8 once checkpointing and batch are allowed for;
# ratio 0.2 at accumulation 8 ran 4,754 (the CPU step amortised over 8 micro-batches). Ranked between
# stage3_offload and stage2_offload until measured beside them at equal accumulation.
SPEED = {"stage2": 1.0, "stage1": 0.999, "stage0": 0.998, "stage3": 0.94, "stage2_offload": 0.39,
         "stage3_partial_offload": 0.30, "stage3_offload": 0.26, "stage3_nvme": 0.10}
# Shipped configs never recommended (--zero_stage auto, --dry_run, the host-memory stop's alternatives, the tables):
# they fit where others do not but train worse; a user picks one knowing that.
NOT_RECOMMENDED = {
    "stage2_offload_bf16": "bf16 master weights lose the updates below a weight's bf16 step (ds_check warns with the "
                           "measurement)",
    "stage2_offload_zenflow": "ZenFlow steps most parameters every update_interval steps only; not measured on a "
                              "GPU yet",
}
GC_SPEED = 0.82
# Throughput grows with tokens per micro-batch as T / (T + T0): batch 8 -> 16 at seq 2048 gave 1.13x (H100).
T0_TOKENS = 5000


@dataclass
class ModelShape:
    name: str
    n_params: int
    n_layers: int
    hidden: int
    intermediate: int
    n_heads: int
    kv_dim: int  # key/value heads x head dim
    q_dim: int  # query heads x head dim (usually = hidden)
    vocab: int
    tied: bool

    @property
    def largest_layer_params(self) -> int:
        """The largest single module (DeepSpeed's 'largest layer'): the embedding for Llama shapes."""
        return max(self.vocab * self.hidden, self.hidden * self.intermediate, self.hidden * self.q_dim)

    @property
    def largest_param(self) -> int:
        """The largest single parameter (what one NVMe swap buffer must hold): each Llama module has one weight
        matrix (norms aside), so it is the largest layer, the embedding."""
        return self.largest_layer_params

    @property
    def largest_param_name(self) -> str:
        h, v = self.hidden, self.vocab
        return (f"the embedding ({v} x {h})" if self.largest_param == v * h
                else f"the largest weight ({self.largest_param:,} elements)")

    def lora_params(self, rank: int) -> int:
        """LoRA A and B on every linear of every layer (q, k, v, o, gate, up, down)."""
        h, i = self.hidden, self.intermediate
        per_layer = (h + self.q_dim) + 2 * (h + self.kv_dim) + (self.q_dim + h) + 2 * (h + i) + (i + h)
        return self.n_layers * rank * per_layer

    @property
    def linear_params(self) -> int:
        """Parameters in the decoder layers' linears (what QLoRA stores in 4 bits)."""
        h, i = self.hidden, self.intermediate
        return self.n_layers * (h * self.q_dim * 2 + 2 * h * self.kv_dim + 3 * h * i)


def shape_from_config(config, name: str = "") -> ModelShape:
    """A Llama-class shape from a transformers config (Llama, Mistral, Qwen2 and kin share the fields)."""
    h = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    i = config.intermediate_size
    layers = config.num_hidden_layers
    vocab = config.vocab_size
    tied = bool(getattr(config, "tie_word_embeddings", False))
    q = heads * head_dim
    per_layer = h * q * 2 + 2 * h * kv + 3 * h * i + 2 * h
    n = vocab * h * (1 if tied else 2) + layers * per_layer + h
    return ModelShape(name, n, layers, h, i, heads, kv, q, vocab, tied)


def load_shape(name: str | None, revision: str = "main", trust_remote_code: bool = False) -> ModelShape:
    """The shape of a hub id, a local model folder, a config.json, or (None) the embedded tiny model."""
    from recipe.modeling import build_tiny_tokenizer, read_config, tiny_config

    if name is None:
        return shape_from_config(tiny_config(len(build_tiny_tokenizer())), "tiny-llama")
    config = read_config(name, revision, trust_remote_code)
    return shape_from_config(config, Path(name).name if Path(name).exists() else name)


@dataclass
class Hardware:
    gpus_per_node: int
    gpu_memory_gib: float
    nodes: int = 1
    cpu_memory_gib: float | None = None  # per node
    gpu_name: str = ""

    @property
    def gpus(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def usable_gib(self) -> float:
        return self.gpu_memory_gib * USABLE_FRACTION - CONTEXT_GIB


def detect_hardware(gpus_per_node: int | None = None, nodes: int = 1, run_processes: int = 0) -> Hardware | None:
    """This machine's GPUs (count, smallest memory) and the host memory a run can use (read_host_memory: MemAvailable
    and the cgroup limit, plus what `run_processes` already started processes of the run hold); None without a CUDA
    GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    cpu = read_host_memory().usable(run_processes) / GiB
    count = torch.cuda.device_count()
    memory = min(torch.cuda.get_device_properties(i).total_memory for i in range(count)) / GiB
    return Hardware(gpus_per_node or count, memory, nodes, cpu, torch.cuda.get_device_name(0))


# ---------------------------------------------------------------- host memory: what this node can give a run


@dataclass
class HostMemory:
    """What this node can still give a run, read at start, in bytes. Not MemTotal: a cgroup (a container, a SLURM
    job) may allow far less, and on some hosts (the H200 machines, 125 GiB) MemTotal starts small and grows."""

    mem_available: float  # /proc/meminfo MemAvailable: free + reclaimable cache, as the kernel estimates it
    cgroup_limit: float | None = None  # the tightest memory limit among this process's cgroups (None: none)
    cgroup_free: float | None = None  # that limit less what the cgroup holds beyond its inactive file cache
    cgroup_file: str = ""  # where the limit was read
    own_rss: float = 0.0  # this process's resident memory when read

    def usable(self, processes: int = 0) -> float:
        """Bytes a run can hold at its peak: the tighter of MemAvailable and the cgroup's headroom, plus what
        `processes` of its own processes (as large as this one) hold already; the estimate counts them from zero."""
        free = self.mem_available if self.cgroup_free is None else min(self.mem_available, self.cgroup_free)
        total = free + processes * self.own_rss
        return total if self.cgroup_limit is None else min(total, self.cgroup_limit)

    def describe(self) -> str:
        cgroup = (f"cgroup limit {self.cgroup_limit / GiB:.1f} GiB ({self.cgroup_file}), "
                  f"{self.cgroup_free / GiB:.1f} GiB of it free" if self.cgroup_limit is not None
                  else "no cgroup memory limit")
        return f"MemAvailable {self.mem_available / GiB:.1f} GiB; {cgroup}"


UNLIMITED = 2**60  # cgroup v1 writes "no limit" as a page-rounded 2^63 - 1


def _numbers(path: Path) -> dict[str, int]:
    """'key value' or 'key: value kB' lines (meminfo, memory.stat, status) as bytes where a unit says kB."""
    out = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.replace(":", " ").split()
        if len(parts) >= 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1]) * (1024 if parts[2:3] == ["kB"] else 1)
    return out


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (v2: no limit) -> None


def _cgroup_dirs(proc: Path, cgroup: Path) -> list[tuple[Path, str]]:
    """(directory, "v1"|"v2") for this process's memory cgroup and its ancestors. A container that mounts its own
    cgroup at the root (the path in /proc/self/cgroup not under the mount) reads the mount's root."""
    dirs = []
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return dirs
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":
            base, version = cgroup, "v2"
        elif "memory" in controllers.split(","):
            base, version = cgroup / "memory", "v1"
        else:
            continue
        here = base / path.lstrip("/")
        if not here.is_dir():
            here = base
        while True:
            dirs.append((here, version))
            if here == base or base not in here.parents:
                break
            here = here.parent
    return dirs


def read_host_memory(proc: Path = Path("/proc"), cgroup: Path = Path("/sys/fs/cgroup")) -> HostMemory:
    """MemAvailable, the tightest cgroup memory limit (v1 or v2, this process's cgroup and its ancestors) and this
    process's RSS. Tests point proc and cgroup at made-up trees."""
    meminfo = _numbers(proc / "meminfo")
    available = meminfo.get("MemAvailable")
    if available is None:  # kernels before 3.14
        available = sum(meminfo.get(k, 0) for k in ("MemFree", "Buffers", "Cached"))
    rss = _numbers(proc / "self" / "status").get("VmRSS", 0)
    best = HostMemory(float(available), own_rss=float(rss))
    for where, version in _cgroup_dirs(proc, cgroup):
        names = ("memory.max", "memory.current", "inactive_file") if version == "v2" else \
            ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        limit = _read_int(where / names[0])
        if limit is None or limit >= UNLIMITED:
            continue
        used = _read_int(where / names[1]) or 0
        inactive = _numbers(where / "memory.stat").get(names[2], 0)
        free = max(0.0, float(limit - max(0, used - inactive)))
        if best.cgroup_free is None or free < best.cgroup_free:
            best.cgroup_limit, best.cgroup_free, best.cgroup_file = float(limit), free, str(where / names[0])
    return best


@dataclass
class Workload:
    seq_len: int = 2048
    micro_batch: int = 1
    gradient_checkpointing: bool = False
    method: str = "full"  # full | lora | qlora
    lora_rank: int = 16
    lora_dropout: float = 0.05
    fused_loss: bool = True  # Liger / TRL chunked head: no full logits
    fused_kernels: bool = True  # compiled layers or Liger kernels (the GPU default); False: eager PyTorch
    sequence_parallel: int = 1  # Ulysses ranks one sequence is split over (activations per rank / N)
    tiled_mlp: bool = False  # DeepSpeed's TiledMLP: the MLP's intermediates kept for one shard, not the sequence
    activation_offload: bool = False  # TRL's activation offloading: saved activations in pinned host memory


@dataclass
class DsFeatures:
    stage: int
    offload_optimizer: str | None  # "cpu" | "nvme" | None
    offload_param: str | None
    reduce_bucket: float  # elements
    prefetch_bucket: float
    overlap_comm: bool
    offload_ratio: float | str = 1.0  # share of the optimizer states on the CPU (stage 3); "auto": chosen here
    sub_group_size: float = 1e9  # elements per ZeRO-3 optimizer sub-group (NVMe swaps one at a time)
    param_buffer: float | str | None = None  # NVMe offload_param.buffer_size; "auto": filled from the model
    param_buffers: int = 5  # offload_param.buffer_count
    optimizer_buffers: int = 4  # offload_optimizer.buffer_count
    max_in_cpu: float = 1e9  # offload_param.max_in_cpu: 16-bit parameter elements kept in CPU memory under NVMe
    master_bytes: int = 4  # per trained parameter, of the master weights and of their gradients (bf16 ones: 2)
    moment_bytes: int = 8  # per trained parameter, of Adam's two moments (bf16 ones: 4)
    zenflow_topk: float = 0.0  # ZenFlow's topk_ratio: that share of the columns keeps fp32 states on the GPU

    @property
    def state_bytes(self) -> int:
        """Master weights + their gradients + Adam's moments per trained parameter: 16 in fp32."""
        return 2 * self.master_bytes + self.moment_bytes


def ds_features(config: dict, shape: ModelShape) -> DsFeatures:
    """What the estimate needs from a DeepSpeed config; "auto" buckets as transformers fills them; DeepSpeed's
    defaults (0.19.8) where a key is absent."""
    from recipe.ds_config import DsConfig

    ds = DsConfig(config)
    zero, stage = ds.zero, ds.stage or 0

    def number(key, auto, default):
        v = zero.get(key, default)
        return auto if v == "auto" else float(v)

    def offload(key, field, default):
        v = ds.offload_value(key, field)
        return default if v is None else v

    h2 = shape.hidden * shape.hidden
    ratio = ds.offload_ratio if stage == 3 and ds.offload_ratio is not None else 1.0
    return DsFeatures(stage, ds.offload_optimizer, ds.offload_param,
                      number("reduce_bucket_size", h2, 5e8), number("stage3_prefetch_bucket_size", 0.9 * h2, 5e7),
                      bool(zero.get("overlap_comm", stage == 3)),
                      offload_ratio=ratio if ratio == "auto" else float(ratio),
                      sub_group_size=float(number("sub_group_size", 1e9, 1e9)),
                      param_buffer=ds.param_buffer_size,
                      param_buffers=int(offload("offload_param", "buffer_count", 5)),
                      optimizer_buffers=int(offload("offload_optimizer", "buffer_count", 4)),
                      max_in_cpu=float(offload("offload_param", "max_in_cpu", 1e9)),
                      master_bytes=ds.master_bytes, moment_bytes=ds.moment_bytes,
                      zenflow_topk=float(ds.zenflow.get("topk_ratio", 0.1)) if ds.zenflow is not None else 0.0)


def rank_tokens(work: Workload) -> float:
    """Tokens of one micro-batch on one rank (Ulysses splits each sequence over its group)."""
    return work.seq_len * work.micro_batch / max(1, work.sequence_parallel)


OFFLOAD_GPU_STASH = 5  # trl.models.activation_offloading's max_fwd_stash_size (get_act_offloading_ctx_manager's default)


def activation_bytes(shape: ModelShape, work: Workload) -> float:
    """Saved activations of one micro-batch, bf16.

    Per token and decoder layer, fused kernels (compiled layers or Liger): norm inputs and outputs 2x(2h+2h),
    q 2q, k and v 2x2kv, attention output 2q (flash attention keeps q, k, v, output and a log-sum-exp),
    gate, up and their product 3x2i. Eager PyTorch keeps each RMSNorm's input in fp32 (4h instead of 2h) and
    the SiLU output (2i) too. LoRA with dropout keeps each adapted linear's dropped-out input for A's gradient:
    2x(5h + q + i) for q/k/v/gate/up (input h), o (input q) and down (input i); the mask itself is regenerated
    from the RNG seed by compiled code (measured, Llama-3.1-8B shape: without this term the estimate was 28%
    low). Checkpointing keeps each layer's input and recomputes one layer at a time. The tiled MLP keeps gate, up
    and their product (6i) for one shard of about hidden_size tokens per row, recomputed in backward, instead of
    for every token. Ulysses holds 1/N of the tokens on each rank (attention: all of them for 1/N of the heads,
    the same bytes).
    """
    h, kv, q, i = shape.hidden, shape.kv_dim, shape.q_dim, shape.intermediate
    per_layer = 8 * h + 4 * q + 4 * kv + 6 * i
    if not work.fused_kernels:
        per_layer += 2 * 2 * h + 2 * i
    if work.method != "full" and work.lora_dropout > 0:
        per_layer += 2 * (5 * h + q + i)
    tokens = rank_tokens(work)
    shard = 0.0
    if work.tiled_mlp:
        per_layer -= 6 * i
        shard = min(tokens, h * work.micro_batch) * 6 * i * 2  # one shard's intermediates, and their gradients
    outside = 6 * h  # embedding output, final norm input and output
    if work.activation_offload:  # what is saved goes to the host (offloaded_activation_bytes); one layer's works here
        # TRL keeps its last OFFLOAD_GPU_STASH offloaded tensors on the GPU until their copies are done (forward) and
        # brings the next layer's input back ahead (backward): up to 6 layer inputs on the GPU at once
        return tokens * (per_layer + outside + (OFFLOAD_GPU_STASH + 1) * 2 * h) + shard
    if work.gradient_checkpointing:
        return tokens * (shape.n_layers * 2 * h + per_layer + outside) + shard
    return tokens * (shape.n_layers * per_layer + outside) + shard


def pinned_block(nbytes: float) -> int:
    """The bytes torch's pinned host allocator reserves for a request: the next power of two."""
    return 1 << max(0, math.ceil(nbytes) - 1).bit_length()


def offloaded_activation_bytes(shape: ModelShape, work: Workload) -> float:
    """Host bytes per process of --activation_offloading: each layer's saved tensors (with checkpointing, its input;
    without, all of activation_bytes' per-layer terms), in pinned memory."""
    if not work.activation_offload:
        return 0.0
    tokens = rank_tokens(work)
    if work.gradient_checkpointing:
        # TRL offloads every saved tensor once (shared storage, such as the RoPE tables, stays): each checkpointed
        # layer's input, the final norm's input and the fused loss's input gradient, and the head's fp32 weight
        # gradient when trained, each in a block of torch's pinned-memory allocator, which rounds every request up
        # to a power of two (CachingHostAllocator). On an H200: 1B at 512K (2 GiB tensors, no rounding) 42.3 GiB
        # estimated with the process, 45.1 GiB peak RSS; 3B at 256K (1.5 GiB tensors in 2 GiB blocks) 71.0 / 74.1
        layer_input = pinned_block(tokens * 2 * shape.hidden)
        head = pinned_block(4 * shape.vocab * shape.hidden) if work.method == "full" else 0
        return (shape.n_layers + 2) * layer_input + head
    layer_only = replace(work, activation_offload=False, gradient_checkpointing=False)
    return activation_bytes(shape, layer_only) - tokens * 6 * shape.hidden


def loss_head_bytes(shape: ModelShape, work: Workload, head_trained: bool) -> float:
    """The LM head's loss. Fused (Liger / TRL chunked): fp32 weight gradient + gradient of the input + a
    chunk of logits. Unfused: bf16 logits, their fp32 copy and its gradient for every token."""
    tokens = rank_tokens(work)
    if not work.fused_loss:
        return tokens * shape.vocab * 10
    return (4 * shape.vocab * shape.hidden if head_trained else 0) + 2 * tokens * shape.hidden


def ds_model_states(shape: ModelShape, f: DsFeatures, hw: Hardware, trained: int,
                    ratio: float = 1.0) -> tuple[float, float]:
    """(GPU, CPU per node) bytes for the trained parameters, from DeepSpeed's own estimators.

    Partial offload (stage 3, optimizer on the CPU, parameters on the GPU, ratio < 1): DeepSpeed's estimate for the
    full optimizer offload with the `ratio` share of its CPU figure on the CPU and the rest of the 16 bytes/param of
    optimizer states (fp32 master, Adam moments, fp32 gradients) on the GPU. Against the probe (8B shape, 1 H200,
    checkpointing, micro-batch 4): GPU 88.8 / 112.7 GiB estimated for ratio 0.4 / 0.2, 91 / 112 measured."""
    from recipe.ds_config import ds_attr

    estimate_zero3_model_states_mem_needs = ds_attr("deepspeed.runtime.zero.stage3",
                                                    "estimate_zero3_model_states_mem_needs")
    estimate_zero2_model_states_mem_needs = ds_attr("deepspeed.runtime.zero.stage_1_and_2",
                                                    "estimate_zero2_model_states_mem_needs")

    low = (16 - f.state_bytes) * trained  # bf16 master weights / moments: fewer bytes than DeepSpeed's fp32 count
    if f.stage == 3:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            trained, shape.largest_layer_params, hw.gpus_per_node, hw.nodes,
            cpu_offload=f.offload_optimizer is not None, cpu_offload_params=f.offload_param is not None,
            zero_init=True)
        if ratio < 1:
            gpu, cpu = gpu + (1 - ratio) * f.state_bytes * trained / hw.gpus, ratio * cpu
        return low_precision_states(gpu, cpu, f, low, hw.gpus)
    # stage 0 replicates everything: the stage-2 estimate with one GPU
    gpus, nodes = (hw.gpus_per_node, hw.nodes) if f.stage else (1, 1)
    cpu, gpu = estimate_zero2_model_states_mem_needs(trained, gpus, nodes,
                                                     cpu_offload=f.offload_optimizer is not None)
    return low_precision_states(gpu, cpu, f, low, gpus * nodes)


def low_precision_states(gpu: float, cpu: float, f: DsFeatures, low: float, gpus: int) -> tuple[float, float]:
    """DeepSpeed's estimators count fp32 master weights, gradients and moments (16 bytes per trained parameter);
    with bf16 ones (f.state_bytes < 16) the host holds that much less under optimizer offload (its estimate is 1.5x
    the states per node), the GPUs that much less per shard without it."""
    if not low:
        return gpu, cpu
    if f.offload_optimizer == "cpu":
        return gpu, cpu * f.state_bytes / 16
    return gpu - low / gpus, cpu


def zero_offload_host_bytes(f: DsFeatures, partition: float) -> float:
    """Host bytes per process of ZeRO-Offload at stages 1-2 (DeepSpeed 0.19.8 stage_1_and_2.py): the master weights'
    flat partition and its gradient, each in one pinned block, which torch's pinned allocator rounds up to a power of
    two, and Adam's moments in ordinary memory (DeepSpeedCPUAdam). With each process's 3 GiB and the 16-bit weights
    as loaded (2 bytes/param), against rank 0's peak RSS on one H200 (stage2_offload, seq 2048): 0.5B (the 1B shape
    cut to 4 layers) / 1B / 3B / 8B shapes 11.7 / 30.5 / 64.9 / 141.8 GiB estimated, 11.4 / 31.7 / 67.0 / 142.9
    measured (DeepSpeed's own estimate, 24 bytes/param: 14.3 / 30.6 / 74.8 / 182.5); bf16 states (0.5B) 7.8 / 7.3."""
    return 2 * pinned_block(f.master_bytes * partition) + f.moment_bytes * partition


def zero3_offload_host_bytes(f: DsFeatures, partition: float) -> float:
    """Host bytes per process of ZeRO-3 with the optimizer on the CPU (DeepSpeed 0.19.8 stage3.py): the flat buffer
    of every gradient partition (pinned), with parameter offload the 16-bit parameters' flat buffer (pinned), the
    master weights in sub-groups of sub_group_size (ordinary memory) and a pinned gradient buffer per sub-group, and
    Adam's moments; each pinned block a power of two. With each process's 3 GiB, against rank 0's peak RSS on one
    H200 (stage3_offload, seq 2048): 1B / 3B / 8B shapes 33.8 / 75.9 / 172.8 GiB estimated, 31.8 / 75.5 / 172.4
    measured (DeepSpeed's own estimate, 27 bytes/param: 34.1 / 83.8 / 204.9)."""
    master = f.master_bytes
    sub = max(1.0, min(f.sub_group_size, partition))
    whole, rest = divmod(partition, sub)
    sub_grads = whole * pinned_block(master * sub) + (pinned_block(master * rest) if rest >= 1 else 0)
    params = pinned_block(2 * partition) if f.offload_param == "cpu" else 0
    return pinned_block(master * partition) + params + master * partition + sub_grads + f.moment_bytes * partition


def zenflow_gpu_states(f: DsFeatures, trained: int, gpus: int) -> float:
    """ZenFlow's selective optimizer on the GPU: fp32 weights, gradients and Adam moments of the top-k share of the
    columns (DeepSpeed's ZenFlowSelectiveAdamW; read in its code, not measured)."""
    return f.zenflow_topk * 16 * trained / gpus


def partial(f: DsFeatures) -> bool:
    """DeepSpeed's partial offload as the estimate models it: stage 3, optimizer states shared between GPU and CPU
    (offload_optimizer.ratio below 1, or "auto"), parameters on the GPU."""
    return f.stage == 3 and f.offload_optimizer == "cpu" and f.offload_param is None and f.offload_ratio != 1.0


def nvme_host_bytes(shape: ModelShape, f: DsFeatures, hw: Hardware, trained: int) -> float:
    """Host memory per node that NVMe offload pins, from DeepSpeed 0.19.8's allocations (read in its code, not
    measured). Per process, P = parameter elements per process, S = the largest optimizer sub-group (sub_group_size
    plus the parameter that closes it, at most P): optimizer on NVMe, buffer_count + 1 fp32 buffers of S
    (swap_tensor/optimizer_utils.py SwapBufferManager; the gradient buffer of initialize_optimizer_states);
    parameters on NVMe, buffer_count 16-bit swap buffers of buffer_size (partitioned_param_swapper.py), up to
    max_in_cpu 16-bit elements kept in CPU, and, when P exceeds max_in_cpu, a 16-bit swap-out buffer of the largest
    sub-group's full (unpartitioned) size (stage3.py reserve_partitioned_swap_space)."""
    from recipe.ds_config import param_buffer_elements

    n = hw.gpus
    largest_part = -(-shape.largest_param // n)
    per_process, p = 0.0, shape.n_params / n
    sub = min(trained / n, f.sub_group_size + (largest_part if trained == shape.n_params else 0))
    if f.offload_optimizer == "nvme":
        per_process += (f.optimizer_buffers + 1) * sub * 4
    if f.offload_param == "nvme":
        buffer = param_buffer_elements(shape.largest_param, n) if f.param_buffer in (None, "auto") \
            else float(f.param_buffer)
        per_process += f.param_buffers * buffer * 2 + min(f.max_in_cpu, p) * 2
        if p > f.max_in_cpu:
            per_process += min(sub * n, trained) * 2
    return hw.gpus_per_node * per_process


def estimate(shape: ModelShape, config: dict, hw: Hardware, work: Workload, name: str = "",
             ratio: float | None = None) -> dict:
    """Per-GPU peak and its parts, CPU memory per node and checkpoint size, in bytes (and GiB).

    ratio: the partial-offload share to estimate with (default: the config's; "auto" there is chosen by
    partial_offload_ratio for this hardware and workload)."""
    f = ds_features(config, shape)
    n = hw.gpus if f.stage else 1
    full = work.method == "full"
    trained = shape.n_params if full else shape.lora_params(work.lora_rank)
    share = None  # the CPU share of the optimizer states under partial offload
    if partial(f):
        share = ratio if ratio is not None else (partial_offload_ratio(shape, config, hw, work)
                                                 if f.offload_ratio == "auto" else float(f.offload_ratio))
    states_gpu, states_cpu = ds_model_states(shape, f, hw, trained, 1.0 if share is None else share)
    states_gpu += zenflow_gpu_states(f, trained, n)
    offloaded = f.offload_optimizer is not None
    # the part of the states that lives only during the optimizer step (sharded): fp32 gradients, 4 bytes/param
    # for stages 1-2; stage 3 reduces straight into its fp32 partition, leaving 2 bytes/param of the 18 to the step
    # (under partial offload, for the GPU's share of the optimizer states)
    step_only = 0 if offloaded else (2 if f.stage == 3 else f.master_bytes) * trained / n
    if share is not None:
        step_only = (1 - share) * 2 * trained / n
    # frozen base weights (LoRA: bf16; QLoRA: 4-bit linears + quantisation constants, bf16 embeddings)
    frozen = frozen_on_cpu = 0.0
    if not full:
        base = shape.n_params
        if work.method == "qlora":
            base = 0.25 * shape.linear_params * 1.03 + (shape.n_params - shape.linear_params)  # 2-byte units
        frozen = 2 * base / (hw.gpus if f.stage == 3 and f.offload_param is None else 1)
        if f.offload_param:
            frozen_on_cpu, frozen = 2 * base, 0.0
    # DeepSpeed buffers: stage 0 keeps fp32 gradient accumulation (4 bytes/param) beside its states;
    # stages 1-2 a 16-bit reduce bucket (two with overlap_comm: one fills while the other reduces; the
    # tiny model on an H200 showed 1.96 GiB for two 5e8-element buckets); stage 3 reduce + prefetch buckets
    if f.stage == 0:
        buffers, step_extra = 0.0, 4 * trained
    elif f.stage in (1, 2):
        buffers, step_extra = 2 * f.reduce_bucket * (2 if f.overlap_comm else 1), 2 * trained / n
    else:  # stage 3: DeepSpeed's estimate is the step itself
        buffers, step_extra = 2 * (f.reduce_bucket + f.prefetch_bucket), 0.0
    if offloaded:  # the step runs on the CPU; the GPU keeps the 16-bit weights only
        step_extra = 0.0
    acts = activation_bytes(shape, work)
    head = loss_head_bytes(shape, work, head_trained=full)
    fwd = states_gpu - step_only + frozen + acts + head + buffers
    step = states_gpu + step_extra + buffers + frozen
    peak = max(fwd, step)
    # CPU per node: each process's own ~3 GiB, plus the larger of loading the weights (from_pretrained reads
    # bf16 safetensors into each process: 2 bytes/param; zero.Init under stage 3 shards them as they load)
    # and what offload keeps there (DeepSpeed's estimate: within 20% of the measured RSS)
    procs = hw.gpus_per_node
    load = 0 if f.stage == 3 else procs * 2 * shape.n_params
    kept = states_cpu if (offloaded or f.stage == 3) else 0
    if f.offload_optimizer == "nvme" or f.offload_param == "nvme":
        kept = nvme_host_bytes(shape, f, hw, trained) + (states_cpu if f.offload_optimizer == "cpu" else 0)
    elif f.offload_param == "cpu" and not full:
        kept += frozen_on_cpu / hw.nodes  # LoRA/QLoRA: the frozen base is offloaded too
    if share is not None:
        # a 16-bit copy of the trained weights beside the CPU share (fitted to the probe, 8B shape: 50 / 72 GiB
        # measured at ratio 0.2 / 0.4, estimated 54 / 90 GiB; the other offload rows are 4-27% above their RSS too)
        kept += 2 * trained / hw.nodes
    held = max(load, kept)
    if f.stage in (1, 2) and f.offload_optimizer == "cpu":  # measured: the loaded weights stay beside the states
        held = load + procs * zero_offload_host_bytes(f, trained / n)
    elif f.stage == 3 and f.offload_optimizer == "cpu" and share is None:
        held = procs * zero3_offload_host_bytes(f, trained / n) + frozen_on_cpu / hw.nodes  # 0 when full
    cpu = procs * CPU_PROCESS_GIB * GiB + held + procs * offloaded_activation_bytes(shape, work)
    # a checkpoint: 16-bit weights + fp32 master and Adam moments of the trained parameters
    disk = 2 * shape.n_params + 12 * trained if full else 2 * trained + 12 * trained
    problems = config_problems(shape, config, hw, name)
    out = {"config": name, "model": shape.name, "method": work.method, "gpus": hw.gpus, "micro_batch": work.micro_batch,
           "seq_len": work.seq_len, "gradient_checkpointing": work.gradient_checkpointing,
           "model_states": states_gpu, "frozen_weights": frozen, "activations": acts, "loss_head": head,
           "buffers": buffers, "forward_backward": fwd, "optimizer_step": step, "gpu_peak": peak,
           "cpu_per_node": cpu, "checkpoint_disk": disk,
           "deepspeed_estimate_gpu": states_gpu, "deepspeed_estimate_cpu_per_node": states_cpu,
           "offload_ratio": share, "problems": problems}
    return out


def config_problems(shape: ModelShape, config: dict, hw: Hardware, name: str = "") -> list[str]:
    """What stops this config with this model before it trains, whatever the memory: an NVMe swap buffer smaller
    than the largest parameter's partition (DeepSpeed asserts at the first forward), or NVMe swap buffers a reuse
    distance outnumbers (it asserts from the second step)."""
    from recipe.ds_check import nvme_buffer_problems

    return nvme_buffer_problems(config, f"{name or 'ds_config'}.json", shape.largest_param, hw.gpus,
                                shape.largest_param_name, shape.n_params)


def partial_offload_ratio(shape: ModelShape, config: dict, hw: Hardware, work: Workload) -> float:
    """offload_optimizer.ratio for partial offload: the smallest share of the optimizer states on the CPU (in steps
    of RATIO_STEP) at which this workload fits the GPU by the estimate, i.e. the largest share the GPU can hold.
    1.0 (all on the CPU) without a GPU's memory to fill, or when even that does not fit."""
    if hw.gpu_memory_gib <= 0:
        return 1.0
    steps = round(1 / RATIO_STEP)
    for i in range(steps + 1):
        r = round(i * RATIO_STEP, 4)
        if estimate(shape, config, hw, work, ratio=r)["gpu_peak"] / GiB <= hw.usable_gib:
            return r
    return 1.0


def host_fits(est: dict, cpu_memory_gib: float | None) -> bool:
    """The node can give the run its host memory: below HOST_USABLE_FRACTION of what it has (unknown: yes)."""
    return cpu_memory_gib is None or est["cpu_per_node"] / GiB <= HOST_USABLE_FRACTION * cpu_memory_gib


def fits(est: dict, hw: Hardware) -> bool:
    return est["gpu_peak"] / GiB <= hw.usable_gib and host_fits(est, hw.cpu_memory_gib) and not est.get("problems")


def max_micro_batch(shape, config, hw, work: Workload, cap: int = 64) -> int:
    """The largest micro-batch that fits: cap, else the largest power of two below it; 0 when 1 does not."""
    def ok(b):
        return fits(estimate(shape, config, hw, Workload(**{**asdict(work), "micro_batch": b})), hw)

    best, b = 0, 1
    while b < cap and ok(b):
        best, b = b, b * 2
    return cap if b >= cap and ok(cap) else best  # the cap itself (a user's 12, say) when it fits


SEQ_STEP = 1024


def longest_sequence(shape, config, hw, work: Workload, name: str | None = None, cap: int = 2**20) -> int:
    """The longest sequence (a multiple of SEQ_STEP, up to cap) at which `config` fits this hardware by the
    estimate, at the workload's micro-batch and checkpointing; 0 when not even SEQ_STEP does. The fit is monotone
    in the length, so a binary search over the steps finds it."""
    def ok(steps):
        est = estimate(shape, config, hw, Workload(**{**asdict(work), "seq_len": steps * SEQ_STEP}), name)
        return fits(est, hw)

    lo, hi = 0, cap // SEQ_STEP  # ok(lo) holds (0: nothing), the answer lies in [lo, hi]
    if ok(hi):
        return hi * SEQ_STEP
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo * SEQ_STEP


def throughput_score(name: str, work: Workload) -> float:
    tokens = work.seq_len * work.micro_batch
    return SPEED.get(name, 0.05) * (GC_SPEED if work.gradient_checkpointing else 1.0) * tokens / (tokens + T0_TOKENS)


@dataclass
class Recommendation:
    config: str | None
    micro_batch: int
    gradient_checkpointing: bool
    reason: str
    candidates: list[dict] = field(default_factory=list)

    @property
    def flags(self) -> list[str]:
        """train_ds.py flags that run this recommendation."""
        return (["--zero_stage", self.config.removeprefix("stage"), "--per_device_train_batch_size",
                 str(self.micro_batch)] + (["--gradient_checkpointing", "true"] if self.gradient_checkpointing else []))


def recommend(shape: ModelShape, configs: dict[str, dict], hw: Hardware, work: Workload,
              max_batch: int = 16, allow_gc: bool = True) -> Recommendation:
    """The fastest config (by SPEED x checkpointing x batch efficiency) that fits at micro-batch >= 1, of those not
    in NOT_RECOMMENDED.

    Micro-batches are searched up to max_batch (the user's, when set); checkpointing is considered
    only when allowed and only for configs that do not fit without it at that batch.
    """
    candidates = []
    for name, config in configs.items():
        if name in NOT_RECOMMENDED:
            continue
        for gc in ([False, True] if allow_gc else [work.gradient_checkpointing]):
            trial = Workload(**{**asdict(work), "gradient_checkpointing": gc})
            b = max_micro_batch(shape, config, hw, trial, cap=max_batch)
            if b:
                trial.micro_batch = b
                est = estimate(shape, config, hw, trial, name)
                candidates.append({"config": name, "micro_batch": b, "gradient_checkpointing": gc,
                                   "gpu_peak_gib": est["gpu_peak"] / GiB, "cpu_per_node_gib": est["cpu_per_node"] / GiB,
                                   "offload_ratio": est["offload_ratio"], "score": throughput_score(name, trial)})
    if not candidates:
        host = (f" (or more than {HOST_USABLE_FRACTION * hw.cpu_memory_gib:.0f} GiB of host memory per node)"
                if hw.cpu_memory_gib is not None else "")
        return Recommendation(None, 0, False, f"nothing fits: even micro-batch 1 with gradient checkpointing needs "
                              f"more than {hw.usable_gib:.0f} GiB per GPU on {hw.gpus} GPU(s){host} in every config; "
                              "use more GPUs, GPUs with more memory, a shorter --max_length, or LoRA/QLoRA.", [])
    candidates.sort(key=lambda c: -c["score"])
    best = candidates[0]
    others = ", ".join(f"{c['config']} b{c['micro_batch']}{' +ckpt' if c['gradient_checkpointing'] else ''} "
                       f"({c['score'] / best['score']:.2f}x)" for c in candidates[1:4])
    ratio = (f" with {best['offload_ratio']:.0%} of the optimizer states on the CPU (offload_optimizer.ratio "
             f"{best['offload_ratio']:g})" if best["offload_ratio"] is not None else "")
    host = (f", {best['cpu_per_node_gib']:.0f} of {hw.cpu_memory_gib:.0f} GiB of host memory per node"
            if hw.cpu_memory_gib is not None else "")
    reason = (f"{best['config']} fits micro-batch {best['micro_batch']}"
              f"{' with gradient checkpointing' if best['gradient_checkpointing'] else ''}{ratio} at an estimated "
              f"{best['gpu_peak_gib']:.1f} of {hw.usable_gib:.0f} usable GiB per GPU ({hw.gpus} x "
              f"{hw.gpu_memory_gib:.0f} GiB){host} and is the fastest that fits"
              + (f"; next: {others}" if others else ""))
    return Recommendation(best["config"], best["micro_batch"], best["gradient_checkpointing"], reason, candidates)


def shipped_configs(names: list[str] | None = None) -> dict[str, dict]:
    from recipe.ds_config import shipped

    return {name: ds.config for name, ds in shipped().items() if names is None or name in names}


def gib_row(est: dict) -> dict:
    """The estimate with byte fields in GiB, rounded, for tables and JSON."""
    return {k: round(v / GiB, 2) if isinstance(v, float | int) and not isinstance(v, bool)
            and k not in ("gpus", "micro_batch", "seq_len", "offload_ratio") else v for k, v in est.items()}


def format_table(rows: list[dict], hw: Hardware | None = None) -> str:
    """A markdown table of estimates (GiB per GPU unless said)."""
    lines = ["| config | GPUs | micro-batch | ckpt | model states | activations | loss head | buffers "
             "| fwd/bwd | step | **peak/GPU** | CPU/node | checkpoint | fits |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for est in rows:
        g = gib_row(est)
        ok = "" if hw is None else ("yes" if fits(est, hw) else "no")
        config = g["config"] + (f" (ratio {g['offload_ratio']:g})" if g.get("offload_ratio") is not None else "")
        lines.append(f"| {config} | {g['gpus']} | {g['micro_batch']} | {'yes' if g['gradient_checkpointing'] else 'no'} "
                     f"| {g['model_states'] + g['frozen_weights']:.1f} | {g['activations']:.1f} | {g['loss_head']:.1f} "
                     f"| {g['buffers']:.1f} | {g['forward_backward']:.1f} | {g['optimizer_step']:.1f} "
                     f"| **{g['gpu_peak']:.1f}** | {g['cpu_per_node']:.0f} | {g['checkpoint_disk']:.0f} | {ok} |")
    return "\n".join(lines)


def run_hardware() -> Hardware | None:
    """The GPUs this launch uses: the processes per node x WORLD_SIZE / that nodes."""
    import os

    from recipe.hardware import local_world_size

    local = local_world_size()
    return detect_hardware(local, max(1, int(os.environ.get("WORLD_SIZE", "1")) // local), run_processes=local)


def run_workload(training_args, model_args) -> Workload:
    """What a train_ds.py run asks for, as the estimator sees it."""
    method = "qlora" if getattr(model_args, "load_in_4bit", False) else "lora" if model_args.use_peft else "full"
    return Workload(seq_len=training_args.max_length or 1024, micro_batch=training_args.per_device_train_batch_size,
                    gradient_checkpointing=bool(training_args.gradient_checkpointing), method=method,
                    lora_rank=model_args.lora_r, lora_dropout=model_args.lora_dropout,
                    fused_loss=not training_args.token_metrics,
                    sequence_parallel=getattr(training_args, "sequence_parallel_size", 1),
                    tiled_mlp=bool(getattr(training_args, "speed", {}).get("tiled_mlp")),
                    # parsed: a bool; a raw --zero_stage auto input: maybe "auto" (decided as on a GPU)
                    activation_offload=activation_offload_wanted(getattr(training_args, "activation_offloading", False),
                                                                 training_args.max_length, cuda=True))


def plan(shape: ModelShape, hw: Hardware, work: Workload, configs: dict[str, dict] | None = None,
         max_batch: int | None = None) -> tuple[list[dict], Recommendation]:
    """Estimates at the asked micro-batch for every config, and the recommendation."""
    configs = configs or shipped_configs()
    rows = [estimate(shape, config, hw, work, name) for name, config in configs.items()]
    return rows, recommend(shape, configs, hw, work, max_batch=max_batch or work.micro_batch)


def report(shape: ModelShape, hw: Hardware, work: Workload, rows: list[dict], rec: Recommendation) -> str:
    """The readable report: what was assumed, the table, the recommendation."""
    head = (f"Memory estimate: {shape.name} ({shape.n_params / 1e9:.2f}B parameters, {work.method}"
            f"{f' rank {work.lora_rank}' if work.method != 'full' else ''}), seq {work.seq_len}, micro-batch "
            f"{work.micro_batch}, gradient checkpointing {'on' if work.gradient_checkpointing else 'off'}, on "
            f"{hw.gpus} x {hw.gpu_name or 'GPU'} ({hw.gpu_memory_gib:.0f} GiB, {hw.usable_gib:.0f} usable)"
            f"{f', {hw.nodes} nodes' if hw.nodes > 1 else ''}"
            f"{f', CPU {hw.cpu_memory_gib:.0f} GiB per node' if hw.cpu_memory_gib else ''}. GiB; peak = max(fwd/bwd, step).")
    rec_line = f"Recommended: {' '.join(rec.flags)}: {rec.reason}." if rec.config else f"Recommended: {rec.reason}"
    return "\n".join([head, "", format_table(rows, hw), "", rec_line])


def to_json(shape: ModelShape, hw: Hardware, work: Workload, rows: list[dict], rec: Recommendation) -> dict:
    return {"model": asdict(shape), "hardware": asdict(hw), "workload": asdict(work),
            "estimates": [gib_row(r) for r in rows],
            "recommendation": {k: v for k, v in asdict(rec).items()}}
