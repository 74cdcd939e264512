"""Tests for impls/attention/gluon_compat.py: which releases count as measured, and the TMA load's name."""

from types import SimpleNamespace

import pytest

from impls.attention import gluon_compat


@pytest.mark.parametrize("version, expect", [
    ("3.6.0", True), ("3.6.1", True),
    ("3.7.1", False), ("3.9.0", False),
    ("3.60.0", False),  # a prefix of the release, not of the string
    ("3.5.1", False),
])
def test_measured_releases(version, expect):
    assert gluon_compat.measured(version) is expect


def _removed(*args, **kwargs):
    raise RuntimeError("async_copy_global_to_shared has been removed; call async_load instead")


def _old(*args, **kwargs):
    return "old"


def _new(*args, **kwargs):
    return "new"


def test_tma_load_takes_async_load_where_it_exists():
    # 3.9: both names, the old one a stub that raises; 3.8: both working; 3.6 and 3.7: only the old one.
    assert gluon_compat.tma_load_of(SimpleNamespace(async_load=_new, async_copy_global_to_shared=_removed)) is _new
    assert gluon_compat.tma_load_of(SimpleNamespace(async_load=_new, async_copy_global_to_shared=_old)) is _new
    assert gluon_compat.tma_load_of(SimpleNamespace(async_copy_global_to_shared=_old)) is _old


def test_tma_load_of_the_installed_gluon():
    tma = pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper.tma")
    want = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
    assert gluon_compat.tma_load is want


def test_tma_add_takes_async_atomic_add_where_it_exists():
    # 3.8 and 3.9 name the TMA reduce-add; 3.6 and 3.7 only have the builder call, which the fallback makes.
    pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper.tma")
    assert gluon_compat.tma_add_of(SimpleNamespace(async_atomic_add=_new)) is _new
    assert gluon_compat.tma_add_of(SimpleNamespace()) is gluon_compat._builder_tma_add
    # Whichever the installed Triton has is what the kernels call; that it compiles: tests/tools/test_compile_gluon.py.
    tma = pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper.tma")
    assert gluon_compat.tma_add is getattr(tma, "async_atomic_add", gluon_compat._builder_tma_add)


def test_every_measured_release_compiles():
    assert all(v in gluon_compat.COMPILES for v in gluon_compat.MEASURED)
