"""Other CPU inference engines as contestants of `generate_throughput.py`: CTranslate2 (fp32 and int8) and
ONNX Runtime (fp32), each converted from the same random-weight Hugging Face GPT-2, offline.

Each runs in a process of its own. Both engines bring their own OpenMP runtime, and after CTranslate2 had
run in the benchmark's process torch's small parallel products there took twice as long (measured: an
int8 QKV product 70 -> 150 us, SDPA 34 -> 77 us), which would have charged the peer's runtime to us.
A peer idles blocked on its pipe, using no CPU while the others run.

Peers take token ids as the prompt and decode greedily with the end of text ignored, as our side does.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import torch


ENGINES = {"ctranslate2": ("ct2-float32", "ct2-int8"), "onnxruntime": ("ort-float32",)}


def available() -> list[str]:
    """The peers whose engines are installed; says which are skipped, and why."""
    names = []
    for module, peers in ENGINES.items():
        try:
            __import__(module)
            names += peers
        except ImportError:
            print(f"skipping {', '.join(peers)}: {module} is not installed (pip install -e '.[bench]')")
    return names


def convert(hf: torch.nn.Module, folder: Path, names: list[str]) -> None:
    """Write each named peer's model of the HF GPT-2 `hf` under `folder`, with the engine's own converter."""
    if not names:
        return
    hf.save_pretrained(folder / "hf")
    if any(name.startswith("ct2") for name in names):
        _convert_ctranslate2(hf, folder, [name for name in names if name.startswith("ct2")])
    if "ort-float32" in names:
        _export_onnx(hf, folder / "ort-float32.onnx")


def _convert_ctranslate2(hf: torch.nn.Module, folder: Path, names: list[str]) -> None:
    """CTranslate2's TransformersConverter; a word-level vocabulary "t0".."t50256" stands in for GPT-2's
    (no download), so token ids pass as the strings "t<id>"."""
    import ctranslate2
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(hf.config.vocab_size)}, unk_token="t0"))
    eos = f"t{hf.config.vocab_size - 1}"
    vocabulary = PreTrainedTokenizerFast(tokenizer_object=words, bos_token=eos, eos_token=eos, unk_token="t0")
    vocabulary.save_pretrained(folder / "hf")
    for name in names:
        quantization = name.removeprefix("ct2-")
        ctranslate2.converters.TransformersConverter(str(folder / "hf")).convert(str(folder / name), quantization=quantization)


class _Step(torch.nn.Module):
    """One forward of the HF model with its past keys/values as plain tensors (one [2, batch, heads, past,
    head_dim] per layer, ONNX Runtime's GPT-2 layout): the last position's logits and each layer's present."""

    def __init__(self, hf: torch.nn.Module):
        super().__init__()
        self.hf = hf

    def forward(self, input_ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.hf.config)
        for layer, kv in enumerate(past):
            cache.update(kv[0], kv[1], layer)
        batch, steps = input_ids.shape
        start = past[0].shape[3]
        out = self.hf(
            input_ids=input_ids,
            past_key_values=cache,
            position_ids=torch.arange(start, start + steps)[None].expand(batch, -1),
            attention_mask=torch.ones(batch, start + steps, dtype=torch.long),
            use_cache=True,
        )
        presents = [torch.stack((layer.keys, layer.values)) for layer in out.past_key_values.layers]
        return (out.logits[:, -1], *presents)


def _export_onnx(hf: torch.nn.Module, path: Path) -> None:
    """torch.onnx's exporter: ONNX Runtime's own GPT-2 converter (`convert_to_onnx`) passes the past as
    tuples, which transformers 5 no longer takes, and its GPT-2 fusions fail on this exporter's graph, so
    the session's own graph optimizations (all levels, the default) are what ONNX Runtime applies."""
    cfg = hf.config
    layers, heads, head_dim = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head
    ids = torch.randint(0, 100, (2, 3))  # sizes above 1, or the exporter fixes them
    past = [torch.zeros(2, 2, heads, 2, head_dim) for _ in range(layers)]
    batch, steps, cached = torch.export.Dim("batch"), torch.export.Dim("steps"), torch.export.Dim("cached")
    torch.onnx.export(
        _Step(hf.eval()), (ids, *past), path, dynamo=True, verbose=False,
        input_names=["input_ids", *[f"past_{i}" for i in range(layers)]],
        output_names=["logits", *[f"present_{i}" for i in range(layers)]],
        dynamic_shapes=({0: batch, 1: steps}, ({1: batch, 3: cached},) * layers),
    )


class Peer:
    """A peer engine in its own process; `generate` and `prefill` return once it is done."""

    def __init__(self, name: str, folder: Path, threads: int):
        context = multiprocessing.get_context("spawn")
        self._pipe, theirs = context.Pipe()
        self._process = context.Process(target=_serve, args=(theirs, name, str(folder), threads), daemon=True)
        self._process.start()
        self._pipe.recv()  # loaded

    def generate(self, prompts: list[list[int]], new_tokens: int) -> None:
        self._pipe.send((prompts, new_tokens))
        self._pipe.recv()

    def prefill(self, prompts: list[list[int]]) -> None:
        """The prompt and one token: what the engine does before its first decode step."""
        self.generate(prompts, 1)

    def close(self) -> None:
        self._pipe.send(None)
        self._process.join()


def _serve(pipe, name: str, folder: str, threads: int) -> None:
    run = _ctranslate2(name, Path(folder), threads) if name.startswith("ct2") else _onnxruntime(Path(folder), threads)
    pipe.send("loaded")
    while (job := pipe.recv()) is not None:
        run(*job)
        pipe.send("done")


def _ctranslate2(name: str, folder: Path, threads: int):
    import ctranslate2

    generator = ctranslate2.Generator(str(folder / name), device="cpu", compute_type=name.removeprefix("ct2-"),
                                      intra_threads=threads)

    def run(prompts: list[list[int]], new_tokens: int) -> None:
        words = [[f"t{t}" for t in row] for row in prompts]
        generator.generate_batch(words, max_length=new_tokens, min_length=new_tokens, sampling_topk=1,
                                 include_prompt_in_result=False)

    return run


def _onnxruntime(folder: Path, threads: int):
    """Greedy decoding on ONNX Runtime, the past fed back as the last step's presents (new tensors each step,
    as ORT's GPT-2 helpers do without I/O binding)."""
    import numpy as np
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = onnxruntime.InferenceSession(str(folder / "ort-float32.onnx"), options, providers=["CPUExecutionProvider"])
    pasts = [i.name for i in session.get_inputs() if i.name.startswith("past_")]
    _, _, heads, _, head_dim = session.get_inputs()[1].shape

    def run(prompts: list[list[int]], new_tokens: int) -> None:
        tokens = np.array(prompts, dtype=np.int64)
        past = np.zeros((2, len(prompts), heads, 0, head_dim), dtype=np.float32)
        feed = {"input_ids": tokens, **dict.fromkeys(pasts, past)}
        for _ in range(new_tokens):
            logits, *presents = session.run(None, feed)
            feed = {"input_ids": logits.argmax(-1)[:, None], **dict(zip(pasts, presents))}

    return run
