"""Exact duplicates: documents whose normalized text (`text.normalize`) hashes alike."""

from __future__ import annotations

import hashlib

from mtnlg.curate.text import normalize


def fingerprint(text: str) -> str:
    return hashlib.blake2b(normalize(text).encode(), digest_size=16).hexdigest()
