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
from mtnlg.eval.scoring import TOKEN_BUDGET, ModelScorer, encode_pair, rolling_windows

MAX_GEN_TOKENS = 256  # lm-eval's default for generate_until


@register_model("mtnlg")
class MtnlgLM(LM):
    """model_args: path (a run, checkpoint or imported model), device, dtype (fp32 by default, as lm-eval's
    hf backend computes), batch_tokens (positions per forward)."""

    def __init__(self, path: str, device: str | None = None, dtype: str = "fp32", batch_tokens: int = TOKEN_BUDGET,
                 **ignored: Any):  # lm-eval also passes batch_size and max_batch_size: the token budget sizes batches
        super().__init__()
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
        windows = [list(rolling_windows(tokenizer.encode(r.args[0]), tokenizer.eod_id, max_len)) for r in requests]
        answers = iter(self.scorer.loglikelihoods([w for doc in windows for w in doc]))
        return [sum(next(answers)[0] for _ in doc) for doc in windows]

    def generate_until(self, requests: list) -> list[str]:
        """Greedy, as lm-eval's tasks ask; requests with the same stop strings and length decode together."""
        groups: dict[tuple[tuple[str, ...], int], list[int]] = {}
        for i, (_, kwargs) in enumerate(r.args for r in requests):
            until = kwargs.get("until") or ()
            key = ((until,) if isinstance(until, str) else tuple(until), int(kwargs.get("max_gen_toks", MAX_GEN_TOKENS)))
            groups.setdefault(key, []).append(i)
        texts = [""] * len(requests)
        for (until, max_tokens), members in groups.items():
            prompts = [requests[i].args[0] for i in members]
            for i, text in zip(members, self.scorer.generate(prompts, list(until), max_tokens, truncate=True)):
                texts[i] = text
        return texts

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.lm.tokenizer.render_chat(chat_history, add_generation_prompt)

    @property
    def tokenizer_name(self) -> str:
        return self.path
