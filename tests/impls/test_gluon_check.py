"""Tests for impls/attention/gluon_check.py, the self-check before the Gluon kernels run on an unmeasured Triton.

On CPU the compare step is a stand-in (monkeypatched): these tests check
when the check runs, what fails it, how its verdict is kept and read back,
and what flash.attention() then runs and writes in its `kernel` entry. The
real check, every case compared on a Hopper GPU whatever the Triton release:

    python3 -m pytest -q tests/impls/test_gluon_check.py -m gpu
"""

import json
import math
import os
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from impls.attention import flash, gluon_check, gluon_compat  # noqa: E402
from impls.attention import flash_triton as ft  # noqa: E402
from impls.attention.gluon_check import Case, Verdict  # noqa: E402
from impls.attention.naive import Masks  # noqa: E402

DEVICE = torch.device("cpu")
REAL_CASES = gluon_check.cases  # before the fixture stands in for it
CASES = [Case("fwd", 128, False, (128, 128, 2, "ws")), Case("dkdv", 128, True, (64, 2)),
         Case("dq", 64, True, (64, 3))]


@pytest.fixture(autouse=True)
def fresh(monkeypatch, tmp_path):
    """No verdicts in this process, verdicts kept under tmp_path, the three CASES, and no forcing."""
    monkeypatch.setattr(gluon_check, "_memo", {})
    monkeypatch.setattr(gluon_check, "_folder", tmp_path)
    monkeypatch.setattr(gluon_check, "cases", lambda fg: list(CASES))
    monkeypatch.delenv(gluon_check.ENV, raising=False)


@pytest.fixture
def compared(monkeypatch):
    """Stand-in compare step: errors per kernel name (a float, or an exception to raise); records the cases run."""
    errors, calls = {"fwd": 4e-3, "dkdv": 1e-2, "dq": 5e-3}, []

    def compare(case, device):
        calls.append(case)
        err = errors[case.kernel]
        if isinstance(err, Exception):
            raise err
        return err

    monkeypatch.setattr(gluon_check, "compare", compare)
    return errors, calls


def check(version="3.9.0", device_name="NVIDIA H100 80GB HBM3"):
    return gluon_check.verdict(DEVICE, version=version, device_name=device_name)


def test_measured_release_runs_unchecked(compared):
    assert check("3.6.0") == Verdict(True, "")
    assert compared[1] == []


def test_unmeasured_release_checks_every_case(compared):
    v = check()
    assert v.ok and v.note == "self-checked on Triton 3.9.0: 3 kernels within 1.0e-02 of Triton's"
    assert compared[1] == CASES


def test_a_case_off_by_more_than_the_tolerance_fails_the_check(compared):
    errors, calls = compared
    errors["dkdv"] = 0.5
    v = check()
    assert not v.ok
    assert v.note == ("Gluon off: self-check on Triton 3.9.0: dkdv D=128 causal (64, 2) differs from the Triton "
                      "kernel by 5.0e-01 (tolerance 2e-02)")
    assert calls == CASES[:2]  # the first failure decides


def test_tolerance_is_inclusive_and_nan_fails(compared):
    errors, _ = compared
    errors["dq"] = gluon_check.TOLERANCE
    assert check().ok
    gluon_check._memo.clear()
    gluon_check.use_cache(None)
    errors["dq"] = float("nan")
    v = check()
    assert not v.ok and "dq D=64 causal (64, 3) differs from the Triton kernel by nan" in v.note


def test_a_kernel_that_does_not_compile_fails_the_check(compared):
    errors, _ = compared
    errors["fwd"] = RuntimeError("async_copy_global_to_shared has been removed; call async_load instead\nmore")
    v = check()
    assert not v.ok
    assert v.note == ("Gluon off: self-check on Triton 3.9.0: fwd D=128 non-causal (128, 128, 2, 'ws') failed: "
                      "RuntimeError: async_copy_global_to_shared has been removed; call async_load instead")


