"""Evaluation tasks from local files: mtnlg's own JSONL schema, the files standard benchmarks ship as, and
text or token shards for perplexity. Nothing is downloaded.

A task is a list of documents of one of lm-eval's output types, each normalized to a small dict:

    multiple_choice        {"context", "choices", "gold"}, or {"contexts", "continuation", "gold"}
                           (partial scoring: the choice is in the context, as WinoGrande is scored)
    loglikelihood          {"context", "continuation"}
    loglikelihood_rolling  {"text"} (and "ids" when read from a token shard)
    generate_until         {"context", "answers", "until"}

The prompt conventions (description, few-shot examples, delimiters) are lm-eval's. A translation record
{"src", "tgt", "src_lang", "tgt_lang"}, the one `mtnlg finetune` trains on, is a generate_until document
whose context is `translation_prompt`, so a held-out file of the fine-tuning data is a task as it is.
"""

from __future__ import annotations

import ast
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mtnlg.errors import MtnlgError

DEFAULT_UNTIL = ["\n\n"]
TRANSLATION_FIELDS = ("src", "tgt", "src_lang", "tgt_lang")
SETTINGS = ("description", "target_delimiter", "fewshot_delimiter")  # what a task file's config line may set

# Megatron-Turing NLG 530B's zero-shot accuracy, from its paper: printed beside our numbers.
MT_NLG_530B = {"lambada": ("acc", 0.766), "hellaswag": ("acc_norm", 0.802), "piqa": ("acc", 0.820),
               "winogrande": ("acc", 0.730), "boolq": ("acc", 0.782), "race": ("acc", 0.479)}


@dataclass
class Task:
    name: str
    kind: str
    docs: list[dict]
    path: str
    fewshot_docs: list[dict] | None = None  # None: examples come from `docs`, never the document itself
    description: str = ""
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    reference: tuple[str, float] | None = None  # (metric, MT-NLG 530B's score)
    lines: list[int] = field(default_factory=list)  # each document's line in `path`, for error messages

    def target(self, doc: dict) -> str:
        """What follows the context in a few-shot example."""
        if self.kind == "multiple_choice":
            return doc["continuation"] if "contexts" in doc else doc["choices"][doc["gold"]]
        return doc["continuation"] if self.kind == "loglikelihood" else doc["answers"][0]

    def text(self, doc: dict) -> str:
        return doc["contexts"][doc["gold"]] if "contexts" in doc else doc["context"]

    def prompts(self, index: int, num_fewshot: int, seed: int) -> list[str]:
        """The contexts of document `index` (one per choice under partial scoring), after the description
        and `num_fewshot` examples drawn with a seed of their own, so a document's prompt is the same in
        every run, batch and process."""
        doc = self.docs[index]
        prefix = self.description  # as lm-eval: a description brings its own separator ("...\n\n")
        if num_fewshot:
            pool = self.fewshot_docs if self.fewshot_docs is not None else self.docs[:index] + self.docs[index + 1 :]
            if len(pool) < num_fewshot:
                raise MtnlgError(f"task {self.name}: {num_fewshot} few-shot examples asked for, {len(pool)} available; "
                                 "lower --num-fewshot or give a larger example file (NAME=FILE@EXAMPLES)")
            examples = random.Random(f"{seed}:{index}").sample(pool, num_fewshot)
            prefix += "".join(self.text(e) + self.target_delimiter + self.target(e) + self.fewshot_delimiter for e in examples)
        return [prefix + c for c in doc["contexts"]] if "contexts" in doc else [prefix + doc.get("context", "")]

    def pairs(self, index: int, prompts: list[str]) -> list[tuple[str, str]]:
        """The (context, continuation) texts to score for document `index`, given its `prompts`: each choice
        after the prompt, or (partial scoring) the continuation after each choice's prompt, or the continuation."""
        doc = self.docs[index]
        if "contexts" in doc:
            return [(p, self.target_delimiter + doc["continuation"]) for p in prompts]
        endings = doc["choices"] if self.kind == "multiple_choice" else [doc["continuation"]]
        return [(prompts[0], self.target_delimiter + e) for e in endings]


def is_translation(record: Any) -> bool:
    """A translation record names its target language; "src" alone may be a document's metadata."""
    return isinstance(record, dict) and "src" in record and "tgt_lang" in record


def check_translation(record: dict[str, Any]) -> None:
    """ValueError naming what is wrong with a translation record: its four fields are strings, and source and
    target are one line each (generation stops at a newline)."""
    for name in TRANSLATION_FIELDS:
        if not isinstance(record.get(name), str):
            raise ValueError(f'needs a string "{name}"')
    if "\n" in record["src"] + record["tgt"]:
        raise ValueError('"src" and "tgt" must be one line each (a translation ends at a newline)')


