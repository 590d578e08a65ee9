import pytest

from mtnlg.errors import MtnlgError
from mtnlg.tokenizer import EOD, Tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 20,
    "def add(a, b):\n    return a + b\n" * 10,
    "Pack my box with five dozen liquor jugs!\n" * 10,
]
UNICODE = "Crème brûlée 🍮 costs 5€ — 日本語のテキスト, 한국어, Ελληνικά\n\tdone.  " + "<|endoftext|>\r\n👍🏽\u200b\x00"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(TEXTS, vocab_size=400)


def test_train_is_deterministic(tok):
    again = Tokenizer.train(TEXTS, vocab_size=400)
    assert again.vocab_size == tok.vocab_size <= 400
    assert again.encode(UNICODE) == tok.encode(UNICODE)


def test_round_trip_unicode(tok):
    for text in [UNICODE, "", " leading space", "trailing  \n\n", *TEXTS]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch([UNICODE, TEXTS[0]]) == [tok.encode(UNICODE), tok.encode(TEXTS[0])]


def test_eod_is_one_special_token(tok):
    assert tok.eod_id is not None
    assert tok.encode(EOD) == [tok.eod_id]
    assert tok.encode("a" + EOD + "b")[1:-1] == [tok.eod_id]
    assert tok.decode([tok.eod_id]) == EOD


def test_save_load_round_trip(tok, tmp_path):
    path = tok.save(tmp_path / "tok")
    assert path == tmp_path / "tok" / "tokenizer.json"
    assert not list(path.parent.glob("*.tmp"))
    for source in (path, path.parent):
        loaded = Tokenizer.load(source)
        assert loaded.encode(UNICODE) == tok.encode(UNICODE)
        assert loaded.vocab_size == tok.vocab_size and loaded.eod_id == tok.eod_id


def test_load_gpt2_vocab_and_merges(tok, tmp_path):
    tok._tok.model.save(str(tmp_path))  # writes vocab.json + merges.txt, as GPT-2 ships them
    loaded = Tokenizer.load(tmp_path)
    assert loaded.encode(UNICODE) == tok.encode(UNICODE)
    assert loaded.decode(loaded.encode(UNICODE)) == UNICODE
    assert loaded.encode(EOD) == [loaded.eod_id] == [tok.eod_id]


def test_eod_added_when_missing(tmp_path):
    import tokenizers

    bare = tokenizers.Tokenizer(tokenizers.models.BPE())
    bare.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bare.train_from_iterator(TEXTS, trainer)
    tok = Tokenizer(bare)
    size = tok.vocab_size
    assert tok.eod_id == size and tok.vocab_size == size + 1
    assert tok.encode(EOD) == [tok.eod_id]


def test_load_errors(tmp_path):
    with pytest.raises(MtnlgError, match="tokenizer.json"):
        Tokenizer.load(tmp_path / "nowhere")
    with pytest.raises(MtnlgError, match="vocab.json"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(MtnlgError, match="not a valid tokenizer.json"):
        Tokenizer.load(tmp_path)


def test_vocab_too_small():
    with pytest.raises(MtnlgError, match="too small"):
        Tokenizer.train(TEXTS, vocab_size=100)


def test_an_imported_end_token_serves_as_eod_without_growing_the_vocab():
    import tokenizers
    from tokenizers import models, pre_tokenizers

    from mtnlg.tokenizer import Tokenizer

    tok = tokenizers.Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "</s>": 2}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    llama_like = Tokenizer(tok)
    assert (llama_like.eod_id, llama_like.vocab_size) == (2, 3)
