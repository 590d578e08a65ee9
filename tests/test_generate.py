import pytest
import torch

from mtnlg.errors import MtnlgError
from mtnlg.inference.generate import Sampling, filter_logits, generate_ids, generate_text, stream_text
from mtnlg.train.checkpoint import load_model
from mtnlg.train.trainer import Trainer


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    from mtnlg.config import load_config

    out = tmp_path_factory.mktemp("gen") / "run"
    cfg = load_config(
        None,
        [f"--train.data={tiny_data}", f"--train.out_dir={out}", "--train.max_steps=150", "--train.lr=3e-3", "--train.warmup_steps=10",
         "--train.tensorboard=false", "--train.progress=false", "--train.eval_interval=0"],
    )
    Trainer(cfg).fit()
    return load_model(out)


def test_generation_from_a_trained_checkpoint(trained):
    model, tokenizer, _ = trained
    text = generate_text(model, tokenizer, "The model", Sampling(max_new_tokens=30, temperature=0))
    words = text.split()
    assert len(words) >= 5
    known = set(w.strip(".").lower() for w in " ".join(["the a model learns to predict next token"]).split())
    assert any(w.strip(".").lower() in known for w in words)  # it learned the corpus vocabulary


def test_same_seed_same_text_and_stream_equals_whole(trained):
    model, tokenizer, _ = trained
    params = Sampling(max_new_tokens=20, temperature=1.0, top_p=0.9, seed=7)
    first = generate_text(model, tokenizer, "Training", params)
    assert first == generate_text(model, tokenizer, "Training", params)
    assert "".join(stream_text(model, tokenizer, "Training", params)) == first


def test_greedy_matches_argmax_of_full_forward(trained):
    model, tokenizer, _ = trained
    prompt = tokenizer.encode("The loss falls")
    ids = list(generate_ids(model, prompt, Sampling(max_new_tokens=8, temperature=0)))
    sequence = list(prompt)
    for _ in range(8):
        sequence.append(int(model(torch.tensor([sequence]))[0, -1].argmax()))
    assert ids == sequence[len(prompt) :]


def test_overlong_prompt_is_refused(trained):
    model, _, _ = trained
    with pytest.raises(MtnlgError, match="the prompt has 64 tokens but the model's context is 64"):
        list(generate_ids(model, [1] * 64, Sampling()))


def test_top_k_and_top_p_filtering():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    probs = logits.softmax(-1)[0]  # about .64, .24, .09, .03
    assert probs[0] < 0.7 < probs[0] + probs[1]
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [[False, True, True, True]]
