"""`mtnlg <verb>`: one command for the whole life of a model."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from mtnlg.defaults import (
    BATCH_SIZE, CHUNK_TOKENS, INFERENCE_DTYPES, MAX_GEN_TOKENS, RERANK_TOP, RERANK_WEIGHT, TOKEN_BUDGET,
)
from mtnlg.errors import MtnlgError


def cmd_prepare(args: argparse.Namespace) -> None:
    from mtnlg.data.prepare import curated_blend, prepare
    from mtnlg.files import write_text_atomic
    from mtnlg.tokenizer import Tokenizer

    output = Path(args.output)
    trained = not args.tokenizer
    tokenizer = _train_tokenizer(args.inputs, args.vocab_size, args.json_key) if trained else Tokenizer.load(args.tokenizer)
    blend = curated_blend(args.inputs)  # `mtnlg curate --weights` output: one shard per source
    parts = [(w, files, Path(f"{output}-{name}")) for w, name, files in blend] if blend else [(1.0, args.inputs, output)]
    for _, inputs, prefix in parts:
        stats = prepare(
            inputs, prefix, tokenizer, json_key=args.json_key, val_fraction=args.val_fraction,
            seed=args.seed, workers=args.workers, on_bad_line=args.on_bad_line,
        )
        for shard, split in zip(stats["outputs"], ("train", "val")):
            print(f"wrote {shard} ({stats[split + '_documents']} documents, {stats[split + '_tokens']:,} tokens)")
        if stats["skipped_lines"]:
            print(f"skipped {stats['skipped_lines']} malformed lines")
    if trained:  # only once the shards exist: a failed prepare leaves nothing behind
        print(f"trained a {tokenizer.vocab_size}-token byte-level BPE -> {tokenizer.save(output.parent)}")
    if blend:
        spec = " ".join(f"{w:g} {prefix}" for w, _, prefix in parts) + "\n"
        print(f"the sources' weights as a blend -> {write_text_atomic(Path(f'{output}.blend'), spec)}; "
              f"train with --train.data @{output}.blend")


def _train_tokenizer(inputs: list[str], vocab_size: int, json_key: str):
    from mtnlg.data.prepare import read_documents
    from mtnlg.tokenizer import Tokenizer

    return Tokenizer.train((doc for p in inputs for doc in read_documents(Path(p), json_key, "skip")), vocab_size)


def cmd_curate(args: argparse.Namespace) -> None:
    """Clean pretraining text before `prepare`: dedup, decontamination, quality, PII (mtnlg.curate)."""
    from mtnlg.curate.minhash import MinHash
    from mtnlg.curate.pipeline import Options, curate, default_stages
    from mtnlg.curate.quality import Thresholds

    stages = tuple(s for arg in args.stages or [] for s in arg.split(",") if s) or default_stages(
        languages=bool(args.languages or args.split_languages), tasks=bool(args.tasks))
    options = Options(
        inputs=[Path(p) for p in args.inputs], output=Path(args.output), stages=stages, json_key=args.json_key,
        on_bad_line=args.on_bad_line,
        workers=args.workers, cluster=args.cluster, minhash=MinHash(args.shingle, args.bands, args.rows, args.seed),
        threshold=args.threshold, verify=not args.no_verify, tasks=[Path(p) for p in args.tasks],
        quality=Thresholds.parse(args.quality),
        languages=tuple(code for arg in args.languages for code in arg.split(",") if code),
        split_languages=args.split_languages, against=[Path(p) for p in args.against], keep_removed=args.keep_removed,
        weights=_weights(args.weights) if args.weights else {},
    )
    report = curate(options)
    for stage in report["stages"]:
        print(f"{stage['stage']:<14} {stage['documents_in']:>9,} -> {stage['documents_out']:>9,} documents, "
              f"{stage['bytes_in']:>12,} -> {stage['bytes_out']:>12,} bytes")
    print(f"wrote {report['output']} and {Path(args.output) / 'report.json'}")


def _weights(path: str) -> dict[str, float]:
    """--weights FILE: a JSON object, each input as given on the command line -> its weight in the blend."""
    try:
        weights = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise MtnlgError(f"--weights {path}: not a readable JSON file ({e})") from None
    if not isinstance(weights, dict) or not all(isinstance(w, (int, float)) for w in weights.values()):
        raise MtnlgError(f'--weights {path}: expected an object of input -> weight, like {{"web.jsonl": 0.7}}')
    return {str(k): float(v) for k, v in weights.items()}


def cmd_tokenizer(args: argparse.Namespace) -> None:
    tokenizer = _train_tokenizer(args.inputs, args.vocab_size, args.json_key)
    print(f"trained a {tokenizer.vocab_size}-token byte-level BPE -> {tokenizer.save(args.output)}")


def cmd_train(args: argparse.Namespace) -> int:
    from mtnlg.config import load_config

    return _fit(load_config(_config_path(args.config), args.overrides), args.resume)


def cmd_finetune(args: argparse.Namespace) -> int:
    from mtnlg.finetune.config import finetune_config

    return _fit(finetune_config(args.base, args.data, args.config and _config_path(args.config), args.overrides), args.resume)


def _fit(config, resume: bool | str) -> int:
    """Train (or fine-tune) as `config` says, reporting on rank 0; the exit code says how it ended."""
    from mtnlg.checkpoint import checkpoint_bytes
    from mtnlg.finetune.data import read_records, translation_texts
    from mtnlg.model.flops import human
    from mtnlg.tokenizer import coverage_report
    from mtnlg.train.trainer import Trainer

    trainer = Trainer(config, resume=resume)
    say = print if trainer.dist.is_main else lambda *_, **__: None
    if trainer.resumed_from is not None:
        say(f"resuming {trainer.run_dir} from step {trainer.step} ({trainer.resumed_from})", flush=True)
    else:
        say(f"starting {trainer.run_dir} from {trainer.base or 'scratch'}", flush=True)
    if config.finetune.data:
        data, val = trainer.train_data, trainer.val_data
        cut = f"; {data.cut} cut to model.max_seq_len {config.model.max_seq_len}" if data.cut else ""
        cut += f", {data.dropped} of them dropped with no response left" if data.dropped else ""
        say(f"fine-tuning on {len(data.examples)} examples ({len(val.examples) if val else 0} held out for "
            f"validation{cut})", flush=True)
        languages = trainer.dist.is_main and translation_texts(r for _, r in read_records(Path(config.finetune.data)))
        if languages:
            say(f"the tokenizer on each language:\n{coverage_report(trainer.tokenizer, languages)}", flush=True)
    size = human(checkpoint_bytes(config.model, config.train.consolidate == "every", config.lora), "B")
    if config.lora.r:
        size += " (the adapters and their optimizer state)"
    say(f"each checkpoint takes about {size} in {trainer.checkpoints_dir} (train.keep_last = "
        f"{config.train.keep_last or 'all'} kept)", flush=True)
    result = trainer.fit()
    if result.stopped_by:
        say(f"stopped by {result.stopped_by} at step {result.step}; checkpoint {result.checkpoint}; continue with --resume")
        return 130 if result.stopped_by == "SIGINT" else 143
    val = f", validation loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    say(f"done: step {result.step}{val}; checkpoint {result.checkpoint}")
    return 0


def _config_path(name: str) -> Path:
    """A TOML path, or the name of a config shipped with mtnlg (`demo`, `tiny`, `gpt2`, ...)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = Path(__file__).parent / "configs" / (path.stem + ".toml")
    return shipped if shipped.is_file() and path.suffix in ("", ".toml") and path.parent == Path(".") else path


