"""docs/applications.md as a user runs it: the instruction demo's fine-tune and scores on a tiny model standing
in for the demo's, then every command of the page, as written but with fewer steps, in a folder laid out as
`make demo-instruct` leaves it."""

from __future__ import annotations

import io
import json
import random
import shlex
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from served import Served
from test_translation import lexicon, record

from mtnlg.checkpoint import resolve_checkpoint, save_checkpoint
from mtnlg.cli import main
from mtnlg.config import Config, ModelConfig
from mtnlg.data.corpus import api_docs
from mtnlg.demo_instruct import TASKS, instruct
from mtnlg.model.gpt import GPT
from mtnlg.search import Index
from mtnlg.tokenizer import Tokenizer

DOC = Path(__file__).parents[1] / "docs" / "applications.md"
FEWER = {  # appended to a verb's command line (later settings win)
    "finetune": ["--train.max_steps", "3", "--train.warmup_steps", "1", "--train.eval_interval", "3",
                 "--train.global_batch_size", "4", "--train.micro_batch_size", "4"],
    "eval": ["--limit", "3"],
}


def doc_commands() -> list[str]:
    """The command lines of the page's bash blocks, without their trailing comments."""
    commands, in_block = [], False
    for line in DOC.read_text().splitlines():
        if line.startswith("```"):
            in_block = line == "```bash"
        elif in_block and line.strip():
            commands.append(line.split("  #")[0].strip())
    return commands


@dataclass
class Demo:
    root: Path  # holds runs/demo and the user's translation pairs
    files: dict[str, Path]  # the instruction demo's data
    run: Path  # its fine-tuned run
    steps: list[str]  # its numbered progress lines
    printed: str  # and the rest of what it printed


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Demo:
    """runs/demo/run (a tiny model with a tokenizer trained on the demo's docstrings),
    fine-tuned by the instruction demo; and the user's translation pairs beside it."""
    root = tmp_path_factory.mktemp("applications")
    tokenizer = Tokenizer.train((doc for _, _, doc in api_docs()), 512)
    cfg = ModelConfig.from_name("tiny", max_seq_len=256)
    save_checkpoint(root / "runs" / "demo" / "run", GPT(cfg, seed=7), Config(model=cfg), tokenizer)
    dictionary, rng = lexicon(), random.Random(6)
    sentences = [rng.sample(list(dictionary), rng.randint(3, 6)) for _ in range(40)]
    for name, part in (("pairs_train", sentences[:32]), ("pairs_heldout", sentences[32:])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(record(s, dictionary)) + "\n" for s in part))
    steps, printed = [], io.StringIO()
    with redirect_stdout(printed):
        files, run = instruct(root / "runs" / "demo" / "run", root / "runs" / "demo" / "instruct", FEWER["finetune"],
                              steps.append)
    return Demo(root, files, run, steps, printed.getvalue())


def test_the_instruction_demo_holds_out_functions_fine_tunes_and_scores(demo):
    files, tokenizer = demo.files, Tokenizer.load(resolve_checkpoint(demo.run))
    assert demo.run.name == "run" and tokenizer.chat_template is not None and len(demo.steps) == 4
    for task in TASKS:
        assert len(files[task].read_text().splitlines()) == 60
        assert f"  {task:<10}        60  rouge_l  " in demo.printed
    train = [json.loads(line) for line in files["train"].read_text().splitlines()]
    held = [json.loads(line) for task in TASKS for line in files[task].read_text().splitlines()]
    asked = {tokenizer.render_chat(r["messages"][:1]) for r in train}
    assert not {h["context"] for h in held} & asked  # no held-out question is trained on
    assert all(h["until"] == list(tokenizer.chat_stop) for h in held)
    heldout = [json.loads(line)["passage"] for line in files["search_heldout"].read_text().splitlines()]
    assert [json.loads(line)["text"] for line in files["passages"].read_text().splitlines()] == heldout


def test_every_command_of_the_page_runs(demo, monkeypatch, capsys):
    monkeypatch.chdir(demo.root)
    commands = doc_commands()
    assert commands[0] == "make demo-instruct" and len(commands) > 10
    for line in commands[1:]:
        argv = shlex.split(line)
        assert argv[0] == "mtnlg", line
        verb = argv[1]
        if verb == "serve":
            check_served(Path(argv[2]))
        elif verb == "chat":
            monkeypatch.setattr("sys.stdin", io.StringIO("Which module provides `dumps`?\n"))
            assert main([*argv[1:], "--max-new-tokens", "4"]) == 0, line
        else:
            extra = FEWER.get(verb, []) + (["--rerank-top", "2"] if "--rerank" in argv else [])
            assert main([*argv[1:], *extra]) == 0, line
        out = capsys.readouterr().out
        if verb == "finetune" and "pairs_train" in line:
            assert "English   Latin" in out and "Vorlish   Latin" in out  # the coverage report
        if verb == "search" and "--queries" in argv:
            queries = len(demo.files["search_heldout"].read_text().splitlines())
            assert out.startswith(f"{queries} queries, ") and "recall@5 " in out


def check_served(checkpoint: Path) -> None:
    """The instruction-tuned run answers chat in its template; the embedder serves the vectors it indexed."""
    served = Served(checkpoint)
    try:
        client = served.client()
        if checkpoint.name == "embedder":
            index = Index.load("runs/demo/index")
            texts = [p.text for p in index.passages[:3]]
            data = client.embeddings.create(model="tiny-serve", input=texts).data
            cosine = (np.array([d.embedding for d in data]) * index.vectors[:3]).sum(1)  # the index may be bf16
            assert cosine == pytest.approx(np.ones(3), abs=1e-3)
        else:
            messages = [{"role": "user", "content": "Which module provides `dumps`?"}]
            reply = client.chat.completions.create(model="tiny-serve", messages=messages, max_tokens=4)
            tokenizer = Tokenizer.load(resolve_checkpoint(checkpoint))
            assert reply.usage.prompt_tokens == len(tokenizer.encode(tokenizer.render_chat(messages)))
            assert tokenizer.chat_template is not None
    finally:
        assert "Traceback" not in served.stop()
