"""The self-check that lets flash_gluon's kernels run on a Triton release they were not measured on.

    from impls.attention import gluon_check
    gluon_check.use_cache(folder)          # where verdicts are kept (the attention suite passes genbench's cache)
    v = gluon_check.verdict(device)        # v.ok: Gluon may run here; v.note: what the `kernel` column adds
    gluon_check.known(device)              # the verdict if no check is due, else None (verdict() would check)

A Gluon kernel that compiles with a new Triton has not yet been shown to
compute the right thing with it: Gluon is experimental, and a changed
lowering of a barrier or an async wgmma gives wrong numbers, not an error.
So on a release outside gluon_compat.MEASURED, the first call on a device
checks them there before `tiled` uses them:

- every config of every Gluon kernel (forward, dK/dV, dQ and the one-kernel
  backward; head dims 64 and 128; causal and not) is compiled and launched
  on small bf16 inputs (SHAPE: grouped-query heads and a sequence that ends
  in a partial block);
- each result is compared with flash_triton's kernel on the same inputs
  (the backward kernels take the Triton forward's lse and delta): the largest
  difference over the largest magnitude of the Triton result must be within
  TOLERANCE.

The verdict is kept per device name, Triton version, the ptxas release that
assembles the kernels (gluon_compat.ptxas()) and hash of the kernels'
source (flash_gluon.py and gluon_compat.py): in this process, and in
`<folder>/gluon-selfcheck.json` once use_cache(folder) has named a folder. A
failed check, or a kernel that does not compile, leaves `tiled` on the Triton
kernels with the reason in its `kernel` column. A verdict file that cannot be
read is checked again, with a warning.

GENBENCH_GLUON_SELFCHECK=1 checks on a measured release too, and afresh
(a kept verdict is replaced): how the check itself is tried on a GPU.
GENBENCH_GLUON_SELFCHECK=0 skips it: the Gluon kernels run unchecked on any
release.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from impls.attention import ahead, gluon_compat, tuning

# A difference between two bf16 results of the same sums is rounding, a few
# 1e-3 of the largest value (each kernel is within 2.2e-3 of float64 forward
# and 3.5e-3 backward: docs/attention-kernels.md); a miscompiled kernel is off
# by O(1) or not finite.
TOLERANCE = 2e-2
SHAPE = (2, 4, 2, 320)  # B, H, Hkv, S: groups of two query heads, 2.5 blocks of 128 rows
DTYPE = torch.bfloat16
ENV = "GENBENCH_GLUON_SELFCHECK"
FILE = "gluon-selfcheck.json"
# The check's kernels compile first in this many other processes (compile_elsewhere): in one
# process a compile holds the GIL for much of its time, and the check compiles every Gluon
# config and the Triton kernels it compares them with.
PROCESSES = 8
WORKER = "from impls.attention.gluon_check import _compile_worker as w; w()"
WAIT_S = 300.0  # past this, what the processes have not compiled compiles here


@dataclass(frozen=True)
class Case:
    """One Gluon kernel config on one kind of input."""

    kernel: str  # "fwd", "dkdv", "dq" or "bwd" (all three gradients), as flash_gluon.describe names them
    head_dim: int
    causal: bool
    config: tuple

    def __str__(self) -> str:
        return f"{self.kernel} D={self.head_dim} {'causal' if self.causal else 'non-causal'} {self.config}"


@dataclass(frozen=True)
class Verdict:
    ok: bool  # whether the Gluon kernels may run
    note: str = ""  # for the `kernel` column: why they do not, or that they were checked rather than measured


def cases(fg) -> list[Case]:
    """Every config the Gluon tuners may choose, on every kind of input they take."""
    out = []
    for D in sorted(fg.CONFIGS):
        for causal in (False, True):
            out += [Case("fwd", D, causal, c) for c in fg.CONFIGS[D] if not (causal and c[3] == "persistent")]
            out += [Case("dkdv", D, causal, c) for c in fg.BWD_CONFIGS]
            out += [Case("dq", D, causal, c) for c in fg.DQ_CONFIGS]
            if D in fg.FUSED_HEAD_DIMS:
                out += [Case("bwd", D, causal, c) for c in fg.FUSED_CONFIGS]
    return out


def _err(got: torch.Tensor, want: torch.Tensor) -> float:
    # Largest difference over the largest magnitude; NaN when got is not finite.
    got, want = got.float(), want.float()
    if not torch.isfinite(got).all():
        return float("nan")
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()


def compare(case: Case, device: torch.device) -> float:
    """The Gluon kernel of `case` against flash_triton's on SHAPE: the largest relative difference (GPU only)."""
    from impls.attention import flash_gluon as fg
    from impls.attention import flash_triton as ft
    B, H, Hkv, S = SHAPE
    D = case.head_dim
    gen = torch.Generator(device=device).manual_seed(D + case.causal)
    q, do = (torch.randn(B, H, S, D, generator=gen, device=device, dtype=DTYPE) for _ in range(2))
    k, v = (torch.randn(B, Hkv, S, D, generator=gen, device=device, dtype=DTYPE) for _ in range(2))
    scale = D ** -0.5
    with torch.no_grad():
        o, lse, _ = ft.forward(q, k, v, case.causal, scale)
        if case.kernel == "fwd":
            go, glse, _ = fg.forward(q, k, v, case.causal, scale, case.config)
            return max(_err(go, o), _err(glse, lse))
        delta = ft.delta(o, do)
        tk, tv, _ = ft.backward_dkdv(q, k, v, do, lse, delta, case.causal, scale)
        tq, _ = ft.backward_dq(q, k, v, do, lse, delta, case.causal, scale)
        if case.kernel == "dkdv":
            gk, gv, _ = fg.backward_dkdv(q, k, v, do, lse, delta, case.causal, scale, case.config)
            return max(_err(gk, tk), _err(gv, tv))
        if case.kernel == "bwd":
            gq, gk, gv, _ = fg.backward(q, k, v, do, lse, delta, case.causal, scale, case.config)
            return max(_err(gq, tq), _err(gk, tk), _err(gv, tv))
        assert case.kernel == "dq", f"no Gluon kernel {case.kernel!r}"
        gq, _ = fg.backward_dq(q, k, v, do, lse, delta, case.causal, scale, case.config)
        return _err(gq, tq)


