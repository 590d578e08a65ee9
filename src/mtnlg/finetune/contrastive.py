"""Contrastive fine-tuning of an embedder: (query, passage) pairs pull each query's pooled hidden states
toward its own passage and away from the other passages of its micro-batch (in-batch negatives, InfoNCE
with a temperature, as DPR, SimCSE and E5 train). The pooling is the one `embed` and the server's
/v1/embeddings use: the mean of the final normed hidden states over the text's tokens, L2-normalized.

A pair travels as one packed row, query then passage, positions restarting at 0 where the passage begins:
the trainer's batches, micro-batches and data-parallel slices carry it unchanged, and the document mask
keeps the two texts from attending to each other, so each is encoded exactly as it is alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mtnlg.data.batch import Batch, Row
from mtnlg.errors import MtnlgError
from mtnlg.tokenizer import Tokenizer

PAIR_FORMAT = 'contrastive pairs {"query", "passage"}'


def is_pair(record: Any) -> bool:
    return isinstance(record, dict) and "query" in record and "passage" in record


def pair_rows(records: Sequence[tuple[str, Any]], tokenizer: Tokenizer, max_tokens: int) -> list[Row]:
    """One row per (where, record) pair: query then passage, at most `max_tokens` inputs (the passage cut to
    fit, the query kept to at most half), and an unused last token (a row holds its inputs and one target
    more), a text of its own so that no passage pools it when collation pads its row into the inputs."""
    for where, record in records:
        if not all(isinstance(record[k], str) and record[k].strip() for k in ("query", "passage")):
            raise MtnlgError(f'{where}: "query" and "passage" must be non-empty strings ({PAIR_FORMAT})')
    ids = iter(tokenizer.encode_batch([record[k] for _, record in records for k in ("query", "passage")]))
    rows = []
    for query, passage in zip(ids, ids):
        query = query[: max_tokens // 2]
        passage = passage[: max_tokens - len(query)]
        tokens = np.array([*query, *passage, tokenizer.eod_id], np.int64)
        positions = np.concatenate([np.arange(len(query)), np.arange(len(passage)), [0]])
        rows.append(Row(tokens, np.ones(len(tokens), bool), positions))
    return rows


def pooled(hidden: torch.Tensor, positions: torch.Tensor, text: int) -> torch.Tensor:
    """The L2-normalized mean of each row's hidden states over its `text`-th packed text (0 the query, 1 the
    passage): [rows, seq, d] -> [rows, d]."""
    member = ((positions == 0).cumsum(-1) == text + 1).to(hidden.dtype)[..., None]
    return F.normalize((hidden * member).sum(1).float() / member.sum(1).float(), dim=-1)


class LanguageModeling:
    """The next-token loss (pretraining, SFT): counted per trained target."""

    hidden = False  # the model's forward returns logits

    def count(self, batch: Batch) -> int:
        return batch.loss_tokens

    def loss(self, logits: torch.Tensor, batch: Batch, denominator: float) -> torch.Tensor:
        from mtnlg.parallel.parallelize import parallel_loss

        return parallel_loss(logits, batch.targets, denominator)


class Contrastive:
    """InfoNCE over a micro-batch of pairs: row i's query should be most similar to row i's passage;
    cosine similarities are divided by `temperature` before the softmax. Counted per pair."""

    hidden = True  # the model's forward returns the final normed hidden states

    def __init__(self, temperature: float):
        self.temperature = temperature

    def count(self, batch: Batch) -> int:
        return batch.inputs.size(0)

    def loss(self, hidden: torch.Tensor, batch: Batch, denominator: float) -> torch.Tensor:
        queries, passages = pooled(hidden, batch.positions, 0), pooled(hidden, batch.positions, 1)
        similarity = queries @ passages.T / self.temperature
        labels = torch.arange(len(similarity), device=similarity.device)
        return F.cross_entropy(similarity, labels, reduction="sum") / denominator


Objective = LanguageModeling | Contrastive
