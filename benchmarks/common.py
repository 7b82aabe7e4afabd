"""Helpers shared by the benchmark scripts: a Markdown table on stdout and a CSV file."""

from __future__ import annotations

import csv
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
"""Where every benchmark writes its tables and figures."""


def columns_of(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r))


def print_table(rows: list[dict], columns: list[str] | None = None) -> None:
    columns = columns or columns_of(rows)
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        print("| " + " | ".join("-" if r.get(c) is None else str(r.get(c)) for c in columns) + " |")


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns_of(rows))
        w.writeheader()
        w.writerows(rows)


def save_rows(name: str, rows: list[dict]) -> Path:
    """Write ``rows`` to benchmarks/results/<name>_<time>.csv, say so on stdout, return the path."""
    path = RESULTS / f"{name}_{time.strftime('%Y%m%d-%H%M%S')}.csv"
    write_csv(path, rows)
    print(f"wrote {path}")
    return path
