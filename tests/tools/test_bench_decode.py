"""tools/bench_decode.py: a small run on the CPU (Triton's interpreter) gives one row per
implementation, split count and page size, each matching the float64 reference."""

import csv


def test_small_run_writes_checked_rows(run_tool, tmp_path):
    out = tmp_path / "decode.csv"
    done = run_tool("bench_decode", "--device", "cpu", "--batch", "1", "--heads", "4", "--kv-heads", "2",
                    "--head-dim", "16", "--q-len", "1,3", "--kv-len", "70", "--dtype", "fp32", "--causal",
                    "--impl", "tiled", "--impl", "sdpa-math", "--splits", "1,3", "--page-size", "0,16", "--rows", "16",
                    "--copy-gbps", "100", "--out", str(out), TRITON_INTERPRET="1")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    # Per q_len: tiled at 2 page sizes x 2 split counts, and sdpa-math.
    assert len(rows) == 2 * 5, rows
    tiled = [r for r in rows if r["impl"] == "tiled"]
    assert sorted((r["page_size"], r["kernel"].split()[2]) for r in tiled) == sorted(
        2 * [("0", "splits=1"), ("0", "splits=3"), ("16", "splits=1"), ("16", "splits=3")])
    assert all(r["kernel"].startswith("triton decode") and "rows=16" in r["kernel"] for r in tiled)
    assert all("paged page_size=16" in r["kernel"] for r in tiled if r["page_size"] == "16")
    for r in rows:
        assert r["reason"] == "" and float(r["rel_err"]) < 1e-5, r
        assert float(r["us"]) > 0 and float(r["pct_copy"]) == round(float(r["GBps"]), 1), r


def test_help_names_the_options(run_tool):
    done = run_tool("bench_decode", "--help")
    assert done.returncode == 0, done.stderr[-3000:]
    assert all(flag in done.stdout for flag in ("--splits", "--page-size", "--copy-gbps", "--kv-heads"))
