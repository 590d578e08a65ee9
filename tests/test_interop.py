"""Hugging Face interop: imported GPT-2 and Llama models reproduce transformers' logits and greedy text,
exports load back in transformers with the same logits and tokens, and a round trip is bit-exact."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json
import re

import pytest
import safetensors.torch
import tokenizers
import torch

transformers = pytest.importorskip("transformers")

from mtnlg.checkpoint import load_model, save_checkpoint
from mtnlg.cli import main
from mtnlg.config import Config, ModelConfig
from mtnlg.errors import MtnlgError
from mtnlg.interop.hf import export_hf, import_hf
from mtnlg.model.gpt import GPT
from mtnlg.model.kv_cache import KVCache
from mtnlg.tokenizer import Tokenizer

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

VOCAB = 300
SENTENCE = "The model learns to predict the next token, héllo wörld!"
TEXTS = [
    "the model learns to predict the next token from text data with attention over layers and heads",
    "training runs on one machine or many while the loss falls slowly as steps pass through batches",
] * 20

HF_CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_layer=2, n_embd=64, n_head=4, n_positions=64, initializer_range=0.1
    ),
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=64, rope_theta=10000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=False, initializer_range=0.1,
    ),
    "llama-tied": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=64, rope_theta=10000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, initializer_range=0.1,
    ),
    "qwen2": lambda: transformers.Qwen2Config(  # biases on q, k and v
        vocab_size=VOCAB, num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=64, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=False, initializer_range=0.1,
    ),
    "qwen3": lambda: transformers.Qwen3Config(  # per-head q and k norms; tied, as Qwen3's small models are
        vocab_size=VOCAB, num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=128, max_position_embeddings=64, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, initializer_range=0.1,
    ),
}


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(TEXTS, VOCAB)


def save_hf(name, path, tokenizer):
    """A random-weight transformers model saved with save_pretrained, our tokenizer.json beside it."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[name]()).eval()
    with torch.no_grad():  # HF starts biases at 0 and norms at 1, which would hide a misplaced one
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    tokenizer.save(path)
    return model, path


@pytest.fixture(scope="module", params=list(HF_CONFIGS))
def hf(request, tmp_path_factory, tokenizer):
    return save_hf(request.param, tmp_path_factory.mktemp(request.param), tokenizer)


@pytest.fixture
def llama_dir(tmp_path, tokenizer):
    return save_hf("llama", tmp_path / "llama", tokenizer)[1]


def tokens(tokenizer):
    return torch.tensor([tokenizer.encode(SENTENCE)])


def greedy(model, prompt, steps=32):
    """Our side of the generation check: prefill, then one token at a time through the KV cache."""
    cache = KVCache(model.cfg, 1, prompt.size(1) + steps, "cpu", torch.float32)
    out = prompt
    logits = model(prompt, cache=cache)
    for _ in range(steps):
        next_token = logits[:, -1].argmax(-1, keepdim=True)
        out = torch.cat([out, next_token], dim=1)
        logits = model(next_token, cache=cache)
    return out


@torch.no_grad()
def test_import_matches_transformers_logits_and_greedy_generation(hf, tokenizer, tmp_path):
    hf_model, src = hf
    model, ours, _ = load_model(import_hf(src, tmp_path / "ckpt"))
    x = tokens(tokenizer)
    assert ours.encode(SENTENCE) == x[0].tolist()
    diff = (model(x) - hf_model(x).logits).abs().max().item()
    print(f"max |logit difference| {src.name}: {diff:.2e}")
    assert diff < 1e-4
    hf_model.generation_config.eos_token_id = None
    hf_model.generation_config.pad_token_id = 0
    prompt = x[:, :16]  # leaves room for 32 new tokens in the 64-position context
    expected = hf_model.generate(prompt, do_sample=False, max_new_tokens=32, use_cache=True)
    assert expected.size(1) == prompt.size(1) + 32
    assert torch.equal(greedy(model, prompt), expected)


