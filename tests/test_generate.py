import math
from pathlib import Path

import pytest
import torch

import mtnlg
from mtnlg.cli import main
from mtnlg.config import ModelConfig
from mtnlg.errors import MtnlgError
from mtnlg.hardware import inference_dtype, this_cpu
from mtnlg.inference.engine import safe_length
from mtnlg.inference.generate import Sampling, generate, score, stream
from mtnlg.inference.sampling import filter_logits, penalize
from mtnlg.model.kv_cache import KVCache
from mtnlg.tokenizer import Tokenizer
from mtnlg.train.trainer import Trainer
from conftest import synthetic_documents

PROMPTS = ["The model", "Training runs on one machine or many while the loss", "A"]


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory) -> Path:
    """A tiny model trained on the synthetic corpus: what the generation and quality tests run."""
    from mtnlg.config import load_config

    out = tmp_path_factory.mktemp("gen") / "run"
    cfg = load_config(
        None,
        [f"--train.data={tiny_data}", f"--train.out_dir={out}", "--train.max_steps=150", "--train.lr=3e-3",
         "--train.warmup_steps=10", "--train.tensorboard=false", "--train.progress=false", "--train.eval_interval=0"],
    )
    Trainer(cfg).fit()
    return out


@pytest.fixture(scope="module")
def lm(trained):
    return mtnlg.load(trained, "cpu", dtype="fp32")


def greedy(lm, prompts, **kw):
    return lm.generate(prompts, temperature=0, max_new_tokens=kw.pop("max_new_tokens", 12), **kw)


def test_generation_from_a_trained_checkpoint(lm):
    # past the first sentence: a model of this corpus may end the document after one
    text = greedy(lm, "The model", max_new_tokens=30, ignore_eos=True)[0].text
    words = [w.strip(".").lower() for w in text.split()]
    assert len(words) >= 5 and set(words) & {"the", "a", "model", "learns", "to", "predict", "loss"}


def test_greedy_matches_argmax_of_full_forward(lm):
    prompt = lm.tokenizer.encode("The loss falls")
    ids = greedy(lm, "The loss falls", max_new_tokens=8)[0].token_ids
    sequence = list(prompt)
    for _ in range(8):
        sequence.append(int(lm.model(torch.tensor([sequence]))[0, -1].argmax()))
    assert ids == sequence[len(prompt) :]


def test_a_prompt_generates_the_same_alone_and_in_a_mixed_batch(lm):
    together = greedy(lm, PROMPTS, max_new_tokens=16)
    assert len({len(lm.tokenizer.encode(p)) for p in PROMPTS}) == 3  # really mixed lengths
    for prompt, completion in zip(PROMPTS, together):
        assert greedy(lm, prompt, max_new_tokens=16)[0].token_ids == completion.token_ids
    sampled = lm.generate(PROMPTS, max_new_tokens=16, seed=3, temperature=1.0)
    assert lm.generate(PROMPTS[1], max_new_tokens=16, seed=3, temperature=1.0)[0].text == sampled[1].text


def test_seeds_reproduce_and_n_samples_differ(lm):
    first = lm.generate("Training", max_new_tokens=20, top_p=0.9, seed=7)[0].text
    assert lm.generate("Training", max_new_tokens=20, top_p=0.9, seed=7)[0].text == first
    samples = lm.generate(["Training", "The"], max_new_tokens=20, top_p=0.9, seed=7, n=3)
    assert [c.index for c in samples] == [0, 0, 0, 1, 1, 1]
    assert samples[0].text == first and len({c.text for c in samples[:3]}) > 1


def test_stop_strings_and_stop_ids(lm):
    free = greedy(lm, "The model", max_new_tokens=30, ignore_eos=True)[0]
    stop = free.text.split()[2]
    cut = greedy(lm, "The model", max_new_tokens=30, stop=[stop], ignore_eos=True)[0]
    assert cut.finish_reason == "stop" and cut.text == free.text[: free.text.find(stop)]
    assert "".join(lm.stream("The model", temperature=0, max_new_tokens=30, stop=[stop], ignore_eos=True)) == cut.text
    first = free.token_ids[0]
    stopped = greedy(lm, "The model", stop_token_ids=[first])[0]
    assert (stopped.text, stopped.token_ids, stopped.finish_reason) == ("", [], "stop")
    assert free.finish_reason == "length" and len(free.token_ids) == 30


