"""The suites genbench runs, and the implementations users add to them, found
through Python's entry points (as pytest finds its plugins): bench/ names no
suite.

A suite declares itself in its package's pyproject.toml,

    [project.entry-points."genbench.suites"]
    attention = "suites.cli.attention:SUITE"

naming a `Suite`: its command, `genbench NAME`, and the charts of the runs it
writes, as "module:function" strings that only `genbench plot` imports (a
command module must stay light: `genbench --help` imports every one). genbench's
own suites are declared so in its pyproject.toml, and an installed package adds
one the same way.

A suite may read implementations from a group of its own (the attention suite
reads `genbench.attention`, the precision suite `genbench.precision`):
`load(spec, group, option)` turns an installed entry point's name, or a
`module:attribute` path, into the object it names.

Running from a checkout (bench/ beside the pyproject.toml that declares
genbench), genbench's own entry points are read from that file, so that a
suite added there needs no reinstall; installed, from the package's metadata
(`pip install -e .` again after changing them, which `make` does).
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.errors import BadInput

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: genbench's own entry points come from its metadata alone
    tomllib = None

SUITES = "genbench.suites"
CHECKOUT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Suite:
    """A suite as the CLI sees it."""

    name: str  # the command: genbench NAME
    # A Typer command function (a `genbench NAME` command) or a typer.Typer (a group: `genbench NAME SUB`),
    # wrapped in bench.commands.cli_errors so that a user's mistake is one red line.
    command: Any
    # The `suite` of a run it writes -> "module:function" drawing that run (a bench.compare.Run -> matplotlib Figure).
    charts: dict[str, str] = field(default_factory=dict)


def entry_points(group: str) -> list[importlib.metadata.EntryPoint]:
    """Every entry point of `group`: genbench's own (its checkout's when running
    from one) first, then those of the other installed packages, each by name
    (installed metadata keeps no other order)."""
    installed = importlib.metadata.entry_points(group=group)
    own = _checkout_entry_points(group)
    if own is None:
        own = [ep for ep in installed if _dist(ep) == "genbench"]
    others = [ep for ep in installed if _dist(ep) != "genbench"]
    return sorted(own, key=lambda ep: ep.name) + sorted(others, key=lambda ep: (_dist(ep) or "", ep.name))


def _checkout_entry_points(group: str) -> list[importlib.metadata.EntryPoint] | None:
    """genbench's entry points of `group` as its checkout's pyproject.toml
    declares them; None when bench/ is not in a checkout of genbench."""
    path = CHECKOUT / "pyproject.toml"
    if tomllib is None or not path.is_file():
        return None
    project = tomllib.loads(path.read_text()).get("project", {})
    if project.get("name") != "genbench":
        return None
    declared = project.get("entry-points", {}).get(group, {})
    return [importlib.metadata.EntryPoint(name, value, group) for name, value in declared.items()]


def _dist(ep: importlib.metadata.EntryPoint) -> str | None:
    return ep.dist.name if ep.dist is not None else None


def source(ep: importlib.metadata.EntryPoint) -> str:
    """Where an entry point comes from, for messages: 'mypkg.flash:attention, from mykernels 0.2'."""
    dist = f", from {ep.dist.name} {ep.dist.version}" if ep.dist is not None else ""
    return ep.value + dist


@functools.cache
def suites() -> tuple[list[Suite], list[str]]:
    """The suites registered, in order, and a line for each entry that could
    not be used (the CLI prints those as warnings and goes on without them)."""
    found: dict[str, Suite] = {}
    problems = []
    for ep in entry_points(SUITES):
        try:
            suite = load_target(ep.value, f"suite {ep.name} ({source(ep)})")
        except BadInput as exc:
            problems.append(f"{exc}; left out")
            continue
        if not isinstance(suite, Suite):
            problems.append(f"suite {ep.name} ({source(ep)}) is a {type(suite).__name__}, not a "
                            "bench.registry.Suite; left out")
        elif suite.name in found:
            problems.append(f"suite {suite.name} ({source(ep)}): another suite has that name; left out")
        else:
            found[suite.name] = suite
    return list(found.values()), problems


def charts() -> dict[str, str]:
    """The suite of a run -> the "module:function" that draws it."""
    return {run: target for suite in suites()[0] for run, target in suite.charts.items()}


def names(group: str) -> list[str]:
    """The names installed packages registered in `group` (nothing is imported)."""
    return [ep.name for ep in entry_points(group)]


def load(spec: str, group: str, option: str, builtin: tuple[str, ...] = ()) -> tuple[str, Any]:
    """What `spec`, given to `option`, names: an entry point of `group` (its
    name), or `module:attribute`. Returns (what it is, as a row may say: the
    entry point's target or `spec`, the object). A spec naming neither, or one
    that cannot be imported, is a BadInput saying so; `builtin` lists, in that
    message, the names the caller knows itself."""
    for ep in entry_points(group):
        if ep.name == spec:
            return ep.value, load_target(ep.value, f"{option} {spec} ({source(ep)})")
    if ":" in spec:
        return spec, load_target(spec, f"{option} {spec}")
    installed = names(group)
    raise BadInput(f"unknown {option} {spec}; known: {', '.join([*builtin, *installed])}, "
                   "or your own as module:function")


def load_target(target: str, what: str) -> Any:
    """The object "module:attribute" names (the attribute may be dotted); a
    BadInput naming `what` when it cannot be had."""
    module_name, _, attribute = target.partition(":")
    module_name, attribute = module_name.strip(), attribute.strip()
    if not module_name or not attribute:
        raise BadInput(f"{what}: expected module:attribute (e.g. mypkg.kernels:attention), got {target!r}")
    try:
        obj = importlib.import_module(module_name)
    except Exception as exc:  # whatever a user's module raises on import, the one line says it
        raise BadInput(f"{what}: cannot import {module_name}: {type(exc).__name__}: {_first_line(exc)}") from None
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise BadInput(f"{what}: {module_name} has no {attribute}") from None
    return obj


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else ""
