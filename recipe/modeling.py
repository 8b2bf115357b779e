"""Tokenizer and model: the embedded tiny default, or any causal LM from the hub or a local folder."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from recipe.errors import ConfigError

logger = logging.getLogger(__name__)

TINY_CONFIG = Path(__file__).with_name("tiny_llama.json")
TINY_NAME = "tiny-llama"
TINY_SPECIALS = ["<pad>", "<unk>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"]
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# For tokenizers that ship no chat template (base models): plain-text headers, the assistant turn
# closed by the tokenizer's own EOS so the model learns to stop; no new tokens, no embedding resize.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{% for m in messages %}"
    "{{ '### ' + m['role'] | capitalize + ':\\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}"
)
# Llama 3.1+ tokenizers reserve this token for padding; better than reusing EOS.
LLAMA_PAD_TOKENS = ("<|finetune_right_pad_id|>", "<pad>")


def build_tiny_tokenizer():
    """Character-level tokenizer over printable ASCII and newline, built offline, deterministic."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {tok: i for i, tok in enumerate(TINY_SPECIALS + chars)}
    # BPE with no merges and no pre-tokenizer splits text into single characters.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    core.add_special_tokens(TINY_SPECIALS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<|end|>",
        additional_special_tokens=TINY_SPECIALS[3:],
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    tokenizer.padding_side = "right"
    return tokenizer


def tiny_config(vocab_size: int):
    from transformers import LlamaConfig

    values = {k: v for k, v in json.loads(TINY_CONFIG.read_text()).items() if not k.startswith("_")}
    return LlamaConfig(**values, vocab_size=vocab_size)


def load_tokenizer(model_name_or_path: str | None, revision: str = "main", trust_remote_code: bool = False):
    """The model's tokenizer with a chat template and a pad token guaranteed ('tiny' or None: the built-in one)."""
    if model_name_or_path in (None, "tiny"):
        return build_tiny_tokenizer()
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model_name_or_path, revision=revision, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:  # ValueError: a folder with a config but no tokenizer files
        raise ConfigError([model_error(model_name_or_path, e)]) from None
    if tokenizer.chat_template is None:
        logger.warning("%s has no chat template; using the plain '### Role:' template.", model_name_or_path)
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        vocab = tokenizer.get_vocab()
        pad = next((t for t in LLAMA_PAD_TOKENS if t in vocab), tokenizer.eos_token)
        tokenizer.pad_token = pad
        logger.info("Tokenizer has no pad token; using %r (labels are masked by attention, not by id).", pad)
    return tokenizer


def model_error(name: str, error: Exception) -> str:
    text = str(error)
    if Path(name).exists():
        return f"{name} exists but is not a loadable model/tokenizer folder ({text.splitlines()[0]}). " \
               "It needs config.json, the weights (*.safetensors) and the tokenizer files."
    if "gated" in text.lower() or "401" in text or "403" in text:
        return f"{name} is gated: accept its licence on the hub and export HF_TOKEN=<your token>."
    return f"cannot load {name!r}: not a local folder, and the hub did not provide it ({text.splitlines()[0]}). " \
           "Check the id, your network, or HF_HUB_OFFLINE with a local path."


