"""File paths for DuckDB's ``read_parquet``, read literally: the one home of glob escaping.

DuckDB expands ``*``, ``?``, ``[...]`` and ``**`` in every path it is given, also inside a list
and also when the path is a bound parameter. A journal file (or its root, or a feature-store
file) whose name holds one of those characters would then read *other* files: a file planted as
``hot/model=fraud/.../*.parquet`` would make a query count every entry of its folder twice, and a
root like ``/data/journal[eu]`` would read nothing. :func:`duckdb_literal_path` escapes each glob
character as a one-character set (``[*]``, ``[?]``, ``[[]``), which DuckDB's glob matches only
against that character (``tests/test_query.py`` plants files named to exploit it).

A backslash cannot be matched inside a DuckDB glob pattern at all, so a path holding a backslash
*and* a glob character cannot be given to DuckDB literally: :func:`duckdb_literal_path` raises
:class:`UnreadableByDuckDB` and callers read such files with pyarrow instead.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["GLOB_CHARACTERS", "UnreadableByDuckDB", "duckdb_literal_path", "duckdb_literal_paths"]

GLOB_CHARACTERS = frozenset("*?[")
"""The characters that make DuckDB treat a path as a pattern (``**`` is two ``*``; ``]`` and ``!``
only mean something inside a set that ``[`` opened; DuckDB has no ``{a,b}`` expansion)."""


class UnreadableByDuckDB(ValueError):
    """The path holds a backslash and a glob character: DuckDB cannot read it literally."""


def duckdb_literal_path(path: str) -> str:
    """``path`` with its glob characters escaped, so ``read_parquet`` reads exactly that file.

    A path without glob characters is returned unchanged.
    """
    if not GLOB_CHARACTERS.intersection(path):
        return path
    if "\\" in path:
        raise UnreadableByDuckDB("a path holding a backslash and a glob character (*, ?, [) "
                                 "cannot be read literally by DuckDB")
    return "".join(f"[{c}]" if c in GLOB_CHARACTERS else c for c in path)


def duckdb_literal_paths(paths: Iterable[str]) -> list[str]:
    """:func:`duckdb_literal_path` of every path (raises if any one cannot be escaped)."""
    return [duckdb_literal_path(p) for p in paths]
