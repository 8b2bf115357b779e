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
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

GiB = 2**30
# A GPU is "fitting" below this share of its memory, less CUDA context and NCCL (not in PyTorch's counters):
# the caching allocator needs room (reserved ran 5-28% above allocated in our measurements).
USABLE_FRACTION, CONTEXT_GIB = 0.90, 1.0
CPU_PROCESS_GIB = 3.0  # one training process outside the model states (Python, CUDA, libraries; measured ~2-4)

# Relative throughput, for ranking only (1B shape, seq 2048, H100/H200, results/memory and results/benchmarks):
# stages 0-2 within 1% of each other; ZeRO-3 0.94x stage 2 (H100, batch 16); offload 0.39x / 0.26x
# (H200, batch 8); gradient checkpointing 0.82x (stage 2, batch 8). NVMe: not measured, assumed below CPU offload.
SPEED = {"stage2": 1.0, "stage1": 0.999, "stage0": 0.998, "stage3": 0.94, "stage2_offload": 0.39,
         "stage3_offload": 0.26, "stage3_nvme": 0.10}
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


def detect_hardware(gpus_per_node: int | None = None, nodes: int = 1) -> Hardware | None:
    """This machine's GPUs (count, smallest memory) and CPU memory; None without a CUDA GPU."""
    import os

    import torch

    cpu = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    if not torch.cuda.is_available():
        return None
    count = torch.cuda.device_count()
    memory = min(torch.cuda.get_device_properties(i).total_memory for i in range(count)) / GiB
    return Hardware(gpus_per_node or count, memory, nodes, cpu, torch.cuda.get_device_name(0))


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


@dataclass
class DsFeatures:
    stage: int
    offload_optimizer: str | None  # "cpu" | "nvme" | None
    offload_param: str | None
    reduce_bucket: float  # elements
    prefetch_bucket: float
    overlap_comm: bool


def ds_features(config: dict, shape: ModelShape) -> DsFeatures:
    """What the estimate needs from a DeepSpeed config; "auto" buckets as transformers fills them."""
    from recipe.ds_config import DsConfig

    ds = DsConfig(config)
    zero, stage = ds.zero, ds.stage or 0

    def number(key, auto, default):
        v = zero.get(key, default)
        return auto if v == "auto" else float(v)

    h2 = shape.hidden * shape.hidden
    return DsFeatures(stage, ds.offload_optimizer, ds.offload_param,
                      number("reduce_bucket_size", h2, 5e8), number("stage3_prefetch_bucket_size", 0.9 * h2, 5e7),
                      bool(zero.get("overlap_comm", stage == 3)))


def activation_bytes(shape: ModelShape, work: Workload) -> float:
    """Saved activations of one micro-batch, bf16.

    Per token and decoder layer, fused kernels (compiled layers or Liger): norm inputs and outputs 2x(2h+2h),
    q 2q, k and v 2x2kv, attention output 2q (flash attention keeps q, k, v, output and a log-sum-exp),
    gate, up and their product 3x2i. Eager PyTorch keeps each RMSNorm's input in fp32 (4h instead of 2h) and
    the SiLU output (2i) too. LoRA with dropout keeps each adapted linear's dropped-out input for A's gradient:
    2x(5h + q + i) for q/k/v/gate/up (input h), o (input q) and down (input i); the mask itself is regenerated
    from the RNG seed by compiled code (measured, Llama-3.1-8B shape: without this term the estimate was 28%
    low). Checkpointing keeps each layer's input and recomputes one layer at a time.
    """
    h, kv, q, i = shape.hidden, shape.kv_dim, shape.q_dim, shape.intermediate
    per_layer = 8 * h + 4 * q + 4 * kv + 6 * i
    if not work.fused_kernels:
        per_layer += 2 * 2 * h + 2 * i
    if work.method != "full" and work.lora_dropout > 0:
        per_layer += 2 * (5 * h + q + i)
    tokens = work.seq_len * work.micro_batch
    outside = 6 * h  # embedding output, final norm input and output
    if work.gradient_checkpointing:
        return tokens * (shape.n_layers * 2 * h + per_layer + outside)
    return tokens * (shape.n_layers * per_layer + outside)


def loss_head_bytes(shape: ModelShape, work: Workload, head_trained: bool) -> float:
    """The LM head's loss. Fused (Liger / TRL chunked): fp32 weight gradient + gradient of the input + a
    chunk of logits. Unfused: bf16 logits, their fp32 copy and its gradient for every token."""
    tokens = work.seq_len * work.micro_batch
    if not work.fused_loss:
        return tokens * shape.vocab * 10
    return (4 * shape.vocab * shape.hidden if head_trained else 0) + 2 * tokens * shape.hidden