def kept_key(version: str) -> str:
    return f"NVIDIA H100 80GB HBM3|triton {version}|ptxas {gluon_compat.ptxas()}|{gluon_check.source_hash()}"


def test_verdict_is_kept_per_device_release_assembler_and_source(compared, tmp_path, monkeypatch):
    _, calls = compared
    assert check().ok and len(calls) == 3
    assert check().ok and len(calls) == 3  # this process: once
    gluon_check._memo.clear()  # a new process reads the file
    assert check().ok and len(calls) == 3
    kept = json.loads((tmp_path / gluon_check.FILE).read_text())
    assert list(kept) == [kept_key("3.9.0")]
    check(device_name="NVIDIA H200")  # another GPU
    assert len(calls) == 6
    check(version="3.8.0")  # another release
    assert len(calls) == 9
    monkeypatch.setattr(gluon_check, "source_hash", lambda: "changed")  # edited kernels
    check()
    assert len(calls) == 12 and len(json.loads((tmp_path / gluon_check.FILE).read_text())) == 4
    monkeypatch.setattr(gluon_compat, "ptxas", lambda: "12.9")  # the same source, another assembler
    check()
    assert len(calls) == 15 and len(json.loads((tmp_path / gluon_check.FILE).read_text())) == 5


def test_known_gives_the_verdict_only_where_no_check_is_due(compared, monkeypatch):
    def known(version="3.9.0"):
        return gluon_check.known(DEVICE, version=version, device_name="NVIDIA H100 80GB HBM3")

    assert known("3.6.0") == Verdict(True) and known() is None  # measured; due
    v = check()
    assert known() == v
    gluon_check._memo.clear()
    assert known() == v, "read back from the kept file"
    monkeypatch.setenv(gluon_check.ENV, "1")
    gluon_check._memo.clear()
    assert known() is None and known("3.6.0") is None, "forced: due everywhere"
    assert compared[1] == CASES


def test_a_failed_verdict_is_kept_too(compared):
    errors, calls = compared
    errors["fwd"] = 1.0
    assert not check().ok
    gluon_check._memo.clear()
    errors["fwd"] = 0.0  # not asked again: the kept verdict stands
    v = check()
    assert not v.ok and "differs from the Triton kernel by 1.0e+00" in v.note and len(calls) == 1  # the first case failed, once


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"x": 1'])
def test_unreadable_verdict_file_is_checked_again_with_a_warning(compared, tmp_path, content):
    (tmp_path / gluon_check.FILE).write_text(content)
    with pytest.warns(UserWarning, match="cannot be read .*checked again"):
        assert check().ok
    assert len(compared[1]) == 3
    assert len(json.loads((tmp_path / gluon_check.FILE).read_text())) == 1  # replaced by a readable one


def test_malformed_entry_is_checked_again(compared, tmp_path):
    key = kept_key("3.9.0")
    (tmp_path / gluon_check.FILE).write_text(json.dumps({key: {"ok": "yes"}}))
    assert check().ok and len(compared[1]) == 3


def test_unwritable_folder_warns_and_keeps_the_verdict_in_the_process(compared, tmp_path):
    (tmp_path / "afile").write_text("")
    gluon_check.use_cache(tmp_path / "afile")
    with pytest.warns(UserWarning, match="could not be kept"):
        assert check().ok
    assert check().ok and len(compared[1]) == 3


def test_forced_check_runs_on_a_measured_release_and_replaces_the_kept_verdict(compared, monkeypatch, tmp_path):
    errors, calls = compared
    key = kept_key("3.6.0")
    (tmp_path / gluon_check.FILE).write_text(json.dumps({key: {"ok": True, "note": "kept"}}))
    monkeypatch.setenv(gluon_check.ENV, "1")
    errors["dq"] = 0.3
    v = check("3.6.0")
    assert not v.ok and len(calls) == 3
    assert json.loads((tmp_path / gluon_check.FILE).read_text())[key]["ok"] is False


