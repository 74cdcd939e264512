"""The shipped autotuning choices (impls/attention/tuning.py): a choice reaches the
kernel's tuner only on a matching file, only if it is still one of the kernel's
configs, and retune() drops every choice."""

import ast
import json
from types import SimpleNamespace

import pytest
import torch

from impls.attention import flash, flash_triton, tuning


class _Config(SimpleNamespace):
    pass


def _cfg(m, n, warps, stages, maxnreg=None):
    return _Config(kwargs={"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages, maxnreg=maxnreg)


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """A fake autotuned kernel and a shipped file for a fake sm90 device."""
    kernel = SimpleNamespace(configs=[_cfg(128, 64, 8, 3), _cfg(64, 64, 4, 2)], cache={}, cache_results=True)
    monkeypatch.setattr(flash_triton, "AUTOTUNED", {"_fwd_kernel": kernel})
    monkeypatch.setattr(flash, "_GLUON", None)
    monkeypatch.setattr(tuning, "_seeded", set())
    monkeypatch.setattr(tuning, "_retune", False)
    key = (8192, 128, False, False, "torch.bfloat16")
    other = (1024, 128, True, False, "torch.bfloat16")
    path = tmp_path / "sm90-triton9.9.json"
    path.write_text(json.dumps({"triton_kernels": {"_fwd_kernel": {
        repr(key): tuning.config_record(kernel.configs[1]),
        repr(other): tuning.config_record(_cfg(256, 32, 8, 5)),  # not among the kernel's configs any more
    }}}))
    monkeypatch.setattr(tuning, "_load", lambda device: json.loads(path.read_text()))
    return kernel, key, other


def test_seed_hands_a_shipped_choice_to_the_tuner(fake):
    kernel, key, other = fake
    tuning.seed(SimpleNamespace(type="cuda", __str__=lambda self: "cuda:0"))
    assert kernel.cache == {key: kernel.configs[1]}  # the unknown config is left to be tuned


def test_seed_keeps_a_choice_made_here(fake):
    kernel, key, _ = fake
    kernel.cache[key] = kernel.configs[0]
    tuning.seed(SimpleNamespace(type="cuda"))
    assert kernel.cache[key] is kernel.configs[0]


def test_nothing_on_cpu_or_after_retune(fake):
    kernel, key, _ = fake
    tuning.seed(torch.device("cpu"))
    assert kernel.cache == {}
    kernel.cache[key] = kernel.configs[0]
    tuning.retune()
    assert kernel.cache == {} and kernel.cache_results is False
    tuning.seed(SimpleNamespace(type="cuda"))
    assert kernel.cache == {}


def test_config_record_round_trips():
    c = _cfg(128, 64, 8, 2, maxnreg=128)
    assert tuning._matching([_cfg(128, 64, 8, 2), c], tuning.config_record(c)) is c


@pytest.mark.parametrize("path", sorted(tuning.FOLDER.glob("*.json")), ids=lambda p: p.name)
def test_shipped_keys_have_the_kernels_current_key_layout(path):
    # The autotuner's key is the values of its named arguments, then each tensor's dtype. A shipped
    # key of another layout (a key argument added since the file was written) never matches: the
    # first run then tunes every configuration again, which is what the file is there to avoid.
    data = json.loads(path.read_text())
    assert data["triton_kernels"], "a shipped file with no Triton choices"
    for name, choices in data["triton_kernels"].items():
        kernel = flash_triton.AUTOTUNED[name]
        for text, record in choices.items():
            key = ast.literal_eval(text)
            named = [v for v in key if not (isinstance(v, str) and v.startswith("torch."))]
            assert len(named) == len(kernel.keys), f"{path.name} {name} {text}: not {kernel.keys} + dtypes"
            assert key[len(named):] and all(v.startswith("torch.") for v in key[len(named):])
            if not flash_triton.INTERPRET:  # the interpreter's config lists are cut to one small config
                assert tuning._matching(kernel.configs, record) is not None, f"{name}: {record} is not a config"


class _Recorder:
    """Records the configs a launch ran with; `arg_names` and `fn` as triton.autotune wants them."""

    arg_names = ["x", "n"]

    def __init__(self):
        self.blocks = []
        self.fn = lambda x, n: None

    def run(self, *args, grid, warmup, **kwargs):
        self.blocks.append(kwargs["BLOCK"])


def test_first_configs_take_the_first_fitting_config_untimed_and_forget_it(monkeypatch):
    triton = pytest.importorskip("triton")
    inner = _Recorder()
    configs = [triton.Config({"BLOCK": b}) for b in (256, 32, 64)]
    fits = lambda configs, named_args, **kw: [c for c in configs if c.kwargs["BLOCK"] <= 64]  # noqa: E731
    kernel = triton.autotune(configs=configs, key=["n"], prune_configs_by={"early_config_prune": fits})(inner)
    monkeypatch.setattr(flash_triton, "AUTOTUNED", {"k": kernel})
    kernel.cache[(7,)] = configs[2]  # a choice made before stays, and is used
    monkeypatch.setattr(kernel, "_bench", lambda *a, **k: pytest.fail("a config was timed"))
    with tuning.first_configs():
        assert tuning.untimed()
        kernel[(1,)]("x", 100)
        with tuning.first_configs():  # nested, as gluon_check's inside a test's: the outer one restores
            kernel[(1,)]("x", 7)
        assert tuning.untimed()
    assert inner.blocks == [32, 64]
    assert kernel.cache == {(7,): configs[2]} and "prune_configs" not in vars(kernel) and not tuning.untimed()


def test_first_configs_make_the_gluon_tuners_take_their_first_config(tmp_path, monkeypatch):
    from impls.attention import flash_gluon
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    tuner = flash_gluon.Tuner("test")
    with tuning.first_configs():
        assert tuner.pick((1,), [(1,), (2,)], lambda c: pytest.fail("a config was timed"), "gpu") == (1,)
    assert tuner.pick((1,), [(1,), (2,)], lambda c: 2.0 if c == (1,) else 1.0, "gpu") == (2,)  # timed again


def test_shipped_choices_seeded_inside_first_configs_are_seeded_again_after(fake):
    kernel, key, _ = fake
    device = SimpleNamespace(type="cuda")
    kernel.prune_configs = lambda kwargs: kernel.configs  # what first_configs wraps, as an autotuner has it
    with tuning.first_configs():
        tuning.seed(device)
        assert kernel.cache[key] is kernel.configs[1]
    assert key not in kernel.cache  # forgotten with the rest of what was chosen within
    tuning.seed(device)
    assert kernel.cache[key] is kernel.configs[1]
