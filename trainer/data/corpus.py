"""Built-in corpora made from files every Python installation has, so nothing is downloaded.

- `stdlib:prose`: English prose, the language reference topics behind `help()`
  (`pydoc_data.topics`) plus the longer docstrings of stdlib modules not in `stdlib:code`.
- `stdlib:code`: Python source code of the standard library (tests and data tables excluded),
  the first CODE_BYTES_CAP bytes of it in sorted path order.

Each corpus is built once into `<cache_dir>/corpus/<name>.jsonl`, one `{"text": ...}` per document.
The content is deterministic for a given Python installation (files are visited in sorted order).
"""

from __future__ import annotations

import ast
import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from trainer.data.cache import build_once

CODE_BYTES_CAP = 4 << 20
MIN_DOCSTRING_CHARS = 200
# Directories whose files are tests, demos, bundled data or generated tables rather than code.
EXCLUDED_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idle_test",
        "__pycache__",
        "pydoc_data",
        "encodings",
        "lib2to3",
        "turtledemo",
        "ensurepip",
    }
)


def builtin_corpus_path(spec: str, cache_dir: str) -> str:
    """Path of the jsonl file of built-in corpus `spec` (e.g. "stdlib:prose"), built if missing."""
    documents = {"stdlib:prose": prose_documents, "stdlib:code": code_documents}
    if spec not in documents:
        raise ValueError(f"unknown built-in corpus {spec!r}; available: {sorted(documents)}")
    path = Path(cache_dir) / "corpus" / f"{spec.split(':', 1)[1]}.jsonl"
    return build_once(str(path), lambda tmp: _write_jsonl(tmp, documents[spec]()))


def stdlib_source_files() -> list[Path]:
    """The stdlib's .py files outside tests and data tables, sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if EXCLUDED_DIRS.isdisjoint(relative.parts[:-1]) and not path.name.startswith("test_"):
            files.append((relative.as_posix(), path))
    return [path for _, path in sorted(files)]


def code_files() -> tuple[list[Path], list[Path]]:
    """(files of the code corpus, remaining files): the first CODE_BYTES_CAP bytes of source."""
    files = stdlib_source_files()
    total = 0
    for count, path in enumerate(files):
        total += path.stat().st_size
        if total > CODE_BYTES_CAP:
            return files[:count], files[count:]
    return files, []


def code_documents() -> Iterator[str]:
    """Whole stdlib source files, in sorted order, up to CODE_BYTES_CAP bytes."""
    for path in code_files()[0]:
        yield path.read_bytes().decode("utf-8", errors="replace")


def prose_documents() -> Iterator[str]:
    """The `help()` topics, then the long docstrings (without doctest examples) of the stdlib
    files that the code corpus leaves out, so that the two corpora share no text."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key].strip()
    for path in code_files()[1]:
        yield from _docstrings(path)


def _docstrings(path: Path) -> Iterator[str]:
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError):
        return
    documented = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for node in ast.walk(tree):
        if isinstance(node, documented):
            text = ast.get_docstring(node)
            if text and len(text) >= MIN_DOCSTRING_CHARS and ">>>" not in text:
                yield text


def _write_jsonl(path: str, documents: Iterator[str]) -> None:
    with open(path, "w", encoding="utf-8") as file:
        for text in documents:
            file.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
