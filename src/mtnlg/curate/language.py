"""Language identification with py3langid (langid.py's model of 97 languages, shipped inside the package: nothing
is downloaded). Each document gets its ISO 639-1 code and the model's probability for it."""

from __future__ import annotations

from functools import cache


@cache
def _identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def identify(text: str) -> tuple[str, float]:
    """(language code, probability) of the text's most likely language."""
    language, probability = _identifier().classify(text)
    return language, round(float(probability), 4)