def test_check_can_be_skipped(compared, monkeypatch):
    monkeypatch.setenv(gluon_check.ENV, "0")
    assert check() == Verdict(True, "unchecked on Triton 3.9.0 (GENBENCH_GLUON_SELFCHECK=0)")
    assert compared[1] == []


def test_unknown_setting_warns_and_is_taken_as_unset(compared, monkeypatch):
    monkeypatch.setenv(gluon_check.ENV, "yes")
    with pytest.warns(UserWarning, match="is not 0 or 1"):
        assert check("3.6.0") == Verdict(True, "")


def test_err_is_the_largest_difference_over_the_largest_magnitude():
    want = torch.tensor([[1.0, -4.0], [2.0, 0.0]])
    got = torch.tensor([[1.5, -4.0], [2.0, 0.25]])
    assert gluon_check._err(got, want) == pytest.approx(0.5 / 4.0)
    assert math.isnan(gluon_check._err(torch.tensor([[1.0, float("inf")], [2.0, 0.0]]), want))  # fails any bound
    assert gluon_check._err(want, want) == 0.0


def test_cases_cover_every_config_of_every_kernel():
    fg = SimpleNamespace(CONFIGS={64: [(128, 128, 2, "ws"), (128, 128, 2, "persistent")],
                                  128: [(128, 128, 2, "ws")]},
                         BWD_CONFIGS=[(64, 2, 0)], DQ_CONFIGS=[(64, 3), (128, 2)], FUSED_CONFIGS=[(2, 1, 1)],
                         FUSED_HEAD_DIMS=(128, ))
    assert [str(c) for c in REAL_CASES(fg)] == [
        "fwd D=64 non-causal (128, 128, 2, 'ws')", "fwd D=64 non-causal (128, 128, 2, 'persistent')",
        "dkdv D=64 non-causal (64, 2, 0)", "dq D=64 non-causal (64, 3)", "dq D=64 non-causal (128, 2)",
        "fwd D=64 causal (128, 128, 2, 'ws')",  # the persistent forward is non-causal only
        "dkdv D=64 causal (64, 2, 0)", "dq D=64 causal (64, 3)", "dq D=64 causal (128, 2)",
        # at head dim 128 the one-kernel backward too
        "fwd D=128 non-causal (128, 128, 2, 'ws')", "dkdv D=128 non-causal (64, 2, 0)",
        "dq D=128 non-causal (64, 3)", "dq D=128 non-causal (128, 2)", "bwd D=128 non-causal (2, 1, 1)",
        "fwd D=128 causal (128, 128, 2, 'ws')", "dkdv D=128 causal (64, 2, 0)",
        "dq D=128 causal (64, 3)", "dq D=128 causal (128, 2)", "bwd D=128 causal (2, 1, 1)",
    ]


def test_source_hash_follows_the_kernel_files():
    h = gluon_check.source_hash()
    assert len(h) == 16 and h == gluon_check.source_hash()


# ---------------------------------------------------------------- what flash.attention() runs on a verdict

needs_interpreter = pytest.mark.skipif(ft.TRITON_ERROR is not None or not ft.INTERPRET,
                                       reason="the Triton kernels under the interpreter: CPU only")


def _stand_in(monkeypatch):
    # A flash_gluon whose forward is the Triton one, accepted everywhere, preferred at head dim 32.
    def forward(q, k, v, causal, scale, config=None):
        o, lse, _ = ft.forward(q, k, v, causal, scale)
        return o, lse, "stand-in"

    fake = SimpleNamespace(supported=lambda q, k, v: None, PREFERRED_HEAD_DIMS=(32,), forward=forward,
                           describe=lambda kernel, config: config, supported_bwd=lambda q, k, v, do: "none")
    monkeypatch.setattr(flash, "_gluon_module", lambda q: fake)


