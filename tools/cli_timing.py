"""How long genbench takes to answer: wall time of `genbench --help` and of
`genbench compare A.csv B.csv` on two small runs, best of 5, against targets.

    python tools/cli_timing.py            # or: make cli-timing
    python tools/cli_timing.py --runs 9

Each command is a fresh `python -m bench` process, so the time includes the
interpreter's start and every import, as a user waits for it. The best of N is
reported because other work on the machine only ever adds time. Beside the wall
time, the process's CPU time (user + system): on a busy machine the wall time
waits for other work, and the CPU time is near what an idle machine's wall time
would be. The targets are judged on the wall time; exits 1 when one is missed.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import ResultWriter  # noqa: E402  (after the checkout is on the path)
from bench.stats import Stats, stat_columns  # noqa: E402

TARGETS_S = {"--help": 0.5, "compare": 1.5}  # what a user should wait on a small 2-core machine


def small_run(folder: Path, median_ms: float) -> Path:
    """A one-row attention run (no raw samples) for compare to read."""
    meta = {"params": ["impl"], "label": "impl", "metrics": [], "primary": "median_ms", "higher_is_better": False}
    writer = ResultWriter(folder, "attention", ["suite", "impl", "status", "reason", *stat_columns()], {},
                          stamp="run", meta=meta)
    stats = Stats.of([median_ms * f for f in (0.98, 0.99, 1.0, 1.01, 1.02)])
    writer.write({"suite": "attention", "impl": "naive", "status": "ok", "reason": "", **stats.columns()})
    writer.close(complete=True)
    return writer.csv_path


def best_of(command: list[str], runs: int) -> tuple[float, float]:
    """(wall, CPU) seconds of `command`, each the least of `runs` processes."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    walls, cpus = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the children waited for so far, this one included
        cpus.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return min(walls), min(cpus)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="processes per command; the fastest counts")
    runs = parser.parse_args().runs
    with tempfile.TemporaryDirectory() as tmp:
        base, new = small_run(Path(tmp) / "a", 1.0), small_run(Path(tmp) / "b", 1.05)
        genbench = [sys.executable, "-m", "bench"]
        measured = {
            "--help": best_of([*genbench, "--help"], runs),
            "compare": best_of([*genbench, "compare", str(base), str(new)], runs),
        }
    python, _ = best_of([sys.executable, "-c", "pass"], runs)  # for scale: no command can answer faster
    load = os.getloadavg()[0]
    print(f"genbench on {os.cpu_count()} cores (load {load:.1f}), best of {runs}; python -c pass: {python:.2f} s")
    over = False
    for name, (wall, cpu) in measured.items():
        target = TARGETS_S[name]
        over |= wall > target
        print(f"  genbench {name:<8} {wall:5.2f} s wall, {cpu:5.2f} s CPU   target <= {target:.1f} s wall   "
              f"{'ok' if wall <= target else 'OVER'}")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
