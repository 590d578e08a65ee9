"""`mtnlg demo --instruct` (`make demo-instruct`): the demo model taught to answer questions about the Python
standard library, with a held-out score that says how much it learned.

Instruction pairs come from the same docstrings the demo model was pretrained on, now with the names of what
they document: summarize what a function does (its docstring's first sentence, from the rest of it), say
what it returns (the docstring's "Return ..." sentence, from its first paragraph), and which module provides
it (from its name alone, when only one module does). A tenth of the docstrings are held out, every question
about what they document with them. The pairs are chat records, fine-tuned through `mtnlg finetune`'s own
path; the held-out questions are generate-until task files for `mtnlg eval`, their prompts rendered with the
same chat template, scored on the base model and on the tuned one. The files stay under runs/demo/instruct
for the recipes of docs/applications.md, with (query, passage) pairs for a search index and a contrastive
embedder.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import mtnlg
from mtnlg.checkpoint import resolve_checkpoint
from mtnlg.data.corpus import api_docs
from mtnlg.demo import Steps, pretrain
from mtnlg.eval.harness import Options, TaskResult, evaluate
from mtnlg.eval.scoring import ModelScorer
from mtnlg.eval.tasks import Task, load_task
from mtnlg.files import write_jsonl_atomic
from mtnlg.finetune.config import finetune_config
from mtnlg.tokenizer import Tokenizer
from mtnlg.train.trainer import Trainer

TASKS = ("summarize", "returns", "module")  # the held-out question kinds, a task file each
HELD_OUT = 10  # one docstring in HELD_OUT is kept out of training, with every function it documents
QUESTIONS_PER_TASK = 60  # held-out questions scored per task
ANSWER_TOKENS = 40  # the most an answer may generate
TUNING = ["--train.max_steps=60", "--train.lr=2e-3", "--train.warmup_steps=10", "--train.global_batch_size=16",
          "--train.micro_batch_size=16", "--train.eval_interval=60", "--train.eval_batches=4",
          "--finetune.val_fraction=0.02"]
SHOWN = 2  # held-out answers printed per task
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z`'\"(])")
_SIGNATURE = re.compile(r"^[\w.]+\(.*\)( -> .*)?$")


def run_instruct_demo(out: Path, overrides: list[str] | None = None) -> None:
    """The demo model (trained first unless out/run holds it), fine-tuned under out/instruct; `overrides`
    (--section.key=value) change the fine-tune."""
    began = time.perf_counter()
    step = Steps(6)
    base_config, result = pretrain(out, [], step)
    if result.stopped_by:
        print(f"stopped by {result.stopped_by}; run `make demo-instruct` again to continue")
        return
    files, run = instruct(Path(base_config.train.out_dir), out / "instruct", overrides or [], step)
    if run is None:
        print("stopped; run `make demo-instruct` again to continue")
        return
    minutes, seconds = divmod(round(time.perf_counter() - began), 60)
    print(f"done in {minutes} min {seconds:02d} s. Next:")
    print(f"  evaluate:  .venv/bin/mtnlg eval {run} --tasks {' '.join(str(files[t]) for t in TASKS)} --max-gen-tokens {ANSWER_TOKENS}")
    print(f"  chat:      .venv/bin/mtnlg chat {run}")
    print(f"  serve:     .venv/bin/mtnlg serve {run}   (then /v1/chat/completions answers with this template)")
    print("  search and translation recipes: docs/applications.md")


def instruct(base: Path, folder: Path, overrides: list[str],
             step: Callable[[str], None]) -> tuple[dict[str, Path], Path | None]:
    """Four steps: write the instruction data under `folder`, fine-tune `base` on it into folder/run, and print
    the base and tuned models' held-out answers and scores. Returns the data files and the tuned run (None
    when stopped)."""
    tokenizer = Tokenizer.load(resolve_checkpoint(base))
    config = finetune_config(str(base), str(folder / "train.jsonl"), None,
                             [*TUNING, f"--train.out_dir={folder / 'run'}", *overrides])
    files = write_instruct_data(folder, tokenizer, config.model.max_seq_len)
    step(f"instruction pairs from the corpus's docstrings -> {files['train']} (held out: the functions of one "
         f"docstring in {HELD_OUT}; {', '.join(str(files[t]) for t in TASKS)} score them)")
    trainer = Trainer(config, resume="auto")
    start = f"resuming from step {trainer.step}" if trainer.resumed_from else f"{len(trainer.train_data.examples)} examples"
    step(f"fine-tuning {base} on them ({start}) -> {config.train.out_dir}")
    if trainer.fit().stopped_by:
        return files, None
    tasks = [load_task(str(files[t])) for t in TASKS]
    step(f"the held-out questions, answered greedily by the base model and the tuned one (up to {ANSWER_TOKENS} tokens)")
    scores = {name: _answer(path, tasks) for name, path in (("base", base), ("tuned", Path(config.train.out_dir)))}
    _show_answers(scores["base"], scores["tuned"])
    step("held-out scores (mtnlg eval's generate-until metrics):")
    _show_scores(scores["base"], scores["tuned"])
    return files, Path(config.train.out_dir)


def write_instruct_data(folder: Path, tokenizer: Tokenizer, max_len: int) -> dict[str, Path]:
    """The training pairs (chat records), one held-out task file per question kind, and the search pairs;
    returns their paths by name. Questions whose prompt leaves no room for an answer are left out."""
    train: list[dict] = []
    held: dict[str, list[dict]] = {t: [] for t in TASKS}
    search: dict[str, list[dict]] = {"search_train": [], "search_heldout": []}
    documented: dict[tuple[str, str], str] = {}
    for module, name, doc in api_docs():
        if name:
            documented.setdefault((module, name), doc)
    modules = Counter(name for _, name in documented)  # how many modules provide each name
    passages: set[str] = set()
    for (module, name), doc in documented.items():
        held_out = _held_out(doc)
        for kind, question, answer in _questions(module, name, doc, ask_module=modules[name] == 1):
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            if not held_out:
                train.append({"messages": messages})
                continue
            context = tokenizer.render_chat(messages[:1], add_generation_prompt=True)
            if len(tokenizer.encode(context)) + ANSWER_TOKENS <= max_len:
                held[kind].append({"context": context, "answers": [answer], "until": list(tokenizer.chat_stop)})
        pair = _search_pair(doc)
        if pair and pair["passage"] not in passages:
            passages.add(pair["passage"])
            search["search_heldout" if held_out else "search_train"].append(pair)
    folder.mkdir(parents=True, exist_ok=True)
    files = {"train": write_jsonl_atomic(folder / "train.jsonl", train)}
    for kind, docs in held.items():
        files[kind] = write_jsonl_atomic(folder / f"{kind}.jsonl", _spread(docs, QUESTIONS_PER_TASK))
    for name, pairs in search.items():
        files[name] = write_jsonl_atomic(folder / f"{name}.jsonl", pairs)
    files["passages"] = write_jsonl_atomic(folder / "search_passages.jsonl",
                                     [{"text": p["passage"]} for p in search["search_heldout"]])
    return files


def _held_out(doc: str) -> bool:
    """By the docstring, not the name: aliases (`array.buffer_info`, `ArrayType.buffer_info`) and a class seen
    from two modules share their questions' answers, so they fall on one side together."""
    text = " ".join(doc.split())
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "little") % HELD_OUT == 0