def test_echo_logprobs_and_score_agree(lm):
    # score() reads each text as a document start, after EOD: prompt the same way to compare
    c = greedy(lm, "<|endoftext|>The model", max_new_tokens=6, echo=True, logprobs=3, ignore_eos=True)[0]
    assert c.text.startswith("<|endoftext|>The model") and len(c.logprobs) == len(c.top_logprobs) == 6
    for chosen, top in zip(c.logprobs, c.top_logprobs):
        assert len(top) == 3 and chosen == pytest.approx(max(top.values()))
    prompt_ids = lm.tokenizer.encode("The model")
    scored = lm.score(lm.tokenizer.decode(prompt_ids + c.token_ids))[0]
    assert scored.token_ids == prompt_ids + c.token_ids
    torch.testing.assert_close(torch.tensor(scored.logprobs[len(prompt_ids) :]), torch.tensor(c.logprobs), atol=1e-4, rtol=0)
    assert scored.total == pytest.approx(sum(scored.logprobs)) and scored.total < 0


def test_score_batches_texts_of_different_lengths(lm):
    texts = ["The model learns.", "A", "Loss falls slowly as steps pass through batches of samples."]
    together = score(lm.model, lm.tokenizer, texts)
    for text, s in zip(texts, together):
        alone = score(lm.model, lm.tokenizer, [text])[0]
        torch.testing.assert_close(torch.tensor(s.logprobs), torch.tensor(alone.logprobs), atol=1e-5, rtol=0)


def _rows_per_forward(lm):
    """Batch sizes the model sees, recorded until the returned hook is removed."""
    rows = []
    hook = lm.model.register_forward_pre_hook(lambda module, args: rows.append(args[0].size(0)))
    return rows, hook


def test_many_prompts_run_batch_size_sequences_at_a_time(lm):
    prompts = PROMPTS + ["Loss", "The model learns to"]
    rows, hook = _rows_per_forward(lm)
    batched = lm.generate(prompts, batch_size=4, max_new_tokens=6, seed=5, n=2, ignore_eos=True)
    hook.remove()
    assert max(rows) == 4  # 10 sequences, never more than 4 at once (each finished one's slot is refilled)
    together = lm.generate(prompts, max_new_tokens=6, seed=5, n=2, ignore_eos=True)
    assert [c.index for c in batched] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert [(c.index, c.token_ids) for c in batched] == [(c.index, c.token_ids) for c in together]
    texts = prompts + ["Steps pass."]
    rows, hook = _rows_per_forward(lm)
    scored = lm.score(texts, batch_size=4)
    hook.remove()
    assert rows == [4, 2]
    for a, b in zip(scored, lm.score(texts)):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
    with pytest.raises(MtnlgError, match="batch size 0 is not positive"):
        lm.generate("The", batch_size=0)


def test_overlong_prompts_are_refused_or_truncated(lm):
    long = "the model " * 60
    with pytest.raises(MtnlgError, match=r"the prompt has \d+ tokens but the model's context is 64"):
        lm.generate(long)
    c = greedy(lm, long, max_new_tokens=10, truncate=True, ignore_eos=True)[0]
    assert c.prompt_tokens == 54 and len(c.token_ids) == 10


def test_presence_penalty_stops_repeats(lm):
    ids = greedy(lm, "The model", max_new_tokens=20, presence_penalty=1e4, ignore_eos=True)[0].token_ids
    assert len(set(ids)) == len(ids) == 20
    assert len(set(greedy(lm, "The model", max_new_tokens=20, ignore_eos=True)[0].token_ids)) < 20


