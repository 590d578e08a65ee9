"""`mtnlg eval` against lm-evaluation-harness itself: the same local task files through lm-eval's `hf` backend,
through `mtnlg eval`, through lm-eval with the `mtnlg` backend, and through lm-eval's `local-completions`
against a live `mtnlg serve` give the same per-sample log-likelihoods and accuracies."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
lm_eval = pytest.importorskip("lm_eval")

import mtnlg
from mtnlg.cli import main
from mtnlg.eval.harness import Options, evaluate
from mtnlg.eval.scoring import ModelScorer, RowScorer, encode_pair, rolling_windows, token_scores
from mtnlg.eval.tasks import load_task
from mtnlg.interop.hf import import_hf
from mtnlg.tokenizer import Tokenizer
from served import Served

transformers.logging.set_verbosity_error()

WORDS = "the a model learns to predict next token from text data with attention over layers and heads".split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    rng = random.Random(0)
    return Tokenizer.train([sentence(rng, 30) for _ in range(200)], 300)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tokenizer) -> Path:
    """A random-weight GPT-2 saved by transformers, with our tokenizer beside it."""
    path = tmp_path_factory.mktemp("hf-gpt2")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=300, n_layer=2, n_embd=64, n_head=4, n_positions=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save(path)
    return path


@pytest.fixture(scope="module")
def checkpoint(hf_dir, tmp_path_factory) -> Path:
    return import_hf(hf_dir, tmp_path_factory.mktemp("ckpt") / "gpt2")


@pytest.fixture(scope="module")
def task_files(tmp_path_factory) -> dict[str, Path]:
    """A multiple-choice task (choices of different lengths, some contexts ending in a space), a LAMBADA file and
    documents longer than the model's 64-token context, in the formats mtnlg reads."""
    rng = random.Random(1)
    out = tmp_path_factory.mktemp("tasks")
    mc = [{"context": sentence(rng, 8) + (" " if i % 3 == 0 else ""), "choices": [sentence(rng, rng.randint(1, 6)) for _ in range(4)],
           "gold": rng.randrange(4)} for i in range(12)]
    lambada = [{"text": sentence(rng, rng.randint(6, 14))} for _ in range(10)]
    rolling = [{"text": sentence(rng, rng.randint(40, 160))} for _ in range(4)]
    qa = [{"context": f"Question: {sentence(rng, 5)}?\nAnswer:", "answers": [sentence(rng, 2)], "until": ["\n\n"]}
          for _ in range(5)]
    files = {"mc": mc, "lambada": lambada, "rolling": rolling, "qa": qa}
    for name, rows in files.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {name: out / f"{name}.jsonl" for name in files}


LM_EVAL_TASKS = {
    "mc": "output_type: multiple_choice\ndoc_to_text: context\ndoc_to_choice: choices\ndoc_to_target: gold\n"
          "metric_list:\n  - metric: acc\n  - metric: acc_norm\n",
    "lambada": "output_type: loglikelihood\ndoc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\n"
               "doc_to_target: \"{{' '+text.split(' ')[-1]}}\"\nmetric_list:\n  - metric: perplexity\n"
               "    aggregation: perplexity\n    higher_is_better: false\n  - metric: acc\n",
    "rolling": "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: text\nmetric_list:\n"
               "  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n",
    "qa": "output_type: generate_until\ndoc_to_text: context\ndoc_to_target: \"{{answers[0]}}\"\n"
          "generation_kwargs:\n  until: [\"\\n\\n\"]\n  max_gen_toks: 16\n  do_sample: false\nmetric_list:\n"
          "  - metric: exact_match\n",
}


def write_task_yamls(task_files: dict[str, Path], directory: Path) -> Path:
    """The three task files declared as lm-eval tasks local_mc, local_lambada, local_rolling over local JSON."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, body in LM_EVAL_TASKS.items():
        data = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {task_files[name]}\ntest_split: test\n"
        (directory / f"{name}.yaml").write_text(f"task: local_{name}\n{data}{body}")
    return directory


def run_lm_eval(model: str, model_args: str, task_files: dict[str, Path], tmp_path: Path) -> dict:
    """lm-eval's own evaluation of the three task files."""
    from lm_eval.tasks import TaskManager

    tasks = TaskManager(include_path=str(write_task_yamls(task_files, tmp_path)), include_defaults=False)
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[f"local_{n}" for n in LM_EVAL_TASKS],
                                   task_manager=tasks, log_samples=True, batch_size=4)


