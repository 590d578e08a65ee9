"""`mtnlg embed` and `mtnlg search`: the index a collection becomes, the vectors the server would give, search
order, the log-likelihood rerank, retrieval metrics, and one-line errors."""

import json
import time

import numpy as np
import pytest
import torch
from conftest import WORDS, synthetic_documents
from test_cli import assert_user_error, run

import mtnlg
from mtnlg.defaults import RERANK_WEIGHT
from mtnlg.inference.embed import embed
from mtnlg.search import (
    COSINE_TEMPERATURE, RERANK_PROMPT, Index, _shared_prefix, build_index, evaluate_retrieval, read_passages,
    rerank_prompt, retrieve,
)

CHUNK = 48


@pytest.fixture(scope="module")
def checkpoint(tiny_data, tmp_path_factory):
    from mtnlg.checkpoint import save_checkpoint
    from mtnlg.config import Config, ModelConfig
    from mtnlg.model.gpt import GPT
    from mtnlg.tokenizer import Tokenizer

    model = GPT(ModelConfig.from_name("tiny", max_seq_len=256), seed=3)
    return save_checkpoint(tmp_path_factory.mktemp("search") / "tiny", model, Config(model=model.cfg),
                           Tokenizer.load(tiny_data.parent))


@pytest.fixture(scope="module")
def lm(checkpoint):
    return mtnlg.load(checkpoint, "cpu", dtype="fp32")