def test_penalties_by_hand():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    counts = torch.tensor([[2.0, 0.0, 1.0, 0.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = penalize(logits, Sampling(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25), counts, seen)
    assert out.tolist() == [[2.0 / 2 - 0.5 - 0.5, -4.0, 1.0 - 0.5 - 0.25, 0.5]]


def test_top_k_top_p_min_p_filtering():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]])  # probabilities about .64, .24, .09, .03
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [[False, True, True, True]]
    assert torch.isinf(filter_logits(logits, min_p=0.1)).tolist() == [[False, False, False, True]]
    with pytest.raises(MtnlgError, match="0 < top_p <= 1"):
        Sampling(top_p=0)


class TableModel(torch.nn.Module):
    """A stand-in model whose next-token log-probabilities come from a table: by the last token, or
    (script mode) by the number of tokens generated so far."""

    def __init__(self, vocab: int, table: torch.Tensor, prompt_len: int = 0, scripted: bool = False):
        super().__init__()
        self.cfg = ModelConfig.from_name("tiny", vocab_size=vocab)
        self.table = torch.nn.Parameter(table, requires_grad=False)
        self.prompt_len, self.scripted = prompt_len, scripted

    def forward(self, tokens, positions=None, cache=None, last_only=False):
        positions = cache.begin(tokens.size(1))
        if self.scripted:
            logits = self.table[(positions - (self.prompt_len - 1)).clamp(0, len(self.table) - 1)]
        else:
            logits = self.table[tokens]
        logits = cache.last(logits) if last_only else logits
        cache.advance()
        return logits


def _five(*taken):
    return [t for t in range(300, 320) if t not in taken][:5]


def test_beam_search_finds_the_best_sequence_greedy_misses(tiny_data):
    tokenizer = Tokenizer.load(tiny_data.parent)
    V, (P,) = 512, tokenizer.encode("A")
    A, B, X, Y, Z = _five(P, tokenizer.eod_id)
    table = torch.full((V, V), -30.0)
    table[[X, Y, Z], tokenizer.eod_id] = 0.0  # after two tokens the text ends
    table[P, [A, B]] = torch.tensor([0.6, 0.4]).log()
    table[A, [X, Y, Z]] = torch.tensor([0.4, 0.3, 0.3]).log()
    table[B, [X, Y]] = torch.tensor([0.9, 0.1]).log()
    model = TableModel(V, table.log_softmax(-1))
    prompt = tokenizer.decode([P])
    assert tokenizer.encode(prompt) == [P]
    greedy_ids = generate(model, tokenizer, [prompt], Sampling(temperature=0, max_new_tokens=5))[0].token_ids
    assert greedy_ids == [A, X]  # 0.6 * 0.4 = 0.24
    beams = generate(model, tokenizer, [prompt], Sampling(num_beams=2, n=2, max_new_tokens=5, length_penalty=0))
    assert [b.token_ids for b in beams] == [[B, X], [A, X]]  # 0.4 * 0.9 = 0.36 beats 0.24
    assert beams[0].finish_reason == "stop"


def test_streaming_never_splits_a_character(tiny_data):
    tokenizer = Tokenizer.load(tiny_data.parent)
    target = "héllo 🙂 wörld ✓"
    script = tokenizer.encode(target)
    assert any("\ufffd" in tokenizer.decode([t]) for t in script)  # some character spans tokens
    table = torch.full((len(script) + 1, 512), -30.0)
    table[torch.arange(len(script)), script] = 0.0
    table[len(script), tokenizer.eod_id] = 0.0
    prompt = tokenizer.encode("A")
    model = TableModel(512, table, prompt_len=len(prompt), scripted=True)
    params = Sampling(temperature=0, max_new_tokens=40)
    deltas = list(stream(model, tokenizer, "A", params))
    assert "".join(deltas) == target == generate(model, tokenizer, ["A"], params)[0].text
    assert all("\ufffd" not in d for d in deltas) and len(deltas) > 3


def test_partial_stop_strings_are_held_back():
    assert safe_length("abc STO", ["STOP"]) == 4
    assert safe_length("abc \ufffd", []) == 4
    assert safe_length("abc", ["STOP"]) == 3