def load_model(model_args, training_args, tokenizer, random_init: bool = False):
    """Load weights (or build the tiny default, or random weights from a config).

    Call after TrainingArguments so ZeRO-3 partitions at load.
    """
    import torch
    from transformers import AutoModelForCausalLM, set_seed

    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled() or getattr(training_args, "sequence_parallel_size", 1) > 1:
        # zero.Init partitions over the process group, so it must exist before the weights do, and Ulysses builds
        # its sequence-parallel groups on DeepSpeed's before the engine does (on CPU, TrainingArguments leaves it to
        # the Trainer, which is too late).
        import deepspeed

        if not deepspeed.comm.is_initialized():  # wraps torch's group when accelerate made one
            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    dtype = model_args.dtype
    if dtype not in (None, "auto"):
        dtype = getattr(torch, dtype)
    if model_args.model_name_or_path is None:
        # Seeded init outside zero.Init, so every stage starts from the same weights; under ZeRO-3
        # the model is built partitioned and the weights are copied in, one parameter at a time.
        from transformers import LlamaForCausalLM

        set_seed(training_args.seed)
        config = tiny_config(len(tokenizer))
        apply_rope_scaling(config, getattr(model_args, "rope_scaling", None))
        config._attn_implementation = model_args.attn_implementation or "sdpa"
        model = LlamaForCausalLM(config)
        if not is_deepspeed_zero3_enabled():
            return model
        weights = model.state_dict()
        partitioned = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        for name, param in partitioned.named_parameters():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                param.data.copy_(weights[name])
        return partitioned
    kwargs = dict(revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code,
                  attn_implementation=model_args.attn_implementation or "sdpa", dtype=dtype)
    quantization = quantization_config(model_args, training_args)
    if quantization is not None:
        kwargs.update(quantization_config=quantization, dtype=quantization.bnb_4bit_compute_dtype)
        if not is_deepspeed_zero3_enabled():  # ZeRO-3 partitions the (bf16-stored) 4-bit weights itself
            import os

            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    kwargs["rope_scaling"] = getattr(model_args, "rope_scaling", None)
    if random_init:
        return random_model(model_args.model_name_or_path, kwargs, training_args.seed)
    rope = kwargs.pop("rope_scaling")
    try:
        if rope:
            config = read_config(model_args.model_name_or_path, model_args.model_revision,
                                 training_args.trust_remote_code)
            apply_rope_scaling(config, rope)
            kwargs["config"] = config
        model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **kwargs)
    except OSError as e:
        raise ConfigError([model_error(model_args.model_name_or_path, e)]) from None
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    return model


def quantization_config(model_args, training_args):
    """QLoRA: bitsandbytes nf4 (or 8-bit) with the compute dtype of training and storage in that dtype (ZeRO-3)."""
    if not (getattr(model_args, "load_in_4bit", False) or getattr(model_args, "load_in_8bit", False)):
        return None  # (scripts call load_model with a few fields only)
    import torch
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else torch.float32
    if model_args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True, bnb_4bit_compute_dtype=compute)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
                              bnb_4bit_use_double_quant=model_args.use_bnb_nested_quant,
                              bnb_4bit_compute_dtype=compute,
                              bnb_4bit_quant_storage=model_args.bnb_4bit_quant_storage or compute)


def check_lora_targets(model, targets) -> None:
    """--lora_target_modules must name modules the model has (peft's own error lists none of them)."""
    import re

    import torch

    if targets is None or targets == "all-linear":
        return
    names = [n for n, _ in model.named_modules()]
    if isinstance(targets, str):  # peft: one string is a regex over the full module name
        missing = [] if any(re.fullmatch(targets, n) for n in names) else [targets]
    else:
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")})
        raise ConfigError([f"--lora_target_modules {' '.join(missing)}: {model.__class__.__name__} has no such module. "
                           f"Its linear layers are {' '.join(linear)}; the default all-linear takes them all."])


def save_base(model, tokenizer, path: Path, is_main: bool) -> None:
    """Save the weights LoRA starts from when they exist nowhere else (the tiny default), so the adapter can
    be merged or loaded later: its adapter_config.json names this folder as its base."""
    import contextlib

    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    gather = contextlib.nullcontext()
    if params:  # ZeRO-3: gather the partitioned weights to save them whole
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params)
    with gather:
        if is_main:
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
    model.name_or_path = model.config._name_or_path = str(path.resolve())  # found from any working directory


ROPE_TYPES = ("yarn", "linear", "dynamic")  # transformers' RoPE types that stretch a context by a factor


def rope_spec(value: str | None) -> tuple[str, float] | None:
    """--rope_scaling TYPE:FACTOR -> (type, factor); ValueError with the fix when malformed."""
    if not value:
        return None
    rtype, _, factor = value.partition(":")
    try:
        number = float(factor)
    except ValueError:
        number = 0.0
    if rtype not in ROPE_TYPES or number <= 1:
        raise ValueError(f"--rope_scaling {value}: write TYPE:FACTOR with TYPE one of {', '.join(ROPE_TYPES)} and "
                         "FACTOR > 1 (e.g. yarn:4).")
    return rtype, number