def run_check(todo: list[Case], device: torch.device, version: str) -> Verdict:
    """compare() every case; the first that fails (does not compile, raises, or is off) fails the check.

    The reference Triton kernels run their first fitting config, untimed: any
    config computes the same sums, and tuning each of them at SHAPE would
    compile every config. Where it can, every kernel the cases launch is
    compiled first, side by side: in other processes into Triton's on-disk
    cache, then here from it (impls/attention/ahead.py).
    """
    with tuning.first_configs():
        if ahead.available() is None:
            compile_elsewhere(todo, device)
            with ahead.compiling():
                for case in todo:
                    try:
                        compare(case, device)
                    except Exception:  # noqa: BLE001 - compare() below, launching it, reports it
                        pass
        worst = 0.0
        for case in todo:
            try:
                err = compare(case, device)
            except Exception as exc:  # noqa: BLE001 - a kernel that does not compile or run fails the check
                first = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ""
                return Verdict(False, f"Gluon off: self-check on Triton {version}: {case} "
                                      f"failed: {type(exc).__name__}: {first}")
            if not err <= TOLERANCE:  # NaN fails too
                return Verdict(False, f"Gluon off: self-check on Triton {version}: {case} "
                                      f"differs from the Triton kernel by {err:.1e} (tolerance {TOLERANCE:.0e})")
            worst = max(worst, err)
    return Verdict(True, f"self-checked on Triton {version}: {len(todo)} kernels within {worst:.1e} of Triton's")