@needs_interpreter
@pytest.mark.parametrize("ok", [True, False])
def test_attention_follows_the_verdict_and_says_so(monkeypatch, ok):
    _stand_in(monkeypatch)
    monkeypatch.setattr(gluon_check, "verdict", lambda device: Verdict(ok, "NOTE"))
    q = torch.randn(1, 2, 19, 32)
    ran = flash.Kernels()
    flash.attention(q, q, q, True, kernels=ran)
    assert flash.uses_gluon(q, q, q) is ok
    if ok:
        assert ran.fwd == "gluon fwd stand-in (NOTE)"
    else:
        assert ran.fwd.startswith("triton fwd BLOCK_M=") and ran.fwd.endswith(" (NOTE)"), ran.fwd


@needs_interpreter
def test_no_note_when_the_release_was_measured(monkeypatch):
    _stand_in(monkeypatch)
    monkeypatch.setattr(gluon_check, "verdict", lambda device: Verdict(True))
    q = torch.randn(1, 2, 19, 32)
    ran = flash.Kernels()
    flash.attention(q, q, q, False, kernels=ran)
    assert ran.fwd == "gluon fwd stand-in"


@needs_interpreter
def test_check_due_where_the_gluon_kernels_would_run_unchecked(monkeypatch):
    _stand_in(monkeypatch)
    pending = {"due": True}
    monkeypatch.setattr(gluon_check, "known", lambda device: None if pending["due"] else Verdict(True))
    q = torch.randn(1, 2, 19, 32)
    assert flash.gluon_check_due(q, q, q)
    assert not flash.gluon_check_due(q[..., :16], q[..., :16], q[..., :16]), "not a preferred head dim"
    assert not flash.gluon_check_due(q, q, q, masks=Masks(softcap=3.0)), "the Gluon kernels take no masks"
    pending["due"] = False
    assert not flash.gluon_check_due(q, q, q)


@needs_interpreter
@pytest.mark.parametrize("D, gluon", [(16, None), (32, False)])
def test_no_check_where_gluon_would_not_run_anyway(monkeypatch, D, gluon):
    _stand_in(monkeypatch)

    def verdict(device):
        raise AssertionError("checked where Gluon is not wanted")

    monkeypatch.setattr(gluon_check, "verdict", verdict)
    q = torch.randn(1, 1, 4, D)
    assert flash.uses_gluon(q, q, q, gluon=gluon) is False


# ---------------------------------------------------------------- Hopper GPU only


def test_compiling_elsewhere_gives_each_process_a_contiguous_share(monkeypatch):
    spawned, waited = [], []
    monkeypatch.setattr(gluon_check.ahead, "cores", lambda: 16)
    monkeypatch.setattr(gluon_check.ahead, "spawn", lambda program, payloads: spawned.append((program, payloads)) or ["p"])
    monkeypatch.setattr(gluon_check.ahead, "wait", lambda procs, timeout_s: waited.append((procs, timeout_s)))
    todo = [Case("fwd", 64, False, (i,)) for i in range(20)]
    gluon_check.compile_elsewhere(todo, torch.device("cuda:1"))
    (program, payloads), = spawned
    assert program == gluon_check.WORKER and len(payloads) == gluon_check.PROCESSES == 8
    assert {(device, threads) for device, threads, _ in payloads} == {("cuda:1", 2)}
    assert sum((share for _, _, share in payloads), []) == todo, "every case once, in order"
    assert sorted(len(share) for _, _, share in payloads) == [2, 2, 2, 2, 3, 3, 3, 3]
    assert waited == [(["p"], gluon_check.WAIT_S)]


def test_one_case_or_one_core_compiles_here_only(monkeypatch):
    monkeypatch.setattr(gluon_check.ahead, "spawn", lambda *a: pytest.fail("no process for one case or core"))
    gluon_check.compile_elsewhere(CASES[:1], torch.device("cuda"))
    monkeypatch.setattr(gluon_check.ahead, "cores", lambda: 1)
    gluon_check.compile_elsewhere(CASES, torch.device("cuda"))


