"""The Medusa suite and `genbench medusa`: options, training and its cache,
the rows' identity check, bad input, and a Hugging Face model folder."""

import csv
import dataclasses
import json
import re
import statistics
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from bench.cli import app
from bench.env import cache_dir
from bench.errors import BadInput
from bench.runner import Context, measure_one
from bench.stats import Stats
from bench.telemetry import Telemetry
from impls import medusa
from impls.data import DataConfig, load_data
from suites import medusa as suite

runner = CliRunner()
# Training budgets small enough for tests; the rows need working models, not good ones.
FAST = dict(base_steps=30, heads_steps=20, draft_steps=20)
FAST_ARGS = ["--base-steps", "30", "--heads-steps", "20", "--draft-steps", "20"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    # A cache of its own: another test in this process (pytest-xdist runs any of them) may have
    # trained the same models into the session's cache, and these tests watch them being trained.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GENBENCH_CACHE", str(tmp_path_factory.mktemp("medusa-cache")))
        phases = []
        opts = suite.MedusaOptions(model="tiny", max_new_tokens=16, prompts=2, **FAST)
        prep = suite.prepare(opts, CPU, progress=lambda phase, step, total, info="": phases.append(phase))
        yield prep, phases


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=0), "--max-new-tokens must be positive"),
    (dict(max_new_tokens=-3), "--max-new-tokens must be positive"),
    (dict(tree="0;0.0;0.0.0;0.0.0.0;0.0.0.0.0"), "5 deep but there are only 4 heads"),
    (dict(tree="0.0"), "no parent"),
    (dict(methods=("vanilla", "beam")), "--method must be among"),
    (dict(dtype="fp8"), "--dtype"),
    (dict(compile="fast"), "--compile"),
    (dict(step_kernels="cuda"), "--step-kernels must be one of"),
    (dict(tree_attention="flash"), "--tree-attention must be one of"),
    (dict(heads=0), "--heads must be at least 1"),
    (dict(temperature=-1.0), "--temperature"),
    (dict(model="no/such/folder"), "neither a preset"),
    (dict(prompt_file="no-such-file.txt"), "no such file"),
])
def test_bad_options(kwargs, message):
    with pytest.raises(BadInput, match=message):
        suite.MedusaOptions(**kwargs)


