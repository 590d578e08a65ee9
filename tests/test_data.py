import json
import threading
from collections import Counter

import numpy as np
import pytest
import torch

from mtnlg.data.corpus import build_default_corpus
from mtnlg.data.indexed import IndexedDataset, IndexedDatasetWriter, dtype_for_vocab
from mtnlg.data.loader import BatchLoader, BlendedDataset, SampleDataset, build_dataset, parse_blend
from mtnlg.data.prepare import prepare, read_documents
from mtnlg.errors import MtnlgError
from mtnlg.tokenizer import Tokenizer

DOCS = [
    f"Document {i}: {word} — naïve café, 東京 {i * 7}, emoji 🎉.\n" + "Some more words here. " * (i % 5)
    for i, word in enumerate(["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"] * 4)
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(DOCS, vocab_size=350)


def write_jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


def decoded(tok, prefix):
    """The documents of a shard as text, checking that each ends in EOD."""
    data = IndexedDataset(prefix)
    docs = [data[i] for i in range(len(data))]
    assert all(d[-1] == tok.eod_id for d in docs)
    return [tok.decode(d[:-1]) for d in docs]


def check_split(tok, stats, docs):
    train, val = (decoded(tok, p) for p in stats["outputs"])
    assert train and val
    assert Counter(train + val) == Counter(docs)
    # each split keeps input order
    assert train == [d for d in docs if d in train] and val == [d for d in docs if d in val]
    assert stats["documents"] == len(docs)
    assert (stats["train_documents"], stats["val_documents"]) == (len(train), len(val))
    assert stats["train_tokens"] == sum(len(tok.encode(d)) + 1 for d in train)


# ---- prepare ----------------------------------------------------------------------------------------------


def test_prepare_txt_round_trip(tok, tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    for i, doc in enumerate(DOCS[:6]):
        (corpus / ("sub" if i % 2 else ".") / f"{i:02d}.txt").write_text(doc, encoding="utf-8")
    stats = prepare([corpus], tmp_path / "out", tok, val_fraction=0.3, progress=False)
    check_split(tok, stats, [(corpus / ("sub" if i % 2 else ".") / f"{i:02d}.txt").read_text() for i in (0, 2, 4)]
                + [DOCS[i] for i in (1, 3, 5)])
    assert stats["outputs"] == [f"{tmp_path / 'out'}_train", f"{tmp_path / 'out'}_val"]


def test_prepare_jsonl_round_trip(tok, tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", DOCS)
    path.write_text(path.read_text(encoding="utf-8") + "\n\n", encoding="utf-8")  # blank lines are fine
    stats = prepare([path], tmp_path / "out", tok, val_fraction=0.2, progress=False)
    check_split(tok, stats, DOCS)
    assert stats["skipped_lines"] == 0


def test_split_is_seeded(tok, tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", DOCS)
    vals = [decoded(tok, prepare([path], tmp_path / f"o{seed}", tok, seed=seed, val_fraction=0.3,
                                 progress=False)["outputs"][1]) for seed in (1, 1, 2)]
    assert vals[0] == vals[1] != vals[2]


def test_each_split_gets_a_document(tok, tmp_path):
    path = write_jsonl(tmp_path / "two.jsonl", DOCS[:2])
    for fraction in (0.001, 0.999):
        stats = prepare([path], tmp_path / "out", tok, val_fraction=fraction, progress=False)
        assert stats["train_documents"] == stats["val_documents"] == 1
    one = write_jsonl(tmp_path / "one.jsonl", DOCS[:1])
    with pytest.raises(MtnlgError, match="at least 2 documents"):
        prepare([one], tmp_path / "one", tok, progress=False)
    stale = IndexedDatasetWriter(tmp_path / "one_val", 100)
    stale.close()
    stats = prepare([one], tmp_path / "one", tok, val_fraction=0, progress=False)
    assert (stats["train_documents"], stats["val_documents"]) == (1, 0)
    assert stats["outputs"] == [f"{tmp_path / 'one'}_train"]
    assert sorted(p.name for p in tmp_path.glob("one_*")) == ["one_train.bin", "one_train.idx"]


def test_workers_give_identical_shards(tok, tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", DOCS * 5)
    outs = [prepare([path], tmp_path / f"w{w}", tok, workers=w, progress=False)["outputs"] for w in (1, 2)]
    for one, two in zip(*outs):
        for ext in (".bin", ".idx"):
            assert open(one + ext, "rb").read() == open(two + ext, "rb").read()


def test_malformed_jsonl(tok, tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [json.dumps({"text": d}) for d in DOCS[:4]]
    lines[1], lines[2] = "{broken", json.dumps({"body": "no text key"})
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(MtnlgError, match=r"data.jsonl:2: invalid JSON.*--on-bad-line skip"):
        prepare([path], tmp_path / "out", tok, progress=False)
    assert not list(tmp_path.glob("out*"))  # nothing half-written
    stats = prepare([path], tmp_path / "out", tok, on_bad_line="skip", progress=False)
    assert stats["skipped_lines"] == 2 and stats["documents"] == 2
    skipped = []
    assert list(read_documents(path, on_bad_line="skip", skipped=skipped)) == [DOCS[0], DOCS[3]]
    assert skipped[1].endswith("data.jsonl:3: no string field 'text'")


def test_prepare_input_errors(tok, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    write_jsonl(tmp_path / "blank.jsonl", ["", ""])
    (tmp_path / "notes.md").write_text("hi")
    cases = [
        ([tmp_path / "missing.txt"], "no such file"),
        ([tmp_path / "notes.md"], "pass .txt or .jsonl"),
        ([tmp_path / "empty.txt", tmp_path / "blank.jsonl"], "no text found"),
        ([tmp_path / "nothing"], "no such file"),
    ]
    for inputs, message in cases:
        with pytest.raises(MtnlgError, match=message):
            prepare(inputs, tmp_path / "out", tok, progress=False)
    assert not list(tmp_path.glob("out*"))


# ---- indexed shards -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab_size, dtype", [(65536, np.uint16), (65537, np.uint32), (200_000, np.uint32)])
def test_writer_dtype(tmp_path, vocab_size, dtype):
    assert dtype_for_vocab(vocab_size) == dtype
    docs = [[0, 1, vocab_size - 1], [], [5]]
    with IndexedDatasetWriter(tmp_path / "s", vocab_size) as w:
        for d in docs:
            w.add_document(d)
    data = IndexedDataset(tmp_path / "s")
    assert data.dtype == dtype and data.tokens.dtype == dtype
    assert len(data) == 3 and [data[i].tolist() for i in range(3)] == docs and data[-1].tolist() == [5]
    assert data.offsets.tolist() == [0, 3, 3, 4]


def test_writer_discards_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(tmp_path / "s", 100) as w:
            w.add_document([1, 2])
            raise RuntimeError
    assert list(tmp_path.iterdir()) == []


def test_corrupt_shards(tmp_path):
    with pytest.raises(MtnlgError, match="no such token shard.*mtnlg prepare"):
        IndexedDataset(tmp_path / "s")
    with IndexedDatasetWriter(tmp_path / "s", 100) as w:
        w.add_document(range(10))
    bin_path, idx_path = tmp_path / "s.bin", tmp_path / "s.idx"
    bin_path.write_bytes(bin_path.read_bytes()[:-2])
    with pytest.raises(MtnlgError, match="s.bin.*re-run `mtnlg prepare`"):
        IndexedDataset(tmp_path / "s")
    idx_path.write_bytes(b"NOTMAGIC" + idx_path.read_bytes()[8:])
    with pytest.raises(MtnlgError, match="s.idx.*re-run `mtnlg prepare`"):
        IndexedDataset(tmp_path / "s")


# ---- loader -----------------------------------------------------------------------------------------------


def stream_shard(prefix, n_tokens, first=0, doc_len=37):
    """A shard whose token stream is first, first + 1, ..., split into documents of doc_len."""
    tokens = np.arange(first, first + n_tokens)
    with IndexedDatasetWriter(prefix, 65536) as w:
        for start in range(0, n_tokens, doc_len):
            w.add_document(tokens[start : start + doc_len])
    return IndexedDataset(prefix)


def test_samples_are_contiguous_windows(tmp_path):
    seq_len = 16
    ds = SampleDataset(stream_shard(tmp_path / "s", 1000), seq_len, seed=0)
    assert len(ds) == 999 // 16
    for epoch in range(2):
        samples = [ds.sample(epoch * len(ds) + j) for j in range(len(ds))]
        assert all(s.dtype == np.int64 and len(s) == seq_len + 1 for s in samples)
        assert all((np.diff(s) == 1).all() for s in samples)
        assert sorted(s[0] for s in samples) == list(range(0, len(ds) * seq_len, seq_len))
    first_epoch = [ds.sample(j)[0] for j in range(len(ds))]
    assert first_epoch != [ds.sample(len(ds) + j)[0] for j in range(len(ds))]


def test_order_depends_on_seed(tmp_path):
    data = stream_shard(tmp_path / "s", 1000)
    orders = [[SampleDataset(data, 8, seed).sample(j)[0] for j in range(50)] for seed in (3, 3, 4)]
    assert orders[0] == orders[1] != orders[2]


def test_too_few_tokens(tmp_path):
    data = stream_shard(tmp_path / "s", 16)
    with pytest.raises(MtnlgError, match="only 16 tokens, need at least 17.*max_seq_len"):
        SampleDataset(data, 16, seed=0)


def test_batch_loader_resumes_exactly(tmp_path):
    ds = SampleDataset(stream_shard(tmp_path / "s", 300), 8, seed=0)  # 37 samples: batches cross epochs
    straight = BatchLoader(ds)
    expected = [straight.next_batch(5) for _ in range(12)]
    x, y = expected[0].inputs, expected[0].targets
    assert x.shape == y.shape == (5, 8) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and expected[0].positions is None and expected[0].loss_tokens == 40

    first = BatchLoader(SampleDataset(ds.data, 8, seed=0))
    for _ in range(7):
        first.next_batch(5)
    state = first.state_dict()
    assert state == {"consumed_samples": 35}
    resumed = BatchLoader(SampleDataset(ds.data, 8, seed=0))
    resumed.load_state_dict(state)
    for want in expected[7:]:
        got = resumed.next_batch(5)
        assert torch.equal(got.inputs, want.inputs) and torch.equal(got.targets, want.targets)


@pytest.mark.parametrize("weights", [(0.7, 0.3), (0.5, 0.3, 0.2), (5, 1)])
def test_blend_proportions(tmp_path, weights):
    datasets = [SampleDataset(stream_shard(tmp_path / f"d{k}", 500, first=10_000 * k), 8, seed=k)
                for k in range(len(weights))]
    blend = BlendedDataset(datasets, weights)
    n = 10_000
    counts = Counter(int(blend.sample(i)[0]) // 10_000 for i in range(n))
    for k, w in enumerate(weights):
        assert abs(counts[k] / n - w / sum(weights)) < 0.02
    again = BlendedDataset(datasets, weights)
    assert all((again.sample(i) == blend.sample(i)).all() for i in range(0, n, 97))


def test_blend_is_fast():
    import time

    blend = BlendedDataset([None, None, None], [0.5, 0.3, 0.2])
    start = time.perf_counter()
    blend._grow(100_000)
    assert time.perf_counter() - start < 1.0
    assert np.bincount(blend._which).tolist() == [50_000, 30_000, 20_000]


def test_parse_blend():
    assert parse_blend("data/web") == [(1.0, "data/web")]
    assert parse_blend(" 0.7 a\n0.3 b ") == [(0.7, "a"), (0.3, "b")]
    for spec, message in [("0.7 a 0.3", "3 words"), ("", "0 words"), ("x a 0.3 b", "not a weight"),
                          ("0 a 1 b", "must be positive"), ("-1 a 2 b", "must be positive")]:
        with pytest.raises(MtnlgError, match=message):
            parse_blend(spec)


def test_build_dataset(tmp_path):
    for name in ("a", "b"):
        for split in ("train", "val"):
            stream_shard(tmp_path / f"{name}_{split}", 200)
    single = build_dataset(str(tmp_path / "a"), "val", 8, seed=0)
    assert isinstance(single, SampleDataset) and single.data.prefix == f"{tmp_path / 'a'}_val"
    blend = build_dataset(f"0.6 {tmp_path / 'a'} 0.4 {tmp_path / 'b'}", "train", 8, seed=0)
    assert isinstance(blend, BlendedDataset) and blend.weights == pytest.approx([0.6, 0.4])
    with pytest.raises(MtnlgError, match="c_train: no such token shard"):
        build_dataset(str(tmp_path / "c"), "train", 8, seed=0)


# ---- default corpus ---------------------------------------------------------------------------------------


def test_default_corpus(tmp_path):
    threads = threading.active_count()
    path = build_default_corpus(tmp_path / "corpus" / "python_docs.jsonl")
    assert path.stat().st_size > 500_000
    assert list(path.parent.iterdir()) == [path]
    texts = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(texts) > 100 and all(isinstance(t, str) and t.strip() for t in texts)
    assert len(set(texts)) == len(texts)
    assert threading.active_count() == threads