def task_specs(task_files: dict[str, Path]) -> list[str]:
    return [str(task_files["mc"]), f"lambada={task_files['lambada']}"]


def mtnlg_eval(checkpoint: Path, task_files: dict[str, Path], out: Path, *flags: str) -> dict:
    """`mtnlg eval` as a user runs it; returns the results JSON with each task's samples under "samples"."""
    assert main(["eval", str(checkpoint), "--tasks", *task_specs(task_files), str(task_files["qa"]), "--perplexity",
                 str(task_files["rolling"]), "--max-gen-tokens", "16", "--output", str(out), "--log-samples", *flags]) == 0
    results = json.loads((out / "results.json").read_text())
    results["samples"] = {name: [json.loads(line) for line in (out / f"samples_{name}.jsonl").read_text().splitlines()]
                          for name in results["results"]}
    return results


def assert_same_as_lm_eval(ours: dict, theirs: dict, names: dict[str, str]) -> None:
    """Per-sample log-likelihoods within 1e-5 (or 2 fp32 steps of a sum beyond 100 nats, which lm-eval adds up in
    fp32: a 700-nat document's last bit is 6e-5), identical per-sample acc/acc_norm, the same aggregates."""
    for local, name in names.items():
        their_samples = sorted(theirs["samples"][f"local_{local}"], key=lambda s: s["doc_id"])
        my_samples = ours["samples"][name]
        assert len(their_samples) == len(my_samples) > 0
        for their, my in zip(their_samples, my_samples):
            their_lls = [r[0] if isinstance(r, (list, tuple)) else r for r in their["filtered_resps"]]
            my_lls = [my["loglikelihood"]] if local == "rolling" else [ll for ll, _ in my["resps"]]
            assert my_lls == pytest.approx(their_lls, abs=1e-5, rel=1e-7), (local, their["doc_id"])
            for metric in ("acc", "acc_norm"):
                if metric in their:
                    assert my[metric] == their[metric], (local, metric, their["doc_id"])
        for key, value in theirs["results"][f"local_{local}"].items():
            if "," in key and key in ours["results"][name] and "stderr" not in key:
                assert ours["results"][name][key] == pytest.approx(value, rel=1e-5), (local, key)


NAMES = {"mc": "mc", "lambada": "lambada", "rolling": "rolling"}


@pytest.fixture(scope="module")
def ours(checkpoint, task_files, tmp_path_factory) -> dict:
    return mtnlg_eval(checkpoint, task_files, tmp_path_factory.mktemp("ours"))


@pytest.fixture(scope="module")
def hf_results(hf_dir, task_files, tmp_path_factory) -> dict:
    """lm-eval's own numbers: its hf backend on the random GPT-2 that `checkpoint` was imported from."""
    return run_lm_eval("hf", f"pretrained={hf_dir},dtype=float32,device=cpu", task_files, tmp_path_factory.mktemp("hf"))


@pytest.mark.slow
def test_mtnlg_eval_equals_lm_eval_hf_backend(ours, hf_results):
    assert_same_as_lm_eval(ours, hf_results, NAMES)
    # generate_until: greedy continuations cut at the stop string, the same text as transformers' generate
    theirs = sorted(hf_results["samples"]["local_qa"], key=lambda s: s["doc_id"])
    assert [s["resps"] for s in ours["samples"]["qa"]] == [s["filtered_resps"][0] for s in theirs]
    assert all(s["resps"] for s in ours["samples"]["qa"])
    assert max(s["tokens"] for s in ours["samples"]["rolling"]) > 64  # the windows really roll
    assert set(ours["results"]["mc"]) == {"alias", "acc,none", "acc_stderr,none", "acc_norm,none", "acc_norm_stderr,none"}
    assert ours["n-shot"] == {"mc": 0, "lambada": 0, "qa": 0, "rolling": 0}
    assert ours["reference"]["lambada"] == {"model": "MT-NLG 530B (zero-shot)", "metric": "acc", "value": 0.766}


