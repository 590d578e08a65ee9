"""The default corpus: English text from the running Python's own documentation, so training works offline."""

import contextlib
import functools
import importlib
import inspect
import io
import itertools
import pkgutil
import sys
import warnings
from pathlib import Path

import pydoc_data.topics

from mtnlg.files import write_jsonl_atomic

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


def _docstrings(module) -> list[tuple[str, str]]:
    """(name, docstring) of the module (name ""), then of its public classes, functions and methods
    ("Class.method")."""
    names = getattr(module, "__all__", None)
    if not isinstance(names, (list, tuple)):
        names = [n for n in dir(module) if not n.startswith("_")]
    docs = [("", inspect.getdoc(module))]
    for name in sorted(set(names)):
        obj = getattr(module, name, None)
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        docs.append((name, inspect.getdoc(obj)))
        if inspect.isclass(obj):
            methods = sorted((n, m) for n, m in vars(obj).items() if not n.startswith("_") and inspect.isroutine(m))
            docs += [(f"{name}.{n}", inspect.getdoc(m)) for n, m in methods]
    return [(n, d) for n, d in docs if isinstance(d, str) and d.strip()]


def _modules(name: str):
    """The importable public module `name` and, for a package, its public submodules, depth first."""
    module = _import_quietly(name)
    if module is None:
        return
    yield module
    for info in sorted(pkgutil.iter_modules(getattr(module, "__path__", [])), key=lambda info: info.name):
        if not info.name.startswith("_") and info.name not in _SKIP:
            yield from _modules(f"{name}.{info.name}")


@functools.cache
def api_docs() -> tuple[tuple[str, str, str], ...]:
    """(module, name, docstring) of every importable public stdlib module (name "") and of its public
    classes, functions and methods, module by module in sorted order. Read once per process: importing a
    submodule can replace its package's function of the same name (curses.has_key), so a second walk differs."""
    return tuple((module.__name__, name, doc)
                 for top in sorted(sys.stdlib_module_names) if not top.startswith("_") and top not in _SKIP
                 for module in _modules(top) for name, doc in _docstrings(module))


def build_default_corpus(path: str | Path) -> Path:
    """Write the corpus as JSONL ({"text": ...} per line): each help topic, then each stdlib module's
    docstrings, each text once."""
    path = Path(path)
    topics = pydoc_data.topics.topics
    documents = list(dict.fromkeys(topics[key].strip() for key in sorted(topics)))  # some topics share a text
    seen = set(documents)
    for _, docs in itertools.groupby(api_docs(), key=lambda entry: entry[0]):
        texts = [d for d in dict.fromkeys(doc for _, _, doc in docs) if d not in seen]
        seen.update(texts)
        if texts:
            documents.append("\n\n".join(texts))
    return write_jsonl_atomic(path, ({"text": text} for text in documents))
