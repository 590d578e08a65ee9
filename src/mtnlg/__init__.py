"""mtnlg: GPT training the Megatron-Turing NLG way, in plain PyTorch.

    import mtnlg
    m = mtnlg.load("runs/demo/run")
    m.generate(["The list type"], max_new_tokens=20, temperature=0)[0].text
    for delta in m.stream("To open a file", max_new_tokens=40): print(delta, end="")
    m.score(["A sentence to score."])[0].total

    # the same, split over two processes: torchrun --nproc-per-node 2 script.py
    m = mtnlg.load("runs/demo/run", tp=2)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtnlg.defaults import BATCH_SIZE

if TYPE_CHECKING:  # torch loads with the first model, so that `mtnlg --help` and `mtnlg plan` run without it
    import torch

__version__ = "0.1.0"


class LanguageModel:
    """A checkpoint ready for inference: the model, its tokenizer and config, on one device."""

    def __init__(self, model: Any, tokenizer: Any, config: Any):
        self.model, self.tokenizer, self.config = model, tokenizer, config

    def generate(self, prompts: str | Sequence[str], batch_size: int = BATCH_SIZE, **sampling: Any) -> list:
        """Completions (`mtnlg.inference.generate.Completion`), `n` per prompt, prompt-major."""
        return list(self.completions(prompts, batch_size, **sampling))

    def completions(self, prompts: str | Sequence[str], batch_size: int = BATCH_SIZE, **sampling: Any) -> Iterator:
        """`generate`, yielding completions as each batch of `batch_size` sequences finishes."""
        from mtnlg.inference.generate import Sampling, completions

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return completions(self.model, self.tokenizer, prompts, Sampling(**sampling), batch_size)

    def stream(self, prompt: str, **sampling: Any) -> Iterator[str]:
        from mtnlg.inference.generate import Sampling, stream

        return stream(self.model, self.tokenizer, prompt, Sampling(**sampling))

    def score(self, texts: str | Sequence[str], batch_size: int = BATCH_SIZE) -> list:
        """Per-token log-likelihoods (`Scored`) of each text."""
        from mtnlg.inference.generate import score

        return score(self.model, self.tokenizer, [texts] if isinstance(texts, str) else list(texts), batch_size)


def load(path: str | Path, device: str | torch.device | None = None, tp: int = 1, dtype: str = "auto") -> LanguageModel:
    """Load a checkpoint, run directory or imported model for inference; on CUDA when available unless
    told otherwise, and on CPU with weights packed for fast matrix-vector products where the CPU allows.

    tp > 1 splits the model over tp processes started by torchrun: each calls `load`, then the same
    generate/stream/score calls (they communicate in every forward), and at the end
    `mtnlg.parallel.launch.shutdown()`.

    dtype "bf16" keeps the matrix weights in bf16: a decode step reads half the bytes (about 1.6x as fast
    on CPU), and the numbers differ from fp32 at bf16's precision. "auto" (the default) takes bf16 where
    the device computes it natively and fp32 elsewhere (`mtnlg.hardware.Precision`); on CPU with
    tp > 1 that is fp32, since the shards do not take the packed bf16 path. "int8" (one process on an x86
    CPU with AVX2) keeps them in int8, per output channel, for FBGEMM's products: a quarter of the bytes.
    """
    import torch

    from mtnlg.checkpoint import load_model
    from mtnlg.hardware import Precision, keep_freed_memory
    from mtnlg.inference.cpu import pack_for_cpu_inference

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    weights = Precision.for_inference(dtype, device, packed=tp == 1).param
    if tp != 1:  # packing is for plain weights; these are sharded DTensors
        from mtnlg.inference.distributed import load_tensor_parallel

        return LanguageModel(*load_tensor_parallel(path, tp, device, weights))
    model, tokenizer, config = load_model(path, device)
    if device.type == "cpu":
        keep_freed_memory()
        return LanguageModel(pack_for_cpu_inference(model, weights), tokenizer, config)
    return LanguageModel(model.to(weights), tokenizer, config)