LONG = " ".join(WORDS * 4)  # about 140 tokens: cut into pieces of CHUNK


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("collection")
    docs = synthetic_documents(12, seed=9)
    (folder / "notes.txt").write_text("\n\n".join(docs[:6]) + "\n\n\n" + LONG + "\n")
    (folder / "more.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs[6:])))
    return [folder / "notes.txt", folder / "more.jsonl"]


@pytest.fixture(scope="module")
def index(checkpoint, files, tmp_path_factory):
    return build_index(checkpoint, files, tmp_path_factory.mktemp("out") / "index", chunk_tokens=CHUNK, dtype="fp32")


def test_the_index_holds_every_passage_once_with_a_unit_vector(index, files, lm, checkpoint):
    loaded = Index.load(index.directory)
    rows = [json.loads(line) for line in (index.directory / "passages.jsonl").read_text().splitlines()]
    info = json.loads((index.directory / "index.json").read_text())
    assert info == {"checkpoint": str(checkpoint.resolve()), "pooling": "mean", "dimension": 64,
                    "count": len(rows), "chunk_tokens": CHUNK, "dtype": "fp32"}
    assert loaded.vectors.dtype == np.float32 and loaded.vectors.shape == (len(rows), 64)
    np.testing.assert_allclose(np.linalg.norm(loaded.vectors, axis=1), 1, atol=1e-5)
    assert set(rows[0]) == {"text", "source", "line", "chunk", "metadata"}
    assert sorted({r["line"] for r in rows if r["source"] == str(files[0])}) == [1, 3, 5, 7, 9, 11, 14]
    assert {r["line"]: r["metadata"] for r in rows if r["source"] == str(files[1])} == {i + 1: {"id": i} for i in range(6)}

    pieces = [r for r in rows if (r["source"], r["line"]) == (str(files[0]), 14)]  # LONG, after six paragraphs and two blank lines
    assert [p["chunk"] for p in pieces] == list(range(len(pieces))) and len(pieces) >= 3
    assert "".join(p["text"] for p in pieces) == LONG
    assert all(len(lm.tokenizer.encode(p["text"])) <= CHUNK for p in pieces)
    assert all(p["text"].startswith(" ") for p in pieces[1:])  # cut between words
    assert len({(r["source"], r["line"]) for r in rows}) == len(read_passages(files))


def test_vectors_are_what_the_server_and_embed_give(index, lm):
    from fastapi.testclient import TestClient

    from mtnlg.serve.app import Settings, create_app

    texts = [p.text for p in index.passages[:5]]
    direct = embed(lm.model, [lm.tokenizer.encode(t) for t in texts])
    np.testing.assert_allclose(index.vectors[:5], direct, atol=1e-6)
    one = lm.model(torch.tensor([lm.tokenizer.encode(texts[0])]), hidden=True)[0].mean(0)
    np.testing.assert_allclose(direct[0], torch.nn.functional.normalize(one, dim=0).detach().numpy(), atol=1e-5)
    with TestClient(create_app(Settings(name="m"), lambda: lm)) as client:
        while client.get("/health").status_code != 200:
            time.sleep(0.05)
        served = client.post("/v1/embeddings", json={"input": texts, "encoding_format": "float"}).json()["data"]
    np.testing.assert_allclose([d["embedding"] for d in served], index.vectors[:5], atol=1e-5)


def test_a_passages_own_text_finds_it_first(index, lm, capsys):
    target = index.passages[7]
    piece = next(row for row, p in enumerate(index.passages) if p.chunk == 1)  # cut from a longer passage
    hits = retrieve(index, lm, [target.text, index.passages[piece].text, "the loss falls"], k=6)
    assert [found[0].row for found in hits[:2]] == [7, piece]
    assert [found[0].score for found in hits[:2]] == pytest.approx([1, 1], abs=1e-5)
    for found in hits:
        assert len(found) == 6 and all(a.score >= b.score for a, b in zip(found, found[1:]))
    code, out, _ = run(capsys, "search", index.directory, target.text, "-k", "3")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 4 and lines[0] == f"query: {target.text}"
    assert lines[1].startswith("   1. 1.0000  ") and f"{target.source}:{target.line}" in lines[1]


def test_rerank_adds_the_querys_log_likelihood_to_the_cosine(index, lm):
    query = "the model learns attention"
    cosine = retrieve(index, lm, [query], k=8)[0]
    reranked = retrieve(index, lm, [query], k=8, rerank=True, rerank_top=8)[0]
    assert {h.row for h in reranked} == {h.row for h in cosine}
    for hit in reranked:
        prompt = RERANK_PROMPT.format(hit.passage.text)
        expected = lm.score(prompt + query + '"')[0].logprobs[len(lm.tokenizer.encode(prompt)):]
        assert hit.loglik == pytest.approx(np.mean(expected), abs=1e-4)
    fused = [h.score / COSINE_TEMPERATURE + RERANK_WEIGHT * h.loglik for h in reranked]
    assert fused == sorted(fused, reverse=True)
    top3 = retrieve(index, lm, [query], k=3, rerank=True, rerank_top=8)[0]
    assert [h.row for h in top3] == [h.row for h in reranked[:3]]
    by_cosine = retrieve(index, lm, [query], k=8, rerank=True, rerank_top=8, rerank_weight=0)[0]
    assert [h.row for h in by_cosine] == [h.row for h in cosine]
    by_loglik = retrieve(index, lm, [query], k=8, rerank=True, rerank_top=8, rerank_weight=1e6)[0]
    assert [h.row for h in by_loglik] == [h.row for h in sorted(reranked, key=lambda h: -h.loglik)]

    assert _shared_prefix([5, 6, 7, 8], [5, 6, 7]) == 3  # the query's tokens start after the prompt's
    assert _shared_prefix([5, 6, 9, 8], [5, 6, 7]) == 2  # or at the one its closing quote merged into

    prompt = rerank_prompt(lm.tokenizer, LONG, query, 80)  # the passage is cut from the right to fit
    assert prompt.endswith('" is a good search result for "') and len(lm.tokenizer.encode(prompt + query + '"')) <= 80


def test_recall_and_mrr_of_labelled_queries(index, lm, tmp_path, capsys):
    passages = [p.text for p in index.passages[:6]]
    pairs = [(text, text) for text in passages[:3]] + [(text.split(".")[0], text) for text in passages[3:]]
    for rerank in (False, True):
        metrics = evaluate_retrieval(index, lm, pairs, k=10, rerank=rerank, rerank_top=10)
        recalls = [metrics[f"recall@{k}"] for k in (1, 5, 10)]
        assert all(0 <= v <= 1 for v in [*recalls, metrics["mrr"]]) and recalls == sorted(recalls)
        assert recalls[0] <= metrics["mrr"] <= recalls[-1] and metrics["queries"] == 6 and metrics["not_in_index"] == 0
    assert evaluate_retrieval(index, lm, pairs[:3])["recall@1"] == 1
    labelled = tmp_path / "queries.jsonl"
    labelled.write_text("".join(json.dumps({"query": q, "passage": p}) + "\n" for q, p in pairs))
    code, out, _ = run(capsys, "search", index.directory, "--queries", labelled, "-k", "5")
    assert code == 0 and out.splitlines()[0] == "6 queries, by cosine similarity"
    assert out.splitlines()[1].startswith("recall@1 ") and "recall@5 " in out and "mrr " in out


def test_bad_inputs_get_one_line(checkpoint, index, tmp_path, capsys):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n   \n")
    out = tmp_path / "idx"
    assert_user_error(capsys, "nothing to index: ", "embed", checkpoint, blank, "--output", out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    assert_user_error(capsys, "bad.jsonl:2: invalid JSON", "embed", checkpoint, bad, "--output", out)
    assert_user_error(capsys, "missing.txt: no such file", "embed", checkpoint, tmp_path / "missing.txt", "--output", out)
    (tmp_path / "doc.pdf").write_text("x")
    assert_user_error(capsys, "unsupported file", "embed", checkpoint, tmp_path / "doc.pdf", "--output", out)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    assert_user_error(capsys, "exists and is not a search index", "embed", checkpoint, blank, "--output", tmp_path / "other")
    assert not out.exists() and (tmp_path / "other" / "keep.txt").exists()
    assert_user_error(capsys, f"{tmp_path}: no search index; build one with mtnlg embed", "search", tmp_path, "hello")
    assert_user_error(capsys, "not both or neither", "search", index.directory)
    assert_user_error(capsys, "pass --rerank too", "search", index.directory, "hello", "--rerank-top", "5")
    assert_user_error(capsys, "--rerank-weight must be 0 or more", "search", index.directory, "hello", "--rerank",
                      "--rerank-weight", "-1")

    good = tmp_path / "good.txt"
    good.write_text("first passage\n\nsecond passage\n")
    for _ in range(2):  # an index is replaced
        code, stdout, _ = run(capsys, "embed", checkpoint, good, "--output", out, "--dtype", "fp32")
        assert code == 0 and stdout.startswith(f"wrote {out}: 2 passages")
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "passages.jsonl", "vectors.npy"]
