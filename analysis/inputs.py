"""Reading the files figures are made from, and rejecting bad ones with one clear line.

Two kinds of input: Result tables (moesim.results; simulator and runtime write the same
schema), and plain CSV/Parquet tables with documented columns (run summaries, planner solve
statistics, validation comparisons). Both fail with `InputError(file, field, message)`, never a
traceback, so `moesim plot` can exit 2 naming the file and the column that is wrong.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from moesim.errors import InputError
from moesim.results import read_results


@dataclass(frozen=True)
class ResultFile:
    """One Result table with its metadata and where it came from."""

    path: Path
    frame: pd.DataFrame
    meta: dict[str, Any]

    @property
    def label(self) -> str:
        return self.path.stem


def read_result_files(paths: Iterable[str | Path]) -> list[ResultFile]:
    out = []
    for p in paths:
        df, meta = read_results(p)
        if df.empty:
            raise InputError(p, "rows", "the result table is empty")
        out.append(ResultFile(Path(p), df, meta))
    if not out:
        raise InputError("--results", "files", "no result files given")
    return out


def read_table(path: str | Path, required: Mapping[str, str]) -> pd.DataFrame:
    """Read a CSV or Parquet table and check that it has `required` columns of the given kinds
    ("number" or "string"); extra columns are kept."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file", "no such file")
    try:
        if path.suffix == ".csv":
            df = pd.read_csv(path)
        elif path.suffix == ".parquet":
            df = pd.read_parquet(path)
        else:
            raise InputError(path, "path", "tables are read from .csv or .parquet")
    except (pa.ArrowInvalid, OSError, pd.errors.ParserError, pd.errors.EmptyDataError,
            UnicodeDecodeError) as e:
        raise InputError(path, "file", f"not a readable table: {e}") from None
    return check_columns(df, required, str(path))


def check_columns(df: pd.DataFrame, required: Mapping[str, str], source: str) -> pd.DataFrame:
    """Check presence and kind of `required` columns; raise InputError on the first problem."""
    for col, kind in required.items():
        if col not in df.columns:
            raise InputError(source, col, f"missing column; need {', '.join(required)}")
        if kind == "number" and not pd.api.types.is_numeric_dtype(df[col]):
            raise InputError(source, col, "must hold numbers")
        if kind == "number" and df[col].isna().any():
            row = int(df[col].isna().to_numpy().argmax()) + 1
            raise InputError(source, col, f"empty value on data row {row}")
    if df.empty:
        raise InputError(source, "rows", "the table has no rows")
    return df


def meta_param(meta: Mapping[str, Any], dotted: str) -> Any:
    """A config value from result metadata: 'model.top_k' is looked up as meta['config']['model']
    ['top_k'], then meta['model']['top_k'], then meta['top_k']; None when absent. Simulator and
    runtime both store the run's config, but a hand-made table may only carry flat keys."""
    section, _, name = dotted.partition(".")
    for root in (meta.get("config"), meta):
        if isinstance(root, Mapping):
            sec = root.get(section)
            if isinstance(sec, Mapping) and name in sec:
                return sec[name]
    return meta.get(name)