def cmd_generate(args: argparse.Namespace) -> None:
    from mtnlg.parallel.launch import world_size

    with _output_from_rank_0():
        tp = args.tp if args.tp is not None else world_size()
        if tp == 1 and world_size() > 1:
            raise MtnlgError(
                f"{world_size()} processes were started but --tp is 1; pass --tp {world_size()} to split the model "
                "over them, or run one process"
            )
        if tp != world_size():
            raise _tp_mismatch(tp)
        _generate(args, tp)


def _tp_mismatch(tp: int) -> MtnlgError:
    from mtnlg.parallel.launch import world_size

    running = world_size()
    return MtnlgError(f"tp {tp} splits the model over {tp} processes, but {running} {'is' if running == 1 else 'are'} "
                      f"running; launch them with torchrun --nproc-per-node {tp}")


def _generate(args: argparse.Namespace, tp: int) -> None:
    import json

    from tqdm import tqdm

    import mtnlg

    params = _sampling(args)
    prompts = list(args.prompt or []) + (_read_prompts(Path(args.prompts_file)) if args.prompts_file else [])
    if not prompts:
        raise MtnlgError("nothing to generate from; pass --prompt TEXT or --prompts-file FILE")
    model = mtnlg.load(args.checkpoint, args.device, tp=tp, dtype=args.dtype)
    if not args.json and len(prompts) == 1 and args.n == 1 and args.num_beams == 1:
        sys.stdout.write("" if args.echo else prompts[0])
        _print_stream(model, prompts[0], params)
        return
    bar = tqdm(total=len(prompts) * args.n, unit=" completions", file=sys.stderr, leave=False,
               disable=None if _is_rank_0() else True)
    for completion in model.completions(prompts, args.batch_size, **params):
        prompt = prompts[completion.index]
        if args.json:
            line = json.dumps({"prompt": prompt, **vars(completion)}, ensure_ascii=False)
        else:
            line = f"--- prompt {completion.index} ({completion.finish_reason})\n{prompt}{completion.text}"
        bar.write(line, file=sys.stdout)
        sys.stdout.flush()  # each batch is on disk as soon as it is done
        bar.update()
    bar.close()


@contextlib.contextmanager
def _output_from_rank_0() -> Iterator[None]:
    """Under torchrun every process runs the command and ends with the same text: only rank 0 prints it."""
    if _is_rank_0():
        yield
        return
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        yield


def _is_rank_0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _read_prompts(path: Path) -> list[str]:
    """One prompt per line; a .jsonl line is a JSON string or an object with a "prompt" field."""
    import json

    if not path.is_file():
        raise MtnlgError(f"{path}: no such prompts file; pass a text file with one prompt per line, or .jsonl")
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            prompts.append(line)
            continue
        try:
            value = json.loads(line)
        except ValueError as e:
            raise MtnlgError(f"{path}:{number}: invalid JSON ({e}); fix the line") from None
        value = value.get("prompt") if isinstance(value, dict) else value
        if not isinstance(value, str):
            raise MtnlgError(f'{path}:{number}: expected a string or {{"prompt": "..."}}; fix the line')
        prompts.append(value)
    return prompts


