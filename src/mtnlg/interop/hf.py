"""Import and export Hugging Face checkpoints: GPT-2 (GPT2LMHeadModel), Llama (LlamaForCausalLM, and
MistralForCausalLM when no sliding window is in effect), Qwen2 (Qwen2ForCausalLM) and Qwen3
(Qwen3ForCausalLM).

Each family is one table: every HF config key and tensor, the mtnlg field or tensors it holds, and how the
layout differs. Import reads the table one way and export the other, so the two directions cannot drift
apart. Weights are fp32 both ways: exact for fp16/bf16 sources, and the precision mtnlg trains and serves
from. The files are read and written directly, so neither direction needs `transformers` installed.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from mtnlg.checkpoint import atomic_directory, check_destination, load_model, resolve_checkpoint, save_checkpoint
from mtnlg.config import Config, ModelConfig
from mtnlg.errors import MtnlgError
from mtnlg.model.gpt import GPT
from mtnlg.tokenizer import Tokenizer

# (HF module, the mtnlg modules it holds, weight stored transposed as [in, out]); "{i}" repeats per layer.
# Each row covers `.weight` and, where the model has them, `.bias`. A fused HF module (GPT-2's c_attn)
# holds several mtnlg modules stacked along its output dimension.
ModuleRule = tuple[str, tuple[str, ...], bool]

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HF_BUFFERS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")  # recomputed, not weights


@dataclass(frozen=True)
class Family:
    architectures: tuple[str, ...]  # the first is what export writes
    model_type: str
    tokenizer_class: str
    shape: dict[str, Any]  # the ModelConfig values every model of the family has
    fields: dict[str, str]  # HF config key -> ModelConfig field
    defaults: dict[str, Any]  # HF's value for an optional key missing from config.json (None: mtnlg derives it)
    fixed: dict[str, tuple[Any, ...]]  # HF keys mtnlg supports only at these values; missing means the first
    modules: tuple[ModuleRule, ...]
    extra: Callable[[ModelConfig], dict[str, Any]] = lambda cfg: {}  # further keys export writes
    check: Callable[[dict[str, Any]], str | None] = lambda hf: None  # what else import cannot map


def _llama_check(hf: dict[str, Any]) -> str | None:
    for key in ("rope_scaling", "rope_parameters"):  # transformers 4 and 5 spellings
        scaling = hf.get(key) or {}
        if scaling.get("rope_type", scaling.get("type", "default")) != "default":
            return f"{key} = {json.dumps(scaling)} is not supported; mtnlg's rotary positions are unscaled"
    width, heads, head_dim = hf.get("hidden_size"), hf.get("num_attention_heads"), hf.get("head_dim")
    if head_dim and width and heads and head_dim * heads != width:
        return f"head_dim = {head_dim} is not hidden_size / num_attention_heads ({width} / {heads}), as mtnlg needs"
    window, context = hf.get("sliding_window"), hf.get("max_position_embeddings", 0)
    if window and window < context:
        return f"sliding_window = {window} is shorter than the context ({context}); mtnlg attends over all of it"
    return None


GPT2 = Family(
    architectures=("GPT2LMHeadModel",),
    model_type="gpt2",
    tokenizer_class="GPT2TokenizerFast",
    shape=dict(norm="layernorm", mlp="gelu", position="learned", bias=True, qk_norm=False),
    fields={
        "vocab_size": "vocab_size",
        "n_layer": "n_layer",
        "n_head": "n_head",
        "n_embd": "d_model",
        "n_inner": "d_ff",
        "n_positions": "max_seq_len",
        "layer_norm_epsilon": "norm_eps",
        "tie_word_embeddings": "tie_embeddings",
    },
    defaults={"n_inner": None, "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True},
    fixed={
        "activation_function": ("gelu_new", "gelu_pytorch_tanh"),  # both are mtnlg's tanh-approximated gelu
        "scale_attn_weights": (True,),
        "scale_attn_by_inverse_layer_idx": (False,),
        "add_cross_attention": (False,),
    },
    modules=(
        ("transformer.wte", ("tok_emb",), False),
        ("transformer.wpe", ("pos_emb",), False),
        ("transformer.h.{i}.ln_1", ("blocks.{i}.attn_norm",), False),
        ("transformer.h.{i}.attn.c_attn", tuple(f"blocks.{{i}}.attn.{p}_proj" for p in "qkv"), True),
        ("transformer.h.{i}.attn.c_proj", ("blocks.{i}.attn.o_proj",), True),
        ("transformer.h.{i}.ln_2", ("blocks.{i}.mlp_norm",), False),
        ("transformer.h.{i}.mlp.c_fc", ("blocks.{i}.mlp.up_proj",), True),
        ("transformer.h.{i}.mlp.c_proj", ("blocks.{i}.mlp.down_proj",), True),
        ("transformer.ln_f", ("norm",), False),
        ("lm_head", ("lm_head",), False),
    ),
    # GPT-2's three dropouts sit exactly where mtnlg's one does: embeddings, attention, residual.
    extra=lambda cfg: dict.fromkeys(("embd_pdrop", "attn_pdrop", "resid_pdrop"), cfg.dropout),
)

# The fields, defaults and tensors Llama, Qwen2 and Qwen3 share; each family adds its own.
_LLAMA_FIELDS = {
    "vocab_size": "vocab_size",
    "num_hidden_layers": "n_layer",
    "num_attention_heads": "n_head",
    "num_key_value_heads": "n_kv_head",
    "hidden_size": "d_model",
    "intermediate_size": "d_ff",
    "max_position_embeddings": "max_seq_len",
    "rms_norm_eps": "norm_eps",
    "rope_theta": "rope_theta",
    "tie_word_embeddings": "tie_embeddings",
}
_LLAMA_DEFAULTS = {"num_key_value_heads": None, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
_LLAMA_MODULES = (
    ("model.embed_tokens", ("tok_emb",), False),
    ("model.layers.{i}.input_layernorm", ("blocks.{i}.attn_norm",), False),
    ("model.layers.{i}.self_attn.q_proj", ("blocks.{i}.attn.q_proj",), False),
    ("model.layers.{i}.self_attn.k_proj", ("blocks.{i}.attn.k_proj",), False),
    ("model.layers.{i}.self_attn.v_proj", ("blocks.{i}.attn.v_proj",), False),
    ("model.layers.{i}.self_attn.o_proj", ("blocks.{i}.attn.o_proj",), False),
    ("model.layers.{i}.post_attention_layernorm", ("blocks.{i}.mlp_norm",), False),
    ("model.layers.{i}.mlp.gate_proj", ("blocks.{i}.mlp.gate_proj",), False),
    ("model.layers.{i}.mlp.up_proj", ("blocks.{i}.mlp.up_proj",), False),
    ("model.layers.{i}.mlp.down_proj", ("blocks.{i}.mlp.down_proj",), False),
    ("model.norm", ("norm",), False),
    ("lm_head", ("lm_head",), False),
)

LLAMA = Family(
    architectures=("LlamaForCausalLM", "MistralForCausalLM"),
    model_type="llama",
    tokenizer_class="PreTrainedTokenizerFast",
    shape=dict(norm="rmsnorm", mlp="swiglu", position="rotary", qkv_bias=False, qk_norm=False),
    fields={**_LLAMA_FIELDS, "attention_bias": "bias", "mlp_bias": "bias"},
    defaults={**_LLAMA_DEFAULTS, "rope_theta": 10000.0, "attention_bias": False, "mlp_bias": False},
    fixed={"hidden_act": ("silu",)},
    modules=_LLAMA_MODULES,
    check=_llama_check,
)

# Qwen2: Llama with biases on q, k and v alone.
QWEN2 = Family(
    architectures=("Qwen2ForCausalLM",),
    model_type="qwen2",
    tokenizer_class="PreTrainedTokenizerFast",
    shape=dict(norm="rmsnorm", mlp="swiglu", position="rotary", bias=False, qkv_bias=True, qk_norm=False),
    fields=_LLAMA_FIELDS,
    defaults={**_LLAMA_DEFAULTS, "rope_theta": 1000000.0},
    fixed={"hidden_act": ("silu",), "use_sliding_window": (False,)},
    modules=_LLAMA_MODULES,
    check=_llama_check,
)

# Qwen3: Llama with an RMSNorm over each head's query and key, before the rotary positions.
QWEN3 = Family(
    architectures=("Qwen3ForCausalLM",),
    model_type="qwen3",
    tokenizer_class="PreTrainedTokenizerFast",
    shape=dict(norm="rmsnorm", mlp="swiglu", position="rotary", bias=False, qkv_bias=False, qk_norm=True),
    fields=_LLAMA_FIELDS,
    defaults={**_LLAMA_DEFAULTS, "rope_theta": 1000000.0},
    fixed={"hidden_act": ("silu",), "use_sliding_window": (False,), "attention_bias": (False,)},
    modules=(
        *_LLAMA_MODULES,
        ("model.layers.{i}.self_attn.q_norm", ("blocks.{i}.attn.q_norm",), False),
        ("model.layers.{i}.self_attn.k_norm", ("blocks.{i}.attn.k_norm",), False),
    ),
    extra=lambda cfg: {"head_dim": cfg.head_dim},  # Qwen3's default is 128, whatever the width
    check=lambda hf: _llama_check({"head_dim": 128, **hf}),
)


FAMILIES = (GPT2, LLAMA, QWEN2, QWEN3)


def import_hf(src: str | Path, dst: str | Path, *, force: bool = False) -> Path:
    """Convert a Hugging Face model folder (config.json, weights, tokenizer) into an mtnlg checkpoint directory."""
    src, dst = Path(src), Path(dst)
    check_destination(dst, force)
    hf = _read_hf_config(src)
    family = _family(hf, src)
    cfg = _model_config(family, hf, src)
    tokenizer = Tokenizer.load(src)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise MtnlgError(
            f"{src}: the tokenizer has {tokenizer.vocab_size} tokens but the model only {cfg.vocab_size}; "
            "the folder mixes files of two models"
        )
    with torch.device("meta"):  # shapes only: every weight comes from the files
        model = GPT(cfg)
    model.load_state_dict(_import_weights(family, model, _read_weights(src, family), src), assign=True)
    return save_checkpoint(dst, model, Config(model=cfg), tokenizer)


def export_hf(src: str | Path, dst: str | Path, *, force: bool = False) -> Path:
    """Write an mtnlg checkpoint (or a run's latest) as a Hugging Face folder that transformers loads offline."""
    dst = Path(dst)
    check_destination(dst, force)
    checkpoint = resolve_checkpoint(src)
    model, tokenizer, config = load_model(checkpoint)
    family = export_family(config.model, checkpoint)
    state = model.state_dict()
    tensors = {}
    for name, ours, transposed in _tensor_map(family, model):
        joined = torch.cat([state[n] for n in ours])
        tensors[name] = (joined.t() if transposed else joined).contiguous()
    (bos, bos_id), (eos, eos_id) = _special_tokens(tokenizer)
    hf_config = {
        "architectures": [family.architectures[0]],
        "model_type": family.model_type,
        **{key: allowed[0] for key, allowed in family.fixed.items()},
        **{key: getattr(config.model, field) for key, field in family.fields.items()},
        **family.extra(config.model),
        "initializer_range": config.model.init_std,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
        "use_cache": True,
    }
    tokenizer_config = {
        "tokenizer_class": family.tokenizer_class,
        "bos_token": bos,
        "eos_token": eos,
        "model_max_length": config.model.max_seq_len,
        "clean_up_tokenization_spaces": False,
        **({"chat_template": tokenizer.chat_template} if tokenizer.chat_template is not None else {}),
    }
    with atomic_directory(dst) as tmp:
        safetensors.torch.save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        tokenizer.save(tmp)  # before tokenizer_config.json, which it would write with the chat template alone
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return dst


def read_json(path: Path, what: str, fix: str) -> dict[str, Any]:
    """A JSON file of a Hugging Face folder, or one line saying it is missing (pass `what`) or unreadable (`fix`)."""
    if not path.is_file():
        raise MtnlgError(f"{path.parent}: no {path.name}; pass {what} (as save_pretrained writes it)")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MtnlgError(f"{path}: unreadable ({e}); {fix}") from None


def _read_hf_config(src: Path) -> dict[str, Any]:
    hf = read_json(src / "config.json", "a Hugging Face model folder", "download or save the model again")
    rope = hf.get("rope_parameters") or {}  # where transformers 5 keeps rope_theta
    if "rope_theta" in rope:
        hf.setdefault("rope_theta", rope["rope_theta"])
    return hf


def _family(hf: dict[str, Any], src: Path) -> Family:
    architecture = (hf.get("architectures") or ["(none)"])[0]
    for family in FAMILIES:
        if architecture in family.architectures:
            return family
    supported = ", ".join(a for f in FAMILIES for a in f.architectures)
    raise MtnlgError(f"{src}: architecture {architecture} is not supported; mtnlg imports {supported}")


def _model_config(family: Family, hf: dict[str, Any], src: Path) -> ModelConfig:
    """The ModelConfig an HF config describes, refusing whatever the family's table cannot express."""
    where = f"{src}/config.json"
    for key, allowed in family.fixed.items():
        if hf.get(key, allowed[0]) not in allowed:
            needs = " or ".join(json.dumps(a) for a in allowed)
            raise MtnlgError(f"{where}: {key} = {json.dumps(hf[key])} is not supported (mtnlg needs {needs})")
    problem = family.check(hf)
    if problem:
        raise MtnlgError(f"{where}: {problem}")
    values, source = dict(family.shape), {}
    for key, field in family.fields.items():
        value = hf.get(key, family.defaults.get(key))
        if value is None:
            if key in family.defaults:
                continue  # HF derives it, and so does mtnlg from the field's 0 default
            raise MtnlgError(f"{where}: no {key}; the file is incomplete, save the model again")
        if field in source and values[field] != value:
            raise MtnlgError(
                f"{where}: {source[field]} = {json.dumps(values[field])} but {key} = {json.dumps(value)}; "
                f"mtnlg has one {field} setting for both"
            )
        values[field], source[field] = value, key
    return ModelConfig(**values)


def _read_weights(src: Path, family: Family) -> dict[str, torch.Tensor]:
    """All tensors of a model folder, from one file or the shards an index lists; safetensors before pickles."""
    for name in WEIGHT_FILES:
        index = src / f"{name}.index.json"
        try:
            if (src / name).is_file():
                files = [src / name]
            elif index.is_file():
                files = sorted({src / f for f in json.loads(index.read_text())["weight_map"].values()})
            else:
                continue
            tensors = {}
            for file in files:
                if file.suffix == ".safetensors":
                    tensors.update(safetensors.torch.load_file(file))
                else:
                    tensors.update(torch.load(file, map_location="cpu", weights_only=True))
        except (OSError, ValueError, KeyError, RuntimeError, pickle.UnpicklingError, safetensors.SafetensorError) as e:
            raise MtnlgError(f"{src}/{name}: unreadable weights ({e}); download or save the model again") from None
        # GPT-2 as first published names the base model's tensors without the `transformer.` prefix.
        prefix = family.modules[0][0].split(".")[0] + "."
        return {n if n.startswith((prefix, "lm_head.")) else prefix + n: t for n, t in tensors.items()}
    looked = ", ".join(f"{n} (or {n}.index.json)" for n in WEIGHT_FILES)
    raise MtnlgError(f"{src}: no weights found (looked for {looked}); add the model's weight files")


def module_map(family: Family, n_layer: int) -> list[ModuleRule]:
    """The family's modules spelled out for a model of `n_layer` layers: (HF module, mtnlg modules, transposed)."""
    return [
        (hf.format(i=i), tuple(n.format(i=i) for n in ours), transposed)
        for hf, ours, transposed in family.modules
        for i in (range(n_layer) if "{i}" in hf else (0,))
    ]


def _tensor_map(family: Family, model: GPT) -> list[ModuleRule]:
    """The family's table spelled out for one model: per layer, per weight and bias it has.

    A tied head is the embedding, so it has no row of its own."""
    have = set(model.state_dict()) - ({"lm_head.weight"} if model.cfg.tie_embeddings else set())
    rows = []
    for hf, ours, transposed in module_map(family, model.cfg.n_layer):
        for kind in ("weight", "bias"):
            names = tuple(f"{n}.{kind}" for n in ours)
            if all(n in have for n in names):
                rows.append((f"{hf}.{kind}", names, transposed and kind == "weight"))
    return rows


def _import_weights(
    family: Family, model: GPT, tensors: dict[str, torch.Tensor], src: Path
) -> dict[str, torch.Tensor]:
    expected = model.state_dict()
    state = {}
    for name, ours, transposed in _tensor_map(family, model):
        if name not in tensors:
            raise MtnlgError(
                f"{src}: tensor {name} is missing from the weights; the files are incomplete "
                f"or config.json does not describe them"
            )
        tensor = tensors.pop(name).float()
        parts = (tensor.t() if transposed else tensor).chunk(len(ours))
        for our_name, part in zip(ours, parts):
            if part.shape != expected[our_name].shape:
                raise MtnlgError(f"{src}: tensor {name} has shape {list(tensor.shape)}, which config.json does not describe")
            state[our_name] = part.clone(memory_format=torch.contiguous_format)  # safetensors refuses shared views
    if model.cfg.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]
        tensors.pop("lm_head.weight", None)  # some files store the tied head a second time
    unexpected = [n for n in tensors if not n.endswith(HF_BUFFERS)]
    if unexpected:
        raise MtnlgError(f"{src}: tensor {unexpected[0]} has no place in mtnlg's model; config.json does not describe it")
    return state