@pytest.mark.slow
def test_lm_eval_cli_with_the_mtnlg_backend_equals_hf_backend(checkpoint, hf_results, task_files, tmp_path):
    """lm-eval's own command line and task code driving mtnlg's scorer (`mtnlg lm-eval run --model mtnlg`) give
    lm-eval's hf numbers."""
    tasks, out = write_task_yamls(task_files, tmp_path / "tasks"), tmp_path / "out"
    assert main(["lm-eval", "run", "--model", "mtnlg", "--model_args", f"path={checkpoint}", "--tasks",
                 *[f"local_{n}" for n in NAMES], "--include_path", str(tasks), "--output_path", str(out),
                 "--log_samples", "--batch_size", "4"]) == 0
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    view = {"results": {k: results["results"][f"local_{k}"] for k in NAMES}, "samples": {}}
    for k in NAMES:  # lm-eval's samples file (numbers written as strings), in the shape of mtnlg's
        lines = next(out.rglob(f"samples_local_{k}_*.jsonl")).read_text().splitlines()
        for s in sorted(map(json.loads, lines), key=lambda s: s["doc_id"]):
            resps = [[float(r[0]), r[1]] if isinstance(r, list) else float(r) for r in s["filtered_resps"]]
            view["samples"].setdefault(k, []).append({**s, "resps": resps, "loglikelihood": resps[0]})
    assert_same_as_lm_eval(view, hf_results, {k: k for k in NAMES})


@pytest.mark.slow
def test_lm_eval_local_completions_against_mtnlg_serve_gives_the_same_numbers(ours, checkpoint, task_files, tmp_path):
    """lm-eval scoring over HTTP (echo + logprobs, the remote /tokenize and /tokenizer_info) agrees with in-process.

    lm-eval's API client keeps room for one generated token beyond each prompt and rolls its perplexity windows
    one token shorter still (62 tokens for max_length=64, where its hf backend rolls 64): those documents are
    compared with mtnlg's scores of the same 62-token windows."""
    served = Served(checkpoint, name="gpt2-tiny")
    try:
        args = (f"model=gpt2-tiny,base_url={served.url}/v1/completions,tokenizer_backend=remote,max_length=64,"
                "num_concurrent=1,max_retries=1,tokenized_requests=True")
        theirs = run_lm_eval("local-completions", args, task_files, tmp_path)
    finally:
        log = served.stop()
    assert "Traceback" not in log, log
    assert_same_as_lm_eval(ours, theirs, {"mc": "mc", "lambada": "lambada"})
    lm = mtnlg.load(checkpoint, "cpu", dtype="fp32")
    scorer, eod = ModelScorer(lm.model, lm.tokenizer), lm.tokenizer.eod_id
    texts = [json.loads(line)["text"] for line in task_files["rolling"].read_text().splitlines()]
    in_process = [sum(ll for ll, _ in scorer.loglikelihoods(list(rolling_windows(lm.tokenizer.encode(t), eod, 62))))
                  for t in texts]
    served_lls = [s["filtered_resps"][0] for s in sorted(theirs["samples"]["local_rolling"], key=lambda s: s["doc_id"])]
    assert served_lls == pytest.approx(in_process, abs=1e-5, rel=1e-7)
    served_texts = [s["filtered_resps"][0] for s in sorted(theirs["samples"]["local_qa"], key=lambda s: s["doc_id"])]
    assert served_texts == [s["resps"] for s in ours["samples"]["qa"]]


def test_boundary_rule_is_lm_eval_encode_pair(tokenizer):
    """A context's trailing spaces move to the continuation, and the continuation is the tail of the whole
    string's tokens: here encoding the parts separately gives other ids, and lm-eval's own rule gives ours."""
    from lm_eval.api.model import TemplateLM

    class Peer(TemplateLM):  # lm-eval's _encode_pair over our tokenizer; nothing else is used
        eot_token_id = tokenizer.eod_id
        tok_encode = staticmethod(tokenizer.encode)
        loglikelihood_rolling = generate_until = _loglikelihood_tokens = None

    context, continuation = "the model ", "learns"
    separate = (tokenizer.encode(context), tokenizer.encode(continuation))
    ours = encode_pair(tokenizer, context, continuation)
    assert ours != separate
    assert ours == (tokenizer.encode("the model"), tokenizer.encode(" learns"))
    for pair in [(context, continuation), ("the model", " learns"), ("text data  ", " with"), ("a", "ttention")]:
        assert encode_pair(tokenizer, *pair) == Peer()._encode_pair(*pair), pair
    # lm-eval scores an empty context after its prefix token: BOS where the tokenizer has one, else EOS
    assert tokenizer.bos_id == tokenizer.eod_id == Peer().eot_token_id
    assert encode_pair(tokenizer, "", "the model") == ([tokenizer.bos_id], tokenizer.encode("the model"))
    assert encode_pair(tokenizer, "  ", "the") == ([tokenizer.bos_id], tokenizer.encode("  the"))