def cmd_chat(args: argparse.Namespace) -> None:
    """A quick try in the terminal: the conversation so far, rendered by the model's chat template (as the
    server and fine-tuning render it), is the prompt of each reply."""
    import mtnlg

    model = mtnlg.load(args.checkpoint, args.device, dtype=args.dtype)
    tokenizer = model.tokenizer
    params = {**_sampling(args), "truncate": True}
    params["stop"] = [*params["stop"], *tokenizer.chat_stop]
    messages: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    tokenizer.render_chat(messages)  # a template that cannot render the system message fails before the first turn
    print("mtnlg chat: type a message, an empty line or Ctrl-D to quit.")
    while True:
        try:
            message = input("User: ").strip()
        except EOFError:
            break
        if not message or message in ("exit", "quit"):
            break
        messages.append({"role": "user", "content": message})
        sys.stdout.write("Assistant:")
        reply = _print_stream(model, tokenizer.render_chat(messages), params)
        messages.append({"role": "assistant", "content": reply.strip()})


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    import mtnlg
    from mtnlg.serve.app import Settings, create_app
    from mtnlg.checkpoint import resolve_checkpoint

    checkpoint = resolve_checkpoint(args.checkpoint)  # a wrong path fails here, before the server starts
    name = args.served_model_name or args.checkpoint  # as vLLM does: the path as given
    api_key = args.api_key or os.environ.get("MTNLG_API_KEY")
    settings = Settings(name=name, max_num_seqs=args.max_num_seqs, max_queue=args.max_queue,
                        token_budget=args.token_budget, api_key=api_key, pooling=args.pooling)
    if args.max_num_seqs < 1 or not 0 <= args.port < 65536:
        raise MtnlgError(f"need --max-num-seqs >= 1 and a --port in 0-65535, got {args.max_num_seqs} and {args.port}")
    if args.token_budget is not None and args.token_budget <= args.max_num_seqs:
        raise MtnlgError(f"--token-budget {args.token_budget} must exceed --max-num-seqs {args.max_num_seqs}, "
                         "or prompts are never read")
    if args.max_queue < 0:
        raise MtnlgError(f"--max-queue must be 0 or more, got {args.max_queue}")

    print(f"mtnlg serve: loading {checkpoint}; serving {name} on http://{args.host}:{args.port} (playground at /, "
          "GET /health answers 503 until the model is ready)", file=sys.stderr, flush=True)
    failed: list[str] = []

    def load() -> mtnlg.LanguageModel:
        try:
            return mtnlg.load(checkpoint, args.device, dtype=args.dtype)
        except Exception as e:  # the server is up by now: stop it, then say why
            failed.append(str(e) if isinstance(e, MtnlgError) else f"loading {checkpoint} failed: {type(e).__name__}: {e}")
            server.should_exit = True
            raise

    server = uvicorn.Server(uvicorn.Config(create_app(settings, load), host=args.host, port=args.port, log_level="warning"))
    server.run()
    if failed:
        raise MtnlgError(failed[0])


def _print_stream(model, prompt: str, params: dict) -> str:
    """Write the completion to the terminal as it arrives, then a newline; return its text."""
    text = ""
    for delta in model.stream(prompt, **params):
        text += delta
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return text


def _add_sampling_args(p: argparse.ArgumentParser, temperature: float = 0.8) -> None:
    p.add_argument("checkpoint", help="a run directory, checkpoint directory or imported model")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=temperature, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--stop-token-id", dest="stop_token_ids", type=int, action="append", default=[])
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-document token")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=INFERENCE_DTYPES, default="auto",
                   help="weights for inference: bf16 reads half the bytes per token (1.5-1.6x faster decoding on a Zen 4 CPU "
                   "with AVX512_BF16, measured), int8 a quarter (x86 CPUs with AVX2); auto (default): bf16 where the "
                   "CPU or GPU computes it natively, else fp32")


def _sampling(args: argparse.Namespace) -> dict:
    """The sampling settings among the parsed arguments (option names follow Sampling's fields)."""
    from dataclasses import fields

    from mtnlg.inference.generate import Sampling

    params = {f.name: getattr(args, f.name) for f in fields(Sampling) if hasattr(args, f.name)}
    Sampling(**params)  # a bad setting fails here, before the model loads
    return params


