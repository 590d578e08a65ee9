"""Configuration: dataclasses, named model presets, TOML files and `--section.key value` overrides.

Every value a run depends on lives here, so a checkpoint's `config.json` can rebuild the run.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from mtnlg.errors import MtnlgError


@dataclass
class ModelConfig:
    """Shape of a decoder-only transformer; `gpt2`-style by default, Llama-style by switches."""

    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = 0  # 0: same as n_head; fewer gives grouped-query attention
    d_model: int = 768
    d_ff: int = 0  # 0: 4 * d_model for gelu, the Llama rounding of 8/3 * d_model for swiglu
    max_seq_len: int = 1024
    norm: str = "layernorm"  # layernorm | rmsnorm
    mlp: str = "gelu"  # gelu | swiglu
    position: str = "learned"  # learned | rotary
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    bias: bool = True
    qkv_bias: bool = False  # biases on q, k and v even without model.bias (Qwen2)
    qk_norm: bool = False  # RMSNorm of each head's query and key before the rotary positions (Qwen3)
    norm_eps: float = 1e-5
    dropout: float = 0.0
    init_std: float = 0.0  # 0: sqrt(1 / (3 * d_model)), as MT-NLG

    def __post_init__(self) -> None:
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        if self.d_ff == 0:
            self.d_ff = 4 * self.d_model if self.mlp == "gelu" else _swiglu_hidden(self.d_model)
        if self.init_std == 0:
            self.init_std = math.sqrt(1 / (3 * self.d_model)) if self.d_model > 0 else 0.0
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def validate(self) -> None:
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise MtnlgError(f"model.{name} must be a positive integer, got {getattr(self, name)}")
        _check_choice("model.norm", self.norm, ("layernorm", "rmsnorm"))
        _check_choice("model.mlp", self.mlp, ("gelu", "swiglu"))
        _check_choice("model.position", self.position, ("learned", "rotary"))
        if self.d_model % self.n_head:
            raise MtnlgError(
                f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head}); "
                f"pick n_head among {_divisors(self.d_model)}"
            )
        if self.n_head % self.n_kv_head:
            raise MtnlgError(
                f"model.n_head ({self.n_head}) must be divisible by model.n_kv_head ({self.n_kv_head}); "
                f"pick n_kv_head among {_divisors(self.n_head)}"
            )
        if self.position == "rotary" and self.head_dim % 2:
            raise MtnlgError(f"rotary positions need an even head dimension, got {self.head_dim}")
        if not 0 <= self.dropout < 1:
            raise MtnlgError(f"model.dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise MtnlgError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


def _swiglu_hidden(d_model: int, multiple_of: int = 256) -> int:
    hidden = int(2 * 4 * d_model / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0][:12]


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise MtnlgError(f"{name} is {value!r}; choose one of: {', '.join(choices)}")


_LLAMA = dict(norm="rmsnorm", mlp="swiglu", position="rotary", bias=False, tie_embeddings=False, norm_eps=1e-5)

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=512, n_layer=2, n_head=4, d_model=64, max_seq_len=64),
    "demo": dict(vocab_size=2048, n_layer=4, n_head=4, d_model=256, max_seq_len=128),
    "gpt2": dict(vocab_size=50304, n_layer=12, n_head=12, d_model=768, max_seq_len=1024),
    "gpt2-medium": dict(vocab_size=50304, n_layer=24, n_head=16, d_model=1024, max_seq_len=1024),
    "gpt2-large": dict(vocab_size=50304, n_layer=36, n_head=20, d_model=1280, max_seq_len=1024),
    "gpt2-xl": dict(vocab_size=50304, n_layer=48, n_head=25, d_model=1600, max_seq_len=1024),
    "mt-nlg-530b": dict(vocab_size=51200, n_layer=105, n_head=128, d_model=20480, max_seq_len=2048),
    "llama-tiny": dict(vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=64, **_LLAMA),
    "llama-1b": dict(
        vocab_size=32000, n_layer=22, n_head=32, n_kv_head=4, d_model=2048, d_ff=5632, max_seq_len=2048, **_LLAMA
    ),
    "llama2-7b": dict(vocab_size=32000, n_layer=32, n_head=32, d_model=4096, d_ff=11008, max_seq_len=4096, **_LLAMA),
}


@dataclass
class TrainConfig:
    """How to train: data, batch, optimizer, schedule, evaluation, checkpoints."""

    data: str = ""  # shard prefix, or a blend "0.7 prefix_a 0.3 prefix_b" (as written by `mtnlg prepare`)
    tokenizer: str = ""  # tokenizer.json or its folder; empty: the one beside the (first) data prefix
    out_dir: str = "runs/default"
    seed: int = 1234
    micro_batch_size: int = 8
    global_batch_size: int = 8  # a multiple of micro_batch_size; the rest is gradient accumulation
    rampup_start: int = 0  # batch-size ramp-up (MT-NLG: 32 -> 1920): 0 turns it off
    rampup_increment: int = 0
    rampup_samples: int = 0
    max_steps: int = 1000
    lr: float = 6e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    decay_steps: int = 0  # 0: max_steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    eval_interval: int = 100
    eval_batches: int = 10  # validation batches of global_batch_size samples each, the same under every layout
    log_interval: int = 1
    save_interval: int = 500
    keep_last: int = 3
    # end | every | never: which saves also write model.safetensors (the weights in one file, for tools
    # outside mtnlg) beside the sharded state/; end: the save at max_steps. Rank 0 writes it once the
    # checkpoint is complete while the other ranks wait (within the process group's timeout): for models of
    # hundreds of GB choose never. Every verb reads state/ alone too; `mtnlg consolidate RUN` writes it later.
    consolidate: str = "end"
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (fp32 on CPU, bf16 autocast on CUDA) | fp32 | bf16
    compile: bool = False
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("micro_batch_size", "global_batch_size", "max_steps", "eval_batches", "log_interval"):
            if getattr(self, name) <= 0:
                raise MtnlgError(f"train.{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("save_interval", "eval_interval", "keep_last", "warmup_steps", "decay_steps"):
            if getattr(self, name) < 0:
                raise MtnlgError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.global_batch_size % self.micro_batch_size:
            raise MtnlgError(
                f"train.global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"train.micro_batch_size ({self.micro_batch_size})"
            )
        if self.rampup_start:
            if self.rampup_increment <= 0 or self.rampup_samples <= 0:
                raise MtnlgError("batch ramp-up needs train.rampup_increment > 0 and train.rampup_samples > 0")
            steps = self.global_batch_size - self.rampup_start
            if steps < 0 or steps % self.rampup_increment or self.rampup_start % self.micro_batch_size or (
                self.rampup_increment % self.micro_batch_size
            ):
                raise MtnlgError(
                    f"batch ramp-up {self.rampup_start} -> {self.global_batch_size} by {self.rampup_increment} "
                    f"must climb in whole steps of train.micro_batch_size ({self.micro_batch_size})"
                )
        if self.lr <= 0:
            raise MtnlgError(f"train.lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise MtnlgError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _check_choice("train.device", self.device, ("auto", "cpu", "cuda"))
        _check_choice("train.dtype", self.dtype, ("auto", "fp32", "bf16"))
        _check_choice("train.consolidate", self.consolidate, ("end", "every", "never"))


PP_SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b")


@dataclass
class ParallelConfig:
    """How a run spreads over processes: tp x pp x dp_shard x dp_replicate must equal the world size.

    tp: tensor parallel (Megatron column/row splits of every block, vocabulary-parallel embedding and loss);
    sequence_parallel: also split norms and dropout along the sequence inside the tp group;
    pp: pipeline stages; dp_shard: FSDP (ZeRO-3) sharding; dp_replicate: data-parallel replicas (HSDP with dp_shard);
    activation_checkpointing: trade compute for activation memory (selective: recompute norms, activations
    and dropout, keep matmul, attention and tensor-parallel collective outputs; full: keep only each block's
    input).
    """

    tp: int = 1
    pp: int = 1
    dp_shard: int = 1
    dp_replicate: int = 1
    sequence_parallel: bool = True
    pp_schedule: str = "1f1b"  # gpipe | 1f1b | interleaved-1f1b
    microbatches: int = 1  # pipeline micro-batches per step; a multiple of pp
    activation_checkpointing: str = "none"  # none | selective | full

    def __post_init__(self) -> None:
        self.validate()

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp_shard * self.dp_replicate

    def validate(self) -> None:
        for name in ("tp", "pp", "dp_shard", "dp_replicate", "microbatches"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise MtnlgError(f"parallel.{name} must be a positive integer, got {value!r}")
        _check_choice("parallel.pp_schedule", self.pp_schedule, PP_SCHEDULES)
        _check_choice("parallel.activation_checkpointing", self.activation_checkpointing, ("none", "selective", "full"))


@dataclass
class EvalConfig:
    """Tasks run during training every train.eval_interval steps, beside the validation loss (`mtnlg eval`'s
    task files: FILE in mtnlg's schema or NAME=FILE for a benchmark; generate_until tasks run only there)."""

    tasks: list[str] = field(default_factory=list)
    num_fewshot: int = 0
    fewshot_seed: int = 1234
    limit: int = 0  # the first N documents of each task; 0: all

    def __post_init__(self) -> None:
        for name in ("num_fewshot", "limit"):
            if getattr(self, name) < 0:
                raise MtnlgError(f"eval.{name} must be >= 0, got {getattr(self, name)}")


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj", "down_proj", "lm_head")


@dataclass
class FinetuneConfig:
    """Supervised fine-tuning (`mtnlg finetune`): examples from a JSONL file instead of token shards, and the
    model's first weights from a base checkpoint instead of a random draw."""

    base: str = ""  # the checkpoint whose weights training starts from (a run, checkpoint or imported model)
    data: str = ""  # Alpaca JSON/JSONL, chat JSONL ({"messages": [...]}) or prompt/completion JSONL
    val_fraction: float = 0.05  # share of the examples held out for validation (at least one when > 0)
    train_on_prompt: bool = False  # also train on the prompt tokens (default: only on the responses)
    packing: bool = True  # several examples per row (attention kept within each), else one padded example per row
    temperature: float = 0.05  # contrastive pairs: cosine similarities are divided by it before the softmax

    def __post_init__(self) -> None:
        if not 0 <= self.val_fraction < 1:
            raise MtnlgError(f"finetune.val_fraction must be in [0, 1), got {self.val_fraction}")
        if not self.temperature > 0:
            raise MtnlgError(f"finetune.temperature must be > 0, got {self.temperature}")


@dataclass
class LoraConfig:
    """Low-rank adapters (LoRA): W x + (alpha / r) B A dropout(x) on the target layers, whose own weights stay
    frozen; r = 0 trains every weight instead (full fine-tuning)."""

    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])  # module names, as in LORA_TARGETS

    def __post_init__(self) -> None:
        if self.r < 0 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise MtnlgError(f"lora needs r >= 0, alpha > 0 and dropout in [0, 1); got r {self.r}, alpha {self.alpha}, "
                             f"dropout {self.dropout}")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown or (self.r and not self.targets):
            problem = f"unknown module {unknown[0]!r}" if unknown else "empty"
            raise MtnlgError(f"lora.targets: {problem}; choose among {', '.join(LORA_TARGETS)}")