class Recorder:
    """A scorer that answers nothing: the harness's prompts and requests are what is looked at."""

    max_len = 1024

    def loglikelihoods(self, requests, progress=None):
        return [(0.0, False)] * len(requests)


def test_few_shot_prompts_are_deterministic(tmp_path, tokenizer):
    path = tmp_path / "qa.jsonl"
    rows = [{"context": f"Question {i}:", "choices": [f"yes {i}", f"no {i}"], "gold": i % 2} for i in range(20)]
    path.write_text(json.dumps({"config": {"description": "Answer.\n\n"}}) + "\n" + "".join(json.dumps(r) + "\n" for r in rows))
    task = load_task(str(path))
    prompts = [task.prompts(i, 3, seed=7) for i in range(20)]
    assert prompts == [load_task(str(path)).prompts(i, 3, seed=7) for i in range(20)]  # same seed, same prompts
    assert prompts != [task.prompts(i, 3, seed=8) for i in range(20)]
    # lm-eval's layout: description, then each example's text, target delimiter and gold answer, then the question
    description, *examples, question = prompts[5][0].split("\n\n")
    assert description == "Answer." and question == "Question 5:" and len(examples) == 3
    for example in examples:
        i = int(example.split()[1][:-1])
        assert i != 5 and example == f"Question {i}: {rows[i]['choices'][rows[i]['gold']]}"
    # what the harness scores, whichever documents run with it
    for limit in (None, 4):
        samples = evaluate(Recorder(), tokenizer, [task], Options(num_fewshot=3, seed=7, limit=limit, progress=False))[0].samples
        assert [s["arguments"] for s in samples] == prompts[: limit or 20]


def same_numbers(a: dict, b: dict) -> None:
    """Two `mtnlg eval` results: per-sample log-likelihoods within 1e-5 and the same accuracies."""
    assert a["results"].keys() == b["results"].keys()
    for name, samples in a["samples"].items():
        for x, y in zip(samples, b["samples"][name], strict=True):
            if isinstance(x["resps"], str):  # a generation
                assert x["resps"] == y["resps"], (name, x["doc_id"])
                continue
            lls = [x["loglikelihood"]] if "loglikelihood" in x else [ll for ll, _ in x["resps"]]
            other = [y["loglikelihood"]] if "loglikelihood" in y else [ll for ll, _ in y["resps"]]
            assert lls == pytest.approx(other, abs=1e-5, rel=1e-7), (name, x["doc_id"])
            assert {k: x[k] for k in ("acc", "acc_norm") if k in x} == {k: y[k] for k in ("acc", "acc_norm") if k in y}


@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 1], ids=["tp2", "dp2"])
def test_two_processes_give_the_numbers_of_one(ours, checkpoint, task_files, tmp_path, tp):
    """Under torchrun the model is split (tp 2) or the documents are (two replicas): the same results."""
    out = tmp_path / "out"
    specs = task_specs(task_files)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "mtnlg", "eval",
         str(checkpoint), "--tasks", *specs, str(task_files["qa"]), "--perplexity", str(task_files["rolling"]),
         "--max-gen-tokens", "16", "--tp", str(tp), "--output", str(out), "--log-samples"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("MT-NLG 530B") == 1  # one table, from rank 0
    theirs = json.loads((out / "results.json").read_text())
    assert theirs["config"]["tp"] == tp and theirs["config"]["replicas"] == 2 // tp
    theirs["samples"] = {name: [json.loads(line) for line in (out / f"samples_{name}.jsonl").read_text().splitlines()]
                         for name in theirs["results"]}
    same_numbers(ours, theirs)


