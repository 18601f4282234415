"""Reading an Nsight Compute report back through ncu's CLI, for the counter probes (bench/attention/
attention_counters.py, bench/linear/gemm_counters.py)."""

from __future__ import annotations

import csv
import io
import subprocess
from pathlib import Path


def ncu_csv(report: Path, *page: str) -> list[list[str]]:
    """One page of the report (`--page raw`, `--page source ...`) as CSV rows; the page is also written beside the
    report, for reading in full later."""
    text = subprocess.run(["ncu", "--import", str(report), "--csv", *page], check=True, capture_output=True,
                          text=True).stdout
    (report.parent / f"{report.stem}.{page[1]}.csv").write_text(text)
    return [row for row in csv.reader(io.StringIO(text)) if row]


def ncu_number(text: str) -> float | None:
    """A value of ncu's CSV ("1,234.5") as a number; None for a non-numeric cell."""
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None