SECTIONS = ("model", "train", "parallel", "eval", "finetune", "lora")
_SECTIONS_TEXT = "sections are [model], [train], [parallel], [eval], [finetune] and [lora]"


@dataclass
class Config:
    """A whole run: `[model]` (with an optional `preset`), `[train]`, `[parallel]`, `[eval]`, and for fine-tuning
    `[finetune]` and `[lora]` sections."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig.from_name("tiny"))
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        data = json.loads(json.dumps(data))  # a deep copy we may edit
        unknown = set(data) - set(SECTIONS)
        if unknown:
            raise MtnlgError(f"unknown config section [{sorted(unknown)[0]}]; {_SECTIONS_TEXT}")
        train = data.get("train", {})
        if "activation_checkpointing" in train:  # its old place, still in earlier checkpoints' config.json
            on = _coerce("train.activation_checkpointing", train.pop("activation_checkpointing"), "bool")
            data.setdefault("parallel", {}).setdefault("activation_checkpointing", "full" if on else "none")
        model = data.get("model", {})
        preset = model.pop("preset", "tiny")
        if preset not in PRESETS:
            raise MtnlgError(f"unknown model preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        model_values = {**PRESETS[preset], **_typed(ModelConfig, "model", model)}
        return cls(
            model=ModelConfig(**model_values),
            train=TrainConfig(**_typed(TrainConfig, "train", data.get("train", {}))),
            parallel=ParallelConfig(**_typed(ParallelConfig, "parallel", data.get("parallel", {}))),
            eval=EvalConfig(**_typed(EvalConfig, "eval", data.get("eval", {}))),
            finetune=FinetuneConfig(**_typed(FinetuneConfig, "finetune", data.get("finetune", {}))),
            lora=LoraConfig(**_typed(LoraConfig, "lora", data.get("lora", {}))),
        )


def _typed(cls: type, section: str, values: dict[str, Any]) -> dict[str, Any]:
    """Check keys against the dataclass and coerce values to the field types, naming any mistake."""
    types = {f.name: f.type for f in fields(cls)}
    out = {}
    for key, value in values.items():
        if key not in types:
            hint = difflib.get_close_matches(key, types, n=1)
            suggestion = f"did you mean {section}.{hint[0]}? " if hint else ""
            raise MtnlgError(f"unknown key {section}.{key}; {suggestion}valid keys: {', '.join(types)}")
        out[key] = _coerce(f"{section}.{key}", value, types[key])
    return out


def _coerce(name: str, value: Any, type_name: str) -> Any:
    try:
        if type_name == "bool":
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if type_name == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if type_name == "float":
            return float(value)
        if type_name == "list[str]":  # a TOML list, or comma-separated on the command line
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
                raise ValueError
            return [v.strip() for v in items if v.strip()]
        return str(value)
    except (TypeError, ValueError):
        raise MtnlgError(f"{name} must be {type_name}, got {value!r}") from None


def parse_overrides(args: list[str]) -> dict[str, dict[str, str]]:
    """`--train.lr 3e-4 --model.preset demo` -> {"train": {"lr": "3e-4"}, "model": {"preset": "demo"}}."""
    out: dict[str, dict[str, str]] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        key, eq, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if not key or "." not in key:
            raise MtnlgError(f"unexpected argument {arg!r}; overrides look like --train.lr 3e-4 or --model.n_layer=4")
        if not eq:
            if i + 1 >= len(args):
                raise MtnlgError(f"{arg} needs a value")
            value = args[i + 1]
            i += 1
        section, _, name = key.partition(".")
        out.setdefault(section, {})[name] = value
        i += 1
    return out


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, defaults: dict[str, dict[str, Any]] | None = None
) -> Config:
    """Read a TOML file (optional) over `defaults` (a verb's own, such as fine-tuning's), apply `--section.key
    value` overrides, validate."""
    data: dict[str, Any] = json.loads(json.dumps(defaults or {}))  # a deep copy we may edit
    layers: list[dict[str, Any]] = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise MtnlgError(f"{path}: no such config file; pass a TOML file such as configs/demo.toml")
        try:
            layers.append(tomllib.loads(path.read_text()))
        except tomllib.TOMLDecodeError as e:
            raise MtnlgError(f"{path}: invalid TOML ({e}); fix the file") from None
    layers.append(parse_overrides(overrides or []))
    for layer in layers:
        for section, values in layer.items():
            if not isinstance(values, dict) or not isinstance(data.get(section, {}), dict):
                raise MtnlgError(f"{section} is not a config section; {_SECTIONS_TEXT}")
            data.setdefault(section, {}).update(values)
    return Config.from_dict(data)