@torch.no_grad()
def test_export_loads_in_transformers(hf, tokenizer, tmp_path):
    hf_model, src = hf
    dst = export_hf(import_hf(src, tmp_path / "ckpt"), tmp_path / "hf")
    model, _, _ = load_model(tmp_path / "ckpt")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(dst).eval()
    assert type(loaded) is type(hf_model)
    x = tokens(tokenizer)
    torch.testing.assert_close(loaded(x).logits, model(x), atol=1e-5, rtol=0)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(dst)
    assert hf_tokenizer.encode(SENTENCE) == tokenizer.encode(SENTENCE)
    assert hf_tokenizer.eos_token == "<|endoftext|>"


def test_a_chat_template_travels_through_import_and_export(llama_dir, tmp_path):
    """The checkpoint keeps the HF folder's Jinja template; ours and transformers' render the same ids."""
    template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    (llama_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "bos_token": "<|endoftext|>",
                                                                 "eos_token": "<|endoftext|>"}))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": SENTENCE}]
    source = transformers.AutoTokenizer.from_pretrained(llama_dir)
    _, ours, _ = load_model(import_hf(llama_dir, tmp_path / "ckpt"))
    assert ours.chat_template == template
    assert ours.render_chat(messages) == source.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    exported = transformers.AutoTokenizer.from_pretrained(export_hf(tmp_path / "ckpt", tmp_path / "hf"))
    ids = exported.apply_chat_template(messages, add_generation_prompt=True)
    assert list(getattr(ids, "input_ids", ids)) == ours.encode(ours.render_chat(messages))
    assert exported.eos_token == source.eos_token


