"""Byte-level BPE tokenizer on Hugging Face `tokenizers`: train one, or load tokenizer.json / GPT-2 vocab+merges;
the chat template that turns messages into a prompt, kept as Hugging Face keeps it; and how well a tokenizer
covers each language of some data."""

import functools
import json
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from mtnlg.errors import MtnlgError
from mtnlg.files import write_text_atomic

if TYPE_CHECKING:
    import jinja2

EOD = "<|endoftext|>"
FOREIGN_EODS = ("</s>", "<|end_of_text|>")  # end tokens of imported tokenizers that play EOD's part
CONFIG_FILE = "tokenizer_config.json"  # Hugging Face's; its "chat_template" is a Jinja string

# For a model without a template of its own: the transcript format of `mtnlg chat`. Generation ends at EOD,
# or where the model starts the user's next turn (DEFAULT_CHAT_STOP).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
DEFAULT_CHAT_STOP = ("\nUser:",)

# Under this many UTF-8 bytes per token a language is poorly covered: a byte-level BPE spends about one token
# per byte (1.0) on text it never saw, and 3 to 4.5 on languages it was trained on (GPT-2 on English: about 4).
# Below 2, that language's text takes over twice the tokens (context and compute) a tokenizer trained on it would.
POOR_COVERAGE = 2.0


class Tokenizer:
    """A thin wrapper that fixes the conventions: no special tokens added on encode, exact byte round trip."""

    def __init__(self, tok: tokenizers.Tokenizer, chat_template: str | None = None):
        self._tok = tok
        self._eod_id: int | None = None
        self.chat_template = chat_template  # None: DEFAULT_CHAT_TEMPLATE

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "Tokenizer":
        """Byte-level BPE like GPT-2's: every byte is in the alphabet, so any text encodes without unknowns."""
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if vocab_size < len(alphabet) + 1:
            raise MtnlgError(f"vocab size {vocab_size} is too small; use at least {len(alphabet) + 1} (bytes + EOD)")
        tok = _byte_level(models.BPE())
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=[EOD], initial_alphabet=alphabet, show_progress=False
        )
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """From a tokenizer.json file, a directory holding one, or a directory holding GPT-2 vocab.json + merges.txt."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        template = _chat_template(file.parent / CONFIG_FILE)
        if file.is_file():
            try:
                return cls(tokenizers.Tokenizer.from_file(str(file)), template)
            except Exception as e:
                raise MtnlgError(f"{file}: not a valid tokenizer.json ({e}); re-save it or train a new one") from None
        vocab, merges = path / "vocab.json", path / "merges.txt"
        if vocab.is_file() and merges.is_file():
            try:
                tok = _byte_level(models.BPE.from_file(str(vocab), str(merges)))
            except Exception as e:
                raise MtnlgError(f"{path}: unreadable vocab.json/merges.txt ({e}); check the files") from None
            tok.add_special_tokens([EOD])
            return cls(tok, template)
        raise MtnlgError(
            f"{path}: no tokenizer found (looked for tokenizer.json, or vocab.json + merges.txt); "
            "pass a tokenizer file or directory, or train one"
        )

    def save(self, directory: str | Path) -> Path:
        """Write directory/tokenizer.json (and the chat template, in tokenizer_config.json) atomically; return
        the tokenizer.json path."""
        path = write_text_atomic(Path(directory) / "tokenizer.json", self._tok.to_str(pretty=True))
        if self.chat_template is not None:
            write_text_atomic(path.parent / CONFIG_FILE, json.dumps({"chat_template": self.chat_template}, indent=2) + "\n")
        return path

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The prompt for a conversation, by the chat template as `transformers`' apply_chat_template renders it."""
        from jinja2 import TemplateError

        try:
            template = _compiled(self.chat_template or DEFAULT_CHAT_TEMPLATE)
            return template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                   bos_token=self.bos_token or "", eos_token=self.decode([self.eod_id]))
        except TemplateError as e:
            raise MtnlgError(f"the chat template cannot render these messages: {e}") from None

    @property
    def chat_stop(self) -> tuple[str, ...]:
        """Where a chat reply ends besides the end-of-document token: the default template's next user turn (a
        model's own template ends its turns with tokens of its own)."""
        return DEFAULT_CHAT_STOP if (self.chat_template or DEFAULT_CHAT_TEMPLATE) == DEFAULT_CHAT_TEMPLATE else ()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Like encode, for many texts at once (parallel inside `tokenizers`)."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        # Special tokens are kept so that decode(encode(s)) == s even when s contains EOD literally.
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_id(self, token: str) -> int | None:
        """The id of a token written out in full (e.g. a special token), or None if the vocabulary lacks it."""
        return self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str | None:
        """What starts a document for Hugging Face: Llama's `<s>` or Llama 3's `<|begin_of_text|>` where the
        vocabulary has it, else EOD (as in GPT-2)."""
        return next((t for t in ("<s>", "<|begin_of_text|>", EOD) if self.token_id(t) is not None), None)

    @property
    def bos_id(self) -> int:
        """The token a document is scored after (lm-eval's prefix token): bos_token's, else the end of document."""
        bos = self.bos_token
        return self.token_id(bos) if bos else self.eod_id

    @property
    def eod_id(self) -> int:
        """The end-of-document id: GPT-2's EOD, else an imported model's own end token (Llama's `</s>`,
        Llama 3's `<|end_of_text|>`); a tokenizer with none gets EOD as a new special token (vocab_size grows)."""
        if self._eod_id is None:
            known = [t for t in (EOD, *FOREIGN_EODS) if self.token_id(t) is not None]
            token = known[0] if known else EOD
            self._tok.add_special_tokens([token])  # no-op when already special; never split afterwards
            self._eod_id = self._tok.token_to_id(token)
        return self._eod_id


