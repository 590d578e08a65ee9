"""Fuzzy deduplication: `mtnlg curate`'s MinHash stage against datatrove's MinHash pipeline (when installed,
`pip install datatrove`), on one generated corpus with planted near duplicates of known Jaccard similarity.

Both use 5-word shingles and 14 bands x 8 rows (datatrove's defaults) and split words the same way (a
regex word tokenizer is handed to datatrove, whose English default needs NLTK data from the network).
Reported per contestant: documents/s per worker process (reading the JSONL to writing the kept documents),
recall (share of the pairs above Jaccard 0.85 of which at most one document stays; the issue asks 95%) and
false removals (share of the documents with no planted partner at 0.7 or more that went; under 2%).
Rounds alternate; the medians are printed.

    .venv/bin/python benchmarks/curate_throughput.py [--documents 20000] [--workers 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import statistics
import tempfile
import time
from pathlib import Path

from mtnlg.curate.minhash import MinHash
from mtnlg.curate.pipeline import Options, curate
from mtnlg.curate.planted import planted_corpus
from mtnlg.hardware import this_cpu


def run_mtnlg(source: Path, out: Path, workers: int) -> set[int]:
    curate(Options([source], out, stages=("fuzzy",), workers=workers, progress=False))
    lines = (out / "documents.jsonl").read_text().splitlines()
    return {int(json.loads(line)["fields"]["id"][1:]) for line in lines}


def run_datatrove(source: Path, out: Path, workers: int) -> set[int]:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                  MinhashDedupFilter, MinhashDedupSignature)
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.word_tokenizers import WordTokenizer

    class Words(WordTokenizer):
        def word_tokenize(self, text: str) -> list[str]:
            return re.findall(r"\w+", text)

        def sent_tokenize(self, text: str) -> list[str]:
            return [text]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [m.span() for m in re.finditer(r"\w+", text)]

    config = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8)
    reader = JsonlReader(str(source.parent), glob_pattern=source.name)
    stages = [
        ([reader, MinhashDedupSignature(str(out / "signatures"), config, language=Words())], workers),
        ([MinhashDedupBuckets(str(out / "signatures"), str(out / "buckets"), config=config)], config.num_buckets),
        ([MinhashDedupCluster(str(out / "buckets"), str(out / "remove"), config=config)], 1),
        ([reader, MinhashDedupFilter(str(out / "remove")), JsonlWriter(str(out / "kept"), compression=None)], workers),
    ]
    for number, (pipeline, tasks) in enumerate(stages):
        LocalPipelineExecutor(pipeline, tasks=tasks, workers=workers, logging_dir=str(out / f"logs{number}"),
                              skip_completed=False).run()
    return {int(json.loads(line)["id"][1:]) for f in (out / "kept").glob("*.jsonl") for line in f.read_text().splitlines()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(this_cpu().describe())
    start = time.perf_counter()
    planted = planted_corpus(args.documents)
    print(f"{len(planted.texts)} documents ({sum(map(len, planted.texts)) / 1e6:.1f} MB), generated in "
          f"{time.perf_counter() - start:.0f} s; MinHash {MinHash().s_curve()}")
    contestants = {"mtnlg": run_mtnlg}
    if importlib.util.find_spec("datatrove"):
        contestants["datatrove"] = run_datatrove
    else:
        print("skipping datatrove: not installed (pip install -e '.[bench]')")
    times: dict[str, list[float]] = {name: [] for name in contestants}
    scores = {}
    with tempfile.TemporaryDirectory() as scratch:
        source = Path(scratch) / "corpus.jsonl"
        source.write_text("".join(json.dumps({"text": t, "id": f"d{i}"}) + "\n" for i, t in enumerate(planted.texts)))
        for round_ in range(args.rounds):
            for name, run in contestants.items():
                out = Path(scratch) / f"{name}-{round_}"
                start = time.perf_counter()
                kept = run(source, out, args.workers)
                times[name].append(time.perf_counter() - start)
                scores[name] = planted.scores(kept) | {"kept": len(kept)}
    for name in contestants:
        seconds = statistics.median(times[name])
        rate = len(planted.texts) / seconds
        s = scores[name]
        print(f"{name:<10} {seconds:6.1f} s  {rate:8.0f} documents/s  {rate / args.workers:8.0f} per worker  "
              f"recall {s['recall']:.4f} ({s['pairs_above_0.85']} pairs above 0.85)  false removals "
              f"{s['false_removals']:.4f} (of {s['documents_below_0.7']})  kept {s['kept']}")
    if "datatrove" in contestants:
        print(f"speed ratio mtnlg / datatrove: {statistics.median(times['datatrove']) / statistics.median(times['mtnlg']):.2f}")


if __name__ == "__main__":
    main()
