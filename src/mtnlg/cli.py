"""`mtnlg <verb>`: one command for the whole life of a model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mtnlg.errors import MtnlgError


def cmd_prepare(args: argparse.Namespace) -> None:
    from mtnlg.data.prepare import prepare

    from mtnlg.tokenizer import Tokenizer

    output = Path(args.output)
    trained = not args.tokenizer
    tokenizer = _train_tokenizer(args.inputs, args.vocab_size, args.json_key) if trained else Tokenizer.load(args.tokenizer)
    stats = prepare(
        args.inputs, output, tokenizer, json_key=args.json_key, val_fraction=args.val_fraction,
        seed=args.seed, workers=args.workers, on_bad_line=args.on_bad_line,
    )
    if trained:  # only once the shards exist: a failed prepare leaves nothing behind
        print(f"trained a {tokenizer.vocab_size}-token byte-level BPE -> {tokenizer.save(output.parent)}")
    for prefix, split in zip(stats["outputs"], ("train", "val")):
        print(f"wrote {prefix} ({stats[split + '_documents']} documents, {stats[split + '_tokens']:,} tokens)")
    if stats["skipped_lines"]:
        print(f"skipped {stats['skipped_lines']} malformed lines")


def _train_tokenizer(inputs: list[str], vocab_size: int, json_key: str):
    from mtnlg.data.prepare import read_documents
    from mtnlg.tokenizer import Tokenizer

    return Tokenizer.train((doc for p in inputs for doc in read_documents(Path(p), json_key, "skip")), vocab_size)


def cmd_tokenizer(args: argparse.Namespace) -> None:
    tokenizer = _train_tokenizer(args.inputs, args.vocab_size, args.json_key)
    print(f"trained a {tokenizer.vocab_size}-token byte-level BPE -> {tokenizer.save(args.output)}")


def cmd_train(args: argparse.Namespace) -> int:
    from mtnlg.config import load_config
    from mtnlg.train.trainer import Trainer

    config = load_config(_config_path(args.config), args.overrides)
    result = Trainer(config, resume=args.resume).fit()
    if result.stopped_by:
        print(f"stopped by {result.stopped_by} at step {result.step}; checkpoint {result.checkpoint}; continue with --resume")
        return 130 if result.stopped_by == "SIGINT" else 143
    val = f", validation loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    print(f"done: step {result.step}{val}; checkpoint {result.checkpoint}")
    return 0


def _config_path(name: str) -> Path:
    """A TOML path, or the name of a config shipped with mtnlg (`demo`, `tiny`, `gpt2`, ...)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = Path(__file__).parent / "configs" / (path.stem + ".toml")
    return shipped if shipped.is_file() and path.suffix in ("", ".toml") and path.parent == Path(".") else path


def cmd_generate(args: argparse.Namespace) -> None:
    from mtnlg.inference.generate import Sampling, stream_text
    from mtnlg.train.checkpoint import load_model

    params = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    model, tokenizer, _ = load_model(args.checkpoint)
    sys.stdout.write(args.prompt)
    for delta in stream_text(model, tokenizer, args.prompt, params):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_info(args: argparse.Namespace) -> None:
    from mtnlg.config import ModelConfig
    from mtnlg.model.flops import TRAINING_BYTES_PER_PARAM, human, model_size
    from mtnlg.train.checkpoint import load_config_file, resolve_checkpoint

    cfg = load_config_file(resolve_checkpoint(args.model)).model if Path(args.model).exists() else ModelConfig.from_name(args.model)
    size = model_size(cfg, args.seq_len)
    seq = args.seq_len or cfg.max_seq_len
    shape = f"{cfg.n_layer} layers, d_model {cfg.d_model}, {cfg.n_head} heads ({cfg.n_kv_head} kv), d_ff {cfg.d_ff}"
    print(f"model          {args.model}: {shape}, vocab {cfg.vocab_size}, context {cfg.max_seq_len}")
    print(f"               {cfg.norm}, {cfg.mlp}, {cfg.position} positions, {'tied' if cfg.tie_embeddings else 'untied'} head")
    print(f"parameters     {size.params:,} ({human(size.params)}; {human(size.params - size.embedding_params)} outside embeddings)")
    print(f"FLOPs/token    {human(size.flops_per_token)} forward+backward at sequence {seq} (6N + attention)")
    print(f"training state {sum(TRAINING_BYTES_PER_PARAM.values())} bytes/parameter = {human(size.training_bytes, 'B')} before activations")
    for what, nbytes in TRAINING_BYTES_PER_PARAM.items():
        print(f"  {what:<20} {nbytes:>2} B/param  {human(size.params * nbytes, 'B'):>10}")
    gpus = -(-size.training_bytes // (80 * 2**30))
    print(f"               at least {gpus:,} GPU{'s' if gpus > 1 else ''} of 80 GiB for the training state alone")


def cmd_plot(args: argparse.Namespace) -> None:
    from mtnlg.train.metrics import plot_losses

    print(plot_losses(args.run, args.output))


def cmd_demo(args: argparse.Namespace) -> None:
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

    p = verbs.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    p.add_argument("inputs", nargs="+")
    p.add_argument("--output", required=True, help="folder to write tokenizer.json into")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--json-key", default="text")
    p.set_defaults(handler=cmd_tokenizer)

    p = verbs.add_parser("train", help="train from a TOML config; --section.key value overrides")
    p.add_argument("config", help="a TOML file, or a shipped config name: demo, tiny, gpt2, mt-nlg-530b")
    p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    p.set_defaults(handler=cmd_train)

    p = verbs.add_parser("generate", help="continue a prompt from a checkpoint or run directory")
    p.add_argument("checkpoint")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int)
    p.set_defaults(handler=cmd_generate)

    p = verbs.add_parser("info", help="parameters, FLOPs per token and training memory of a model")
    p.add_argument("--model", required=True, help="a preset name (gpt2, mt-nlg-530b, ...) or a checkpoint")
    p.add_argument("--seq-len", type=int, default=0, help="sequence length for attention FLOPs")
    p.set_defaults(handler=cmd_info)

    p = verbs.add_parser("plot", help="draw a run's loss curves to a PNG")
    p.add_argument("run")
    p.add_argument("--output")
    p.set_defaults(handler=cmd_plot)

    p = verbs.add_parser("demo", help="build the embedded corpus, train the demo model, plot, generate")
    p.add_argument("--out", default="runs/demo")
    p.set_defaults(handler=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.verb not in ("train", "demo"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.overrides = rest
    try:
        return args.handler(args) or 0
    except MtnlgError as e:
        print(f"mtnlg {args.verb}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"mtnlg {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