@pytest.mark.skipif(not this_cpu().packed_linear, reason="this CPU has no packed path (x86 with AVX2 and oneDNN)")
def test_packed_cpu_inference_matches_the_plain_model(tiny_data):
    import copy

    from mtnlg.inference.cpu import PackedLinear, Slice, pack_for_cpu_inference
    from mtnlg.model.gpt import GPT

    torch.manual_seed(0)
    for name in ("tiny", "llama-tiny"):
        plain = GPT(ModelConfig.from_name(name)).eval()
        packed = pack_for_cpu_inference(copy.deepcopy(plain))
        attn, mlp = packed.blocks["0"].attn, packed.blocks["0"].mlp
        assert isinstance(attn.q_proj, Slice) and attn.q_proj.packed[0] is attn.v_proj.packed[0]  # one q/k/v product
        assert isinstance(attn.o_proj, PackedLinear) and isinstance(packed.lm_head, PackedLinear)
        assert isinstance(mlp.up_proj, Slice if name == "llama-tiny" else PackedLinear)
        x = torch.randint(0, 512, (3, 20))
        with torch.no_grad():
            torch.testing.assert_close(packed(x), plain(x), atol=1e-5, rtol=1e-5)
            # with a cache, one token at a time (the decode path), against the plain model's full forward
            cache = KVCache(plain.cfg, 3, 20, "cpu", torch.float32)
            steps = torch.cat([packed(x[:, :12], cache=cache)] + [packed(x[:, i : i + 1], cache=cache) for i in range(12, 20)], 1)
            torch.testing.assert_close(steps, plain(x), atol=1e-5, rtol=1e-5)


@pytest.fixture
def checkpoint(tiny_data, tmp_path):
    """A random llama-tiny checkpoint."""
    from mtnlg.checkpoint import save_checkpoint
    from mtnlg.config import Config
    from mtnlg.model.gpt import GPT

    torch.manual_seed(0)
    plain = GPT(ModelConfig.from_name("llama-tiny")).eval()
    return save_checkpoint(tmp_path / "ckpt", plain, Config(model=plain.cfg), Tokenizer.load(tiny_data.parent))


@pytest.mark.skipif(not this_cpu().bf16, reason=f"this CPU has no bf16 path: it lacks {this_cpu().missing_bf16()}")
def test_bf16_weights_for_inference(checkpoint):
    """bf16 packing halves the bytes a decode step reads; logits stay within bf16's precision of fp32; auto
    takes it on this CPU."""
    plain = mtnlg.load(checkpoint, "cpu", dtype="fp32").model
    packed = mtnlg.load(checkpoint, "cpu", dtype="bf16").model
    assert packed.lm_head.weight.dtype == torch.bfloat16
    x = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        got, want = packed(x), plain(x)
    assert got.dtype == torch.float32
    assert 0 < (got - want).abs().max() < 0.02 * want.abs().max()
    lm = mtnlg.load(checkpoint, "cpu")
    assert lm.model.lm_head.weight.dtype == torch.bfloat16
    assert len(lm.generate("The model", max_new_tokens=8, temperature=0, ignore_eos=True)[0].token_ids) == 8


def test_cpus_without_bf16_refuse_it_and_auto_takes_fp32(checkpoint, cap_cpu):
    from mtnlg.inference.cpu import PackedLinear

    cap_cpu("AVX2")
    with pytest.raises(MtnlgError, match=r"bf16 weights need bf16 instructions \(AVX512_BF16, AMX-BF16 or AVX-NE-CONVERT\)"):
        mtnlg.load(checkpoint, "cpu", dtype="bf16")
    lm = mtnlg.load(checkpoint, "cpu")
    assert isinstance(lm.model.lm_head, PackedLinear) and lm.model.lm_head.weight.dtype == torch.float32
    assert len(lm.generate("The model", max_new_tokens=8, temperature=0, ignore_eos=True)[0].token_ids) == 8
    with pytest.raises(MtnlgError, match="dtype 'fp16' is not one of: auto, fp32, bf16, int8"):
        mtnlg.load(checkpoint, dtype="fp16")