def test_import_export_import_is_bit_exact(hf, tmp_path):
    _, src = hf
    first = import_hf(src, tmp_path / "a")
    second = import_hf(export_hf(first, tmp_path / "hf"), tmp_path / "b")
    a = safetensors.torch.load_file(first / "model.safetensors")
    b = safetensors.torch.load_file(second / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("config.json", "tokenizer.json"):
        assert (first / name).read_text() == (second / name).read_text()


@torch.no_grad()
def test_gpt2_as_first_published(tokenizer, tmp_path):
    """openai-community/gpt2's layout: pytorch_model.bin with the base model's names and its mask buffers,
    vocab.json + merges.txt instead of tokenizer.json."""
    hf_model, src = save_hf("gpt2", tmp_path / "hf", tokenizer)
    state = {k.removeprefix("transformer."): v for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    state["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    torch.save(state, src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    (src / "tokenizer.json").unlink()
    tokenizers.Tokenizer.from_file(str(tokenizer.save(tmp_path / "tok"))).model.save(str(src))
    model, ours, _ = load_model(import_hf(src, tmp_path / "ckpt"))
    assert (tmp_path / "ckpt" / "tokenizer.json").is_file()
    assert ours.encode(SENTENCE) == tokenizer.encode(SENTENCE) and ours.vocab_size == tokenizer.vocab_size
    x = tokens(tokenizer)
    assert (model(x) - hf_model(x).logits).abs().max() < 1e-4


@torch.no_grad()
def test_sharded_checkpoint_imports(tokenizer, tmp_path):
    hf_model, _ = save_hf("llama", tmp_path / "one", tokenizer)
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    tokenizer.save(tmp_path / "sharded")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    a = import_hf(tmp_path / "one", tmp_path / "a")
    b = import_hf(tmp_path / "sharded", tmp_path / "b")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


@torch.no_grad()
@pytest.mark.parametrize("preset, architecture", [("tiny", "GPT2LMHeadModel"), ("llama-tiny", "LlamaForCausalLM")])
def test_trained_checkpoint_exports(preset, architecture, tokenizer, tmp_path, capsys):
    torch.manual_seed(0)
    config = Config(model=ModelConfig.from_name(preset))
    model = GPT(config.model).eval()
    save_checkpoint(tmp_path / "ckpt", model, config, tokenizer)
    assert main(["export", "hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    assert capsys.readouterr().out.startswith(f"wrote Hugging Face model {tmp_path / 'hf'}")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(loaded).__name__ == architecture
    x = torch.randint(0, config.model.vocab_size, (2, 24))
    torch.testing.assert_close(loaded(x).logits, model(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(position="rotary"), "GPT2LMHeadModel needs position=learned; LlamaForCausalLM needs norm=rmsnorm"),
        (dict(bias=False), "GPT2LMHeadModel needs bias=True"),
    ],
)
def test_export_refuses_models_no_family_fits(overrides, message, tokenizer, tmp_path):
    config = Config(model=ModelConfig.from_name("tiny", **overrides))
    save_checkpoint(tmp_path / "ckpt", GPT(config.model), config, tokenizer)
    with pytest.raises(MtnlgError, match=message):
        export_hf(tmp_path / "ckpt", tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf.tmp").exists()


def test_mistral_without_sliding_window_imports(llama_dir, tmp_path):
    edit_config(llama_dir, architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=None)
    import_hf(llama_dir, tmp_path / "ckpt")
    edit_config(llama_dir, sliding_window=16)
    with pytest.raises(MtnlgError, match="sliding_window = 16"):
        import_hf(llama_dir, tmp_path / "ckpt2")


def test_qwen3_needs_head_dim_to_be_the_width_per_head(tokenizer, tmp_path):
    """Qwen3 sets head_dim on its own (128 unless given); mtnlg's heads split the width evenly."""
    _, src = save_hf("qwen3", tmp_path / "qwen3", tokenizer)
    config = json.loads((src / "config.json").read_text())
    del config["head_dim"]  # a file without it means transformers' default of 128
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(MtnlgError, match=r"head_dim = 128 is not hidden_size / num_attention_heads \(64 / 4\)"):
        import_hf(src, tmp_path / "ckpt")


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))


def drop_tensor(path, name):
    tensors = safetensors.torch.load_file(path / "model.safetensors")
    del tensors[name]
    safetensors.torch.save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


BROKEN = {  # how a Llama folder is damaged -> what the one-line error must say
    "architecture": (
        lambda p: edit_config(p, architectures=["BertForMaskedLM"]), "architecture BertForMaskedLM is not supported"
    ),
    "missing tensor": (
        lambda p: drop_tensor(p, "model.layers.1.mlp.up_proj.weight"), "tensor model.layers.1.mlp.up_proj.weight is missing"
    ),
    "rope_scaling": (lambda p: edit_config(p, rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling = "),
    "rope_parameters": (
        lambda p: edit_config(p, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
        "rope_parameters = ",
    ),
    "activation": (lambda p: edit_config(p, hidden_act="gelu"), 'hidden_act = "gelu" is not supported'),
    "half the biases": (lambda p: edit_config(p, attention_bias=True), "attention_bias = true but mlp_bias = false"),
    "no config": (lambda p: (p / "config.json").unlink(), "no config.json"),
    "no weights": (lambda p: (p / "model.safetensors").unlink(), "no weights found (looked for model.safetensors"),
    "no tokenizer": (lambda p: (p / "tokenizer.json").unlink(), "looked for tokenizer.json, or vocab.json + merges.txt"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_import_names_what_does_not_map(case, llama_dir, tmp_path, capsys):
    breaks, message = BROKEN[case]
    breaks(llama_dir)
    with pytest.raises(MtnlgError, match=re.escape(message)):
        import_hf(llama_dir, tmp_path / "ckpt")
    assert main(["import", "hf", str(llama_dir), str(tmp_path / "ckpt")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mtnlg import: error: ") and message in err[0]
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "ckpt.tmp").exists()


def test_cli_refuses_to_overwrite_without_force(llama_dir, tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "notes.txt").write_text("keep me")
    assert main(["import", "hf", str(llama_dir), str(tmp_path / "ckpt")]) == 1
    assert "--force" in capsys.readouterr().err
    assert main(["import", "hf", str(llama_dir), str(tmp_path / "ckpt"), "--force"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote mtnlg checkpoint {tmp_path / 'ckpt'} from {llama_dir}"
    assert not (tmp_path / "ckpt" / "notes.txt").exists()