def export_family(cfg: ModelConfig, checkpoint: Path) -> Family:
    """The family whose shape this model has, or an error naming what keeps it out of each."""
    misfits = []
    for family in FAMILIES:
        wrong = [f"{k}={v}" for k, v in family.shape.items() if getattr(cfg, k) != v]
        if cfg.n_kv_head != cfg.n_head and "n_kv_head" not in family.fields.values():
            wrong.append(f"n_kv_head={cfg.n_head}")
        if not wrong:
            return family
        misfits.append(f"{family.architectures[0]} needs {', '.join(wrong)}")
    have = ", ".join(f"{k}={getattr(cfg, k)}" for k in ("norm", "mlp", "position", "bias", "qkv_bias", "qk_norm", "n_kv_head"))
    raise MtnlgError(f"{checkpoint}: the model ({have}) fits no Hugging Face architecture: {'; '.join(misfits)}")


def _special_tokens(tokenizer: Tokenizer) -> tuple[tuple[str | None, int | None], tuple[str, int]]:
    """(bos, eos) as (token, id): eos is the tokenizer's end of document; mtnlg's EOD starts documents too,
    as in GPT-2, while a tokenizer imported from Llama has <s> for that."""
    eos_id = tokenizer.eod_id
    bos = tokenizer.bos_token
    return (bos, tokenizer.token_id(bos) if bos else None), (tokenizer.decode([eos_id]), eos_id)
