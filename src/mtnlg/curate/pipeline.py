"""`mtnlg curate`: read the inputs once into a JSONL work file, then run the chosen stages over it in order.

Each stage reads the previous stage's file and writes its own (atomically), with a marker holding its
options and its counts. A rerun with the same options skips every stage whose marker matches, so a killed
run continues from the last finished stage; a changed option reruns that stage and those after it. Only
what a stage needs stays in memory: hashes for exact deduplication, signatures and band keys for fuzzy
deduplication, the task n-grams for decontamination; the documents stream through.

Out: DIR/documents.jsonl (`{"text", "id", "source"}` and "fields", the input line's other fields; what
`mtnlg prepare` reads), DIR/report.json (documents
and bytes in and out per stage and source, and why each removed document went); with --keep-removed
DIR/removed/STAGE.jsonl; with source weights DIR/sources/N-NAME.jsonl and DIR/blend.json, from which
`mtnlg prepare DIR` writes one shard per source and the training blend.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from mtnlg.curate import exact, language, pii, quality
from mtnlg.curate.decontaminate import Contamination, Rules, task_items
from mtnlg.curate.minhash import Clusters, MinHash, candidate_pairs, jaccard, shingles
from mtnlg.data.prepare import read_with_origin
from mtnlg.errors import MtnlgError
from mtnlg.files import atomic_file, jsonl_lines, write_text_atomic

STAGES = ("exact", "language", "quality", "fuzzy", "decontaminate", "pii")
CHUNK = 256  # documents per task sent to a worker


def default_stages(languages: bool = False, tasks: bool = False) -> tuple[str, ...]:
    """The stages run when none are named: language identification when languages are asked for (before the
    quality checks, which are English's), decontamination when there are task files (before PII redaction,
    which changes the text)."""
    return ("exact", *(("language",) if languages else ()), "quality", "fuzzy", *(("decontaminate",) if tasks else ()),
            "pii")


@dataclass
class Options:
    inputs: list[Path]
    output: Path
    stages: tuple[str, ...] = default_stages()
    json_key: str = "text"
    on_bad_line: str = "fail"  # or "skip" (counted in the report), as `mtnlg prepare`
    workers: int = 1
    cluster: str | None = None  # a Dask scheduler's address, or "local" (see Workers)
    minhash: MinHash = field(default_factory=MinHash)
    threshold: float = 0.8  # Jaccard at or above which candidates are duplicates (with verify)
    verify: bool = True  # check candidates' exact Jaccard; without it every LSH candidate is a duplicate
    tasks: list[Path] = field(default_factory=list)
    rules: Rules = field(default_factory=Rules)
    quality: quality.Thresholds = field(default_factory=quality.Thresholds)
    languages: tuple[str, ...] = ()  # the language stage keeps these (ISO 639-1 codes); empty: all, labelled
    split_languages: bool = False  # also write DIR/languages/CODE.jsonl
    against: list[Path] = field(default_factory=list)  # earlier curate outputs to deduplicate against
    weights: dict[str, float] = field(default_factory=dict)  # input (as given) -> its weight in the training blend
    keep_removed: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        self.weights = {str(Path(source)): w for source, w in self.weights.items()}  # "books/" names input books/

    def check(self) -> None:
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise MtnlgError(f"unknown stage {unknown[0]!r}; stages are {', '.join(STAGES)}")
        if not 0 < self.threshold <= 1:
            raise MtnlgError(f"--threshold {self.threshold} must be in (0, 1]: it is a Jaccard similarity")
        if min(self.minhash.bands, self.minhash.rows, self.minhash.shingle, self.workers) < 1:
            raise MtnlgError("--bands, --rows, --shingle and --workers take 1 or more")
        if (self.languages or self.split_languages) and "language" not in self.stages:
            raise MtnlgError("--languages and --split-languages need the language stage: add it to --stages")
        if "decontaminate" in self.stages and not self.tasks:
            raise MtnlgError("decontamination needs the task files: pass --tasks FILE... (or leave the stage out)")
        if self.against and "fuzzy" not in self.stages:
            raise MtnlgError("--against compares near duplicates: it needs the fuzzy stage in --stages")
        if self.tasks and "decontaminate" not in self.stages:
            raise MtnlgError("--tasks are for decontamination: add decontaminate to --stages (or drop --tasks)")
        unknown = set(self.weights) - {str(p) for p in self.inputs}
        if self.weights and (unknown or len(self.weights) < len(self.inputs) or min(self.weights.values()) <= 0):
            raise MtnlgError(f"--weights: give each input ({', '.join(map(str, self.inputs))}) a positive weight"
                             + (f"; {', '.join(sorted(unknown))} is not an input" if unknown else ""))
        for path in self.inputs:
            if not path.exists():
                raise MtnlgError(f"{path}: no such file or directory; pass existing .txt/.jsonl files or folders")


@dataclass
class Stage:
    """What a stage did: counts in and out per source, and why each removed document went."""

    name: str
    options: dict[str, Any]
    path: Path  # where its documents go
    documents_in: Counter = field(default_factory=Counter)  # per source
    bytes_in: Counter = field(default_factory=Counter)
    documents_out: Counter = field(default_factory=Counter)
    bytes_out: Counter = field(default_factory=Counter)
    removed: dict[str, str] = field(default_factory=dict)  # id -> reason
    details: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        sources = sorted(set(self.documents_in) | set(self.documents_out))
        return {
            "stage": self.name, "options": self.options,
            "documents_in": sum(self.documents_in.values()), "documents_out": sum(self.documents_out.values()),
            "bytes_in": sum(self.bytes_in.values()), "bytes_out": sum(self.bytes_out.values()),
            "per_source": {s: {"documents_in": self.documents_in[s], "documents_out": self.documents_out[s],
                               "bytes_in": self.bytes_in[s], "bytes_out": self.bytes_out[s]} for s in sources},
            "removed": self.removed, **self.details,
        }


def curate(options: Options) -> dict[str, Any]:
    """Run the stages; returns the report (also written to DIR/report.json)."""
    options.check()
    work = options.output / "work"
    work.mkdir(parents=True, exist_ok=True)
    read_options = {"inputs": [_file_state(p) for p in options.inputs], "json_key": options.json_key,
                    "on_bad_line": options.on_bad_line}
    steps: list[tuple[str, dict, Callable]] = [("read", read_options, _read)]
    for name in options.stages:
        steps.append((name, _stage_options(name, options), RUNNERS[name]))
    with Workers(options.workers, options.cluster) as workers:
        report, final = _run(options, steps, workers)
    result = {"inputs": [str(p) for p in options.inputs], "output": str(final), "stages": report}
    write_text_atomic(options.output / "report.json", json.dumps(result, indent=1, ensure_ascii=False))
    return result


def _run(options: Options, steps: list[tuple[str, dict, Callable]], workers: Workers) -> tuple[list[dict], Path]:
    """Each stage whose marker does not match, in order; returns the stages' summaries and the last file."""
    work = options.output / "work"
    for derived in ("removed", "languages", "sources", "blend.json"):  # what an earlier run with other options left
        path = options.output / derived
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    report, previous, upstream, total = [], None, "", None
    for number, (name, stage_options, run) in enumerate(steps):
        path, marker = work / f"{number:02d}-{name}.jsonl", work / f"{number:02d}-{name}.done.json"
        key = json.dumps({"options": stage_options, "after": upstream}, sort_keys=True, default=str)
        if marker.exists() and path.exists() and json.loads(marker.read_text())["key"] == key:
            summary = json.loads(marker.read_text())["summary"]
            print(f"{name}: done before, kept ({summary['documents_out']} documents)", file=sys.stderr)
        else:
            stage = Stage(name, stage_options, path)
            with atomic_file(path) as out:
                kept = run(options, previous, stage, workers)
                for record in _bar(kept, options, name, total):
                    stage.documents_out[record["source"]] += 1
                    stage.bytes_out[record["source"]] += len(record["text"].encode())
                    out.write(json.dumps(record, ensure_ascii=False).encode() + b"\n")
            summary = stage.summary()
            write_text_atomic(marker, json.dumps({"key": key, "summary": summary}))
        if options.keep_removed and summary["removed"] and previous is not None:
            _write_removed(options.output / "removed" / f"{name}.jsonl", previous, summary["removed"])
        report.append(summary)
        previous, upstream, total = path, key, summary["documents_out"]
    final = options.output / "documents.jsonl"
    with atomic_file(final) as out, open(previous, "rb") as f:
        for line in f:
            out.write(line)
    if options.split_languages:
        _split(final, options.output / "languages", lambda record: record["language"])
    if options.weights:
        names = {str(p): f"{i}-{p.stem}" for i, p in enumerate(options.inputs)}
        counts = _split(final, options.output / "sources", lambda record: names[record["source"]])
        for source in [s for s in options.weights if not counts[names[s]]]:
            print(f"{source}: no documents left, so it is not in the blend", file=sys.stderr)
        blend = [{"source": source, "weight": weight, "documents": f"sources/{names[source]}.jsonl",
                  "count": counts[names[source]]} for source, weight in options.weights.items() if counts[names[source]]]
        write_text_atomic(options.output / "blend.json", json.dumps(blend, indent=1))
    return report, final


