"""Fixed-length training samples from token shards: shuffled per epoch, blended by weight, resumable by count.

Sample order is a pure function of (seed, sample index), so the only loader state a checkpoint needs is the
number of samples consumed.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from mtnlg.data.batch import Batch, Row
from mtnlg.data.indexed import IndexedDataset
from mtnlg.errors import MtnlgError


class SampleDataset:
    """A shard as one token stream (documents end in EOD) cut into seq_len + 1 windows that overlap by one token,
    so that sample k gives inputs tokens[k*seq_len : (k+1)*seq_len] and the targets one token to the right."""

    def __init__(self, data: IndexedDataset, seq_len: int, seed: int):
        self.data, self.seq_len, self.seed = data, seq_len, seed
        self.n_samples = (len(data.tokens) - 1) // seq_len
        if self.n_samples < 1:
            raise MtnlgError(
                f"{data.prefix}: only {len(data.tokens)} tokens, need at least {seq_len + 1}; "
                "use a shorter --model.max_seq_len or more data"
            )
        self._epoch, self._order = -1, np.empty(0, np.int64)

    def __len__(self) -> int:
        return self.n_samples

    def sample(self, i: int) -> np.ndarray:
        """Sample i of an endless sequence of epochs, each a fresh seeded shuffle of all windows."""
        epoch, j = divmod(i, self.n_samples)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n_samples)
        start = int(self._order[j]) * self.seq_len
        return self.data.tokens[start : start + self.seq_len + 1].astype(np.int64)


class BlendedDataset:
    """Mixes datasets by weight: sample i comes from the dataset furthest behind its share after i + 1 samples,
    so every prefix of the sequence matches the weights as closely as whole samples allow."""

    def __init__(self, datasets: Sequence[SampleDataset], weights: Sequence[float]):
        if len(datasets) != len(weights) or not datasets or min(weights) <= 0:
            raise ValueError("need one positive weight per dataset")
        self.datasets = list(datasets)
        self.weights = [w / sum(weights) for w in weights]
        self._counts = [0] * len(datasets)
        self._which = np.empty(0, np.int64)  # sample i -> dataset
        self._local = np.empty(0, np.int64)  # sample i -> index within that dataset

    def _grow(self, n: int) -> None:
        which, local, counts = [], [], self._counts
        for i in range(len(self._which), n):
            lags = [w * (i + 1) - c for w, c in zip(self.weights, counts)]
            d = lags.index(max(lags))
            which.append(d)
            local.append(counts[d])
            counts[d] += 1
        self._which = np.concatenate([self._which, which])
        self._local = np.concatenate([self._local, local])

    def sample(self, i: int) -> np.ndarray:
        if i >= len(self._which):
            self._grow(max(i + 1, 2 * len(self._which), 1024))
        return self.datasets[self._which[i]].sample(int(self._local[i]))


def parse_blend(spec: str) -> list[tuple[float, str]]:
    """ "0.7 path_a 0.3 path_b" -> [(0.7, "path_a"), (0.3, "path_b")]; a lone "path" -> [(1.0, "path")];
    "@FILE" -> the blend written in FILE (as `mtnlg prepare` writes one for curated sources)."""
    if spec.startswith("@"):
        try:
            spec = Path(spec[1:]).read_text()
        except OSError as e:
            raise MtnlgError(f"data blend {spec}: cannot read it ({e.strerror}); pass the .blend file that prepare "
                             "wrote") from None
    parts = spec.split()
    if len(parts) == 1:
        return [(1.0, parts[0])]
    usage = "write one path, or weight/path pairs like '0.7 data/web 0.3 data/books'"
    if not parts or len(parts) % 2:
        raise MtnlgError(f"data blend {spec!r} has {len(parts)} words; {usage}")
    blend = []
    for weight, path in zip(parts[::2], parts[1::2]):
        try:
            w = float(weight)
        except ValueError:
            raise MtnlgError(f"data blend {spec!r}: {weight!r} is not a weight; {usage}") from None
        if not w > 0:
            raise MtnlgError(f"data blend {spec!r}: weight {weight} must be positive; {usage}")
        blend.append((w, path))
    return blend


def build_dataset(spec: str, split: str, seq_len: int, seed: int) -> SampleDataset | BlendedDataset:
    """Open prefix + "_" + split for each prefix of the blend `spec` (prefixes as given to `prepare`)."""
    blend = parse_blend(spec)
    datasets = [SampleDataset(IndexedDataset(f"{prefix}_{split}"), seq_len, seed) for _, prefix in blend]
    return datasets[0] if len(datasets) == 1 else BlendedDataset(datasets, [w for w, _ in blend])


class Samples(Protocol):
    """An endless sequence of samples: token windows (SampleDataset, BlendedDataset), or fine-tuning rows
    (mtnlg.finetune.data.Examples)."""

    def sample(self, i: int) -> Row | np.ndarray: ...


class BatchLoader:
    """Yields batches in a fixed order; its position (consumed samples) is part of the training state."""

    def __init__(self, dataset: Samples, consumed_samples: int = 0, multiple: int = 1, length: int = 0):
        """multiple, length: of every batch's sequence (see `Batch.collate`)."""
        self.dataset, self.consumed_samples = dataset, consumed_samples
        self.multiple, self.length = multiple, length

    def next_batch(self, batch_size: int) -> Batch:
        """The next `batch_size` samples; targets are the inputs shifted left by one."""
        start = self.consumed_samples
        self.consumed_samples += batch_size
        rows = [self.dataset.sample(start + b) for b in range(batch_size)]
        return Batch.collate(rows, self.multiple, self.length)

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        self.consumed_samples = int(state["consumed_samples"])
