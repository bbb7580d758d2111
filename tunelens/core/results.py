"""A folder of analysis results: named tables (CSV), named arrays (NPZ) and a JSON summary.

This is the hand-off between analysis and reports: analysis writes it, reports
only read it. The folder is written to a temporary sibling and swapped into
place, so a reader never sees half of it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .files import read_json, write_folder_atomically, write_owned_folder

__all__ = ["Results", "write_folder_atomically"]


def _jsonable(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


@dataclass
class Results:
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    arrays: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    def table(self, name: str) -> pd.DataFrame | None:
        return self.tables.get(name)

    def save(self, folder: str | os.PathLike) -> Path:
        def fill(tmp: Path) -> None:
            for name, df in self.tables.items():
                if df is None or len(df.columns) == 0:
                    continue  # nothing to write (an empty table reads back as an error)
                df.to_csv(tmp / f"{name}.csv", index=False)
            for name, arrs in self.arrays.items():
                np.savez_compressed(tmp / f"{name}.npz", allow_pickle=False, **arrs)
            (tmp / "summary.json").write_text(json.dumps(self.summary, indent=2, sort_keys=True, default=_jsonable))

        return write_owned_folder(folder, fill)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Results:
        folder = Path(folder)
        if not (folder / "summary.json").exists():
            raise FileNotFoundError(
                f"{folder} holds no analysis results (no summary.json): run `tunelens analyze` first"
            )
        fix = "run `tunelens analyze` (or `tunelens compare`) again"
        r = cls(summary=read_json(folder / "summary.json", fix))
        for p in sorted(folder.glob("*.csv")):
            r.tables[p.stem] = pd.read_csv(p)
        for p in sorted(folder.glob("*.npz")):
            with np.load(p, allow_pickle=False) as z:
                r.arrays[p.stem] = {k: z[k] for k in z.files}
        return r
