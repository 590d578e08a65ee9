"""Defaults shared by the CLI, the Python API and the library that runs them.

They live apart from the code they size, in a module without torch, so that `mtnlg --help`, `mtnlg plan`
and `import mtnlg` start without loading torch.
"""

# Sequences decoded (or scored) together by default: batches amortize reading the weights, and a cap keeps
# the KV cache and padding of a long prompts file bounded.
BATCH_SIZE = 16

# Positions (rows x longest row) per evaluation batch. Measured on 2 cores with a GPT-2-shaped model: 2048
# and 8192 score at the same rate, and the logits of a batch (positions x vocabulary x 4 bytes) stay near 0.4 GB.
TOKEN_BUDGET = 2048

MAX_GEN_TOKENS = 256  # lm-eval's default for generate_until

INFERENCE_DTYPES = ("auto", "fp32", "bf16", "int8")  # the weights `mtnlg.load` keeps (mtnlg.hardware)

# Search (mtnlg.search): passages of about 100 words, as DPR's (capped by the model's context); the best 20
# cosine hits reranked, the log-likelihood weighted as measured on the demo model (docs/applications.md).
CHUNK_TOKENS = 128
RERANK_TOP = 20
RERANK_WEIGHT = 0.5