def ds_model_states(shape: ModelShape, f: DsFeatures, hw: Hardware, trained: int) -> tuple[float, float]:
    """(GPU, CPU per node) bytes for the trained parameters, from DeepSpeed's own estimators."""
    from recipe.ds_config import ds_attr

    estimate_zero3_model_states_mem_needs = ds_attr("deepspeed.runtime.zero.stage3",
                                                    "estimate_zero3_model_states_mem_needs")
    estimate_zero2_model_states_mem_needs = ds_attr("deepspeed.runtime.zero.stage_1_and_2",
                                                    "estimate_zero2_model_states_mem_needs")

    if f.stage == 3:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            trained, shape.largest_layer_params, hw.gpus_per_node, hw.nodes,
            cpu_offload=f.offload_optimizer is not None, cpu_offload_params=f.offload_param is not None,
            zero_init=True)
        return gpu, cpu
    # stage 0 replicates everything: the stage-2 estimate with one GPU
    gpus, nodes = (hw.gpus_per_node, hw.nodes) if f.stage else (1, 1)
    cpu, gpu = estimate_zero2_model_states_mem_needs(trained, gpus, nodes,
                                                     cpu_offload=f.offload_optimizer is not None)
    return gpu, cpu


def estimate(shape: ModelShape, config: dict, hw: Hardware, work: Workload, name: str = "") -> dict:
    """Per-GPU peak and its parts, CPU memory per node and checkpoint size, in bytes (and GiB)."""
    f = ds_features(config, shape)
    n = hw.gpus if f.stage else 1
    full = work.method == "full"
    trained = shape.n_params if full else shape.lora_params(work.lora_rank)
    states_gpu, states_cpu = ds_model_states(shape, f, hw, trained)
    offloaded = f.offload_optimizer is not None
    # the part of the states that lives only during the optimizer step (sharded): fp32 gradients, 4 bytes/param
    # for stages 1-2; stage 3 reduces straight into its fp32 partition, leaving 2 bytes/param of the 18 to the step
    step_only = 0 if offloaded else (2 if f.stage == 3 else 4) * trained / n
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
        kept = 2 * shape.n_params / hw.nodes  # pinned swap buffers, roughly
    elif f.offload_param == "cpu" and not full:
        kept += frozen_on_cpu / hw.nodes  # LoRA/QLoRA: the frozen base is offloaded too
    cpu = procs * CPU_PROCESS_GIB * GiB + max(load, kept)
    # a checkpoint: 16-bit weights + fp32 master and Adam moments of the trained parameters
    disk = 2 * shape.n_params + 12 * trained if full else 2 * trained + 12 * trained
    out = {"config": name, "model": shape.name, "method": work.method, "gpus": hw.gpus, "micro_batch": work.micro_batch,
           "seq_len": work.seq_len, "gradient_checkpointing": work.gradient_checkpointing,
           "model_states": states_gpu, "frozen_weights": frozen, "activations": acts, "loss_head": head,
           "buffers": buffers, "forward_backward": fwd, "optimizer_step": step, "gpu_peak": peak,
           "cpu_per_node": cpu, "checkpoint_disk": disk,
           "deepspeed_estimate_gpu": states_gpu, "deepspeed_estimate_cpu_per_node": states_cpu}
    return out


def fits(est: dict, hw: Hardware) -> bool:
    cpu_ok = hw.cpu_memory_gib is None or est["cpu_per_node"] / GiB <= 0.9 * hw.cpu_memory_gib
    return est["gpu_peak"] / GiB <= hw.usable_gib and cpu_ok


