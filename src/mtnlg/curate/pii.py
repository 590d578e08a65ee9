"""Personal identifiers replaced by placeholders: e-mail addresses, phone numbers, IP addresses, card numbers.

Patterns, not a model: they miss what does not look like an identifier and can catch a number that only
looks like one (a long product code may read as a phone number); the report counts each kind.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter

EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)*\.[A-Za-z]{2,}\b")
IPV4 = re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b")
IPV6 = re.compile(r"(?<![\w:])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:])")  # checked by ipaddress
# A card number: 13-19 digits in groups, checked with Luhn's sum below.
CARD = re.compile(r"\b\d(?:[ -]?\d){12,18}\b")
# A phone number: an optional +country code, then 9-15 digits in groups of 2-4 with spaces, dots, dashes or
# parentheses between them.
PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){2,4}(?!\w)")

PLACEHOLDERS = {"email": "<EMAIL>", "ip_address": "<IP_ADDRESS>", "card_number": "<CARD_NUMBER>", "phone": "<PHONE>"}


def redact(text: str) -> tuple[str, Counter]:
    """The text with each identifier replaced by its placeholder, and how many of each kind were found."""
    counts: Counter = Counter()

    def replace(kind: str, valid=lambda s: True):
        def sub(match: re.Match) -> str:
            if not valid(match.group()):
                return match.group()
            counts[kind] += 1
            return PLACEHOLDERS[kind]
        return sub

    text = EMAIL.sub(replace("email"), text)
    text = IPV4.sub(replace("ip_address", _is_ip), text)
    text = IPV6.sub(replace("ip_address", lambda s: any(c.isalnum() for c in s) and _is_ip(s)), text)  # not "::"
    text = CARD.sub(replace("card_number", _luhn), text)
    text = PHONE.sub(replace("phone", lambda s: 9 <= sum(c.isdigit() for c in s) <= 15), text)
    return text, counts


def _is_ip(candidate: str) -> bool:
    try:
        ipaddress.ip_address(candidate)
        return True
    except ValueError:
        return False


def _luhn(candidate: str) -> bool:
    digits = [int(c) for c in candidate if c.isdigit()][::-1]
    return sum(d if i % 2 == 0 else (2 * d - 9 if d > 4 else 2 * d) for i, d in enumerate(digits)) % 10 == 0
