"""The default corpus: English text from the running Python's own documentation, so training works offline."""

import contextlib
import importlib
import inspect
import io
import json
import pkgutil
import sys
import warnings
from pathlib import Path

import pydoc_data.topics

from mtnlg.files import write_text_atomic

# Modules that open windows, print, touch the terminal, write files on import, are tests or codec tables, or
# (distutils) are often setuptools' copy rather than the standard library's.
_SKIP = {"antigravity", "distutils", "encodings", "idlelib", "lib2to3", "readline", "rlcompleter", "test", "tests",
         "this", "tkinter", "turtle", "turtledemo"}


def _import_quietly(name: str):
    """The module, or None when importing it fails or writes anything to stdout/stderr."""
    out = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            warnings.simplefilter("ignore")
            module = importlib.import_module(name)
    except (Exception, SystemExit):
        return None
    return None if out.getvalue() else module


def _docstrings(module) -> list[str]:
    """The module's docstring, then those of its public classes, functions and methods."""
    names = getattr(module, "__all__", None)
    if not isinstance(names, (list, tuple)):
        names = [n for n in dir(module) if not n.startswith("_")]
    docs = [inspect.getdoc(module)]
    for name in sorted(set(names)):
        obj = getattr(module, name, None)
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        docs.append(inspect.getdoc(obj))
        if inspect.isclass(obj):
            methods = sorted((n, m) for n, m in vars(obj).items() if not n.startswith("_") and inspect.isroutine(m))
            docs += [inspect.getdoc(m) for _, m in methods]
    return [d for d in docs if isinstance(d, str) and d.strip()]


def _modules(name: str):
    """The importable public module `name` and, for a package, its public submodules, depth first."""
    module = _import_quietly(name)
    if module is None:
        return
    yield module
    for info in sorted(pkgutil.iter_modules(getattr(module, "__path__", [])), key=lambda info: info.name):
        if not info.name.startswith("_") and info.name not in _SKIP:
            yield from _modules(f"{name}.{info.name}")


def build_default_corpus(path: str | Path) -> Path:
    """Write the corpus as JSONL ({"text": ...} per line): each help topic, then each stdlib module's docstrings."""
    path = Path(path)
    topics = pydoc_data.topics.topics
    documents = list(dict.fromkeys(topics[key].strip() for key in sorted(topics)))  # some topics share a text
    seen = set(documents)
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in _SKIP:
            continue
        for module in _modules(name):
            docs = [d for d in dict.fromkeys(_docstrings(module)) if d not in seen]
            seen.update(docs)
            if docs:
                documents.append("\n\n".join(docs))
    return write_text_atomic(path, "".join(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in documents))