def _questions(module: str, name: str, doc: str, ask_module: bool) -> Iterator[tuple[str, str, str]]:
    """(kind, question, answer) about one documented name; which module provides it only when one does."""
    paragraphs = _paragraphs(doc)
    if not paragraphs:
        return
    first = _SENTENCE_END.split(paragraphs[0])
    summary, rest = first[0], " ".join(first[1:] + paragraphs[1:2])
    if 20 <= len(summary) <= 160 and len(rest) >= 40:
        yield "summarize", f"Summarize what `{name}` does.\n\n{_clip(rest, 280)}", summary
    returns = next((s for s in first if s.startswith("Return") and 20 <= len(s) <= 160), None)
    if returns and len(paragraphs[0]) <= 320:
        yield "returns", f"What does `{name}` return?\n\n{paragraphs[0]}", returns
    if ask_module:
        yield "module", f"Which module provides `{name}`?", module


def _search_pair(doc: str) -> dict | None:
    """A query and the passage it should find: a docstring's first sentence, and the text that follows it."""
    paragraphs = _paragraphs(doc)
    if not paragraphs:
        return None
    first = _SENTENCE_END.split(paragraphs[0])
    query, passage = first[0], " ".join(first[1:] + paragraphs[1:3])
    return {"query": query, "passage": _clip(passage, 250)} if 20 <= len(query) <= 160 and len(passage) >= 60 else None


def _paragraphs(doc: str) -> list[str]:
    """The docstring's paragraphs as single lines, without a leading call signature ("f(x) -> int")."""
    paragraphs = [" ".join(p.split()) for p in doc.split("\n\n") if p.strip()]
    while paragraphs and _SIGNATURE.match(paragraphs[0]):
        paragraphs.pop(0)
    return paragraphs


def _clip(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[:chars].rsplit(" ", 1)[0] + " ..."


def _spread(docs: list[dict], count: int) -> list[dict]:
    """`count` documents evenly spaced through `docs` (which run module by module), so every part of the
    library is asked about."""
    return docs if len(docs) <= count else [docs[i * len(docs) // count] for i in range(count)]


def _answer(checkpoint: Path, tasks: list[Task]) -> list[TaskResult]:
    lm = mtnlg.load(checkpoint)
    options = Options(max_gen_tokens=ANSWER_TOKENS, progress=False)
    return evaluate(ModelScorer(lm.model, lm.tokenizer), lm.tokenizer, tasks, options)


def _show_answers(base: list[TaskResult], tuned: list[TaskResult]) -> None:
    for b, t in zip(base, tuned):
        for before, after in list(zip(b.samples, t.samples))[:SHOWN]:
            question = before["doc"]["context"].removeprefix("User: ").removesuffix("\nAssistant:")
            print(f"  Q: {_clip(' '.join(question.split()), 150)}")
            print(f"     expected: {before['doc']['answers'][0]!r}")
            print(f"     base:     {_clip(before['resps'].strip(), 150)!r}")
            print(f"     tuned:    {_clip(after['resps'].strip(), 150)!r}")


def _show_scores(base: list[TaskResult], tuned: list[TaskResult]) -> None:
    print(f"  {'task':<10} {'questions':>9}  {'metric':<12} {'base':>6} {'tuned':>6}")
    for b, t in zip(base, tuned):
        for metric in ("rouge_l", "exact_match"):
            print(f"  {b.task.name:<10} {len(b.samples):>9}  {metric:<12} {b.metrics[metric]:>6.3f} {t.metrics[metric]:>6.3f}")