@pytest.mark.skipif(not this_cpu().int8, reason="this CPU has no int8 path (FBGEMM needs x86 with AVX2)")
def test_int8_weights_for_inference(checkpoint):
    """int8 weights read a quarter of the matrix bytes. FBGEMM quantizes each product's input too, so the
    logits move more than bf16's: measured within 5% of the largest logit here (a random model, whose
    logits are all close) and 1.6% on the trained demo model, whose validation perplexity moves by 0.04%
    (docs/benchmarks.md); the tolerance below is twice the measured."""
    from mtnlg.inference.cpu import PackedLinear

    plain = mtnlg.load(checkpoint, "cpu", dtype="fp32").model
    lm = mtnlg.load(checkpoint, "cpu", dtype="int8")
    assert isinstance(lm.model.lm_head, PackedLinear) and lm.model.lm_head.dtype == torch.int8
    assert lm.model.lm_head.nbytes < 0.3 * plain.lm_head.weight.numel() * 4
    x = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        got, want = lm.model(x), plain(x)
    assert got.dtype == torch.float32 and 0 < (got - want).abs().max() < 0.1 * want.abs().max()
    assert len(lm.generate("The model", max_new_tokens=8, temperature=0, ignore_eos=True)[0].token_ids) == 8


@pytest.mark.skipif(not this_cpu().int8, reason="this CPU has no int8 path (FBGEMM needs x86 with AVX2)")
def test_int8_perplexity_is_within_1_percent_of_fp32(trained):
    """The quality cost of int8 weights, on held-out text (sentences of documents of another seed) of a
    trained model."""
    texts = [sentence for document in synthetic_documents(30, seed=1) for sentence in document.split(". ")]
    perplexity = {}
    for dtype in ("fp32", "int8"):
        lm = mtnlg.load(trained, "cpu", dtype=dtype)
        scored = lm.score(texts)
        perplexity[dtype] = math.exp(-sum(s.total for s in scored) / sum(len(s.logprobs) for s in scored))
    print(f"held-out perplexity fp32 {perplexity['fp32']:.4f}, int8 {perplexity['int8']:.4f}")
    assert perplexity["fp32"] < lm.model.cfg.vocab_size / 2  # it learned something: uniform is the vocabulary size
    assert abs(perplexity["int8"] / perplexity["fp32"] - 1) < 0.01


def test_int8_needs_fbgemm_on_one_cpu_process(checkpoint, cap_cpu, capsys):
    cap_cpu("AVX")
    with pytest.raises(MtnlgError, match=r"int8 weights run only on x86 with AVX2 and FBGEMM"):
        mtnlg.load(checkpoint, "cpu", dtype="int8")
    assert main(["generate", str(checkpoint), "--prompt", "The", "--dtype", "int8", "--max-new-tokens", "2"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "int8 weights run only on" in err[0]
    with pytest.raises(MtnlgError, match=r"int8 weights run only on one process \(tp 1\)"):
        inference_dtype("int8", torch.device("cpu"), packed=False)


def test_cpus_without_the_packed_path_run_plain_linears(checkpoint, cap_cpu):
    """Below AVX2 (and on ARM) the model stays plain nn.Linear, and greedy decoding gives the tokens the packed
    model gives."""
    params = dict(max_new_tokens=12, temperature=0, ignore_eos=True)
    packed = mtnlg.load(checkpoint, "cpu", dtype="fp32").generate(["The model", "A"], **params)
    cap_cpu("AVX")
    lm = mtnlg.load(checkpoint, "cpu")
    assert all(type(m) is torch.nn.Linear for m in (lm.model.lm_head, lm.model.blocks["0"].attn.q_proj))
    with pytest.raises(MtnlgError, match=r"bf16 weights need oneDNN's packed products"):
        mtnlg.load(checkpoint, "cpu", dtype="bf16")
    assert [c.token_ids for c in lm.generate(["The model", "A"], **params)] == [c.token_ids for c in packed]