def test_row_scorer_equals_model_scorer(checkpoint, task_files, tokenizer):
    """The fixed-shape scorer that training's layouts run gives the numbers of the KV-reusing one."""
    lm = mtnlg.load(checkpoint, "cpu", dtype="fp32")
    tasks = [load_task(spec) for spec in task_specs(task_files)]
    fast = evaluate(ModelScorer(lm.model, lm.tokenizer), lm.tokenizer, tasks, Options(progress=False))
    rows = RowScorer(lambda x, y: token_scores(lm.model(x), y), lm.model.cfg.max_seq_len, rows=5, device=torch.device("cpu"))
    plain = evaluate(rows, lm.tokenizer, tasks, Options(progress=False))
    for a, b in zip(fast, plain):
        assert [ll for s in a.samples for ll, _ in s["resps"]] == pytest.approx([ll for s in b.samples for ll, _ in s["resps"]], abs=1e-5)
        assert a.metrics == pytest.approx(b.metrics, rel=1e-5)


def test_mistakes_are_one_line_each(checkpoint, tmp_path, capsys):
    def error(*args: str) -> str:
        assert main(["eval", str(checkpoint), *args]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        return err

    assert "nope.jsonl: no such task file" in error("--tasks", str(tmp_path / "nope.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a", "choices": ["b", "c"], "gold": 0}\n{"context": "a", "choices": ["b"], "gold": 3\n')
    assert f"{bad}:2: " in error("--tasks", str(bad))
    bad.write_text('{"context": "a", "choices": ["b", "c"], "gold": 0}\n{"context": "a", "choices": ["b"], "gold": 3}\n')
    assert f"{bad}:2: needs \"gold\": the index of the right choice, 0 to 0" in error("--tasks", str(bad))
    assert "unknown task 'squad'" in error("--tasks", f"squad={bad}")
    assert "unknown task 'hellaswagg'" in error("--tasks", "hellaswagg")
    assert "task hellaswag needs its data file (mtnlg downloads nothing): pass hellaswag=FILE" in error("--tasks", "hellaswag")
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"context": " ".join(["the model"] * 80), "choices": ["a", "b"], "gold": 0}) + "\n")
    message = error("--tasks", str(long))
    assert f"{long}:1: the request is" in message and "the model's context is 64" in message and "--truncate" in message
    assert main(["eval", str(checkpoint), "--tasks", str(long), "--truncate"]) == 0
    assert "nothing to evaluate" in error()
    assert "--limit, --stride out of range" in error("--tasks", str(long), "--limit", "0", "--stride", "-1")
    (tmp_path / "doc.txt").write_text("the model learns " * 30)
    assert "stride 65 must be 1 to the model's context, 64" in error("--perplexity", str(tmp_path / "doc.txt"), "--stride", "65")
    assert "--log-samples writes beside the results" in error("--tasks", str(long), "--log-samples")
    (tmp_path / "a").mkdir()
    (tmp_path / "b=1@x").mkdir()  # "=" and "@" in a path are the path's
    for folder in ("a", "b=1@x"):
        (tmp_path / folder / "dev.jsonl").write_text('{"context": "a", "choices": ["b", "c"], "gold": 0}\n')
    assert main(["eval", str(checkpoint), "--tasks", str(tmp_path / "b=1@x" / "dev.jsonl")]) == 0
    capsys.readouterr()
    assert "two tasks are named 'dev'" in error("--tasks", str(tmp_path / "a" / "dev.jsonl"), str(tmp_path / "b=1@x" / "dev.jsonl"))
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"context": "Question: what?\\nAnswer:", "answer": "yes"}\n')
    assert "up to 256 may be generated, over the model's context of 64; lower --max-gen-tokens" in error("--tasks", str(qa))
    assert main(["eval", str(checkpoint), "--tasks", str(qa), "--truncate"]) == 0


def test_lm_eval_backend_arguments_are_checked(checkpoint):
    from mtnlg.errors import MtnlgError
    from mtnlg.eval.lm_eval_backend import MtnlgLM

    with pytest.raises(MtnlgError, match="--model_args dtpye: unknown; mtnlg takes path, device, dtype and batch_tokens"):
        MtnlgLM(path=str(checkpoint), dtpye="bf16")
    with pytest.raises(MtnlgError, match="--model_args needs path=RUN"):
        MtnlgLM()