def translation_prompt(record: dict[str, Any]) -> str:
    """The prompt of a translation record, the same in fine-tuning and evaluation; the target follows it after
    a space, on one line."""
    source, target = record["src_lang"], record["tgt_lang"]
    return f"Translate {source} to {target}.\n{source}: {record['src']}\n{target}:"


# Readers for the files the standard benchmarks are distributed as (the JSON lines of their Hugging Face
# datasets): each turns one record into a normalized document, with lm-eval's prompt for that task.
def _lambada(r: dict) -> dict:
    context, word = r["text"].rsplit(" ", 1)
    return {"context": context, "continuation": " " + word}


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag(r: dict) -> dict:
    ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize() if "ctx_a" in r else r["ctx"]
    return {"context": _hellaswag_clean(r["activity_label"] + ": " + ctx),
            "choices": [_hellaswag_clean(e) for e in r["endings"]], "gold": int(r["label"])}


def _piqa(r: dict) -> dict:
    return {"context": f"Question: {r['goal']}\nAnswer:", "choices": [r["sol1"], r["sol2"]], "gold": int(r["label"])}


def _winogrande(r: dict) -> dict:
    blank = r["sentence"].index("_")
    return {"contexts": [r["sentence"][:blank] + r[o] for o in ("option1", "option2")],
            "continuation": r["sentence"][blank + 1 :].strip(), "gold": int(r["answer"]) - 1}


