"""The registry: where suites and implementations are found (a checkout's
pyproject.toml, installed packages' entry points), and loading what a name
or a module:attribute path names."""

import textwrap

import pytest

from bench import registry
from bench.errors import BadInput


def _dist(root, name, entry_points):
    """An installed distribution as importlib.metadata sees one: a dist-info folder on sys.path."""
    info = root / f"{name}-9.9.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 9.9\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))


@pytest.fixture
def stale_install(tmp_path, monkeypatch):
    """genbench installed from an older checkout, with a suite since removed, beside another package's suite."""
    _dist(tmp_path, "genbench", """
        [genbench.suites]
        attention = suites.cli.attention:SUITE
        gone = suites.cli.gone:SUITE
        """)
    _dist(tmp_path, "mysuites", """
        [genbench.suites]
        mine = mysuites.cli:SUITE
        """)
    monkeypatch.syspath_prepend(str(tmp_path))


def test_a_checkout_declares_genbench_own_suites_not_a_stale_install(stale_install):
    eps = registry.entry_points(registry.SUITES)
    assert [(ep.name, ep.value) for ep in eps] == [
        ("attention", "suites.cli.attention:SUITE"), ("ddp", "suites.cli.ddp:SUITE"),
        ("gan", "suites.cli.gan:SUITE"), ("medusa", "suites.cli.medusa:SUITE"), ("posenc", "suites.cli.posenc:SUITE"),
        ("precision", "suites.cli.precision:SUITE"),  # pyproject.toml's
        ("mine", "mysuites.cli:SUITE"),  # then the other packages'
    ]
    assert registry.source(eps[-1]) == "mysuites.cli:SUITE, from mysuites 9.9"


def test_installed_genbench_declares_its_own_outside_a_checkout(stale_install, tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "CHECKOUT", tmp_path / "site-packages")  # no pyproject.toml beside bench/
    names = [ep.name for ep in registry.entry_points(registry.SUITES)]
    assert names.index("gone") < names.index("mine") and "precision" not in names


def test_genbench_suites_and_their_charts():
    found, problems = registry.suites()
    assert [s.name for s in found][:6] == ["attention", "ddp", "gan", "medusa", "posenc", "precision"] and problems == []
    assert registry.charts() == {**{name: f"suites.charts.{name}:chart" for name in ("attention", "precision", "ddp",
                                                                                    "medusa")},
                                 "ddp-collectives": "suites.charts.collectives:chart",
                                 "gan": "suites.charts.gan:chart", "gan-vq": "suites.charts.gan:vq_chart",
                                 "posenc-cost": "suites.charts.posenc:cost_chart",
                                 "posenc-reach": "suites.charts.posenc:reach_chart"}


def test_load_by_entry_point_name_or_path(tmp_path, monkeypatch):
    (tmp_path / "mykernels.py").write_text("class Flash:\n    version = 2\n")
    _dist(tmp_path, "mykernels", """
        [genbench.test]
        flash = mykernels:Flash
        """)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert registry.names("genbench.test") == ["flash"]
    target, obj = registry.load("flash", "genbench.test", "--impl")
    assert target == "mykernels:Flash" and obj.__name__ == "Flash"
    assert registry.load("mykernels:Flash.version", "genbench.test", "--impl") == ("mykernels:Flash.version", 2)
    with pytest.raises(BadInput, match=r"^unknown --impl flash2; known: a, b, flash, or your own as module:function$"):
        registry.load("flash2", "genbench.test", "--impl", builtin=("a", "b"))
    with pytest.raises(BadInput, match=r"^--impl mykernels:Flash.size: mykernels has no Flash.size$"):
        registry.load("mykernels:Flash.size", "genbench.test", "--impl")


def test_a_module_that_fails_on_import_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "brokenkernels.py").write_text("import torch\nraise ValueError('needs CUDA 12.8\\nsee docs')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(BadInput) as info:
        registry.load_target("brokenkernels:attention", "--impl brokenkernels:attention")
    assert str(info.value) == "--impl brokenkernels:attention: cannot import brokenkernels: ValueError: needs CUDA 12.8"