def compile_elsewhere(todo: list[Case], device: torch.device) -> None:
    """Compile the kernels of `todo` in other processes (PROCESSES, or one a host core where
    there are fewer), a contiguous share of the cases each, into Triton's on-disk cache;
    wait for them (at most WAIT_S).

    Contiguous shares, because cases of one head dim and mask launch the same
    reference kernels: each share then compiles few of them twice."""
    n = min(PROCESSES, len(todo), ahead.cores())
    if n < 2:
        return
    threads = max(1, ahead.cores() // n)
    shares = [todo[len(todo) * i // n:len(todo) * (i + 1) // n] for i in range(n)]
    ahead.wait(ahead.spawn(WORKER, [(str(device), threads, share) for share in shares]), WAIT_S)


def _compile_worker() -> None:
    """Entry of one compile_elsewhere() process: (device, threads, cases) on stdin."""
    device, threads, share = ahead.payload()
    with tuning.first_configs(), ahead.compiling(threads):
        for case in share:
            try:
                compare(case, torch.device(device))
            except Exception:  # noqa: BLE001 - the check itself reports a kernel that does not compile
                pass


@functools.lru_cache(maxsize=1)
def source_hash() -> str:
    """A hash of the Gluon kernels' source: a changed kernel is checked again. Read once: verdict() runs every call."""
    here = Path(__file__).parent
    text = b"".join((here / name).read_bytes() for name in ("flash_gluon.py", "gluon_compat.py"))
    return hashlib.sha256(text).hexdigest()[:16]


_folder: Path | None = None
_memo: dict[str, Verdict] = {}  # this process's verdicts, by key


def use_cache(folder: Path | str | None) -> None:
    """Keep verdicts in folder/gluon-selfcheck.json (None: in this process only)."""
    global _folder
    _folder = None if folder is None else Path(folder)


def _read(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        warnings.warn(f"{path} cannot be read ({exc}): the Gluon kernels are checked again", stacklevel=3)
        return {}


def _write(path: Path, key: str, verdict: Verdict) -> None:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        data = {}  # missing, or unreadable and already warned about: replaced
    data = data if isinstance(data, dict) else {}
    data[key] = {"ok": verdict.ok, "note": verdict.note}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except OSError as exc:
        warnings.warn(f"the Gluon self-check's verdict could not be kept in {path} ({exc})", stacklevel=3)


def _kept(path: Path, key: str) -> Verdict | None:
    entry = _read(path).get(key)
    if not (isinstance(entry, dict) and isinstance(entry.get("ok"), bool) and isinstance(entry.get("note"), str)):
        return None
    return Verdict(entry["ok"], entry["note"])


def _mode() -> str:
    mode = os.environ.get(ENV, "")
    if mode not in ("", "0", "1"):
        warnings.warn(f"{ENV}={mode!r} is not 0 or 1: taken as unset", stacklevel=3)
        return ""
    return mode


def known(device: torch.device, *, version: str | None = None, device_name: str | None = None) -> Verdict | None:
    """verdict() where it needs no check (a measured release, GENBENCH_GLUON_SELFCHECK=0, or a kept
    verdict), else None: the check is due, and verdict() would run it.

    version and device_name default to triton.__version__ and the CUDA device's name.
    """
    version = version or _triton_version()
    mode = _mode()
    if gluon_compat.measured(version) and mode != "1":
        return Verdict(True)
    if mode == "0":
        return Verdict(True, f"unchecked on Triton {version} ({ENV}=0)")
    key = _key(device, version, device_name)
    if key not in _memo and mode != "1" and _folder is not None:
        kept = _kept(_folder / FILE, key)
        if kept is not None:
            _memo[key] = kept
    return _memo.get(key)


def verdict(device: torch.device, *, version: str | None = None, device_name: str | None = None) -> Verdict:
    """Whether the Gluon kernels may run on `device` with this Triton; checks them first where they must be.

    version and device_name default to triton.__version__ and the CUDA device's name.
    """
    version = version or _triton_version()
    found = known(device, version=version, device_name=device_name)
    if found is not None:
        return found
    if ahead.active():  # the check launches kernels, which compiling ahead does not
        raise ahead.Untuned("the Gluon kernels are not self-checked on this device yet")
    from impls.attention import flash_gluon
    key = _key(device, version, device_name)
    _memo[key] = run_check(cases(flash_gluon), device, version)
    if _folder is not None:
        _write(_folder / FILE, key, _memo[key])
    return _memo[key]


def _triton_version() -> str:
    import triton
    return triton.__version__


def _key(device: torch.device, version: str, device_name: str | None) -> str:
    return (f"{device_name or torch.cuda.get_device_name(device)}|triton {version}|ptxas {gluon_compat.ptxas()}|"
            f"{source_hash()}")