def apply_rope_scaling(config, value: str | None) -> dict | None:
    """Stretch the config's RoPE by --rope_scaling (in place): transformers' rope_parameters and the positions."""
    spec = rope_spec(value)
    if spec is None:
        return None
    rtype, factor = spec
    old = dict(getattr(config, "rope_parameters", None) or {})
    base = config.max_position_embeddings
    new = {"rope_type": rtype, "factor": factor,
           "rope_theta": old.get("rope_theta", getattr(config, "rope_theta", 10000.0))}
    if rtype == "yarn":
        new["original_max_position_embeddings"] = base
    config.rope_parameters = new
    config.max_position_embeddings = int(base * factor)
    return new


def model_config(name: str | None, revision: str = "main", trust_remote_code: bool = False):
    """The model's config without weights: the tiny default's, or read_config's."""
    if name is None:
        return tiny_config(len(build_tiny_tokenizer()))
    return read_config(name, revision, trust_remote_code)


def read_config(name: str, revision: str = "main", trust_remote_code: bool = False):
    """A model's config from a hub id, a local model folder, or a config.json path."""
    from transformers import AutoConfig

    path = Path(name)
    return AutoConfig.from_pretrained(str(path.parent if path.name == "config.json" else path),
                                      revision=revision, trust_remote_code=trust_remote_code)


def random_model(name: str, kwargs: dict, seed: int):
    """Random weights in the shape of `name`'s config (a folder, a config.json, or a hub id)."""
    import torch
    from transformers import AutoModelForCausalLM, set_seed
    from transformers.integrations import is_deepspeed_zero3_enabled

    try:
        config = read_config(name, kwargs["revision"], kwargs["trust_remote_code"])
    except OSError as e:
        raise ConfigError([f"--random_init: cannot read a model config from {name} ({str(e).splitlines()[0]}). "
                           "Point --model_name_or_path at a folder with config.json."]) from None
    config._attn_implementation = kwargs["attn_implementation"]
    apply_rope_scaling(config, kwargs.pop("rope_scaling", None))
    if kwargs.get("quantization_config") is not None:
        return random_quantized_model(name, config, kwargs, seed)
    set_seed(seed)
    dtype = kwargs["dtype"] if isinstance(kwargs["dtype"], torch.dtype) else torch.float32
    if torch.cuda.is_available() and not is_deepspeed_zero3_enabled():
        # initialise on this process's GPU: seconds instead of a minute on the CPU for billions of weights
        import os

        with torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"):
            return AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                    trust_remote_code=kwargs["trust_remote_code"])
    return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=kwargs["trust_remote_code"])


def random_quantized_model(name: str, config, kwargs: dict, seed: int):
    """QLoRA on random weights (benchmarks): bitsandbytes quantises at load, so the random bf16 weights are
    written once to a temporary folder and loaded from there like any checkpoint."""
    import os
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, set_seed

    folder = Path(tempfile.gettempdir()) / f"recipe-random-{Path(name).name}-seed{seed}-{os.getuid()}"
    rank = int(os.environ.get("LOCAL_RANK", 0))
    if rank == 0 and not (folder / "config.json").exists():
        set_seed(seed)
        device = f"cuda:{rank}" if torch.cuda.is_available() else "cpu"
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=kwargs["dtype"],
                                                     trust_remote_code=kwargs["trust_remote_code"])
        model.save_pretrained(folder.with_suffix(".partial"))
        del model
        folder.with_suffix(".partial").rename(folder)
    while not (folder / "config.json").exists():  # other local ranks wait for rank 0's copy
        import time

        time.sleep(2)
    logger.info("random weights for %s saved in %s, loaded quantised", name, folder)
    return AutoModelForCausalLM.from_pretrained(folder, **{k: v for k, v in kwargs.items() if k != "revision"})
