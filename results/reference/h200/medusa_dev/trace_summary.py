"""Kernels per decoding step from the Chrome traces that `genbench medusa --profile` writes.

    python3 results/reference/h200/medusa_dev/trace_summary.py TRACE_DIR OUT.csv vanilla=381 medusa=180

One row per method and kernel name: launches and device microseconds per
decoding step, and microseconds per launch. The decoding steps in each trace
are given on the command line. For explore/'s traces (3 profiled generations
of 128 tokens): vanilla 3 x 127 = 381; Medusa 180, the launches of a GEMM
that runs once per layer per step (2880) over the model's 16 layers (the
prefills' GEMMs have other shapes, hence other kernels).
"""

import collections
import json
import sys
from pathlib import Path

import pandas as pd


def main() -> None:
    traces, out = Path(sys.argv[1]), Path(sys.argv[2])
    steps_of = {method: int(n) for method, n in (arg.split("=") for arg in sys.argv[3:])}
    rows = []
    for path in sorted(traces.glob("*.json")):
        method = path.name.split("method=")[1].split("-")[0]
        steps = steps_of[method]
        kernels = collections.defaultdict(lambda: [0, 0.0])
        for event in json.loads(path.read_text())["traceEvents"]:
            if event.get("cat") == "kernel":
                kernels[event["name"]][0] += 1
                kernels[event["name"]][1] += event["dur"]
        for name, (count, us) in kernels.items():
            rows.append(dict(method=method, kernel=name[:120], launches_per_step=count / steps,
                             us_per_step=us / steps, us_per_launch=us / count))
    df = pd.DataFrame(rows).sort_values(["method", "us_per_step"], ascending=[True, False])
    df.to_csv(out, index=False, float_format="%.3f")
    print(df.groupby("method")[["launches_per_step", "us_per_step"]].sum())


if __name__ == "__main__":
    main()