def cmd_eval(args: argparse.Namespace) -> None:
    """Tasks and perplexity on a checkpoint; under torchrun, documents split over tp-sized replicas."""
    import time

    import mtnlg
    from mtnlg.eval.harness import Options, evaluate
    from mtnlg.eval.results import format_table, results_json, write_results
    from mtnlg.eval.scoring import ModelScorer
    from mtnlg.eval.tasks import load_task, perplexity_task
    from mtnlg.parallel.launch import world_size

    specs = [spec for arg in args.tasks for spec in arg.split(",") if spec]
    if not specs and not args.perplexity:
        raise MtnlgError("nothing to evaluate; pass --tasks FILE (or NAME=FILE) and/or --perplexity PATH")
    if args.log_samples and not args.output:
        raise MtnlgError("--log-samples writes beside the results: pass --output DIR or FILE.json too")
    limits = {"--num-fewshot": args.num_fewshot >= 0, "--limit": args.limit is None or args.limit > 0,
              "--stride": args.stride is None or args.stride > 0, "--max-gen-tokens": args.max_gen_tokens > 0,
              "--batch-tokens": args.batch_tokens > 0, "--tp": args.tp is None or args.tp > 0}
    if not all(limits.values()):
        raise MtnlgError(f"{', '.join(k for k, ok in limits.items() if not ok)} out of range: --num-fewshot takes 0 "
                         "or more, the others 1 or more")
    tp, world = args.tp or 1, world_size()
    tasks = [load_task(spec) for spec in specs] + [perplexity_task(path) for path in args.perplexity]
    options = Options(num_fewshot=args.num_fewshot, seed=args.fewshot_seed, limit=args.limit, truncate=args.truncate,
                      stride=args.stride, max_gen_tokens=args.max_gen_tokens, progress=_is_rank_0())
    start = time.perf_counter()
    device = args.device
    if world > 1 and tp == 1:  # replicas of a whole model, each on its own device, talk only to gather answers
        device = _join_group(args.device)
    lm = mtnlg.load(args.checkpoint, device, tp=tp, dtype=args.dtype)  # tp > 1 joins the group itself
    rank = int(os.environ.get("RANK", "0"))
    results = evaluate(ModelScorer(lm.model, lm.tokenizer, args.batch_tokens), lm.tokenizer, tasks, options,
                       ranks=(rank // tp, world // tp))
    if not _is_rank_0():
        return
    print(format_table(results))
    if args.output:
        config = {"dtype": args.dtype, "device": str(next(lm.model.parameters()).device), "tp": tp,
                  "replicas": world // tp, "batch_tokens": args.batch_tokens, "truncate": args.truncate, "stride": args.stride}
        summary = results_json(results, args.checkpoint, options, config, time.perf_counter() - start)
        print(f"wrote {write_results(Path(args.output), summary, results, args.log_samples)}")


def _join_group(device: str | None):
    """Join torchrun's group as one of its data-parallel ranks; returns this rank's device."""
    from mtnlg.config import ParallelConfig
    from mtnlg.parallel.launch import init_distributed, world_size
    from mtnlg.train.trainer import pick_device

    return init_distributed(ParallelConfig(dp_shard=world_size()), pick_device(device or "auto", "--device")).device


def cmd_lm_eval(argv: list[str]) -> int:
    """lm-evaluation-harness's own command line, with the `mtnlg` model registered (lm-eval 0.4 finds no
    models outside its source tree)."""
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        raise MtnlgError("lm-eval is not installed; pip install 'lm-eval[api]'") from None
    import mtnlg.eval.lm_eval_backend  # noqa: F401  registers --model mtnlg

    saved, sys.argv = sys.argv, ["lm-eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0


def cmd_embed(args: argparse.Namespace) -> None:
    from mtnlg.search import build_index

    if args.batch_size < 1:
        raise MtnlgError(f"--batch-size must be 1 or more, got {args.batch_size}")
    index = build_index(args.checkpoint, args.files, args.output, pooling=args.pooling, chunk_tokens=args.chunk_tokens,
                        json_key=args.json_key, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                        progress=True)
    print(f"wrote {index.directory}: {len(index)} passages of at most {index.info['chunk_tokens']} tokens, "
          f"{index.info['dimension']}-dimensional vectors ({args.pooling} pooling)")


def cmd_search(args: argparse.Namespace) -> None:
    from mtnlg.search import Index, evaluate_retrieval, format_hits, read_pairs, retrieve

    if bool(args.query) == bool(args.queries):
        raise MtnlgError("pass QUERY text to search for, or --queries FILE.jsonl to measure recall, not both or neither")
    if args.k < 1 or (args.rerank_top is not None and args.rerank_top < 1):
        raise MtnlgError(f"-k and --rerank-top must be 1 or more, got {args.k} and {args.rerank_top}")
    if (args.rerank_top is not None or args.rerank_weight is not None) and not args.rerank:
        raise MtnlgError("--rerank-top and --rerank-weight set how --rerank reorders; pass --rerank too, or drop them")
    if args.rerank_weight is not None and args.rerank_weight < 0:
        raise MtnlgError(f"--rerank-weight must be 0 or more, got {args.rerank_weight}")
    index = Index.load(args.index)
    pairs = read_pairs(Path(args.queries)) if args.queries else None
    lm = index.load_model(args.model, args.device, args.dtype)
    top = args.rerank_top or RERANK_TOP
    weight = RERANK_WEIGHT if args.rerank_weight is None else args.rerank_weight
    if pairs is None:
        for query, hits in zip(args.query, retrieve(index, lm, args.query, args.k, args.rerank, top, weight)):
            print(format_hits(query, hits))
        return
    metrics = evaluate_retrieval(index, lm, pairs, args.k, args.rerank, top, weight, progress=True)
    how = f"reranking the top {max(args.k, top)} with log-likelihood (weight {weight})" if args.rerank else "by cosine similarity"
    print(f"{metrics.pop('queries')} queries, {how}")
    missing = metrics.pop("not_in_index")
    print("  ".join(f"{name} {value:.3f}" for name, value in metrics.items()))
    if missing:
        print(f"{missing} of the queries' passages are in no index entry (count as misses); check the passage texts")


def cmd_info(args: argparse.Namespace) -> None:
    from mtnlg.config import ModelConfig
    from mtnlg.model.flops import TRAINING_BYTES_PER_PARAM, human, model_size

    if Path(args.model).exists():
        from mtnlg.checkpoint import load_config_file, resolve_checkpoint

        cfg = load_config_file(resolve_checkpoint(args.model)).model
    else:  # a preset: no torch needed
        cfg = ModelConfig.from_name(args.model)
    size = model_size(cfg, args.seq_len)
    seq = args.seq_len or cfg.max_seq_len
    shape = f"{cfg.n_layer} layers, d_model {cfg.d_model}, {cfg.n_head} heads ({cfg.n_kv_head} kv), d_ff {cfg.d_ff}"
    print(f"model          {args.model}: {shape}, vocab {cfg.vocab_size}, context {cfg.max_seq_len}")
    print(f"               {cfg.norm}, {cfg.mlp}, {cfg.position} positions, {'tied' if cfg.tie_embeddings else 'untied'} head")
    print(f"parameters     {size.params:,} ({human(size.params)}; {human(size.params - size.embedding_params)} outside embeddings)")
    print(f"FLOPs/token    {human(size.flops_per_token)} forward+backward at sequence {seq} (6N + attention)")
    reads = ", ".join(f"{human(size.matmul_params * nbytes, 'B')} {dtype}"
                      for dtype, nbytes in (("fp32", 4), ("bf16", 2), ("int8", 1)))
    print(f"decode reads   {reads}: the matrix weights, once per step whatever the batch (--dtype)")
    print(f"training state {sum(TRAINING_BYTES_PER_PARAM.values())} bytes/parameter = {human(size.training_bytes, 'B')} before activations")
    for what, nbytes in TRAINING_BYTES_PER_PARAM.items():
        print(f"  {what:<20} {nbytes:>2} B/param  {human(size.params * nbytes, 'B'):>10}")
    gpus = -(-size.training_bytes // (80 * 2**30))
    print(f"               at least {gpus:,} GPU{'s' if gpus > 1 else ''} of 80 GiB for the training state alone")


def cmd_plan(args: argparse.Namespace) -> None:
    from mtnlg.config import ModelConfig
    from mtnlg.parallel.planner import MATMUL_EFFICIENCY, format_plan, plan

    if args.check and args.zero1:
        raise MtnlgError("--check builds layouts as mtnlg trains them, without ZeRO-1; drop --zero1 or --check")
    tokens = args.tokens or (270e9 if args.model == "mt-nlg-530b" else 300e9)
    efficiency = args.efficiency or MATMUL_EFFICIENCY
    layouts = plan(
        ModelConfig.from_name(args.model), args.gpus, args.gpu, args.global_batch, args.seq, tokens=tokens,
        micro_batch=args.micro_batch, tp=args.tp, pp=args.pp, zero1=args.zero1, efficiency=efficiency,
    )
    print(format_plan(layouts, args.gpu, limit=None if args.all else 10, efficiency=efficiency, zero1=args.zero1))
    if args.check:
        from mtnlg.parallel.dryrun import check_layout

        print("\nchecking the first layout ...", flush=True)
        print(check_layout(ModelConfig.from_name(args.model), layouts[0], args.gpus, args.global_batch, args.seq))


def cmd_plot(args: argparse.Namespace) -> None:
    from mtnlg.train.metrics import plot_losses

    print(plot_losses(args.run, args.output))


def cmd_import(args: argparse.Namespace) -> None:
    if args.format == "hf":
        from mtnlg.interop.hf import import_hf

        if args.base:
            raise MtnlgError("--base is for import peft; a Hugging Face model folder holds its whole model")
        print(f"wrote mtnlg checkpoint {import_hf(args.src, args.dst, force=args.force)} from {args.src}")
        return
    from mtnlg.interop.peft import import_peft

    if not args.base:
        raise MtnlgError("import peft needs --base: the mtnlg checkpoint of the model the adapter was trained on")
    print(f"wrote mtnlg LoRA checkpoint {import_peft(args.src, args.base, args.dst, force=args.force)} from {args.src}")


def cmd_export(args: argparse.Namespace) -> None:
    if args.format == "hf":
        from mtnlg.interop.hf import export_hf

        print(f"wrote Hugging Face model {export_hf(args.src, args.dst, force=args.force)} (load it with from_pretrained)")
        return
    from mtnlg.interop.peft import export_peft

    print(f"wrote peft adapter {export_peft(args.src, args.dst, force=args.force)} (load it with PeftModel.from_pretrained "
          "on the base's mtnlg export hf)")


def cmd_merge(args: argparse.Namespace) -> None:
    from mtnlg.finetune.lora import merge_checkpoint

    print(f"wrote mtnlg checkpoint {merge_checkpoint(args.run, args.output, force=args.force)} (base model with the "
          "adapters folded in)")


def cmd_consolidate(args: argparse.Namespace) -> None:
    from mtnlg.checkpoint import consolidate, resolve_checkpoint
    from mtnlg.model.flops import human

    path = consolidate(resolve_checkpoint(args.run))
    print(f"wrote {path} ({human(path.stat().st_size, 'B')})")


def cmd_demo(args: argparse.Namespace) -> None:
    if args.instruct:
        from mtnlg.demo_instruct import run_instruct_demo

        run_instruct_demo(Path(args.out), args.overrides)
    else:
        from mtnlg.demo import run_demo

        run_demo(Path(args.out), args.overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtnlg", description="Train, evaluate and serve GPT-style language models.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("prepare", help="text/jsonl -> token shards (.bin + .idx), train/validation split")
    p.add_argument("inputs", nargs="+", help=".txt or .jsonl files, or folders of them")
    p.add_argument("--output", required=True, help="output prefix: writes PREFIX_train and PREFIX_val shards")
    p.add_argument("--tokenizer", help="tokenizer.json, its folder, or a GPT-2 vocab.json+merges.txt folder")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE size to train when no --tokenizer is given")
    p.add_argument("--json-key", default="text", help="the field holding the text in .jsonl lines")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of documents held out for validation")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--on-bad-line", choices=("fail", "skip"), default="fail", help="malformed jsonl lines")
    p.add_argument("--seed", type=int, default=1234)
    p.set_defaults(handler=cmd_prepare)

    p = verbs.add_parser("curate", help="clean text before prepare: exact/fuzzy dedup, decontamination, quality, PII")
    p.add_argument("inputs", nargs="+", help=".txt or .jsonl files, or folders of them (earlier inputs win ties)")
    p.add_argument("--output", required=True, help="folder: documents.jsonl, report.json, work/ (for resuming)")
    p.add_argument("--stages", nargs="+", help="in order, from exact, language, quality, fuzzy, decontaminate, pii (default: "
                   "exact quality fuzzy pii, with language after exact when languages are asked for and "
                   "decontaminate before pii when --tasks is given)")
    p.add_argument("--json-key", default="text", help="the field holding the text in .jsonl lines")
    p.add_argument("--on-bad-line", choices=("fail", "skip"), default="fail", help="malformed jsonl lines (skipped "
                   "ones are listed in the report)")
    p.add_argument("--workers", type=int, default=1, help="processes for the per-document work")
    p.add_argument("--cluster", help="run the per-document work on a Dask cluster: its scheduler's address "
                   "(tcp://host:8786), or 'local' for one of --workers processes on this machine (docs/curate.md)")
    p.add_argument("--threshold", type=float, default=0.8, help="Jaccard similarity of near duplicates")
    p.add_argument("--shingle", type=int, default=5, help="words per MinHash shingle")
    p.add_argument("--bands", type=int, default=14, help="LSH bands (bands x rows permutations)")
    p.add_argument("--rows", type=int, default=8, help="LSH rows per band")
    p.add_argument("--seed", type=int, default=0, help="of the MinHash permutations")
    p.add_argument("--against", nargs="+", default=[], metavar="DIR", help="earlier `mtnlg curate` outputs: "
                   "near duplicates of their documents are removed from these inputs (their saved signatures are "
                   "used, not recomputed)")
    p.add_argument("--no-verify", action="store_true", help="take LSH candidates as duplicates without checking "
                   "their exact Jaccard (faster, less precise)")
    p.add_argument("--tasks", nargs="+", default=[], help="evaluation task files (JSONL, or text lines) to "
                   "decontaminate against")
    p.add_argument("--quality", nargs="+", default=[], metavar="NAME=VALUE",
                   help="change a quality threshold, e.g. min_words=20 (docs/curate.md lists them)")
    p.add_argument("--languages", nargs="+", default=[], help="the language stage keeps only these ISO 639-1 codes "
                   "(e.g. en de); without it every document is kept and labelled")
    p.add_argument("--split-languages", action="store_true", help="also write DIR/languages/CODE.jsonl per language")
    p.add_argument("--keep-removed", action="store_true", help="write removed documents to DIR/removed/STAGE.jsonl")
    p.add_argument("--weights", metavar="FILE", help="JSON of input -> weight: writes each source apart, and "
                   "`mtnlg prepare DIR` turns them into a weighted training blend")
    p.set_defaults(handler=cmd_curate)

    p = verbs.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    p.add_argument("inputs", nargs="+")
    p.add_argument("--output", required=True, help="folder to write tokenizer.json into")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--json-key", default="text")
    p.set_defaults(handler=cmd_tokenizer)

    p = verbs.add_parser("train", help="train from a TOML config; --section.key value overrides")
    p.add_argument("config", help="a TOML file, or a shipped config name: demo, tiny, gpt2, mt-nlg-530b")
    p.add_argument(
        "--resume", nargs="?", const=True, default=False, choices=["auto"],
        help="continue from the run's latest checkpoint; --resume auto: continue if there is one, else start "
        "(for preemptible jobs that rerun the same command)",
    )
    p.set_defaults(handler=cmd_train)

    p = verbs.add_parser("finetune", help="supervised fine-tuning (full or LoRA) of a checkpoint on instruction, chat, "
                         "prompt/completion or translation examples, or of an embedder on query/passage pairs; "
                         "--section.key value overrides")
    p.add_argument("base", metavar="BASE", help="the model to start from: a run, checkpoint or imported model")
    p.add_argument("--data", required=True, help="a .jsonl (or .json) file of Alpaca, chat, prompt/completion or translation "
                   "records, or of {query, passage} pairs (docs/finetuning.md)")
    p.add_argument("--config", help="a TOML file of settings (e.g. [lora] r = 8); overrides win over it")
    p.add_argument("--resume", nargs="?", const=True, default=False, choices=["auto"],
                   help="continue the run's latest checkpoint (auto: if there is one)")
    p.set_defaults(handler=cmd_finetune)

    p = verbs.add_parser("merge", help="fold a LoRA run's adapters into its base model -> a whole mtnlg checkpoint")
    p.add_argument("run", metavar="RUN", help="a LoRA run directory or checkpoint")
    p.add_argument("output", metavar="OUTPUT", help="the folder to write the merged checkpoint to")
    p.add_argument("--force", action="store_true", help="replace OUTPUT if it exists and is not empty")
    p.set_defaults(handler=cmd_merge)

    p = verbs.add_parser("generate", help="continue prompts from a checkpoint or run directory")
    _add_sampling_args(p)
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="one prompt per line, or .jsonl of strings / {\"prompt\": ...}")
    p.add_argument("--n", "--num-completions", dest="n", type=int, default=1,
                   help="completions per prompt (under torchrun spell it --num-completions: torchrun claims --n)")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE,
                   help="sequences decoded together (default %(default)s): more is faster per token and takes more memory")
    p.add_argument("--num-beams", type=int, default=1, help="> 1: beam search")
    p.add_argument("--length-penalty", type=float, default=1.0)
    p.add_argument("--logprobs", type=int, help="report log-probabilities with the top N alternatives")
    p.add_argument("--echo", action="store_true", help="include the prompt in the output text")
    p.add_argument("--truncate", action="store_true", help="cut overlong prompts from the left")
    p.add_argument("--json", action="store_true", help="one JSON object per completion")
    p.add_argument(
        "--tp", type=int, help="split the model over N processes started by torchrun --nproc-per-node N "
        "(tensor parallel; default: as many as were started)"
    )
    p.set_defaults(handler=cmd_generate)

    p = verbs.add_parser("chat", help="talk to a model in the terminal (its chat template, as the server uses)")
    _add_sampling_args(p, temperature=0.7)
    p.add_argument("--system", help="a system message to start the conversation with")
    p.set_defaults(handler=cmd_chat)

    p = verbs.add_parser("serve", help="an OpenAI-compatible HTTP server (completions, chat, embeddings) with a playground")
    p.add_argument("checkpoint", help="a run directory, checkpoint directory or imported model")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-num-seqs", type=int, default=16, help="sequences decoded together (KV-cache slots)")
    p.add_argument("--max-queue", type=int, default=64, help="sequences that may wait for a slot; past it: 503")
    p.add_argument("--token-budget", type=int,
                   help="tokens per engine step, decode rows plus prompt chunks (default: --max-num-seqs + 128): lower "
                   "keeps streams smoother while long prompts are read, higher reads prompts faster")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $MTNLG_API_KEY, else none)")
    p.add_argument("--served-model-name", help="the model id clients pass (default: CHECKPOINT as given)")
    p.add_argument("--pooling", choices=["mean", "last"], default="mean", help="how /v1/embeddings pools hidden states")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=INFERENCE_DTYPES, default="auto", help="weights for inference (as for generate)")
    p.set_defaults(handler=cmd_serve)

    p = verbs.add_parser("eval", help="perplexity and zero/few-shot tasks from local files (lm-eval's formats and numbers)")
    p.add_argument("checkpoint", help="a run directory, checkpoint directory or imported model")
    p.add_argument("--tasks", nargs="+", default=[], metavar="TASK",
                   help="a .jsonl task file in mtnlg's schema, or NAME=FILE for a benchmark's own file (lambada, hellaswag, "
                   "piqa, winogrande, boolq, arc_easy, arc_challenge, race); FILE@EXAMPLES draws few-shot examples "
                   "from EXAMPLES (docs/evaluation.md)")
    p.add_argument("--perplexity", action="append", default=[], metavar="PATH",
                   help="loss, perplexity and bits per byte of a token shard prefix, .txt/.jsonl file or folder (repeatable)")
    p.add_argument("--num-fewshot", type=int, default=0)
    p.add_argument("--fewshot-seed", type=int, default=1234, help="seed of the few-shot draws (each document its own)")
    p.add_argument("--limit", type=int, help="only the first N documents of each task")
    p.add_argument("--stride", type=int, help="perplexity windows advance by this many tokens (default: the model's "
                   "context, disjoint windows as lm-eval); smaller gives each token more context and costs more")
    p.add_argument("--truncate", action="store_true", help="drop context from the left when a request is too long")
    p.add_argument("--max-gen-tokens", type=int, default=MAX_GEN_TOKENS, help="for generate_until tasks")
    p.add_argument("--batch-tokens", type=int, default=TOKEN_BUDGET,
                   help="positions per forward (rows x longest row, default %(default)s): more takes more memory")
    p.add_argument("--output", help="write results (lm-eval's JSON layout) to FILE.json, or DIR/results.json")
    p.add_argument("--log-samples", action="store_true", help="also write each document's prompts, answers and "
                   "metrics to samples_TASK.jsonl beside the results")
    p.add_argument("--tp", type=int, help="split the model over N processes (torchrun); more processes than N "
                   "split the documents over replicas")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=INFERENCE_DTYPES, default="fp32",
                   help="weights (default fp32, the numbers lm-eval's hf backend gives; auto and bf16 are faster on CPUs "
                   "with bf16 instructions)")
    p.set_defaults(handler=cmd_eval)

    verbs.add_parser("lm-eval", help="lm-evaluation-harness's command line with --model mtnlg available "
                     "(mtnlg lm-eval run --model mtnlg --model_args path=RUN --tasks ...)", add_help=False)

    p = verbs.add_parser("embed", help="embed .txt/.jsonl passages with a checkpoint -> a search index folder")
    p.add_argument("checkpoint", help="a run directory, checkpoint directory or imported model")
    p.add_argument("files", nargs="+", metavar="FILE", help=".txt (passages split at blank lines) or .jsonl (one per line)")
    p.add_argument("--output", required=True, help="the index folder to write (an index there is replaced)")
    p.add_argument("--pooling", choices=["mean", "last"], default="mean", help="how hidden states become a vector")
    p.add_argument("--chunk-tokens", type=int, help="cut longer passages into pieces of at most N tokens "
                   f"(default {CHUNK_TOKENS}, or the model's context if shorter)")
    p.add_argument("--json-key", default="text", help="the field holding the text in .jsonl lines (the others are "
                   "kept as metadata)")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="passages per forward (default %(default)s)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=INFERENCE_DTYPES, default="auto", help="weights for inference (as for "
                   "generate); search loads the model the same way")
    p.set_defaults(handler=cmd_embed)

    p = verbs.add_parser("search", help="the passages of an index nearest to queries; or recall and MRR of labelled queries")
    p.add_argument("index", metavar="DIR", help="an index folder written by mtnlg embed")
    p.add_argument("query", nargs="*", metavar="QUERY", help="text to search for")
    p.add_argument("--queries", metavar="FILE", help='.jsonl of {"query": ..., "passage": ...} lines: print recall@1, '
                   "@5, @10 and MRR (the passage text is the right answer)")
    p.add_argument("-k", type=int, default=10, help="hits per query")
    p.add_argument("--rerank", action="store_true", help="reorder the best hits by the model's log-likelihood of the "
                   "query after the passage (SGPT's cross-encoder; one forward per hit)")
    p.add_argument("--rerank-top", type=int, help=f"hits reranked (default: {RERANK_TOP}, or k if more)")
    p.add_argument("--rerank-weight", type=float, help="the log-likelihood's weight against the cosine's "
                   f"(default {RERANK_WEIGHT}; large: the log-likelihood's order alone)")
    p.add_argument("--model", help="the checkpoint to embed queries with (default: the one that built the index)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=INFERENCE_DTYPES, help="weights for inference (default: as the index was built)")
    p.set_defaults(handler=cmd_search)

    p = verbs.add_parser("info", help="parameters, FLOPs per token and training memory of a model")
    p.add_argument("--model", required=True, help="a preset name (gpt2, mt-nlg-530b, ...) or a checkpoint")
    p.add_argument("--seq-len", type=int, default=0, help="sequence length for attention FLOPs")
    p.set_defaults(handler=cmd_info)

    for verb, handler, what in (
        ("import", cmd_import, "a Hugging Face model folder (GPT-2, Llama, Qwen2, Qwen3) or peft adapter -> mtnlg checkpoint"),
        ("export", cmd_export, "an mtnlg checkpoint or run -> Hugging Face model folder, or a LoRA run -> peft adapter"),
    ):
        p = verbs.add_parser(verb, help=what)
        p.add_argument("format", choices=["hf", "peft"], help="hf: Hugging Face transformers (save_pretrained layout); "
                       "peft: a LoRA adapter on such a model")
        p.add_argument("src", metavar="SRC")
        p.add_argument("dst", metavar="DST")
        p.add_argument("--force", action="store_true", help="replace DST if it exists and is not empty")
        if verb == "import":
            p.add_argument("--base", help="peft: the mtnlg checkpoint of the model the adapter was trained on")
        p.set_defaults(handler=handler)

    p = verbs.add_parser("consolidate", help="write a checkpoint's model.safetensors from its sharded state/")
    p.add_argument("run", metavar="RUN", help="a run directory, its checkpoints folder or a checkpoint directory")
    p.set_defaults(handler=cmd_consolidate)

    p = verbs.add_parser("plan", help="which tensor x pipeline x data layouts fit a model on a cluster, and how fast")
    p.add_argument("--model", required=True, help="a preset name (gpt2, mt-nlg-530b, ...)")
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--gpu", required=True, help="a100-80g, h100 or h200")
    p.add_argument("--global-batch", type=int, required=True, help="sequences per optimizer step")
    p.add_argument("--seq", type=int, required=True, help="sequence length")
    p.add_argument("--tokens", type=float, help="tokens to train (default 270e9 for mt-nlg-530b, else 300e9)")
    p.add_argument("--micro-batch", type=int, help="only this micro-batch size (default: try 1, 2, 4, 8)")
    p.add_argument("--tp", type=int, help="only this tensor-parallel size")
    p.add_argument("--pp", type=int, help="only this pipeline-parallel size")
    p.add_argument("--zero1", action="store_true", help="shard the optimizer state over data-parallel replicas")
    p.add_argument("--efficiency", type=float, help="assumed fraction of peak reached on matmuls (default 0.55)")
    p.add_argument("--all", action="store_true", help="show every feasible layout, not the 10 fastest")
    p.add_argument("--check", action="store_true", help="build the first layout's real parallelized model as its first, "
                   "middle and last pipeline ranks on PyTorch's fake process group (meta tensors) and compare")
    p.set_defaults(handler=cmd_plan)

    p = verbs.add_parser("plot", help="draw a run's loss curves to a PNG")
    p.add_argument("run")
    p.add_argument("--output")
    p.set_defaults(handler=cmd_plot)

    p = verbs.add_parser("demo", help="build the embedded corpus, train the demo model, plot, generate")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--instruct", action="store_true",
                   help="then fine-tune it to answer questions about the library, and score base against tuned")
    p.set_defaults(handler=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["lm-eval"]:  # every argument is lm-eval's
        args = argparse.Namespace(verb="lm-eval", handler=lambda _: cmd_lm_eval(argv[1:]))
    else:
        parser = build_parser()
        args, rest = parser.parse_known_args(argv)
        if rest and args.verb not in ("train", "finetune", "demo"):
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        args.overrides = rest
    try:
        code = args.handler(args) or 0
    except MtnlgError as e:
        # Under torchrun every rank meets the same mistake: say it once per node.
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"mtnlg {args.verb}: error: {e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print(f"mtnlg {args.verb}: interrupted", file=sys.stderr)
        code = 130
    if "torch.distributed" in sys.modules and sys.modules["torch.distributed"].is_initialized():
        from mtnlg.parallel.launch import leave

        leave(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
