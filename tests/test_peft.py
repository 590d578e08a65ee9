"""peft interop: a LoRA run's adapters exported with export_peft give, in peft on the base's Hugging Face
export, the logits mtnlg computes; a peft adapter imported with import_peft gives our model peft's logits and
exports back tensor for tensor; what mtnlg's LoRA cannot hold is refused in one line."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json
import random
import shutil

import pytest
import safetensors.torch
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from mtnlg.checkpoint import load_model
from mtnlg.cli import main
from mtnlg.errors import MtnlgError
from mtnlg.interop.hf import export_hf, import_hf
from mtnlg.interop.peft import export_peft, import_peft
from mtnlg.tokenizer import Tokenizer

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

VOCAB = 300
WORDS = "the model learns to predict the next token from text data with attention over layers and heads".split()
SENTENCE = "The model learns to predict the next token, héllo wörld!"

HF_CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_layer=2, n_embd=32, n_head=4, n_positions=64, initializer_range=0.1
    ),
    "llama": lambda: transformers.LlamaConfig(  # grouped-query attention: k and v narrower than q
        vocab_size=VOCAB, num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=False, initializer_range=0.1,
    ),
}
PEFT_TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"], "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                "up_proj", "down_proj"]}


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train([" ".join(WORDS)] * 20, VOCAB)


@pytest.fixture(scope="module")
def bases(tmp_path_factory, tokenizer):
    """family -> an mtnlg checkpoint imported from a random-weight transformers model."""
    out = {}
    for name, make in HF_CONFIGS.items():
        torch.manual_seed(0)
        hf_dir = tmp_path_factory.mktemp(f"hf-{name}")
        transformers.AutoModelForCausalLM.from_config(make()).save_pretrained(hf_dir)
        tokenizer.save(hf_dir)
        out[name] = import_hf(hf_dir, tmp_path_factory.mktemp(name) / "base")
    return out


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("sft") / "examples.jsonl"
    rows = [{"prompt": " ".join(rng.choices(WORDS, k=6)) + ":", "completion": " " + " ".join(rng.choices(WORDS, k=4))}
            for _ in range(16)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def finetune(base, examples, targets, out):
    """A two-step LoRA run with a large learning rate, so that every B is far from its zero start."""
    with torch.enable_grad():  # under the tests' no_grad
        assert main(["finetune", str(base), "--data", str(examples), "--lora.r", "4", "--lora.targets", targets,
                     f"--train.out_dir={out}", "--train.max_steps=2", "--train.lr=0.05", "--train.warmup_steps=0",
                     "--train.global_batch_size=2", "--train.micro_batch_size=2", "--train.eval_interval=0",
                     "--finetune.val_fraction=0", "--train.tensorboard=false", "--train.progress=false"]) == 0
    return out


def hf_base(base, dst):
    return transformers.AutoModelForCausalLM.from_pretrained(export_hf(base, dst)).eval()


def tokens(tokenizer):
    return torch.tensor([tokenizer.encode(SENTENCE)])


def logits(checkpoint, x):
    return load_model(checkpoint)[0](x)


@torch.no_grad()
@pytest.mark.parametrize("family,targets,c_attn_rank", [
    ("gpt2", "q_proj,v_proj", 8),  # one fused c_attn adapter, B block-diagonal (rank_pattern, alpha_pattern)
    ("gpt2", "q_proj,k_proj,v_proj,o_proj,up_proj,down_proj", 12),  # beside rank-4 Conv1Ds
    ("llama", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head", None),
])
def test_exported_adapter_matches_in_peft(bases, examples, tokenizer, tmp_path, family, targets, c_attn_rank):
    run = finetune(bases[family], examples, targets, tmp_path / "run")
    x = tokens(tokenizer)
    ours = logits(run, x)
    hf_model = hf_base(bases[family], tmp_path / "hf")
    assert (hf_model(x).logits - ours).abs().max() > 1e-2  # the adapters matter
    adapter = export_peft(run, tmp_path / "adapter")
    settings = json.loads((adapter / "adapter_config.json").read_text())
    assert settings["fan_in_fan_out"] is (family == "gpt2")
    if c_attn_rank:
        assert "attn.c_attn" in settings["target_modules"]
        assert settings["rank_pattern"]["transformer.h.1.attn.c_attn"] == c_attn_rank
    theirs = peft.PeftModel.from_pretrained(hf_model, adapter).eval()(x).logits
    diff = (theirs - ours).abs().max().item()
    print(f"max |logit difference| mtnlg vs peft, {family} {targets}: {diff:.2e}")
    assert diff < 1e-5
    again = logits(import_peft(adapter, bases[family], tmp_path / "again"), x)  # ranks padded to the widest
    assert (again - ours).abs().max().item() < 1e-5


def peft_adapter(base, dst, family, targets=None, **options):
    """A peft adapter made with get_peft_model on the base's transformers export, B drawn away from zero."""
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets or PEFT_TARGETS[family], task_type="CAUSAL_LM",
                             fan_in_fan_out=family == "gpt2", **options)
    model = peft.get_peft_model(hf_base(base, dst / "hf"), config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    model.save_pretrained(dst / "adapter")
    return model, dst / "adapter"


@torch.no_grad()
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_peft_adapter_imports_and_exports_back(bases, tokenizer, tmp_path, family):
    model, adapter = peft_adapter(bases[family], tmp_path, family)
    x = tokens(tokenizer)
    checkpoint = import_peft(adapter, bases[family], tmp_path / "ckpt")
    diff = (logits(checkpoint, x) - model(x).logits).abs().max().item()
    print(f"max |logit difference| peft vs imported, {family}: {diff:.2e}")
    assert diff < 1e-5
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["lora"]["r"] == 4 and config["lora"]["alpha"] == 8
    assert config["finetune"]["base"] == str(bases[family].resolve())
    before = safetensors.torch.load_file(adapter / "adapter_model.safetensors")
    after = safetensors.torch.load_file(export_peft(checkpoint, tmp_path / "back") / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@torch.no_grad()
def test_consistent_rank_and_alpha_patterns_import_padded(bases, tokenizer, tmp_path):
    """q at rank 8 with alpha 16 scales as the rest (rank 4, alpha 8): one r (8) and alpha (16) hold them all;
    the layer the adapter leaves alone gets zeros."""
    model, adapter = peft_adapter(bases["llama"], tmp_path, "llama", rank_pattern={"q_proj": 8},
                                  alpha_pattern={"q_proj": 16}, layers_to_transform=[1])
    x = tokens(tokenizer)
    checkpoint = import_peft(adapter, bases["llama"], tmp_path / "ckpt")
    assert (logits(checkpoint, x) - model(x).logits).abs().max().item() < 1e-5
    lora = json.loads((checkpoint / "config.json").read_text())["lora"]
    assert (lora["r"], lora["alpha"]) == (8, 16)


def edited(adapter, dst, tensors=lambda t: t, **settings):
    """A copy of a peft adapter folder with some settings, or its tensors, changed."""
    shutil.copytree(adapter, dst)
    path = dst / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **settings}))
    weights = dst / "adapter_model.safetensors"
    safetensors.torch.save_file(tensors(safetensors.torch.load_file(weights)), weights)
    return dst