def max_micro_batch(shape, config, hw, work: Workload, cap: int = 64) -> int:
    """The largest micro-batch that fits: cap, else the largest power of two below it; 0 when 1 does not."""
    def ok(b):
        return fits(estimate(shape, config, hw, Workload(**{**asdict(work), "micro_batch": b})), hw)

    best, b = 0, 1
    while b < cap and ok(b):
        best, b = b, b * 2
    return cap if b >= cap and ok(cap) else best  # the cap itself (a user's 12, say) when it fits


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
    """The fastest config (by SPEED x checkpointing x batch efficiency) that fits at micro-batch >= 1.

    Micro-batches are searched up to max_batch (the user's, when set); checkpointing is considered
    only when allowed and only for configs that do not fit without it at that batch.
    """
    candidates = []
    for name, config in configs.items():
        for gc in ([False, True] if allow_gc else [work.gradient_checkpointing]):
            trial = Workload(**{**asdict(work), "gradient_checkpointing": gc})
            b = max_micro_batch(shape, config, hw, trial, cap=max_batch)
            if b:
                trial.micro_batch = b
                est = estimate(shape, config, hw, trial, name)
                candidates.append({"config": name, "micro_batch": b, "gradient_checkpointing": gc,
                                   "gpu_peak_gib": est["gpu_peak"] / GiB, "cpu_per_node_gib": est["cpu_per_node"] / GiB,
                                   "score": throughput_score(name, trial)})
    if not candidates:
        return Recommendation(None, 0, False, f"nothing fits: even micro-batch 1 with gradient checkpointing needs "
                              f"more than {hw.usable_gib:.0f} GiB per GPU on {hw.gpus} GPU(s) in every config; use more "
                              "GPUs, GPUs with more memory, a shorter --max_length, or LoRA/QLoRA.", [])
    candidates.sort(key=lambda c: -c["score"])
    best = candidates[0]
    others = ", ".join(f"{c['config']} b{c['micro_batch']}{' +ckpt' if c['gradient_checkpointing'] else ''} "
                       f"({c['score'] / best['score']:.2f}x)" for c in candidates[1:4])
    reason = (f"{best['config']} fits micro-batch {best['micro_batch']}"
              f"{' with gradient checkpointing' if best['gradient_checkpointing'] else ''} at an estimated "
              f"{best['gpu_peak_gib']:.1f} of {hw.usable_gib:.0f} usable GiB per GPU ({hw.gpus} x "
              f"{hw.gpu_memory_gib:.0f} GiB) and is the fastest that fits"
              + (f"; next: {others}" if others else ""))
    return Recommendation(best["config"], best["micro_batch"], best["gradient_checkpointing"], reason, candidates)


def shipped_configs(names: list[str] | None = None) -> dict[str, dict]:
    from recipe.ds_config import shipped

    return {name: ds.config for name, ds in shipped().items() if names is None or name in names}


def gib_row(est: dict) -> dict:
    """The estimate with byte fields in GiB, rounded, for tables and JSON."""
    return {k: round(v / GiB, 2) if isinstance(v, float | int) and not isinstance(v, bool)
            and k not in ("gpus", "micro_batch", "seq_len") else v for k, v in est.items()}


def format_table(rows: list[dict], hw: Hardware | None = None) -> str:
    """A markdown table of estimates (GiB per GPU unless said)."""
    lines = ["| config | GPUs | micro-batch | ckpt | model states | activations | loss head | buffers "
             "| fwd/bwd | step | **peak/GPU** | CPU/node | checkpoint | fits |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for est in rows:
        g = gib_row(est)
        ok = "" if hw is None else ("yes" if fits(est, hw) else "no")
        lines.append(f"| {g['config']} | {g['gpus']} | {g['micro_batch']} | {'yes' if g['gradient_checkpointing'] else 'no'} "
                     f"| {g['model_states'] + g['frozen_weights']:.1f} | {g['activations']:.1f} | {g['loss_head']:.1f} "
                     f"| {g['buffers']:.1f} | {g['forward_backward']:.1f} | {g['optimizer_step']:.1f} "
                     f"| **{g['gpu_peak']:.1f}** | {g['cpu_per_node']:.0f} | {g['checkpoint_disk']:.0f} | {ok} |")
    return "\n".join(lines)


def run_hardware() -> Hardware | None:
    """The GPUs this launch uses: the processes per node x WORLD_SIZE / that nodes."""
    import os

    from recipe.hardware import local_world_size

    local = local_world_size()
    return detect_hardware(local, max(1, int(os.environ.get("WORLD_SIZE", "1")) // local))


def run_workload(training_args, model_args) -> Workload:
    """What a train_ds.py run asks for, as the estimator sees it."""
    method = "qlora" if getattr(model_args, "load_in_4bit", False) else "lora" if model_args.use_peft else "full"
    return Workload(seq_len=training_args.max_length or 1024, micro_batch=training_args.per_device_train_batch_size,
                    gradient_checkpointing=bool(training_args.gradient_checkpointing), method=method,
                    lora_rank=model_args.lora_r, lora_dropout=model_args.lora_dropout,
                    fused_loss=not training_args.token_metrics)


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
