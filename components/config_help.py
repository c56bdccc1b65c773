"""What ``--help`` says about each setting: its key, its default and its explanation.

An option is documented once, as the comment above (or beside) its dataclass field; this module
reads those comments from the source (``ast`` for the fields, ``tokenize`` for the comments), so
the help can never drift from the code. No Ray, no OmegaConf: only the dataclasses themselves.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
from functools import lru_cache
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import yaml

# Tool pragmas, not explanations.
_PRAGMAS = ("noqa", "type:", "pragma", "fmt:")


@lru_cache(maxsize=None)
def field_comments(cls: type) -> Dict[str, str]:
    """``{field: explanation}`` for the fields of dataclass ``cls`` that carry a comment: the run of
    comment lines right above the field, then the comment beside it. Empty when the source is not
    available (a frozen or compiled install)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments: Dict[int, Tuple[str, bool]] = {}  # line -> (text, alone on its line)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if not text.startswith(_PRAGMAS):
                comments[tok.start[0]] = (text, not tok.line[:tok.start[1]].strip())
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef))
    out: Dict[str, str] = {}
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        above, line = [], stmt.lineno - 1
        while line in comments and comments[line][1]:
            above.insert(0, comments[line][0])
            line -= 1
        beside = comments.get(stmt.lineno)
        text = " ".join(above + ([beside[0]] if beside and not beside[1] else []))
        if text:
            out[stmt.target.id] = text
    return out


def _options(obj: Any, prefix: str = "") -> Iterator[Tuple[str, Any, Any, str]]:
    """(dotted key, value, owning dataclass, field name) of every field of dataclass instance
    ``obj``, depth first in declaration order; nested dataclasses come as their own entry first."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        yield prefix + f.name, value, type(obj), f.name
        if dataclasses.is_dataclass(value):
            yield from _options(value, f"{prefix}{f.name}.")


def option_keys(schema: type) -> List[str]:
    """Every dotted key of ``schema``, sections and settings alike: ``storage``, ``storage.root``, ..."""
    return [key for key, *_ in _options(schema())]


def _format(value: Any) -> str:
    """A default as it would be written on the command line (``key=<this>``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple, dict)):
        return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=1 << 20).strip()
    return str(value) if value != "" else "''"


def _selected(key: str, sections: Optional[Sequence[str]]) -> bool:
    """``key`` lies in one of ``sections`` (or ``sections`` go through it, e.g. ``data`` for ``data.name``)."""
    if sections is None:
        return True
    return any(key == s or key.startswith(s + ".") or s.startswith(key + ".") for s in sections)


def describe_options(schema: type, sections: Optional[Sequence[str]] = None, width: int = 100) -> str:
    """The settings of ``schema`` under ``sections`` (all when None), one ``key=default`` line each
    with its explanation wrapped below it, grouped under a ``section:`` line per dataclass.

    Args:
        schema: the root config dataclass (e.g. ``AppConfig``).
        sections: dotted keys to show: whole sections (``retriever``) or single settings
            (``train.dataset_version``); None shows every setting.
        width: wrap explanations at this many columns.

    Raises:
        KeyError: a name in ``sections`` that ``schema`` does not have.
    """
    options = list(_options(schema()))
    unknown = sorted(set(sections or ()) - {key for key, *_ in options})
    if unknown:
        raise KeyError(f"not settings of {schema.__name__}: {', '.join(unknown)}")
    lines: List[str] = []
    for key, value, owner, name in options:
        if not _selected(key, sections):
            continue
        depth = key.count(".")
        indent = "  " * max(depth, 1)  # a section's settings two columns in from its line
        if dataclasses.is_dataclass(value):
            lines += [""] * (depth == 0) + ["  " * depth + f"{key}:"]
        else:
            lines.append(f"{indent}{key}={_format(value)}")
        doc = field_comments(owner).get(name)
        if doc:
            lines += textwrap.wrap(doc, width, initial_indent=indent + "    ", subsequent_indent=indent + "    ",
                                   break_long_words=False, break_on_hyphens=False)
    return "\n".join(lines).strip("\n")