def test_what_mtnlg_lora_cannot_hold_is_refused_in_one_line(bases, examples, tmp_path):
    llama, gpt2 = bases["llama"], bases["gpt2"]
    _, adapter = peft_adapter(llama, tmp_path / "llama", "llama")
    (tmp_path / "empty").mkdir()
    weightless = edited(adapter, tmp_path / "weightless")
    (weightless / "adapter_model.safetensors").unlink()
    cases = [
        (tmp_path / "empty", llama, "no adapter_config.json"),
        (weightless, llama, "no adapter_model.safetensors"),
        (edited(adapter, tmp_path / "ia3", peft_type="IA3"), llama, "peft_type is IA3"),
        (edited(adapter, tmp_path / "rslora", use_rslora=True), llama, "use_rslora"),
        (edited(adapter, tmp_path / "dora", use_dora=True), llama, "use_dora"),
        (edited(adapter, tmp_path / "bias", bias="all"), llama, 'bias = "all"'),
        (edited(adapter, tmp_path / "fused", lambda t: {k.replace("0.self_attn.q_proj", "0.self_attn.qkv"): v
                                                        for k, v in t.items()}),
         llama, "self_attn.qkv, which .* has no LoRA counterpart"),
        (edited(adapter, tmp_path / "narrow", lambda t: {k: v[:, 1:].clone() if "lora_A" in k else v
                                                         for k, v in t.items()}),
         llama, r"down_proj has shapes \[4, 63\] and \[32, 4\], but .* needs \[4, 64\]"),
        (peft_adapter(llama, tmp_path / "embed", "llama", ["embed_tokens"])[1], llama, "embed_tokens.lora_embedding_A"),
        (peft_adapter(llama, tmp_path / "uneven", "llama", rank_pattern={"q_proj": 8})[1], llama, "one alpha / r"),
        (peft_adapter(gpt2, tmp_path / "gpt2", "gpt2")[1], llama, "is for a GPT2LMHeadModel"),
        (adapter, gpt2, "is for a LlamaForCausalLM"),
    ]
    run = finetune(llama, examples, "q_proj", tmp_path / "run")
    cases.append((adapter, run, "holds LoRA adapters itself"))
    for source, base, message in cases:
        with pytest.raises(MtnlgError, match=message) as error:
            import_peft(source, base, tmp_path / "dst")
        assert "\n" not in str(error.value)
    with pytest.raises(MtnlgError, match="holds no LoRA adapters .* mtnlg export hf"):
        export_peft(llama, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


def test_cli(bases, tmp_path, capsys):
    _, adapter = peft_adapter(bases["llama"], tmp_path, "llama")
    assert main(["import", "peft", str(adapter), str(tmp_path / "ckpt")]) == 1
    assert "import peft needs --base" in capsys.readouterr().err
    assert main(["import", "hf", str(tmp_path / "hf"), str(tmp_path / "ckpt"), "--base", str(bases["llama"])]) == 1
    assert "--base is for import peft" in capsys.readouterr().err
    assert main(["import", "peft", str(adapter), str(tmp_path / "ckpt"), "--base", str(bases["llama"])]) == 0
    assert main(["export", "peft", str(tmp_path / "ckpt"), str(tmp_path / "back")]) == 0
    assert (tmp_path / "back" / "adapter_model.safetensors").is_file()
