"""Result files of one run: a tidy CSV, a JSON sidecar, and the raw samples.

    results/attention-20261128-203000.csv           one row per configuration
    results/attention-20261128-203000.json          environment + run metadata
    results/attention-20261128-203000.samples.npz   raw timing samples per row

Rows are written one at a time, each as a single write followed by flush and
fsync, so an interrupted run keeps every finished row and never a torn line.
Floats are written with repr(), i.e. at full precision. The JSON is written
when the run starts (`"complete": false`) and rewritten when it ends, and it
names the samples file: `samples["row3"]` holds the samples of CSV row 3
(0-based, header excluded). It also says how to read the CSV: which columns
are the sweep's parameters (`params`, label first), its `label`, its own
`metrics`, its `primary` column and whether `higher_is_better`.

`writable_folder(out)` creates the folder and writes a file into it, so that a
folder that cannot take the results is found before a run, not at its end.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from bench.errors import BadInput


def writable_folder(path: Path) -> Path:
    """`path`, created if missing, once a file could be written into it; else a
    BadInput saying why (a file in the way, a read-only or full disk)."""
    path = Path(path)
    for folder in (path, *path.parents):  # the nearest part that exists must be a folder
        if folder.exists():
            if not folder.is_dir():
                raise BadInput(f"{folder} is a file, not a folder")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=path, prefix=".genbench-write-test-")
        os.close(handle)
        os.remove(probe)
    except OSError as exc:
        raise BadInput(f"cannot write into {path}: {exc.strerror or exc}") from None
    return path


class ResultWriter:
    def __init__(self, out_dir: Path, suite: str, columns: Sequence[str], env: dict, stamp: str | None = None,
                 meta: dict | None = None):
        out_dir = writable_folder(out_dir)
        stamp = stamp or dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        stem = f"{suite}-{stamp}"
        self.csv_path = out_dir / f"{stem}.csv"
        self.json_path = out_dir / f"{stem}.json"
        self.samples_path = out_dir / f"{stem}.samples.npz"
        self.columns = list(columns)
        self.rows: list[dict] = []
        self._samples: dict[str, np.ndarray] = {}
        # `meta`: how to read the CSV (see Sweep.meta), for compare and plot.
        self._meta = {"suite": suite, "csv": self.csv_path.name, **(meta or {}), "env": env, "complete": False,
                      "rows": 0}
        self._write_json()
        self._file = open(self.csv_path, "w", newline="")
        self._write_line(dict(zip(self.columns, self.columns)))

    def _write_line(self, row: dict) -> None:
        buf = io.StringIO()
        csv.DictWriter(buf, fieldnames=self.columns, restval="", extrasaction="raise").writerow(
            {k: ("" if v is None else v) for k, v in row.items()}
        )
        self._file.write(buf.getvalue())
        self._file.flush()
        os.fsync(self._file.fileno())

    def _write_json(self) -> None:
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self._meta, indent=2, default=str))
        tmp.replace(self.json_path)

    def write(self, row: dict, samples: Sequence[float] | None = None) -> None:
        if samples is not None:
            self._samples[f"row{len(self.rows)}"] = np.asarray(samples, dtype=np.float64)
        self._write_line(row)
        self.rows.append(row)

    def close(self, complete: bool, wall_s: float | None = None) -> None:
        """Finish the files; `wall_s`: the sweep's wall time, kept in the JSON."""
        self._file.close()
        if self._samples:
            np.savez_compressed(self.samples_path, **self._samples)
            self._meta["samples"] = self.samples_path.name
        self._meta.update(complete=complete, rows=len(self.rows))
        if wall_s is not None:
            self._meta["wall_s"] = wall_s
        self._write_json()


def load_samples(json_path: Path) -> dict[int, np.ndarray]:
    """Raw samples of a run by CSV row index, or {} when none were kept."""
    meta = json.loads(Path(json_path).read_text())
    name = meta.get("samples")
    if not name:
        return {}
    with np.load(Path(json_path).parent / name) as data:
        return {int(k[3:]): data[k] for k in data.files}
