"""Shared test set-up.

- Without CUDA, Triton kernels run through Triton's interpreter: the flag must
  be set before triton is first imported, so it is set here.
- Each test session gets its own genbench cache (calibrated peaks, tokenizers,
  checkpoints), so tests neither read nor pollute the user's. pytest-xdist's
  workers inherit their session's: every cache write is renamed into place,
  so workers racing on one entry are safe, and a test that must watch an
  entry being made uses a cache of its own.
"""

import os
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("GENBENCH_CACHE", tempfile.mkdtemp(prefix="genbench-test-cache-"))
# One console width wherever the tests run (a terminal, CI, pytest-xdist's
# workers, which have none): tests read what rich wrapped at this width.
os.environ.setdefault("COLUMNS", "200")

_skip_without_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; run on the GPU machine")


@pytest.fixture(autouse=True)
def _untuned_in_quick_gpu_tests(request):
    """In the quick GPU selection (-m "gpu and not slow") every autotuned flash
    kernel takes its first fitting config untimed (impls/attention/tuning.py
    first_configs): a test's new shape key would otherwise compile every config,
    which kept the selection from ending in one GPU call. The slow tests, and
    any test with GENBENCH_TEST_AUTOTUNE=1, tune as a user's run does."""
    node = request.node
    if (not torch.cuda.is_available() or node.get_closest_marker("gpu") is None
            or node.get_closest_marker("slow") is not None or os.environ.get("GENBENCH_TEST_AUTOTUNE") == "1"):
        yield
        return
    from impls.attention import tuning
    with tuning.first_configs():
        yield


def slow_after_first(values):
    """Parametrize values for a GPU test: the first stays in the quick GPU selection
    (-m "gpu and not slow"), the others are marked slow. With stacked parametrize
    decorators the quick combination is the one made of every list's first value."""
    return [v if i == 0 else pytest.param(*(v if isinstance(v, tuple) else (v,)), marks=pytest.mark.slow)
            for i, v in enumerate(values)]


def requires_cuda(fn):
    """Skipped without CUDA, and in the GPU machine's selection (-m gpu)."""
    return pytest.mark.gpu(_skip_without_cuda(fn))


@pytest.fixture
def cpu() -> torch.device:
    return torch.device("cpu")


@pytest.fixture
def one_timed_rep(monkeypatch):
    """For rows whose kernels run through Triton's interpreter: one timed
    repetition where a call outlasts the budget, not bench.timing's floor of
    five. Such a call takes seconds and its time means nothing; the row's
    checks (status, error against float64, kernel) are made as before."""
    from bench import timing

    monkeypatch.setattr(timing, "MIN_REPS", 1)
