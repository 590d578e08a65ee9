"""The continuous-batching engine: sequences joining and leaving a running batch, chunked prompts, cancels."""

import pytest
import torch

from mtnlg.config import ModelConfig
from mtnlg.inference.engine import Engine, Request
from mtnlg.inference.generate import Sampling, generate
from mtnlg.inference.sampling import seeded_generators
from mtnlg.model.gpt import GPT
from mtnlg.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(ModelConfig.from_name("llama-tiny", max_seq_len=128)).eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_data):
    return Tokenizer.load(tiny_data.parent)


def prompts(count: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 500, (int(torch.randint(1, 60, (), generator=g)),), generator=g).tolist() for _ in range(count)]


def alone(model, tokenizer, prompt: list[int], params: Sampling) -> list[int]:
    return generate(model, tokenizer, [prompt], params, batch_size=1)[0].token_ids


def run(engine: Engine, arrivals: dict[int, list[Request]]) -> int:
    """Step until done, adding arrivals[k] before step k; returns the steps taken."""
    step = 0
    while engine.has_work() or any(k >= step for k in arrivals):
        for r in arrivals.get(step, []):
            engine.add(r)
        engine.step()
        step += 1
    return step


def test_sequences_joining_a_running_batch_decode_as_they_would_alone(model, tokenizer):
    """Greedy and seeded sampling: the same tokens whatever else runs, with prompts read in small chunks
    and requests arriving while others decode."""
    params = [Sampling(max_new_tokens=20, temperature=0, ignore_eos=True),
              Sampling(max_new_tokens=20, temperature=0.9, top_k=50, seed=3, ignore_eos=True)]
    engine = Engine(model, tokenizer, max_num_seqs=4, token_budget=24)  # long prompts take several steps
    requests = [Request(p, params[i % 2], seeded_generators(model, params[i % 2], 1)[0]) for i, p in enumerate(prompts(10))]
    run(engine, {3 * i: [r] for i, r in enumerate(requests)})
    for request in requests:
        assert request.finish == "length"
        assert request.ids == alone(model, tokenizer, request.prompt, request.params)
    assert all(s is None for s in engine.slots) and (engine.cache.lengths <= 128).all()


def test_each_step_decodes_first_then_reads_prompts_within_the_budget(model, tokenizer):
    engine = Engine(model, tokenizer, max_num_seqs=3, token_budget=10)
    params = Sampling(max_new_tokens=50, temperature=0, ignore_eos=True)
    short, long = Request([5, 6], params, torch.Generator()), Request(list(range(1, 41)), params, torch.Generator())
    engine.add(short)
    engine.step()  # reads the short prompt and chooses its first token
    engine.add(long)
    for k in range(4):  # 40 prompt tokens at 10 - 1 per step, while the short one keeps decoding
        engine.step()
        assert len(short.ids) == 2 + k
        assert long.read == min(40, 9 * (k + 1))
    engine.step()
    assert long.read == 40 and len(long.ids) == 1


def test_a_cancelled_sequence_frees_its_slot_at_the_next_step(model, tokenizer):
    engine = Engine(model, tokenizer, max_num_seqs=1)
    params = Sampling(max_new_tokens=100, temperature=0, ignore_eos=True)
    first, second = Request([1, 2, 3], params, torch.Generator()), Request([4, 5], params, torch.Generator())
    engine.add(first)
    engine.add(second)
    engine.step()
    assert engine.slots == [first] and list(engine.waiting) == [second]
    first.cancelled = True
    changed = engine.step()
    assert first in changed and first.finish == "cancelled" and engine.slots == [second]
    assert second.ids == alone(model, tokenizer, [4, 5], params)[:1]


def test_echo_with_logprobs_scores_the_prompt_across_chunks(model, tokenizer):
    """Prompt log-probabilities gathered chunk by chunk equal one plain forward's."""
    prompt = prompts(1, seed=5)[0] + list(range(10, 40))
    request = Request(prompt, Sampling(max_new_tokens=0, echo=True, logprobs=2), torch.Generator())
    engine = Engine(model, tokenizer, max_num_seqs=2, token_budget=7)
    run(engine, {0: [request]})
    with torch.no_grad():
        expected = model(torch.tensor([prompt]))[0, :-1].log_softmax(-1).gather(-1, torch.tensor(prompt[1:])[:, None])[:, 0]
    assert request.prompt_logprobs[0] is None and request.ids == [] and request.finish == "length"
    torch.testing.assert_close(torch.tensor(request.prompt_logprobs[1:]), expected, atol=1e-5, rtol=0)
    # the top alternatives, keyed by text as OpenAI's shape has it (two tokens may decode alike)
    for top, logprob in zip(request.prompt_top[1:], request.prompt_logprobs[1:]):
        assert 1 <= len(top) <= 2 and max(top.values()) >= logprob - 1e-6


def test_a_full_context_ends_with_length(model, tokenizer):
    engine = Engine(model, tokenizer, max_num_seqs=2)
    request = Request(list(range(1, 121)), Sampling(max_new_tokens=50, temperature=0, ignore_eos=True), torch.Generator())
    run(engine, {0: [request]})
    assert len(request.ids) == 128 - 120 and request.finish == "length"
    with pytest.raises(ValueError, match="does not fit"):
        engine.add(Request(list(range(1, 129)), Sampling(), torch.Generator()))


def test_a_prompt_that_starts_like_a_finished_one_reuses_its_slot_and_reads_only_the_rest(model, tokenizer):
    """A shared preamble is read once: the next request takes the slot holding it, and decodes exactly as
    it would from scratch."""
    preamble, params = list(range(100, 160)), Sampling(max_new_tokens=8, temperature=0, ignore_eos=True)
    engine = Engine(model, tokenizer, max_num_seqs=3)
    first = Request(preamble + [7, 8, 9], params, torch.Generator())
    run(engine, {0: [first]})
    second = Request(preamble + [11, 12], params, torch.Generator())
    engine.add(second)
    engine.step()
    assert second.slot == first.slot and engine.reused == 60 and second.read == 62
    run(engine, {})
    assert second.ids == alone(model, tokenizer, second.prompt, params)
    exact = Engine(model, tokenizer, max_num_seqs=3, reuse_prefixes=False)
    run(exact, {0: [Request(preamble + [7], params, torch.Generator())], 20: [Request(preamble + [5], params, torch.Generator())]})
    assert exact.reused == 0
    scored = Request(preamble + [11, 12], Sampling(max_new_tokens=0, echo=True, logprobs=0), torch.Generator())
    run(engine, {0: [scored]})  # prompt log-probabilities need the whole prompt read
    assert engine.reused == 60 and len(scored.prompt_logprobs) == 62
