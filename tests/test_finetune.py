"""Fine-tuning: examples and their loss masks, packing, LoRA (init, merge, adapter-only resume), the verbs and
their errors, and the chat template shared with transformers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mtnlg.checkpoint import STATE_DIR, checkpoint_bytes, find_latest, load_config_file, load_model, tensor_reader
from mtnlg.cli import main
from mtnlg.config import LoraConfig, ModelConfig
from mtnlg.data.batch import IGNORE, Batch, Row
from mtnlg.errors import MtnlgError
from mtnlg.finetune.config import finetune_config
from mtnlg.finetune.data import Examples, segments, tokenize
from mtnlg.finetune.lora import apply_lora, is_adapter, merge_lora, with_new_adapters
from mtnlg.model.gpt import GPT, cross_entropy
from mtnlg.parallel.parallelize import materialize
from mtnlg.tokenizer import DEFAULT_CHAT_TEMPLATE, Tokenizer
from mtnlg.train.metrics import read_metrics
from mtnlg.train.trainer import Trainer

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a model."},
        {"role": "assistant", "content": "The model."}, {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "A layer."}]


@pytest.fixture
def tokenizer(tiny_data) -> Tokenizer:
    return Tokenizer.load(tiny_data.parent)


# -- examples ---------------------------------------------------------------------------------------


def test_chat_replies_are_what_the_template_adds_after_each_generation_prompt(tokenizer):
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    pieces = segments({"messages": CHAT}, "x:1", tokenizer)
    assert "".join(text for text, _ in pieces) == tokenizer.render_chat(CHAT, add_generation_prompt=False)
    assert [text for text, trained in pieces if trained] == [" The model.\n", " A layer.\n"]
    assert pieces[0] == (tokenizer.render_chat(CHAT[:2]), False)  # the prompt `mtnlg chat` and the server send
    alpaca = segments({"instruction": "Add.", "input": "1 2", "output": "3"}, "x:2", tokenizer)
    assert alpaca == [("User: Add.\n\n1 2\nAssistant:", False), (" 3\n", True)]
    assert segments({"prompt": "a", "completion": " b"}, "x:3", tokenizer) == [("a", False), (" b", True)]


def test_only_responses_and_the_end_are_trained(tokenizer):
    (row,) = tokenize([[("The model", False), (" learns", True)]], tokenizer, train_on_prompt=False)
    prompt, response = tokenizer.encode("The model"), tokenizer.encode(" learns")
    assert row.tokens.tolist() == prompt + response + [tokenizer.eod_id]
    assert row.trained.tolist() == [False] * len(prompt) + [True] * (len(response) + 1)
    (everything,) = tokenize([[("The model", False), (" learns", True)]], tokenizer, train_on_prompt=True)
    assert everything.trained.all()


def test_masked_tokens_add_nothing_to_the_loss_or_its_gradient():
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_name("tiny"), seed=1)
    tokens = torch.randint(0, 512, (2, 17)).numpy()
    trained = np.zeros((2, 17), bool)
    trained[:, 9:] = True
    batch = Batch.collate([Row(t, m) for t, m in zip(tokens, trained)])
    assert batch.loss_tokens == 2 * 8 and (batch.targets[:, :8] == IGNORE).all()
    logits = model(batch.inputs)
    logits.retain_grad()
    loss = cross_entropy(logits, batch.targets, batch.loss_tokens)
    loss.backward()
    per_token = torch.nn.functional.cross_entropy(logits[:, 8:].flatten(0, 1), batch.targets[:, 8:].flatten())
    torch.testing.assert_close(loss, per_token, rtol=1e-6, atol=0)
    assert (logits.grad[:, :8] == 0).all() and (logits.grad[:, 8:].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_packed_examples_do_not_attend_across_examples(preset):
    """Two examples packed in one row lose exactly what each loses in a padded row of its own."""
    model = GPT(ModelConfig.from_name(preset), seed=1).eval()
    rng = np.random.default_rng(0)
    examples = [Row(rng.integers(0, 512, n), rng.random(n) < 0.6) for n in (21, 30)]
    packed = Examples(examples, seq_len=63, seed=0, packing=True)
    padded = Examples(examples, seq_len=63, seed=0, packing=False)
    one_row = Batch.collate([packed.sample(0)])
    two_rows = Batch.collate([padded.sample(0), padded.sample(1)])
    assert one_row.inputs.shape == (1, 50) and two_rows.inputs.shape == (2, 29)
    assert one_row.loss_tokens == two_rows.loss_tokens
    with torch.no_grad():
        packed_loss = cross_entropy(model(one_row.inputs, **one_row.model_inputs()), one_row.targets, 1)
        padded_loss = cross_entropy(model(two_rows.inputs), two_rows.targets, 1)
        leaking = cross_entropy(model(one_row.inputs), one_row.targets, 1)  # the plain causal mask
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-6, atol=0)
    assert abs(leaking - padded_loss) > 1e-3


def test_examples_are_shuffled_per_epoch_and_cut_to_fit():
    rows = [Row(np.arange(n), np.ones(n, bool)) for n in (5, 7, 40, 9)]
    data = Examples(rows, seq_len=15, seed=3, packing=True)
    assert data.cut == 1
    first_epoch = [data.sample(i).tokens.tolist() for i in range(3)]
    again = Examples(rows, seq_len=15, seed=3, packing=True)
    assert [again.sample(i).tokens.tolist() for i in range(3)] == first_epoch  # a pure function of (seed, index)
    assert all(len(data.sample(i).tokens) <= 16 for i in range(20))


# -- LoRA -------------------------------------------------------------------------------------------


def _adapted(preset: str, lora: LoraConfig, seed: int = 5) -> tuple[GPT, GPT]:
    base = GPT(ModelConfig.from_name(preset), seed=1).eval()
    with torch.device("meta"):
        model = GPT(base.cfg)
    apply_lora(model, lora)
    weights = base.state_dict()
    materialize(model, torch.device("cpu"), with_new_adapters(lambda _, name: weights[name], seed))
    return base, model.eval()


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_lora_at_init_is_the_base_model_and_merges_exactly(preset):
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"] + (["gate_proj", "lm_head"] if preset != "tiny" else [])
    base, model = _adapted(preset, LoraConfig(r=4, alpha=8, targets=targets))
    tokens = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        assert torch.equal(model(tokens), base(tokens))  # B starts at zero
        adapters = {n: p for n, p in model.named_parameters() if is_adapter(n)}
        per_layer = [t for t in targets if t != "lm_head"]
        assert len(adapters) == 2 * (2 * len(per_layer) + ("lm_head" in targets))  # A and B; 2 layers
        assert all(p.requires_grad for p in adapters.values())
        assert not any(p.requires_grad for n, p in model.named_parameters() if not is_adapter(n))
        for name, p in adapters.items():
            if name.endswith("lora_B"):
                p.normal_(std=0.05)
        assert (model(tokens) - base(tokens)).abs().max() > 1e-3
        # In float64, so that what is compared is the merge, not fp32's summation order (1.4e-6 apart here).
        adapted = model.double()(tokens)
        merged = merge_lora(model)(tokens)
    assert not any(is_adapter(n) for n, _ in model.named_parameters())
    assert (merged - adapted).abs().max() < 1e-6


def test_new_adapters_are_kaiming_uniform_a_and_zero_b():
    _, model = _adapted("tiny", LoraConfig(r=8, targets=["q_proj"]))
    a, b = model.blocks["0"].attn.q_proj.lora_A, model.blocks["0"].attn.q_proj.lora_B
    bound = 1 / 64**0.5
    assert a.shape == (8, 64) and b.shape == (64, 8) and (b == 0).all()
    assert a.abs().max() <= bound and a.abs().max() > 0.8 * bound and a.std() > 0.5 * bound / 3**0.5
    _, again = _adapted("tiny", LoraConfig(r=8, targets=["q_proj"]))
    assert torch.equal(again.blocks["0"].attn.q_proj.lora_A, a)  # drawn per (seed, name)


@pytest.mark.parametrize(
    "lora, message",
    [
        (dict(r=4, targets=["gate_proj"]), "this model has no gate_proj layers; its linear layers are q_proj, k_proj"),
        (dict(r=4, targets=["lm_head"]), "lm_head shares its weight with the token embedding"),
    ],
)
def test_targets_the_base_lacks_are_refused(lora, message):
    with pytest.raises(MtnlgError, match=message):
        _adapted("tiny", LoraConfig(**lora))


def test_unknown_target_is_refused():
    with pytest.raises(MtnlgError, match="lora.targets: unknown module 'query'; choose among q_proj, k_proj"):
        LoraConfig(r=4, targets=["query"])


# -- the trainer: fine-tuning runs, resume, the verbs -----------------------------------------------


def _finetune(base, data, out_dir, *extra: str):
    return finetune_config(str(base), str(data), None, [
        "--train.max_steps=4", "--train.global_batch_size=4", "--train.micro_batch_size=2", "--train.warmup_steps=1",
        "--train.eval_interval=2", "--train.eval_batches=1", "--train.save_interval=2", "--train.tensorboard=false",
        "--train.progress=false", f"--train.out_dir={out_dir}", "--train.lr=1e-2", *extra,
    ])


def _saved_names(checkpoint) -> list[str]:
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(checkpoint / STATE_DIR).read_metadata().state_dict_metadata
    return [k.removeprefix("model.") for k in metadata if k.startswith("model.")]


@pytest.mark.parametrize("lora", [("--lora.r=4", "--lora.targets=q_proj,v_proj,down_proj"), ()], ids=["lora", "full"])
def test_fine_tuning_resumes_bit_exactly_and_lora_saves_only_adapters(tiny_bases, sft_data, tmp_path, lora):
    Trainer(_finetune(tiny_bases(), sft_data, tmp_path / "a", *lora)).fit()
    Trainer(_finetune(tiny_bases(), sft_data, tmp_path / "b", *lora, "--train.max_steps=2")).fit()
    resumed = Trainer(_finetune(tiny_bases(), sft_data, tmp_path / "b", *lora), resume=True)
    assert resumed.step == 2
    resumed.fit()
    losses = [{r["step"]: r["loss"] for r in read_metrics(tmp_path / run) if "loss" in r} for run in ("a", "b")]
    assert losses[0] == losses[1] and len(losses[0]) == 4 and losses[0][4] < losses[0][1]
    final = [find_latest(tmp_path / run / "checkpoints") for run in ("a", "b")]
    names = _saved_names(final[0])
    assert all(torch.equal(tensor_reader(final[0])(n), tensor_reader(final[1])(n)) for n in names)
    config = load_config_file(final[0])
    size = sum(f.stat().st_size for f in (final[0] / STATE_DIR).iterdir())
    assert abs(size / checkpoint_bytes(config.model, lora=config.lora) - 1) < 0.1  # what mtnlg finetune announces
    if lora:
        assert len(names) == 2 * 3 * 2 and all(is_adapter(n) for n in names)  # the base's weights are not saved again
        assert size < checkpoint_bytes(config.model) / 4


def test_the_loss_weighs_every_trained_token_alike_however_the_batch_is_cut(tiny_bases, sft_data, tmp_path):
    """Micro-batches hold different numbers of trained tokens: the step's loss is still per trained token of
    the whole batch, so one micro-batch or four give the same losses."""
    runs = [Trainer(_finetune(tiny_bases(), sft_data, tmp_path / str(m), f"--train.micro_batch_size={m}",
                              "--finetune.packing=false")) for m in (4, 1)]
    losses = [[run.train_step()[0] for _ in range(3)] for run in runs]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


def test_finetune_merge_export_and_the_chat_template_shared_with_transformers(tiny_bases, tmp_path, capsys):
    """LoRA on chat data installs the default template; generate reads the adapters, merge folds them in,
    and the exported model's apply_chat_template gives the ids our render gives."""
    transformers = pytest.importorskip("transformers")
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": CHAT}) + "\n" for _ in range(6)))
    run = tmp_path / "run"
    assert main(["finetune", str(tiny_bases()), "--data", str(data), "--lora.r=2", f"--train.out_dir={run}",
                 "--train.max_steps=2", "--train.global_batch_size=2", "--train.micro_batch_size=2",
                 "--train.tensorboard=false", "--train.progress=false", "--train.lr=1e-2"]) == 0
    out = capsys.readouterr().out
    assert "fine-tuning on 5 examples (1 held out for validation; 5 cut to model.max_seq_len 64)" in out
    assert "(the adapters and their optimizer state)" in out
    adapted, tokenizer, config = load_model(run)
    assert config.lora.r == 2 and tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    assert main(["merge", str(run), str(tmp_path / "merged")]) == 0
    merged, _, merged_config = load_model(tmp_path / "merged")
    assert merged_config.lora.r == 0 and (tmp_path / "merged" / "model.safetensors").is_file()
    tokens = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens), adapted(tokens), rtol=0, atol=0)
    assert main(["export", "hf", str(tmp_path / "merged"), str(tmp_path / "hf")]) == 0
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = hf_tokenizer.apply_chat_template(CHAT[:4], add_generation_prompt=True)
    assert list(getattr(ids, "input_ids", ids)) == tokenizer.encode(tokenizer.render_chat(CHAT[:4]))


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "a", "completion": "b"', r"examples.jsonl:2: invalid JSON"),
        ('{"text": "a"}', r"examples.jsonl:2: not a fine-tuning example; expected Alpaca"),
        ('{"instruction": "a", "output": 3}', r"examples.jsonl:2: 'output' must be a string"),
        ('{"messages": [{"role": "user", "content": "a"}]}', r"examples.jsonl:2: the conversation has no assistant"),
    ],
)
def test_a_malformed_example_is_named_by_file_and_line(tiny_bases, tmp_path, capsys, line, message):
    data = tmp_path / "examples.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n' + line + "\n")
    assert main(["finetune", str(tiny_bases()), "--data", str(data), f"--train.out_dir={tmp_path / 'run'}"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert __import__("re").search(message, err)
    assert not (tmp_path / "run").exists()


def test_lora_needs_a_base_and_a_lora_checkpoint_needs_its_base(tiny_config, tiny_bases, sft_data, tmp_path):
    with pytest.raises(MtnlgError, match="lora.r > 0 trains adapters on a base model"):
        Trainer(tiny_config("--lora.r=4"))
    Trainer(_finetune(tiny_bases(), sft_data, tmp_path / "run", "--lora.r=2", "--train.max_steps=1")).fit()
    checkpoint = find_latest(tmp_path / "run" / "checkpoints")
    config = json.loads((checkpoint / "config.json").read_text())
    config["finetune"]["base"] = str(tmp_path / "gone")
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(MtnlgError, match=r"holds LoRA adapters for the base model .*gone .*which is not there"):
        load_model(checkpoint)
    with pytest.raises(MtnlgError, match="holds LoRA adapters, not a whole model; mtnlg merge"):
        main_error = __import__("mtnlg.checkpoint", fromlist=["consolidate"]).consolidate
        main_error(checkpoint)
    assert load_config_file(checkpoint).lora.r == 2


def test_mistakes_in_a_fine_tuning_config_are_one_line_errors(tiny_bases, sft_data, tmp_path):
    Trainer(_finetune(tiny_bases(), sft_data, tmp_path / "run", "--lora.r=2", "--train.max_steps=1")).fit()
    with pytest.raises(MtnlgError, match=r"cannot resume .*lora.r: checkpoint 2, config 4"):
        Trainer(_finetune(tiny_bases(), sft_data, tmp_path / "run", "--lora.r=4"), resume=True)
    with pytest.raises(MtnlgError, match=r"holds LoRA adapters, not a whole model; mtnlg merge it"):
        Trainer(_finetune(tmp_path / "run", sft_data, tmp_path / "again"))
    with pytest.raises(MtnlgError, match=r"pos_emb.weight is \[64, 64\] in the base model .* but \[128, 64\]"):
        Trainer(_finetune(tiny_bases(), sft_data, tmp_path / "longer", "--model.max_seq_len=128"))
    toml = tmp_path / "ft.toml"
    toml.write_text(f'[finetune]\ndata = "{tmp_path / "elsewhere.jsonl"}"\n[lora]\nr = 2\n')
    config = finetune_config(str(tiny_bases()), str(sft_data), toml, [])
    assert config.finetune.data == str(sft_data) and config.lora.r == 2 and config.train.lr == 2e-4  # --data wins


def test_validation_never_takes_every_example_and_an_untrainable_set_is_refused(tokenizer, tmp_path):
    from mtnlg.config import FinetuneConfig
    from mtnlg.finetune.data import examples

    data = tmp_path / "two.json"  # a .json array
    data.write_text(json.dumps([{"prompt": "a b", "completion": " c"}, {"prompt": "d", "completion": " e"}]))
    train, val = examples(FinetuneConfig(data=str(data), val_fraction=0.9), tokenizer, 16, seed=0)
    assert len(train.examples) == 1 and len(val.examples) == 1
    long_prompt = {"prompt": "the model " * 40, "completion": " learns"}
    data.write_text(json.dumps([long_prompt] * 3))
    with pytest.raises(MtnlgError, match="no example has a response within model.max_seq_len"):
        examples(FinetuneConfig(data=str(data), val_fraction=0), tokenizer, 16, seed=0)