def test_fewer_cores_than_processes_start_one_process_a_core(monkeypatch):
    spawned = []
    monkeypatch.setattr(gluon_check.ahead, "cores", lambda: 3)
    monkeypatch.setattr(gluon_check.ahead, "spawn", lambda program, payloads: spawned.append(payloads) or [])
    monkeypatch.setattr(gluon_check.ahead, "wait", lambda procs, timeout_s: None)
    gluon_check.compile_elsewhere([Case("dq", 64, True, (i,)) for i in range(20)], torch.device("cuda"))
    assert [(len(share), threads) for _, threads, share in spawned[0]] == [(6, 1), (7, 1), (7, 1)]


def test_a_compile_process_runs_each_case_of_its_share_under_compiling(monkeypatch, compared):
    import contextlib
    errors, calls = compared
    errors["fwd"] = RuntimeError("does not compile")  # left for the check to report; the share goes on
    pools = []
    monkeypatch.setattr(gluon_check.ahead, "payload", lambda: ("cuda:1", 3, CASES))
    monkeypatch.setattr(gluon_check.ahead, "compiling", lambda threads: pools.append(threads) or contextlib.nullcontext())
    gluon_check._compile_worker()
    assert pools == [3] and calls == CASES


def test_the_check_compiles_elsewhere_then_here_then_compares(monkeypatch, compared):
    import contextlib
    _, calls = compared
    steps = []
    monkeypatch.setattr(gluon_check.ahead, "available", lambda: None)
    monkeypatch.setattr(gluon_check, "compile_elsewhere", lambda todo, device: steps.append(("elsewhere", list(todo))))
    monkeypatch.setattr(gluon_check.ahead, "compiling", lambda: steps.append(("here", len(calls))) or contextlib.nullcontext())
    verdict = gluon_check.run_check(CASES, DEVICE, "3.9.0")
    assert steps == [("elsewhere", CASES), ("here", 0)]
    assert verdict.ok and calls == CASES + CASES, "compiled here (its launches only compile), then compared"


def _hopper_reason():
    from impls.attention import flash_gluon as fg
    if fg.GLUON_ERROR is not None:
        return fg.GLUON_ERROR
    if not torch.cuda.is_available() or ft.INTERPRET:
        return "needs a CUDA device outside Triton's interpreter (the Gluon kernels have none)"
    if torch.cuda.get_device_capability()[0] != 9:
        return "the Gluon kernels need a Hopper (sm_90) GPU"
    return None


@pytest.mark.gpu
def test_gpu_self_check_passes_here(monkeypatch):
    # The real check, every case, on this GPU and Triton: the Gluon kernels within TOLERANCE of Triton's.
    reason = _hopper_reason()
    if reason:
        pytest.skip(reason)
    monkeypatch.setattr(gluon_check, "cases", REAL_CASES)
    from impls.attention import flash_gluon as fg
    import triton
    v = gluon_check.run_check(REAL_CASES(fg), torch.device("cuda"), triton.__version__)
    assert v.ok, v.note


@pytest.mark.gpu
def test_gpu_compiling_elsewhere_fills_tritons_cache(monkeypatch, tmp_path):
    # Two cases compiled in two processes into an empty cache; the check here then passes on them.
    reason = _hopper_reason()
    if reason:
        pytest.skip(reason)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # the processes' cache; this one compiles nothing
    from impls.attention import flash_gluon as fg
    todo = [c for c in REAL_CASES(fg) if c.head_dim == 64 and not c.causal and c.kernel in ("fwd", "dq")][:2]
    gluon_check.compile_elsewhere(todo, torch.device("cuda"))
    assert len(list(tmp_path.rglob("*.cubin"))) >= 2, "the Gluon kernels at least, and the Triton ones they are compared with"
    v = gluon_check.run_check(todo, torch.device("cuda"), "test")
    assert v.ok, v.note