def benchmark_files(directory: Path) -> dict[str, list[dict]]:
    """Two tiny records of each benchmark, in the fields of the dataset lm-eval reads it from."""
    race_problems = [{"answer": "B", "options": ["a cat", "a dog", "a bird", "a fish"], "question": "Tom has  _  ."},
                     {"answer": "A", "options": ["yes", "no", "maybe", "never"], "question": "Is Tom happy?"},
                     {"answer": "C", "options": ["red", "blue", "green", "black"], "question": "Which colour is it?"}]
    return {
        "lambada": [{"text": "He opened the door and saw the garden"}, {"text": "She said it was late"}],
        "hellaswag": [{"ind": i, "activity_label": "Cooking", "ctx_a": "A man cuts onions.", "ctx_b": "then he",
                       "ctx": "", "endings": ["fries them [title] well.", "sings.", "leaves  now.", "sleeps."],
                       "source_id": "x", "split": "val", "split_type": "indomain", "label": str(i)} for i in (1, 3)],
        "piqa": [{"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Hit it.", "label": 0},
                 {"goal": "Dry hair", "sol1": "Use water.", "sol2": "Use a towel.", "label": 1}],
        "winogrande": [{"sentence": "The trophy did not fit the case because the _ was too big.", "option1": "trophy",
                        "option2": "case", "answer": "1"},
                       {"sentence": "Anna helped Maria because _ was kind.", "option1": "Anna", "option2": "Maria",
                        "answer": "1"}],
        "boolq": [{"question": "is the sky blue", "passage": "The sky is blue.", "idx": 0, "label": 1},
                  {"question": "is fire cold", "passage": "Fire is hot.", "idx": 1, "label": 0}],
        "arc_easy": [{"id": "1", "question": "What melts ice?", "choices": {"text": ["heat", "cold", "dark"],
                      "label": ["A", "B", "C"]}, "answerKey": "A"},
                     {"id": "2", "question": "What do plants need?", "choices": {"text": ["rocks", "light", "salt", "oil"],
                      "label": ["1", "2", "3", "4"]}, "answerKey": "2"}],
        "race": [{"article": "Tom has a dog. It is green.", "problems": repr(race_problems), "example_id": "a"},
                 {"article": "Sam runs.", "problems": repr(race_problems[1:2]), "example_id": "b"}],
    }


LM_EVAL_YAMLS = {"lambada": "lambada/lambada_openai.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
                 "piqa": "piqa/piqa.yaml", "winogrande": "winogrande/default.yaml", "boolq": "super_glue/boolq/default.yaml",
                 "arc_easy": "arc/arc_easy.yaml", "race": "race/race.yaml"}


def test_benchmark_readers_give_lm_eval_requests(tmp_path):
    """Each benchmark's file read by mtnlg gives the (context, continuation) texts that lm-eval's own task
    definition (its shipped YAML, pointed at the same local file) builds."""
    from lm_eval.tasks import TaskManager

    shipped, yamls = Path(lm_eval.__file__).parent / "tasks", tmp_path / "yamls"
    yamls.mkdir()
    files = benchmark_files(tmp_path)
    for name, records in files.items():
        data = tmp_path / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in records))
        splits = "\n".join(f"    {split}: {data}" for split in ("train", "validation", "test"))
        (yamls / f"{name}.yaml").write_text(f"include: {shipped / LM_EVAL_YAMLS[name]}\ntask: local_{name}\n"
                                            f"dataset_path: json\ndataset_name: null\ndataset_kwargs:\n  data_files:\n{splits}\n")
    tasks = TaskManager(include_path=str(yamls), include_defaults=False).load([f"local_{name}" for name in files])["tasks"]
    for name, records in files.items():
        task = tasks[f"local_{name}"]
        task.build_all_requests(rank=0, world_size=1, limit=None)
        theirs: dict[int, list] = {}
        for instance in task.instances:
            theirs.setdefault(instance.doc_id, []).append(tuple(instance.arguments))
        ours = load_task(f"{name}={tmp_path / name}.jsonl")
        assert [ours.pairs(i, ours.prompts(i, 0, 0)) for i in range(len(records))] == [theirs[i] for i in range(len(records))], name
        if name != "lambada":  # the right answer's index (WinoGrande's choices are contexts: lm-eval's doc_to_text)
            gold = task.doc_to_text if name == "winogrande" else task.doc_to_target
            assert [d["gold"] for d in ours.docs] == [gold(d) for d in task.eval_docs], name


