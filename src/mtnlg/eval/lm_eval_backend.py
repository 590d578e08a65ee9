"""An lm-evaluation-harness model backend, so lm-eval's own task library runs on an mtnlg checkpoint:

    mtnlg lm-eval run --model mtnlg --model_args path=runs/demo/run --tasks hellaswag
    # or from Python, after `import mtnlg.eval.lm_eval_backend`: lm_eval.simple_evaluate(model="mtnlg", ...)

Requests are scored by the same `ModelScorer` as `mtnlg eval`, with lm-eval's boundary rule and windows.
"""

from __future__ import annotations

from typing import Any

import lm_eval.models  # noqa: F401  lm-eval's own models, registered first: a registry holding only ours hides them
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

import torch

import mtnlg
from mtnlg.errors import MtnlgError
from mtnlg.eval.harness import MAX_GEN_TOKENS, generate_until
from mtnlg.eval.scoring import TOKEN_BUDGET, ModelScorer, encode_pair, rolling_windows


@register_model("mtnlg")
class MtnlgLM(LM):
    """model_args: path (a run, checkpoint or imported model), device, dtype (fp32 by default, as lm-eval's
    hf backend computes), batch_tokens (positions per forward; it sizes batches, so lm-eval's batch_size and
    max_batch_size are not used)."""

    def __init__(self, path: str | None = None, device: str | None = None, dtype: str = "fp32",
                 batch_tokens: int = TOKEN_BUDGET, batch_size: Any = None, max_batch_size: Any = None, **unknown: Any):
        super().__init__()
        if path is None:
            raise MtnlgError("--model_args needs path=RUN (a run, checkpoint or imported model)")
        if unknown:
            raise MtnlgError(f"--model_args {', '.join(sorted(unknown))}: unknown; mtnlg takes path, device, dtype and "
                             "batch_tokens")
        if device and device.startswith("cuda") and not torch.cuda.is_available():
            device = None  # lm-eval's command line asks for cuda by default; take the CPU, as its hf backend does
        self.lm = mtnlg.load(path, device, dtype=dtype)
        self.path = path
        self.scorer = ModelScorer(self.lm.model, self.lm.tokenizer, int(batch_tokens))

    def loglikelihood(self, requests: list) -> list[tuple[float, bool]]:
        tokenizer = self.lm.tokenizer
        pairs = [encode_pair(tokenizer, context, continuation) for context, continuation in (r.args for r in requests)]
        return self.scorer.loglikelihoods(pairs)

    def loglikelihood_rolling(self, requests: list) -> list[float]:
        tokenizer, max_len = self.lm.tokenizer, self.scorer.max_len
        windows = [list(rolling_windows(tokenizer.encode(r.args[0]), tokenizer.bos_id, max_len)) for r in requests]
        answers = iter(self.scorer.loglikelihoods([w for doc in windows for w in doc]))
        return [sum(next(answers)[0] for _ in doc) for doc in windows]

    def generate_until(self, requests: list) -> list[str]:
        """Greedy, as lm-eval's tasks ask, the context cut to leave room for max_gen_toks (as its hf backend)."""
        by_length: dict[int, list[int]] = {}
        for i, (_, kwargs) in enumerate(r.args for r in requests):
            by_length.setdefault(int(kwargs.get("max_gen_toks", MAX_GEN_TOKENS)), []).append(i)
        texts = [""] * len(requests)
        for max_tokens, members in by_length.items():
            asked = [(requests[i].args[0], _stops(requests[i].args[1].get("until"))) for i in members]
            for i, text in zip(members, generate_until(self.scorer, asked, max_tokens, truncate=True)):
                texts[i] = text
        return texts

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.lm.tokenizer.render_chat(chat_history, add_generation_prompt)

    @property
    def tokenizer_name(self) -> str:
        return self.path


def _stops(until: str | list[str] | None) -> list[str]:
    return [until] if isinstance(until, str) else list(until or [])
