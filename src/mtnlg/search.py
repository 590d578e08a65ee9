"""`mtnlg embed` and `mtnlg search`: dense retrieval with the model's own embeddings (pooled final hidden
states, as /v1/embeddings serves them), and an optional rerank of the best hits by how likely the model finds
the query after the passage: SGPT's cross-encoder (Muennighoff 2022), which needs no training.

The rerank adds its evidence to the cosine's rather than replacing it: a hit's score is its cosine over
COSINE_TEMPERATURE (the logit a contrastive embedder is trained to rank by) plus `rerank_weight` times the
query's mean log-probability per token after the passage. A small model's log-likelihood alone ranks worse
than a tuned embedder's cosine (on the demo model, recall@5 0.19-0.33 against 0.41: docs/applications.md);
the sum keeps the cosine's order where the model is unsure, and a large weight gives the log-likelihood's.

An index is a folder: vectors.npy (float32 [n, d], L2-normalized, so a dot product is the cosine),
passages.jsonl (the passage of each row) and index.json (the checkpoint and how the vectors were made).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from mtnlg.defaults import BATCH_SIZE, CHUNK_TOKENS, RERANK_TOP, RERANK_WEIGHT
from mtnlg.errors import MtnlgError
from mtnlg.files import jsonl_lines, write_jsonl_atomic
from mtnlg.inference.embed import embed

if TYPE_CHECKING:
    from mtnlg import LanguageModel
    from mtnlg.tokenizer import Tokenizer

INDEX_FILE, VECTORS_FILE, PASSAGES_FILE = "index.json", "vectors.npy", "passages.jsonl"
INDEX_FILES = {INDEX_FILE, VECTORS_FILE, PASSAGES_FILE}  # an index folder holds these and nothing else
INFO_KEYS = {"checkpoint", "pooling", "dimension", "count", "chunk_tokens", "dtype"}  # what index.json holds
COSINE_TEMPERATURE = 0.05  # cosine similarities are divided by it in the rerank score: finetune.temperature's default
RERANK_PROMPT = ('Documents are searched to find matches with the same content.\n'
                 'The document "{}" is a good search result for "')  # then the query and '"'
RECALL_AT = (1, 5, 10)
SNIPPET_CHARS = 100


@dataclass
class Passage:
    text: str
    source: str  # the file, as given
    line: int  # where the passage starts in it, from 1
    chunk: int = 0  # which piece of a passage cut to the chunk size, from 0
    metadata: dict[str, Any] = field(default_factory=dict)  # the other fields of a .jsonl line


@dataclass
class Hit:
    row: int  # the passage's row in the index
    score: float  # cosine similarity to the query
    passage: Passage
    loglik: float | None = None  # when reranked: log p(query | passage) per query token


def read_passages(files: Sequence[str | Path], json_key: str = "text") -> list[Passage]:
    """.txt files split into passages at blank lines; .jsonl files one passage per line, from `json_key`."""
    paths = [Path(f) for f in files]
    for path in paths:  # every name checked before any file is read
        if not path.exists():
            raise MtnlgError(f"{path}: no such file; pass .txt or .jsonl files")
        if path.suffix not in (".txt", ".jsonl") or not path.is_file():
            raise MtnlgError(f"{path}: unsupported file (not .txt or .jsonl); pass .txt or .jsonl files")
    read = {".txt": _txt_passages, ".jsonl": lambda path: _jsonl_passages(path, json_key)}
    return [passage for path in paths for passage in read[path.suffix](path)]


def _txt_passages(path: Path) -> Iterator[Passage]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise MtnlgError(f"{path}: not UTF-8 text ({e}); convert it to UTF-8") from None
    block: list[str] = []
    for number, line in enumerate([*lines, ""], 1):
        if line.strip():
            block.append(line)
        elif block:
            yield Passage("\n".join(block).strip(), str(path), number - len(block))
            block = []


def _jsonl_passages(path: Path, key: str) -> Iterator[Passage]:
    for number, record in jsonl_lines(path):
        text = record.get(key) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise MtnlgError(f"{path}:{number}: no string field {key!r}; fix the line or pass --json-key")
        if text.strip():
            yield Passage(text, str(path), number, metadata={k: v for k, v in record.items() if k != key})


def chunk_passages(passages: Sequence[Passage], tokenizer: Tokenizer,
                   max_tokens: int) -> tuple[list[Passage], list[list[int]]]:
    """Passages of at most `max_tokens` tokens, and their token ids: a longer passage is cut into pieces, each
    ending before a token that starts with whitespace where its second half has one, so words stay whole.
    A piece's text decodes its ids; an uncut passage's ids are its text's, as a query of that text has."""
    starts_word: dict[int, bool] = {}

    def at_word(token: int) -> bool:
        if token not in starts_word:
            starts_word[token] = tokenizer.decode([token])[:1].isspace()
        return starts_word[token]

    pieces, piece_ids = [], []
    for passage, ids in zip(passages, tokenizer.encode_batch([p.text for p in passages])):
        if len(ids) <= max_tokens:
            pieces.append(passage)
            piece_ids.append(ids)
            continue
        cuts = [0]
        while len(ids) - cuts[-1] > max_tokens:
            end = cuts[-1] + max_tokens
            cuts.append(next((e for e in range(end, end - (max_tokens + 1) // 2, -1) if at_word(ids[e])), end))
        for number, (start, end) in enumerate(zip(cuts, [*cuts[1:], len(ids)])):
            text = tokenizer.decode(ids[start:end])
            pieces.append(Passage(text, passage.source, passage.line, number, passage.metadata))
            piece_ids.append(ids[start:end])
    return pieces, piece_ids


def build_index(checkpoint: str | Path, files: Sequence[str | Path], output: str | Path, *, pooling: str = "mean",
                chunk_tokens: int | None = None, json_key: str = "text", batch_size: int = BATCH_SIZE,
                device: str | None = None, dtype: str = "auto", progress: bool = False) -> Index:
    """Embed the passages of `files` with the checkpoint and write the index folder `output` (atomically; an
    index there is replaced). chunk_tokens: passage size (default CHUNK_TOKENS, capped by the context)."""
    import mtnlg
    from mtnlg.checkpoint import atomic_directory, resolve_checkpoint

    output = Path(output)
    if output.exists() and not (output.is_dir() and {p.name for p in output.iterdir()} <= INDEX_FILES):
        raise MtnlgError(f"{output} exists and is not a search index; pass a new --output folder or remove it")
    passages = read_passages(files, json_key)
    if not passages:
        raise MtnlgError(f"nothing to index: {', '.join(map(str, files))} {'holds' if len(files) == 1 else 'hold'} no "
                         f'text; pass .txt files of paragraphs or .jsonl lines with a "{json_key}" field')
    checkpoint = resolve_checkpoint(checkpoint).resolve()
    lm = mtnlg.load(checkpoint, device, dtype=dtype)
    context = lm.model.cfg.max_seq_len
    chunk_tokens = min(CHUNK_TOKENS, context) if chunk_tokens is None else chunk_tokens
    if not 0 < chunk_tokens <= context:
        raise MtnlgError(f"--chunk-tokens {chunk_tokens} is out of range; pass 1 to the model's context, {context}")
    pieces, ids = chunk_passages(passages, lm.tokenizer, chunk_tokens)
    bar = tqdm(total=len(ids), unit=" passages", file=sys.stderr, leave=False, disable=None if progress else True)
    with bar:
        vectors = embed(lm.model, ids, pooling, batch_size, bar.update)
    info = {"checkpoint": str(checkpoint), "pooling": pooling, "dimension": vectors.shape[1], "count": len(pieces),
            "chunk_tokens": chunk_tokens, "dtype": dtype}
    with atomic_directory(output) as tmp:
        np.save(tmp / VECTORS_FILE, vectors)
        write_jsonl_atomic(tmp / PASSAGES_FILE, (asdict(p) for p in pieces))
        (tmp / INDEX_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return Index(output, vectors, pieces, info)


@dataclass
class Index:
    directory: Path
    vectors: np.ndarray  # float32 [n, d], L2-normalized rows
    passages: list[Passage]
    info: dict[str, Any]  # index.json

    @classmethod
    def load(cls, directory: str | Path) -> Index:
        directory = Path(directory)
        if not all((directory / name).is_file() for name in (INDEX_FILE, VECTORS_FILE, PASSAGES_FILE)):
            raise MtnlgError(f"{directory}: no search index; build one with mtnlg embed CKPT FILES --output "
                             f"{directory}")
        try:
            info = json.loads((directory / INDEX_FILE).read_text())
            vectors = np.load(directory / VECTORS_FILE)
            lines = (directory / PASSAGES_FILE).read_text(encoding="utf-8").splitlines()
            passages = [Passage(**json.loads(line)) for line in lines]
        except (OSError, ValueError, TypeError) as e:
            raise MtnlgError(f"{directory}: the search index is unreadable ({e}); build it again with mtnlg "
                             "embed") from None
        if not (isinstance(info, dict) and INFO_KEYS <= info.keys()) or vectors.shape != (len(passages), info["dimension"]):
            raise MtnlgError(f"{directory}: {VECTORS_FILE} does not match {PASSAGES_FILE} and {INDEX_FILE}; build the "
                             "index again with mtnlg embed")
        return cls(directory, vectors, passages, info)

    def __len__(self) -> int:
        return len(self.passages)

    def load_model(self, checkpoint: str | Path | None = None, device: str | None = None,
                   dtype: str | None = None) -> LanguageModel:
        """The model that made the vectors (or `checkpoint`, which must make the same kind), loaded as it was."""
        import mtnlg

        path = checkpoint or self.info["checkpoint"]
        if checkpoint is None and not Path(path).exists():
            raise MtnlgError(f"{path}: the checkpoint this index was built with is gone; pass --model CKPT (the same "
                             "model)")
        lm = mtnlg.load(path, device, dtype=dtype or self.info["dtype"])
        if lm.model.cfg.d_model != self.info["dimension"]:
            raise MtnlgError(f"{path} makes {lm.model.cfg.d_model}-dimensional vectors but the index holds "
                             f"{self.info['dimension']}-dimensional ones; pass the checkpoint that built the index")
        return lm

    def search(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """The k passages of highest cosine similarity to each query vector (L2-normalized rows), best first."""
        scores, rows = _top_k(self.vectors, np.asarray(queries, dtype=np.float32), min(k, len(self)))
        return [[Hit(int(r), float(s), self.passages[r]) for s, r in zip(ss, rr)] for ss, rr in zip(scores, rows)]


def _top_k(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores and rows of each query's k largest dot products, best first: faiss's exact search if installed."""
    try:
        import faiss
    except ImportError:
        scores = queries @ vectors.T
        rows = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        rows = np.take_along_axis(rows, np.argsort(-np.take_along_axis(scores, rows, 1), axis=1, kind="stable"), 1)
        return np.take_along_axis(scores, rows, 1), rows
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(np.ascontiguousarray(vectors))
    return flat.search(np.ascontiguousarray(queries), k)


def embed_queries(lm: LanguageModel, queries: Sequence[str], pooling: str) -> np.ndarray:
    """Query vectors made as the index's passage vectors are (the tokens of the text, nothing appended)."""
    ids = lm.tokenizer.encode_batch(list(queries))
    context = lm.model.cfg.max_seq_len
    for tokens in ids:
        if not tokens:
            raise MtnlgError("a query is empty; pass text to search for")
        if len(tokens) > context:
            raise MtnlgError(f"a query has {len(tokens)} tokens, over the model's context of {context}; shorten it")
    return embed(lm.model, ids, pooling)


def retrieve(index: Index, lm: LanguageModel, queries: Sequence[str], k: int = 10, rerank: bool = False,
             rerank_top: int = RERANK_TOP, rerank_weight: float = RERANK_WEIGHT,
             progress: bool = False) -> list[list[Hit]]:
    """Each query's best k passages: by cosine similarity, or with `rerank` the best max(k, rerank_top) by
    cosine reordered with the query's log-likelihood after each (`rerank_hits`)."""
    found = index.search(embed_queries(lm, queries, index.info["pooling"]), max(k, rerank_top) if rerank else k)
    if not rerank:
        return found
    bar = tqdm(found, unit=" queries", file=sys.stderr, leave=False, disable=None if progress else True)
    return [rerank_hits(lm, query, hits, rerank_weight)[:k] for query, hits in zip(queries, bar)]


def rerank_hits(lm: LanguageModel, query: str, hits: Sequence[Hit], weight: float = RERANK_WEIGHT,
                batch_size: int = BATCH_SIZE) -> list[Hit]:
    """hits ordered by cosine / COSINE_TEMPERATURE + weight * log p(query | passage) per query token: the
    log-probabilities of the tokens after a prompt that presents the passage as a search result for the query
    (the query's and its closing quote's). SGPT's cross-encoder: the model reads passage and query together,
    where cosine similarity compares two separately pooled vectors."""
    if not hits:
        return []
    context = lm.model.cfg.max_seq_len
    prompts = [rerank_prompt(lm.tokenizer, hit.passage.text, query, context) for hit in hits]
    scored = lm.score([prompt + query + '"' for prompt in prompts], batch_size)
    logliks = [np.mean(s.logprobs[_shared_prefix(s.token_ids, lm.tokenizer.encode(prompt)):])
               for s, prompt in zip(scored, prompts)]
    reranked = [Hit(h.row, h.score, h.passage, float(ll)) for ll, h in zip(logliks, hits)]
    return sorted(reranked, key=lambda h: -(h.score / COSINE_TEMPERATURE + weight * h.loglik))


def _shared_prefix(tokens: Sequence[int], prompt: Sequence[int]) -> int:
    """Where the query's tokens begin: after the prompt's, or at the token where the prompt's closing quote
    merged with a query that starts with punctuation (so at least one token is always scored)."""
    return next((i for i, (a, b) in enumerate(zip(tokens, prompt)) if a != b), len(prompt))


def rerank_prompt(tokenizer: Tokenizer, passage: str, query: str, context: int) -> str:
    """RERANK_PROMPT around the passage, cut from the right until the prompt, the query and its closing quote
    fit the context."""
    ids = tokenizer.encode(passage)
    while True:
        prompt = RERANK_PROMPT.format(tokenizer.decode(ids))
        over = len(tokenizer.encode(prompt + query + '"')) - context
        if over <= 0:
            return prompt
        if not ids:
            raise MtnlgError(f"the query is too long to rerank: with the rerank prompt it takes {context + over} "
                             f"tokens, over the model's context of {context}; shorten it or search without --rerank")
        ids = ids[: max(0, len(ids) - over)]


def read_pairs(path: Path) -> list[tuple[str, str]]:
    """(query, passage) pairs from .jsonl lines {"query": ..., "passage": ...}."""
    if not path.is_file():
        raise MtnlgError(f'{path}: no such file; pass a .jsonl file of {{"query": ..., "passage": ...}} lines')
    pairs = []
    for number, record in jsonl_lines(path):
        if not (isinstance(record, dict) and all(isinstance(record.get(key), str) for key in ("query", "passage"))):
            raise MtnlgError(f'{path}:{number}: expected {{"query": "...", "passage": "..."}}; fix the line')
        pairs.append((record["query"], record["passage"]))
    if not pairs:
        raise MtnlgError(f'{path} holds no queries; add {{"query": ..., "passage": ...}} lines')
    return pairs


def evaluate_retrieval(index: Index, lm: LanguageModel, pairs: Sequence[tuple[str, str]], k: int = 10,
                       rerank: bool = False, rerank_top: int = RERANK_TOP, rerank_weight: float = RERANK_WEIGHT,
                       progress: bool = False) -> dict[str, float]:
    """Recall@1, 5, 10 (those under k, and k; k capped by the index size) and MRR@k of (query, passage) pairs:
    a hit is right when its text equals the pair's passage (both stripped). Also "queries", and
    "not_in_index": pairs whose passage no index entry holds (so no search can find it)."""
    if not pairs:
        raise MtnlgError("no (query, passage) pairs to evaluate; pass at least one")
    depth = min(k, len(index))
    found = retrieve(index, lm, [q for q, _ in pairs], depth, rerank, rerank_top, rerank_weight, progress)
    ranks = [next((rank for rank, hit in enumerate(hits, 1) if hit.passage.text.strip() == gold.strip()), None)
             for hits, (_, gold) in zip(found, pairs)]
    metrics: dict[str, float] = {f"recall@{at}": sum(r is not None and r <= at for r in ranks) / len(pairs)
                                 for at in sorted({at for at in RECALL_AT if at < depth} | {depth})}
    metrics["mrr"] = sum(1 / r for r in ranks if r is not None) / len(pairs)
    indexed = {p.text.strip() for p in index.passages}
    metrics.update(queries=len(pairs), not_in_index=sum(gold.strip() not in indexed for _, gold in pairs))
    return metrics


def format_hits(query: str, hits: Sequence[Hit]) -> str:
    """The query, then a line per hit: rank, score (and log-likelihood when reranked), source:line, snippet."""
    lines = [f"query: {query}"]
    for rank, hit in enumerate(hits, 1):
        p = hit.passage
        where = f"{p.source}:{p.line}" + (f" chunk {p.chunk}" if p.chunk else "")
        snippet = " ".join(p.text.split())
        snippet = snippet if len(snippet) <= SNIPPET_CHARS else snippet[: SNIPPET_CHARS - 3] + "..."
        loglik = f" loglik {hit.loglik:8.2f}" if hit.loglik is not None else ""
        lines.append(f"{rank:4d}. {hit.score:.4f}{loglik}  {where}  {snippet}")
    return "\n".join(lines)
