"""Every config key, with its value, its default and its docstring (the string literal under
each dataclass field, the convention of trainer/config.py and the configs it imports)."""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

from trainer.config import JobConfig

KEYWORD_NAMES = {"from_": "from"}
"""Fields named after a Python keyword, and their key in configs (`init.from`)."""


@dataclass
class KeyDoc:
    key: str
    value: Any
    default: Any
    doc: str


@cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: its docstring} for a dataclass, read from its source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def config_keys(cfg: Any = None, prefix: str = "") -> Iterator[KeyDoc]:
    """Every leaf key of `cfg` (default: the default JobConfig), depth first."""
    cfg = JobConfig() if cfg is None else cfg
    docs = field_docs(type(cfg))
    for f in dataclasses.fields(cfg):
        key = prefix + KEYWORD_NAMES.get(f.name, f.name)
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            yield from config_keys(value, key + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        yield KeyDoc(key, value, default, docs.get(f.name, ""))


def closest_key(key: str) -> str | None:
    """The known key a mistyped one most likely meant: same last part, else the closest."""
    known = [k.key for k in config_keys()]
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in known if k.rsplit(".", 1)[-1] == leaf]
    if same_leaf:
        return same_leaf[0]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return close[0]
    leaves = {k.rsplit(".", 1)[-1]: k for k in known}
    close = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)
    return leaves[close[0]] if close else None
