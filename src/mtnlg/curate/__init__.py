"""Curation of pretraining text, the MT-NLG way: exact and fuzzy (MinHash-LSH) deduplication, decontamination
against evaluation tasks, quality heuristics and PII redaction, as resumable stages (`pipeline.py`)."""