def _boolq(r: dict) -> dict:
    gold = r["label"] if "label" in r else r["answer"]
    return {"context": f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", "choices": ["no", "yes"], "gold": int(gold)}


def _arc(r: dict) -> dict:
    return {"context": f"Question: {r['question']}\nAnswer:", "choices": r["choices"]["text"],
            "gold": r["choices"]["label"].index(r["answerKey"])}


def _race(r: dict) -> dict:
    """EleutherAI/race (an article and its "problems", the last one asked with the others answered before it),
    or one question per line as in the original RACE ("article", "question", "options", "answer")."""
    problems = ast.literal_eval(r["problems"]) if "problems" in r else [r]
    text = f"Article: {r['article']}\n\n"
    for p in problems[:-1]:
        answer = p["options"]["ABCD".index(p["answer"])]
        fill_in = p["question"].endswith("  _  .")
        text += p["question"][:-5] + answer + "\n" if fill_in else f"Question: {p['question']}\nAnswer: {answer}\n"
    last = problems[-1]
    return {"context": text + last["question"], "choices": last["options"], "gold": "ABCD".index(last["answer"])}


READERS: dict[str, tuple[str, Callable[[dict], dict]]] = {
    "lambada": ("loglikelihood", _lambada), "hellaswag": ("multiple_choice", _hellaswag),
    "piqa": ("multiple_choice", _piqa), "winogrande": ("multiple_choice", _winogrande),
    "boolq": ("multiple_choice", _boolq), "arc_easy": ("multiple_choice", _arc),
    "arc_challenge": ("multiple_choice", _arc), "race": ("multiple_choice", _race),
}


def _kind_of(record: dict) -> str | None:
    """mtnlg's schema: the fields of a line say its type."""
    if "choices" in record or "contexts" in record:
        return "multiple_choice"
    if "continuation" in record:
        return "loglikelihood"
    if "answers" in record or "answer" in record or is_translation(record):
        return "generate_until"
    return "loglikelihood_rolling" if "text" in record else None


def _normalized(kind: str, r: dict) -> dict:
    """A record of mtnlg's schema, checked field by field."""
    def text(name: str) -> str:
        if not isinstance(r.get(name), str):
            raise ValueError(f'needs a string "{name}"')
        return r[name]

    def texts(name: str) -> list[str]:
        value = r.get(name)
        if not (isinstance(value, list) and value and all(isinstance(v, str) and v for v in value)):
            raise ValueError(f'needs "{name}": a list of non-empty strings')
        return value

    if kind == "multiple_choice":
        options = texts("contexts") if "contexts" in r else texts("choices")
        gold = r.get("gold")
        if not (isinstance(gold, int) and 0 <= gold < len(options)):
            raise ValueError(f'needs "gold": the index of the right choice, 0 to {len(options) - 1}')
        doc = {"contexts": options, "continuation": text("continuation")} if "contexts" in r else {
            "context": r.get("context", ""), "choices": options}
        return {**doc, "gold": gold}
    if kind == "loglikelihood":
        return {"context": r.get("context", ""), "continuation": text("continuation")}
    if kind == "generate_until" and is_translation(r):
        check_translation(r)
        return {"context": translation_prompt(r), "answers": [r["tgt"]], "until": ["\n"]}
    if kind == "generate_until":
        answers = texts("answers") if "answers" in r else [text("answer")]
        return {"context": text("context"), "answers": answers, "until": texts("until") if "until" in r else DEFAULT_UNTIL}
    if not text("text"):
        raise ValueError('"text" is empty')
    return {"text": r["text"]}


def _read_jsonl(path: Path, parse: Callable[[dict, int], dict]) -> tuple[list[dict], list[int], dict]:
    """Documents of a JSONL file, each line through `parse`; a bad line is an error naming file:line. A first
    line {"config": {...}} sets the task's description and delimiters."""
    if not path.is_file():
        raise MtnlgError(f"{path}: no such task file; pass a .jsonl file (see docs/evaluation.md for the formats)")
    docs, lines, config = [], [], {}
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
                if not docs and not config and set(record) == {"config"}:
                    config = record["config"]
                    if not isinstance(config, dict) or set(config) - set(SETTINGS) or not all(
                            isinstance(v, str) for v in config.values()):
                        raise ValueError(f'"config" takes strings for {", ".join(SETTINGS)}')
                    continue
                docs.append(parse(record, number))
                lines.append(number)
            except (ValueError, KeyError, IndexError, TypeError, AttributeError, SyntaxError) as e:
                reason = f"missing field {e}" if isinstance(e, KeyError) else str(e)
                raise MtnlgError(f"{path}:{number}: {reason}; fix the line") from None
    if not docs:
        raise MtnlgError(f"{path}: no documents; a task file needs at least one line")
    return docs, lines, config


def load_task(spec: str) -> Task:
    """A task from `FILE` (mtnlg's schema, named after the file), or `NAME=FILE` (a standard benchmark's
    file, e.g. hellaswag=hellaswag_val.jsonl); either may end in `@EXAMPLES` (a file of few-shot examples)."""
    name, equals, rest = spec.partition("=")
    if not (equals and re.fullmatch(r"[a-z_]+", name)):  # a path with "=" in it
        name, rest = "", spec
    path, at, examples = rest.rpartition("@")
    if not at or Path(rest).is_file():  # a path with "@" in it
        path, examples = rest, ""
    if name and name not in READERS:
        raise MtnlgError(f"unknown task {name!r}; known benchmarks: {', '.join(READERS)}; a file in mtnlg's own "
                         "schema needs no name")
    if not name and not Path(path).is_file() and path in READERS:
        raise MtnlgError(f"task {path} needs its data file (mtnlg downloads nothing): pass {path}=FILE")
    if not name and not Path(path).is_file() and Path(path).suffix != ".jsonl":
        raise MtnlgError(f"unknown task {path!r}: not a .jsonl file, nor one of {', '.join(READERS)} (pass NAME=FILE)")
    if name:
        kind, reader = READERS[name]
        parse: Callable[[dict, int], dict] = lambda r, _: reader(r)  # noqa: E731
    else:
        kind = ""

        def parse(r: dict, number: int) -> dict:
            nonlocal kind
            line_kind = _kind_of(r)
            if line_kind is None:
                raise ValueError('no task fields; a line needs "choices", "continuation", "answers", "src" or "text"')
            if kind and line_kind != kind:
                raise ValueError(f"a {line_kind} line in a {kind} task; one task holds one type")
            kind = line_kind
            return _normalized(kind, r)

    docs, lines, config = _read_jsonl(Path(path), parse)
    fewshot = _read_jsonl(Path(examples), parse)[0] if examples else None
    delimiter = {"target_delimiter": ""} if kind == "loglikelihood" else {}  # the continuation brings its space
    return Task(name or Path(path).stem, kind, docs, path, fewshot, reference=MT_NLG_530B.get(name.split("_")[0]),
                lines=lines, **{**delimiter, **config})


def perplexity_task(path: str) -> Task:
    """A rolling-loglikelihood task over documents: a token shard prefix (as `mtnlg prepare` writes), a .txt
    file (one document), or a .jsonl file of {"text": ...} lines, or a folder of those files. A shard's
    documents lose the end-of-document token `prepare` appended: each is scored after one, as text is."""
    from mtnlg.data.indexed import IndexedDataset
    from mtnlg.data.prepare import read_documents

    if Path(f"{path}.idx").is_file():
        shard = IndexedDataset(path)
        docs: list[dict[str, Any]] = [{"ids": shard[i][:-1].tolist()} for i in range(len(shard)) if len(shard[i]) > 1]
    elif Path(path).exists():
        docs = [{"text": t} for t in read_documents(Path(path))]
    else:
        raise MtnlgError(f"{path}: no such text file, folder or token shard (PREFIX.bin + PREFIX.idx)")
    if not docs:
        raise MtnlgError(f"{path}: no documents to score")
    return Task(Path(path).stem, "loglikelihood_rolling", docs, path)
