"""What a report section is made of: figures, tables and notes (no HTML here)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

__all__ = ["Figure", "Section", "Table"]


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


@dataclass
class Section:
    id: str
    title: str
    intro: str = ""
    blocks: list[Figure | Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    code: list[tuple[str, str]] = field(default_factory=list)  # (title, preformatted text)
