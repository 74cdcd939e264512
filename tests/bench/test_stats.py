import math

import pytest

from bench.stats import Stats, stat_columns


def test_summary_fields_by_hand():
    s = Stats.of([4, 1, 10, 3, 2])  # sorted: 1 2 3 4 10
    assert s.n == 5
    assert s.median == 3
    # Type-7 quartiles: positions 0.25*(n-1) = 1 and 0.75*(n-1) = 3 of the sorted samples.
    assert s.q1 == 2 and s.q3 == 4 and s.iqr == 2
    assert s.mean == 4
    # Deviations -3 -2 -1 0 6: squares sum to 50, / (n-1) = 12.5.
    assert s.std == pytest.approx(math.sqrt(12.5))
    assert (s.min, s.max) == (1, 10)
    assert s.noisy  # IQR is 67% of the median


def test_interpolated_quartiles_and_quiet_row():
    s = Stats.of([10.0, 10.1, 10.2, 10.3, 10.4, 10.5])
    # positions 1.25 and 3.75: 10.1 + 0.25*0.1 and 10.3 + 0.75*0.1
    assert s.q1 == pytest.approx(10.125) and s.q3 == pytest.approx(10.375)
    assert s.median == pytest.approx(10.25)
    assert not s.noisy


def test_noisy_threshold_is_ten_percent_inclusive():
    # median 10, q1 9.5, q3 10.5 -> IQR/median exactly 0.10
    assert Stats.of([9, 9.5, 10, 10.5, 11]).noisy
    assert not Stats.of([9.6, 9.8, 10, 10.2, 10.4]).noisy


def test_single_sample_has_zero_spread():
    s = Stats.of([2.5])
    assert (s.median, s.iqr, s.std, s.n) == (2.5, 0, 0, 1)


def test_columns_carry_units_and_match_header():
    cols = Stats.of([1, 2, 3]).columns()
    assert list(cols) == stat_columns()
    assert cols["median_ms"] == 2 and cols["n"] == 3
    assert "median_s" in Stats.of([1.0], unit="s").columns()


def test_empty_samples_rejected():
    with pytest.raises(AssertionError):
        Stats.of([])