def _file_state(path: Path) -> dict[str, Any]:
    """An input as the read stage's marker remembers it: a changed file reads again."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {"path": str(path), "files": [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]}


def _stage_options(name: str, o: Options) -> dict[str, Any]:
    return {
        "exact": {},
        "language": {"languages": list(o.languages)},
        "quality": asdict(o.quality),
        "fuzzy": {**asdict(o.minhash), "threshold": o.threshold, "verify": o.verify,
                  "against": [_file_state(folder / "signatures.npz") for folder in o.against if folder.exists()]},
        "decontaminate": {**asdict(o.rules), "tasks": [_file_state(p) for p in o.tasks]},
        "pii": {},
    }[name]


def _records(path: Path) -> Iterator[dict[str, Any]]:
    return (record for _, record in jsonl_lines(path))


def _bar(records: Iterable, options: Options, name: str, total: int | None) -> Iterable:
    return tqdm(records, total=total, desc=name, unit=" docs", file=sys.stderr, leave=False,
                disable=None if options.progress else True)


def _counted(records: Iterable[dict], stage: Stage) -> Iterator[dict]:
    for record in records:
        stage.documents_in[record["source"]] += 1
        stage.bytes_in[record["source"]] += len(record["text"].encode())
        yield record


class Workers:
    """Where the per-document work runs: this process (1 worker), a pool of worker processes, or a Dask cluster
    (`cluster`: "local" starts one on this machine with `count` worker processes; else a scheduler's address).
    Only the work on each document goes out: deciding what stays needs every document's result, in order,
    and happens here."""

    def __init__(self, count: int, cluster: str | None = None):
        self.count, self.cluster, self.client = count, cluster, None

    def __enter__(self) -> Workers:
        if self.cluster:
            try:
                from distributed import Client, LocalCluster
            except ImportError:
                raise MtnlgError("--cluster needs Dask: pip install 'mtnlg[cluster]'") from None
            if self.cluster == "local":
                self.client = Client(LocalCluster(n_workers=self.count, threads_per_worker=1, processes=True,
                                                  dashboard_address=None))
            else:
                try:
                    self.client = Client(self.cluster, timeout=30)
                except OSError as e:
                    raise MtnlgError(f"--cluster {self.cluster}: no Dask scheduler answers there ({e})") from None
        return self

    def __exit__(self, *exc) -> None:
        if self.client is not None:
            cluster = self.client.cluster
            self.client.close()
            if cluster is not None and self.cluster == "local":
                cluster.close()

    def map(self, fn: Callable[[dict], Any], records: Iterable[dict]) -> Iterator[tuple[dict, Any]]:
        """(record, fn(record)) in order; a few chunks per worker are in flight at a time, so memory stays
        bounded."""
        if self.client is None and self.count == 1:
            for record in records:
                yield record, fn(record)
            return
        records = iter(records)
        chunks = iter(lambda: list(islice(records, CHUNK)), [])
        if self.client is not None:
            shared = self.client.scatter(fn, broadcast=True, hash=False)  # sent once, not with every chunk
            width = 4 * max(1, len(self.client.scheduler_info()["workers"]))
            while window := list(islice(chunks, width)):
                futures = self.client.map(_apply, [shared] * len(window), window, pure=False)
                for chunk, results in zip(window, self.client.gather(futures)):
                    yield from zip(chunk, results)
            return
        with multiprocessing.get_context("spawn").Pool(self.count, _init_worker, (fn,)) as pool:
            while window := list(islice(chunks, 4 * self.count)):
                for chunk, results in zip(window, pool.map(_apply_in_worker, window)):
                    yield from zip(chunk, results)


def _apply(fn: Callable[[dict], Any], chunk: list[dict]) -> list[Any]:
    return [fn(record) for record in chunk]


_worker_fn: Callable[[dict], Any] | None = None


def _init_worker(fn: Callable[[dict], Any]) -> None:
    """Each pool worker gets the function (and what it holds: task n-grams, thresholds) once, not per chunk."""
    global _worker_fn
    _worker_fn = fn


def _apply_in_worker(chunk: list[dict]) -> list[Any]:
    return _apply(_worker_fn, chunk)


def _write_removed(path: Path, previous: Path, removed: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as out:
        for record in _records(previous):
            if record["id"] in removed:
                out.write(json.dumps({**record, "reason": removed[record["id"]]}, ensure_ascii=False).encode() + b"\n")


def _read(options: Options, _: Path | None, stage: Stage, workers: Workers) -> Iterator[dict]:
    skipped: list[str] = []
    stage.details["skipped_lines"] = skipped  # with on_bad_line "skip": "file:line: reason" of each
    yield from _counted(_read_inputs(options, skipped), stage)


def _read_inputs(options: Options, skipped: list[str]) -> Iterator[dict]:
    for source in options.inputs:
        for file, line, text, fields in read_with_origin(source, options.json_key, options.on_bad_line, skipped):
            record = {"text": text, "id": f"{file}:{line}" if line else str(file), "source": str(source)}
            if fields:
                record["fields"] = fields  # the line's other fields, carried through
            yield record


def _exact(options: Options, previous: Path, stage: Stage, workers: Workers) -> Iterator[dict]:
    """The first copy stays (inputs in the order given, so an earlier input wins)."""
    first: dict[str, str] = {}
    for record, digest in workers.map(_fingerprint_text, _counted(_records(previous), stage)):
        if digest in first:
            stage.removed[record["id"]] = f"exact duplicate of {first[digest]}"
        else:
            first[digest] = record["id"]
            yield record


def _fingerprint_text(record: dict) -> str:
    return exact.fingerprint(record["text"])


def _language(options: Options, previous: Path, stage: Stage, workers: Workers) -> Iterator[dict]:
    """Label each document with its language; with `languages`, keep only those."""
    found: Counter = Counter()
    for record, (code, probability) in workers.map(_identify, _counted(_records(previous), stage)):
        found[code] += 1
        if options.languages and code not in options.languages:
            stage.removed[record["id"]] = f"language {code} (probability {probability})"
        else:
            yield {**record, "language": code}
    stage.details["languages"] = dict(found.most_common())


def _identify(record: dict) -> tuple[str, float]:
    return language.identify(record["text"])


def _split(documents: Path, folder: Path, name: Callable[[dict], str]) -> Counter:
    """The documents streamed into one JSONL per name (each renamed into place when done); their counts."""
    folder.mkdir(parents=True, exist_ok=True)
    counts: Counter = Counter()
    with ExitStack() as files, open(documents, "rb") as lines:
        outs: dict[str, Any] = {}
        for line in lines:
            key = name(json.loads(line))
            if key not in outs:
                outs[key] = files.enter_context(atomic_file(folder / f"{key}.jsonl"))
            outs[key].write(line)
            counts[key] += 1
    return counts


def _quality(options: Options, previous: Path, stage: Stage, workers: Workers) -> Iterator[dict]:
    failures: Counter = Counter()
    check = partial(_failed_check, thresholds=options.quality)
    for record, reason in workers.map(check, _counted(_records(previous), stage)):
        if reason is None:
            yield record
        else:
            stage.removed[record["id"]] = reason
            failures[reason.split(" ")[0]] += 1
    stage.details["failed_checks"] = dict(failures)


def _failed_check(record: dict, thresholds: quality.Thresholds) -> str | None:
    return quality.failed_check(record["text"], thresholds)


def _pii(options: Options, previous: Path, stage: Stage, workers: Workers) -> Iterator[dict]:
    found: Counter = Counter()
    documents = 0
    for record, (text, counts) in workers.map(_redact, _counted(_records(previous), stage)):
        found.update(counts)
        documents += bool(counts)
        yield {**record, "text": text}
    stage.details["redacted"] = {**{kind: found[kind] for kind in pii.PLACEHOLDERS}, "documents": documents}


def _redact(record: dict) -> tuple[str, Counter]:
    return pii.redact(record["text"])


def _fuzzy(options: Options, previous: Path, stage: Stage, workers: Workers) -> Iterator[dict]:
    """Signatures (workers), candidates by band, verified by exact Jaccard, clusters; the document kept in a
    cluster is one of an earlier corpus (`against`) if it has one, else the one from the earliest input, then
    the longest, then the first. The kept documents' signatures are saved (DIR/signatures.npz), so a later
    batch can be deduplicated against this corpus without signing it again."""
    params = options.minhash
    stage.details["lsh"] = {"permutations": params.permutations, "threshold_implied": round(params.threshold(), 4),
                            "candidate_probability": params.s_curve()}
    print(f"fuzzy: {params.bands} bands x {params.rows} rows of {params.shingle}-word shingles; candidates from "
          f"similarity ~{params.threshold():.2f}; P(candidate | similarity) {params.s_curve()}", file=sys.stderr)
    earlier = [_load_signatures(folder, params) for folder in options.against]
    ids = [i for corpus in earlier for i in corpus["ids"].tolist()]
    signatures = [row for corpus in earlier for row in corpus["signatures"]]
    ranks = [(-1, 0, i) for i in range(len(ids))]  # documents of an earlier corpus always stay
    old = len(ids)
    priority = {str(p): i for i, p in enumerate(options.inputs)}
    for record, signature in workers.map(partial(_signature, params=params), _counted(_records(previous), stage)):
        ids.append(record["id"])
        ranks.append((priority.get(record["source"], len(priority)), -len(record["text"]), len(ids)))
        signatures.append(signature)
    pairs = [(a, b) for a, b in candidate_pairs(params, signatures) if b >= old]  # earlier corpora are deduplicated
    if options.verify:
        files = [(folder / str(c["documents"]), len(c["ids"])) for folder, c in zip(options.against, earlier)]
        similar = _verified(pairs, [*files, (previous, len(ids) - old)], params.shingle, options.threshold)
    else:
        similar = dict.fromkeys(pairs)
    clusters, closest = Clusters(), {}
    for (a, b), score in similar.items():
        clusters.union(a, b)
        for i in (a, b):
            closest[i] = max(closest.get(i, 0.0), score or 0.0)
    removed: dict[int, str] = {}
    for members in clusters.groups():
        keep = min(members, key=lambda i: ranks[i])
        for i in members:
            if i != keep:
                removed[i - old] = f"near duplicate of {ids[keep]} (a cluster of {len(members)}" + (
                    f"; its closest match at Jaccard {closest[i]:.3f})" if options.verify else ")")
    stage.details.update(candidate_pairs=len(pairs), duplicate_pairs=len(similar), clusters=len(clusters.groups()),
                         against={str(f): len(c["ids"]) for f, c in zip(options.against, earlier)})
    kept = [i for i in range(len(ids) - old) if i not in removed]
    with atomic_file(options.output / "signatures.npz") as out:
        np.savez(out, ids=np.array([ids[old + i] for i in kept]), signatures=np.array(signatures[old:])[kept],
                 params=np.array([params.shingle, params.bands, params.rows, params.seed]),
                 documents=np.array(f"work/{stage.path.name}"))  # the signed texts, relative to this folder
    for index, record in enumerate(_records(previous)):
        if index in removed:
            stage.removed[record["id"]] = removed[index]
        else:
            yield record


def _load_signatures(folder: Path, params: MinHash) -> Any:
    path = folder / "signatures.npz"
    if not path.is_file():
        raise MtnlgError(f"--against {folder}: no signatures.npz there; pass the folder of an earlier `mtnlg curate` "
                         "run with the fuzzy stage")
    corpus = np.load(path)
    if not (folder / str(corpus["documents"])).is_file():
        raise MtnlgError(f"--against {folder}: {corpus['documents']} (the texts its signatures were made from) is "
                         "gone; keep the work/ folder of a corpus you compare against")
    made = corpus["params"].tolist()
    if made != [params.shingle, params.bands, params.rows, params.seed]:
        raise MtnlgError(f"--against {folder}: its signatures were made with --shingle {made[0]} --bands {made[1]} "
                         f"--rows {made[2]} --seed {made[3]}; pass the same to compare with them")
    return corpus


def _signature(record: dict, params: MinHash) -> np.ndarray:
    return params.signature(record["text"])


def _verified(pairs: list[tuple[int, int]], files: list[tuple[Path, int]], size: int,
              threshold: float) -> dict[tuple[int, int], float]:
    """The candidate pairs whose exact Jaccard reaches the threshold, with it. Documents are numbered through
    `files` (path, documents) in order; only the shingle sets of documents in some pair are held."""
    wanted = {i for pair in pairs for i in pair}
    sets, offset = {}, 0
    for path, count in files:
        if any(offset <= i < offset + count for i in wanted):
            for i, record in enumerate(_records(path), offset):
                if i in wanted:
                    sets[i] = shingles(record["text"], size)
        offset += count
    scores = {(a, b): jaccard(sets[a], sets[b]) for a, b in pairs}
    return {pair: score for pair, score in scores.items() if score >= threshold}


def _decontaminate(options: Options, previous: Path, stage: Stage, workers: Workers) -> Iterator[dict]:
    items = [item for path in options.tasks for item in task_items(path)]
    contamination = Contamination(items, options.rules)
    found = workers.map(partial(_task_ngrams, contamination=contamination), _records(previous))
    contamination.ignore_common(grams for _, grams in found)
    hits: dict[str, list[str]] = {}
    for record, (pieces, found, why) in workers.map(partial(_clean, contamination=contamination),
                                                _counted(_records(previous), stage)):
        if found:
            hits[record["id"]] = found
        if not pieces:
            stage.removed[record["id"]] = f"contaminated by {', '.join(found)}: {why}"
        for number, piece in enumerate(pieces):
            yield {**record, "text": piece, "id": record["id"] if len(pieces) == 1 else f"{record['id']}#{number}"}
    stage.details.update(task_items=len(items), task_ngrams=len(contamination.ngrams),
                         ignored_ngrams=len(contamination.ignored), hits=hits)


def _task_ngrams(record: dict, contamination: Contamination) -> set[tuple[str, ...]]:
    return {gram for _, _, gram in contamination.matches(record["text"])}


def _clean(record: dict, contamination: Contamination) -> tuple[list[str], list[str], str]:
    return contamination.clean(record["text"])


RUNNERS = {"exact": _exact, "language": _language, "quality": _quality, "fuzzy": _fuzzy,
           "decontaminate": _decontaminate, "pii": _pii}
