"""Evaluation: perplexity, zero- and few-shot tasks from local files, and an lm-evaluation-harness backend."""
