"""What a report section is made of: figures, tables and notes (no HTML here)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

__all__ = ["COLLAPSE_ROWS", "Figure", "Section", "Table"]

COLLAPSE_ROWS = 15  # tables longer than this start collapsed unless marked otherwise


@dataclass
class Figure:
    id: str
    title: str
    uri: str  # data: URI
    caption: str = ""
    source: str | None = None  # the result table it is drawn from (findings citing that table link here)


@dataclass
class Table:
    id: str
    title: str
    df: pd.DataFrame
    csv: str | None = None  # name of the CSV written beside the report
    caption: str = ""
    max_rows: int = 400
    collapsed: bool | None = None  # None: collapsed when longer than COLLAPSE_ROWS; False for a primary table

    @property
    def is_collapsed(self) -> bool:
        return len(self.df) > COLLAPSE_ROWS if self.collapsed is None else self.collapsed


@dataclass
class Section:
    id: str
    title: str
    intro: str = ""
    blocks: list[Figure | Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    code: list[tuple[str, str]] = field(default_factory=list)  # (title, preformatted text)