@pytest.mark.parametrize("args, message", [
    (["--max-new-tokens", "0"], "--max-new-tokens must be positive"),
    (["--heads", "2", "--tree", "0;0.0;0.0.0"], "3 deep but there are only 2 heads"),
    (["--method", "beam"], "--method must be among"),
    (["--compile", "cuda-graph"], "needs a CUDA device"),
    (["--model", "gpt5"], "neither a preset"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    result = runner.invoke(app, ["medusa", "--device", "cpu", "--out", str(tmp_path), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not list(tmp_path.glob("*.csv"))


@pytest.mark.parametrize("change, message", [
    (dict(vocab_size=999), "vocabulary 999 does not match"),
    (dict(n_layer=3), "config does not match (n_layer 3 != 2)"),
])
def test_incompatible_checkpoint_is_bad_input(tmp_path, change, message):
    config = {**dataclasses.asdict(suite.PRESETS["tiny"].base), "vocab_size": 2048, **change}
    path = tmp_path / "base.pt"
    torch.save(dict(kind="base", config=config, state_dict={}, info={}), path)
    result = runner.invoke(app, ["medusa", "--device", "cpu", "--checkpoint", str(path), "--out", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    result = runner.invoke(app, ["medusa", "--device", "cpu", "--checkpoint", str(tmp_path / "junk.pt")])
    assert result.exit_code == 2 and "cannot read checkpoint" in result.output


def test_training_is_cached_and_reported(prepared):
    prep, phases = prepared
    assert {"data", "base", "distill", "heads", "draft"} <= set(phases)  # all trained, with progress
    assert [p.name for p in prep.parts] == ["base", "heads", "draft"]
    for p in prep.parts:  # where earlier versions put them, so that their caches still load
        assert re.fullmatch(re.escape(str(cache_dir() / "medusa" / p.name)) + r"-[0-9a-f]{16}\.pt", p.path)
    heads = next(p for p in prep.parts if p.name == "heads")
    top1, top5 = heads.info["top1"], heads.info["top5"]
    assert len(top1) == 4 and all(0 <= a <= b <= 1 for a, b in zip(top1, top5))
    # a second preparation loads every checkpoint instead of training
    again = []
    opts = suite.MedusaOptions(model="tiny", max_new_tokens=16, prompts=2, **FAST)
    prep2 = suite.prepare(opts, CPU, progress=lambda phase, step, total, info="": again.append((phase, info)))
    assert all(p.cached for p in prep2.parts)
    assert not any(phase == "distill" for phase, _ in again)
    for a, b in zip(prep.model.state_dict().values(), prep2.model.state_dict().values()):
        assert torch.equal(a, b)


def test_rows_check_greedy_identity(prepared):
    prep, _ = prepared
    steps = []
    ctx = Context(CPU, on_step=lambda *s: steps.append(s))
    sweep = suite.sweep(prep)
    rows = {cfg.method: measure_one(sweep, cfg, ctx) for cfg in sweep.configs}
    assert list(rows) == ["vanilla", "medusa", "draft", "lookup"]
    assert steps == [(1, 2, "prompt"), (2, 2, "prompt")] * 4  # each row's prompts, for the progress line
    for name, m in rows.items():
        assert m.status == "ok", (name, m.reason)
        assert m.values["identical_to_greedy"] == "2/2" and m.values["unexplained_divergences"] == 0
        assert m.stats.n == 2  # one sample per prompt: its time in ms
        # tokens/s is the median over prompts of 16 tokens / that prompt's time
        assert m.values["tokens_per_s"] == pytest.approx(statistics.median(16e3 / s for s in m.stats.samples))
        assert m.values["joules_per_step"] is None and m.values["tokens_per_J"] is None  # no energy on a CPU
    assert rows["vanilla"].values["mean_accept_length"] == 1.0 and rows["vanilla"].values["speedup"] == 1.0
    assert rows["medusa"].values["mean_accept_length"] >= 1.0
    assert len(rows["medusa"].values["accept_hist"].split(";")) == prep.tree.depth + 1
    assert len(rows["medusa"].values["head_top1"].split(";")) == 4


def test_energy_per_step_and_token_by_hand():
    # 12 J over 6 decoding steps: 2 J a step; 2 prompts x 12 new tokens = 24 tokens: 2 tokens per J
    assert suite._energy(Telemetry(energy_J=12.0), steps=6, tokens=24) == {"joules_per_step": 2.0,
                                                                          "tokens_per_J": 2.0}
    assert suite._energy(Telemetry(), steps=6, tokens=24) == {"joules_per_step": None, "tokens_per_J": None}


@pytest.mark.skipif(suite.decoding_triton.triton is None, reason="needs triton (its interpreter on the CPU)")
def test_triton_step_kernels_rows(prepared):
    # The same rows with the step's Triton kernels, through the interpreter: still greedy, and the row says so.
    opts = dataclasses.replace(prepared[0].options, step_kernels="triton")
    prep = suite.prepare(opts, CPU)
    sweep = suite.sweep(prep)
    for cfg in sweep.configs:
        m = measure_one(sweep, cfg, Context(CPU))
        assert m.status == "ok" and m.values["identical_to_greedy"] == "2/2", (cfg.method, m.reason)
        assert m.values["speed"] == "eager+triton"
    with pytest.raises(BadInput, match="--step-kernels triton is for greedy"):
        suite.prepare(dataclasses.replace(opts, temperature=0.7), CPU)


@pytest.mark.skipif(suite.decoding.tree_attention_why_not(suite.GPT(suite.PRESETS["tiny"].base), medusa.Tree.chain(3))
                    is not None, reason="needs triton (its interpreter on the CPU)")
def test_tiled_tree_attention_rows_stay_lossless(prepared):
    # Medusa's trees verified by the decode kernel, through the interpreter: still greedy, and the row says so.
    # One prompt, 4 tokens, a 12-node tree as deep as the 4 heads: the interpreter runs every step of the
    # warm-up and the timed generation, a program per tree node and head in each layer's split-KV combine.
    opts = dataclasses.replace(prepared[0].options, tree_attention="tiled", methods=("vanilla", "medusa"),
                               prompts=1, max_new_tokens=4, tree_size=12)
    prep = suite.prepare(opts, CPU)
    sweep = suite.sweep(prep)
    m = measure_one(sweep, next(c for c in sweep.configs if c.method == "medusa"), Context(CPU))
    assert m.status == "ok" and m.values["identical_to_greedy"] == "1/1", m.reason
    assert m.values["tree_attention"] == "tiled" and m.values["tree_attention_sdpa_ms"] is None  # not timed on a CPU
    assert m.values["spec"].endswith("attention tiled")
    assert prep.tree_attention.line() == "medusa verified its trees with tiled (--tree-attention tiled)"


def test_auto_keeps_the_faster_tree_attention_only_if_it_agrees(prepared, monkeypatch):
    # Timings faked (sdpa is timed first, then tiled); the outputs are the real ones, on the CPU, of a
    # 12-node tree (each choice runs the decode kernel through the interpreter, a program per node and head).
    prep = dataclasses.replace(prepared[0], tree=medusa.default_tree(4, 12))
    if suite.decoding.tree_attention_why_not(prep.model, prep.tree) is not None:
        pytest.skip("needs triton (its interpreter on the CPU)")
    gpu = torch.device("cuda")  # only read by the timer, faked here

    def choose(asked, sdpa_ms, tiled_ms):
        times = iter([sdpa_ms, tiled_ms])
        monkeypatch.setattr(suite.timing, "measure", lambda fn, **kw: Stats.of([next(times)]))
        return suite.choose_tree_attention(dataclasses.replace(prep, options=dataclasses.replace(
            prep.options, tree_attention=asked)), gpu, "eager")

    t = choose("auto", 2.0, 1.0)
    assert (t.used, t.sdpa_ms, t.tiled_ms, t.why) == ("tiled", 2.0, 1.0, "")
    # 2 prompts of the preset's length, 16 new tokens: halfway is 8 past the prompt, plus 12 tree slots, in 128-slot steps
    assert t.length == min(prep.max_len, 128 * -(-(prep.prompts[0].numel() + 8 + 12) // 128))
    assert t.line() == (f"medusa verified its trees with tiled (the faster): one layer's attention 1 ms tiled, "
                        f"2 ms sdpa at {t.length} cache slots")
    assert choose("auto", 1.0, 2.0).used == "sdpa"
    monkeypatch.setattr(suite.correctness, "passes", lambda err, dtype: False)  # as if the kernel were wrong
    t = choose("auto", 2.0, 1.0)
    assert t.used == "sdpa" and "tiled's output differs from sdpa's" in t.why and t.line().endswith(t.why)
    with pytest.raises(RuntimeError, match="--tree-attention tiled: tiled's output differs"):
        choose("tiled", 2.0, 1.0)


def test_auto_times_graph_replays_where_the_decoders_replay_graphs(prepared, monkeypatch):
    # In graph mode the timed calls are the captures' replays (capture faked: no CUDA here); eager times the calls.
    prep = dataclasses.replace(prepared[0], tree=medusa.default_tree(4, 12))  # a small tree: the interpreter runs it
    if suite.decoding.tree_attention_why_not(prep.model, prep.tree) is not None:
        pytest.skip("needs triton (its interpreter on the CPU)")
    captured, timed = [], []

    def capture(fn, device):
        captured.append(fn)
        return lambda: "replay"

    monkeypatch.setattr(suite.decoding, "capture", capture)
    monkeypatch.setattr(suite.timing, "measure", lambda fn, **kw: timed.append(fn()) or Stats.of([1.0]))
    for mode in ("graph", "eager"):
        suite.choose_tree_attention(prep, torch.device("cuda"), mode)
    assert len(captured) == 2, "both attentions are captured in graph mode, none in eager"
    assert timed[:2] == ["replay", "replay"] and all(isinstance(t, torch.Tensor) for t in timed[2:])


def test_a_lossy_method_is_a_mismatch(prepared, monkeypatch):
    # Break greedy acceptance so that it keeps a token greedy decoding would not
    # choose: the identity check must catch it, and the gap is no near-tie.
    prep, _ = prepared
    real = medusa.greedy_accept

    def lossy(tokens, logits, b):
        acc = real(tokens, logits, b)
        return medusa.Accepted(acc.path, acc.n, acc.last, (acc.bonus + 1) % logits.shape[-1])

    monkeypatch.setattr(medusa, "greedy_accept", lossy)
    fresh = suite.Prepared(prep.options, prep.device, prep.dtype, prep.mode, prep.model, prep.prompts, prep.max_new,
                           prep.max_len, heads=prep.heads, draft=prep.draft, tree=prep.tree, scores=prep.scores)
    fresh.reference = [torch.tensor(r) for r in _vanilla_outputs(prep)]
    sweep = suite.sweep(fresh)
    cfg = next(c for c in sweep.configs if c.method == "lookup")
    m = measure_one(sweep, cfg, Context(CPU))
    assert m.status == "mismatch", m.reason
    assert m.values["unexplained_divergences"] >= 1 and "without a near-tie" in m.reason


def _vanilla_outputs(prep):
    from impls.decoding import VanillaDecoder

    dec = VanillaDecoder(prep.model, max_len=prep.max_len)
    return [dec.generate(p, prep.max_new).tolist() for p in prep.prompts]


def test_near_tie_rule_in_ulps():
    # bf16 logits near 10 (binade [8, 16)) are spaced 2^-7 * 8 = 0.0625 apart.
    prep = SimpleNamespace(dtype=torch.bfloat16)
    want, got = torch.tensor([3, 1]), torch.tensor([3, 2])
    logits = torch.zeros(2, 4)
    logits[1, 1], logits[1, 2] = 10.0, 10.0 - 0.125  # two ulps apart
    assert suite._divergence(prep, None, want, got, logits) == pytest.approx(2.0)
    logits[1, 2] = 9.0  # 16 ulps: a real difference
    assert suite._divergence(prep, None, want, got, logits) == pytest.approx(16.0)
    assert suite._divergence(prep, None, want, want, logits) is None


def test_cli_end_to_end_with_train_and_sampling(tmp_path):
    out = tmp_path / "bench"
    result = runner.invoke(app, ["medusa", "--device", "cpu", "--model", "tiny", "--max-new-tokens", "16",
                                 "--prompts", "2", *FAST_ARGS, "--out", str(out)])
    assert result.exit_code == 0, result.output
    (path,) = out.glob("medusa-*.csv")
    with open(path, newline="") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert set(rows) == set(suite.METHODS)
    for r in rows.values():
        assert r["status"] == "ok" and r["identical_to_greedy"] == "2/2", r
        assert float(r["tokens_per_s"]) > 0 and r["speed"] == "eager"
    meta = json.loads(next(out.glob("medusa-*.json")).read_text())
    assert meta["complete"] and meta["label"] == "method" and meta["baseline"] == "vanilla"
    assert "speedup" in result.output
    assert rows["medusa"]["tree_attention"] == "sdpa" and rows["vanilla"]["tree_attention"] == ""
    assert "medusa verified its trees with sdpa (--tree-attention auto); auto times the two on a GPU only" \
        in result.output

    # `medusa train`: the same models, from the cache, a row per part and per head
    result = runner.invoke(app, ["medusa", "train", "--device", "cpu", "--model", "tiny", *FAST_ARGS,
                                 "--out", str(tmp_path / "train")])
    assert result.exit_code == 0, result.output
    (path,) = (tmp_path / "train").glob("medusa-train-*.csv")
    with open(path, newline="") as f:
        parts = {r["part"]: r for r in csv.DictReader(f)}
    assert set(parts) == {"base", "draft", "head1", "head2", "head3", "head4"}
    assert all(parts[p]["cached"] == "True" for p in parts)
    assert 0 <= float(parts["head1"]["top1"]) <= float(parts["head1"]["top5"]) <= 1

    # sampling with typical acceptance: no greedy reference, rows still run
    result = runner.invoke(app, ["medusa", "--device", "cpu", "--model", "tiny", "--max-new-tokens", "12",
                                 "--prompts", "1", *FAST_ARGS, "--temperature", "0.8", "--method", "vanilla",
                                 "--method", "medusa", "--tree", "greedy", "--out", str(tmp_path / "sample")])
    assert result.exit_code == 0, result.output
    (path,) = (tmp_path / "sample").glob("medusa-*.csv")
    with open(path, newline="") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert {r["status"] for r in rows.values()} == {"ok"} and rows["medusa"]["identical_to_greedy"] == ""


def test_prompt_file_adds_prompts(tmp_path):
    first, second = "def add(a, b):\n    return a + b\n", "class Point:\n    def __init__(self, x, y):\n"
    text = tmp_path / "prompts.txt"
    text.write_text(first + "---\n" + second)
    opts = suite.MedusaOptions(model="tiny", max_new_tokens=8, prompts=1, prompt_file=str(text),
                               methods=("vanilla",), **FAST)
    prep = suite.prepare(opts, CPU)
    data = load_data(DataConfig.from_name("stdlib-small"), cache_dir())
    assert len(prep.prompts) == 3  # one from the corpus, two from the file
    assert prep.prompts[1].tolist() == data.encode(first) and prep.prompts[2].tolist() == data.encode(second)
    (tmp_path / "empty.txt").write_text("---\n\n")
    with pytest.raises(BadInput, match="holds no text"):
        suite.prepare(suite.MedusaOptions(model="tiny", prompt_file=str(tmp_path / "empty.txt"), **FAST), CPU)


def test_hugging_face_folder_runs_vanilla_and_lookup(tmp_path):
    transformers = pytest.importorskip("transformers", reason="the Hugging Face path needs transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=2048, n_layer=2, n_embd=64, n_head=2, n_positions=256,
                                     bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "tiny-gpt2")
    out = tmp_path / "out"
    result = runner.invoke(app, ["medusa", "--device", "cpu", "--model", str(tmp_path / "tiny-gpt2"), "--data",
                                 "stdlib-small", "--max-new-tokens", "12", "--prompts", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    (path,) = out.glob("medusa-*.csv")
    with open(path, newline="") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert rows["vanilla"]["status"] == "ok" and rows["lookup"]["status"] == "ok"
    assert rows["vanilla"]["identical_to_greedy"] == "2/2" and rows["lookup"]["identical_to_greedy"] == "2/2"
    assert rows["medusa"]["status"] == "unsupported" and "Hugging Face" in rows["medusa"]["reason"]
    assert rows["draft"]["status"] == "unsupported"
    # a vocabulary smaller than the corpus tokenizer's, and no tokenizer to fix it: bad input
    small = transformers.GPT2Config(vocab_size=100, n_layer=1, n_embd=32, n_head=2, n_positions=64,
                                    bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(small).save_pretrained(tmp_path / "small")
    result = runner.invoke(app, ["medusa", "--device", "cpu", "--model", str(tmp_path / "small"),
                                 "--data", "stdlib-small", "--out", str(out)])
    assert result.exit_code == 2 and "vocabulary of 100" in result.output