def _byte_level(model: models.Model) -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


@functools.lru_cache(maxsize=8)
def _compiled(template: str) -> "jinja2.Template":
    """A chat template compiled once (compiling costs a hundred times a render), in a sandbox as transformers
    renders it."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    return env.from_string(template)


def _chat_template(config: Path) -> str | None:
    if not config.is_file():
        return None
    try:
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except (ValueError, AttributeError) as e:
        raise MtnlgError(f"{config}: not valid JSON ({e}); fix or remove it") from None
    if isinstance(template, list):  # several named templates, as some models ship: take the default
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


@dataclass
class Coverage:
    """How many tokens a tokenizer spends on one language's texts."""

    language: str
    script: str  # the Unicode script of most of its letters: "Latin", "CJK", "Cyrillic", ...
    utf8_bytes: int
    tokens: int

    @property
    def bytes_per_token(self) -> float:
        return self.utf8_bytes / self.tokens


def coverage(tokenizer: Tokenizer, texts_by_language: dict[str, list[str]]) -> list[Coverage]:
    """Bytes per token of each language's texts (languages without text are left out)."""
    out = []
    for language, texts in texts_by_language.items():
        tokens = sum(map(len, tokenizer.encode_batch(list(texts))))
        if tokens:
            out.append(Coverage(language, _script(texts), sum(len(t.encode()) for t in texts), tokens))
    return out


def _script(texts: Iterable[str]) -> str:
    """The Unicode script most letters of `texts` are in: the first word of their Unicode names ("LATIN SMALL
    LETTER A", "CJK UNIFIED IDEOGRAPH-4E2D", "HIRAGANA LETTER A"); "none" without letters."""
    counts = Counter(unicodedata.name(ch, "?").split()[0] for text in texts for ch in text
                     if unicodedata.category(ch).startswith("L"))
    if not counts:
        return "none"
    name = counts.most_common(1)[0][0]
    return name if name == "CJK" else name.capitalize()


def coverage_report(tokenizer: Tokenizer, texts_by_language: dict[str, list[str]]) -> str:
    """A table of each language's script and bytes per token, then advice for every poorly covered language."""
    rows = coverage(tokenizer, texts_by_language)
    width = max([len("language"), *(len(r.language) for r in rows)])
    lines = [f"{'language':<{width}}  {'script':<10}  bytes/token  tokens"]
    lines += [f"{r.language:<{width}}  {r.script:<10}  {r.bytes_per_token:>11.2f}  {r.tokens:>6,}" for r in rows]
    lines += [f"{r.language} ({r.script}) is poorly covered ({r.bytes_per_token:.2f} bytes/token, under "
              f"{POOR_COVERAGE}): train a tokenizer on a mixed corpus that includes {r.language} (mtnlg tokenizer "
              "FILES... --output DIR) and pretrain with it; a fine-tune keeps its base's tokenizer"
              for r in rows if r.bytes_per_token < POOR_COVERAGE]
    return "\n".join(lines)
