"""The collectives' sweep: sizes, a row's arithmetic on hand-made rank
results, and a real two-process gloo run of `genbench ddp --collectives`."""

import pytest

from bench import launch, metrics
from bench.errors import BadInput
from suites import collectives
from tests.suites.test_ddp import _run, hosts


@pytest.mark.parametrize("text, n", [("1K", 1024), ("1KiB", 1024), ("64M", 64 * 2**20), ("1g", 2**30), ("4096", 4096)])
def test_parse_size(text, n):
    assert collectives.parse_size(text) == n


@pytest.mark.parametrize("text", ["", "K", "1.5M", "-1K", "1T"])
def test_parse_size_rejects(text):
    with pytest.raises(BadInput, match="as a size"):
        collectives.parse_size(text)


def test_collective_sizes_split_evenly_over_ranks():
    configs = collectives.CollectiveOptions(hosts(nproc=3), collectives=("all_gather",), min_bytes=1024,
                                            max_bytes=4096).configs()
    # fp32, 3 ranks: 256 elements -> 255, 512 -> 510, 1024 -> 1023
    assert [(c.size, c.size_bytes) for c in configs] == [("1 KiB", 1020), ("2 KiB", 2040), ("4 KiB", 4092)]


def test_collective_row_by_hand():
    cfg = collectives.CollectiveConfig("all_reduce", "64 MiB", 64 * 2**20, world_size=4, dtype="fp32")
    per_rank = [{"us": [100.0, 200.0, 300.0], "calls": 1}, {"us": [300.0, 400.0, 500.0], "calls": 1}]
    m = collectives.collective_measurement(cfg, per_rank, nodes=1, line_rate_GBps=450.0)
    # Averaged over ranks sample by sample: [200, 300, 400] us, median 300 us.
    assert m.stats.samples == (200.0, 300.0, 400.0) and m.stats.unit == "us"
    algbw = 64 * 2**20 / 300e-6 / 1e9
    assert m.values["algbw_GBps"] == pytest.approx(algbw)
    assert m.values["busbw_GBps"] == pytest.approx(algbw * 2 * 3 / 4)
    assert m.values["pct_of_line_rate"] == pytest.approx(100 * algbw * 1.5 / 450)
    skipped = collectives.collective_measurement(cfg, [{"skip": "needs 2 GiB"}] * 2, 1, None)
    assert (skipped.status, skipped.reason) == ("oom", "needs 2 GiB")


@pytest.mark.slow
def test_collective_rows_from_two_gloo_processes(tmp_path, monkeypatch):
    monkeypatch.delenv(launch.FAULT_ENV, raising=False)
    df, meta = _run(tmp_path, "--collectives", "--max-size", "8K")
    assert meta["suite"] == "ddp-collectives" and meta["primary"] == "busbw_GBps"
    assert len(df) == 3 * 4 and (df["status"] == "ok").all(), df["reason"].tolist()
    assert set(df["collective"]) == {"all_reduce", "all_gather", "reduce_scatter"}
    assert list(df["size_bytes"][:4]) == [1024, 2048, 4096, 8192] and (df["world_size"] == 2).all()
    for _, row in df.iterrows():
        algbw = metrics.algbw_GBps(row["size_bytes"], row["median_us"] / 1e3)
        factor = 1.0 if row["collective"] == "all_reduce" else 0.5  # 2(n-1)/n and (n-1)/n at n = 2
        assert row["algbw_GBps"] == pytest.approx(algbw)
        assert row["busbw_GBps"] == pytest.approx(algbw * factor)