def test_perplexity_of_a_shard_equals_that_of_its_text(tiny_data, tmp_path):
    """A token shard's documents are scored as their text would be (the end-of-document token `prepare`
    appended is the prefix, not a scored token), so bits per byte count the text's bytes."""
    from mtnlg.config import ModelConfig
    from mtnlg.eval.tasks import perplexity_task
    from mtnlg.model.gpt import GPT

    tokenizer = Tokenizer.load(tiny_data.parent)
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_name("tiny")).eval()
    shard = perplexity_task(f"{tiny_data}_val")
    texts = tmp_path / "val.jsonl"
    texts.write_text("".join(json.dumps({"text": tokenizer.decode(d["ids"])}) + "\n" for d in shard.docs))
    a, b = evaluate(ModelScorer(model, tokenizer), tokenizer, [shard, perplexity_task(str(texts))], Options(progress=False))
    assert a.task.name == "corpus_val" and len(a.samples) == len(b.samples) > 1
    assert a.metrics == pytest.approx(b.metrics, rel=1e-6)
    assert [s["bytes"] for s in a.samples] == [len(s["doc"]["text"].encode()) for s in b.samples]
    assert all(tokenizer.eod_id not in d["ids"] for d in shard.docs)


class Given:
    """A scorer whose generations are given, one per prompt: the harness's metrics on known predictions."""

    max_len = 1024

    def __init__(self, generations: dict[str, str]):
        self.generations = generations

    def loglikelihoods(self, requests: list, progress=None) -> list:
        assert not requests  # a generation task asks for none
        return []

    def generate(self, prompts: list[str], until: list[str], max_tokens: int, truncate: bool) -> list[str]:
        return [self.generations[p] for p in prompts]


def test_generation_metrics_are_rouge_score_and_sacrebleu(tokenizer, tmp_path):
    """Per document ROUGE-L equals Google's rouge_score (its default tokens: lower case, a-z and 0-9) on the best
    answer; chrF and BLEU are sacrebleu's corpus scores, every answer a reference; the table and the results
    JSON carry all of them."""
    import sacrebleu

    from mtnlg.eval.harness import HIGHER_IS_BETTER
    from mtnlg.eval.results import format_table, results_json

    rouge = pytest.importorskip("rouge_score.rouge_scorer").RougeScorer(["rougeL"])
    cases = [(" The cat sat on the mat.", ["the cat is on the mat"]), ("a b c d", ["d c b a", "x a c"]),
             ("Hello, World! 42", ["hello world 42"]), ("police kill the gunman", ["the gunman police killed"]),
             (" the the the", ["the cat the", "cat"]), ("Über café, naïve", ["uber cafe naive"]), ("", ["something"]),
             ("---", ["..."])]
    task = tmp_path / "gen.jsonl"
    task.write_text("".join(json.dumps({"context": f"Q{i}:", "answers": a}) + "\n" for i, (_, a) in enumerate(cases)))
    given = Given({f"Q{i}:": prediction for i, (prediction, _) in enumerate(cases)})
    (result,) = evaluate(given, tokenizer, [load_task(str(task))], Options(progress=False))
    expected = [max(rouge.score(a, p)["rougeL"].fmeasure for a in answers) for p, answers in cases]
    assert [s["rouge_l"] for s in result.samples] == pytest.approx(expected, abs=1e-12)
    assert result.metrics["rouge_l"] == pytest.approx(sum(expected) / len(expected), abs=1e-12)
    predictions = [p.strip() for p, _ in cases]
    references = [[answers[i] if i < len(answers) else None for _, answers in cases] for i in range(2)]
    assert result.metrics["chrf"] == sacrebleu.corpus_chrf(predictions, references).score
    assert result.metrics["bleu"] == sacrebleu.corpus_bleu(predictions, references).score > 0
    assert "chrf_stderr" not in result.metrics and "bleu_stderr" not in result.metrics
    table = format_table([result]).splitlines()
    assert [line.split()[-2:] for line in table if "chrf" in line or "bleu" in line] == [
        ["chrf", f"{result.metrics['chrf']:.4f}"], ["bleu", f"{result.metrics['bleu']:.4f}"]]
    assert any(line.split()[0] == "rouge_l" and "±" in line for line in table)
    summary = results_json([result], "model", Options(), {}, 0.0)
    assert {"rouge_l,none", "rouge_l_stderr,none", "chrf,none", "bleu,none"} <= set(summary["results"]["gen"])
    metrics = ("exact_match", "f1", "rouge_l", "chrf", "bleu")
    assert summary["higher_is_better"]["gen"] == {m: True for m in metrics}
    assert all(HIGHER_IS_BETTER[m] for m in metrics)
