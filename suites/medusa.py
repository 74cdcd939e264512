"""The Medusa suite: speculative decoding with Medusa heads against plain
greedy decoding of the same model, with a draft model and prompt lookup beside
them, batch 1.

    genbench medusa --device cpu --model tiny --max-new-tokens 48 --prompts 4
    genbench medusa --model medium --dtype bf16            # an H200-sized run
    genbench medusa train --model tiny                     # train and cache only

The base GPT, the Medusa heads and the draft model of a preset come from
impls/medusa_models.py, trained there the first time (impls/train.py:
next-token prediction on the offline corpus of impls/data.py, and
self-distillation of the heads); this suite hands it bench/checkpoints.py as
the store, so they are cached under $GENBENCH_CACHE/medusa/, keyed by a hash
of the model config, the data and the training settings. `--model PATH`
takes a local Hugging Face model instead (vanilla and lookup only).

Each row is one method. Every prompt is decoded once after an untimed warm-up;
a row's samples are the per-prompt times (prefill + decode, ms), tokens/s is
the median over prompts of max_new_tokens / time. On a GPU with NVML
(bench/telemetry.py), the energy of the same timed loop gives joules_per_step
(per decoding step) and tokens_per_J (generated tokens). Every speculative method's
greedy output is compared token for token with vanilla's, and vanilla's with
a cache-free forward; a divergence is explained by a near-tie when the two
tokens' logits at the first difference are within NEAR_TIE_ULPS units in the
last place of the decoding dtype, and otherwise makes the row a mismatch.

Medusa's tree verification attends through SDPA with the tree's dense mask or
through the split-KV decode kernel with the tree as bits
(impls/decoding.py, `--tree-attention`). With `auto` the choice is made once,
before the medusa decoder is built: one layer's verification attention, on
random inputs of the run's shape (the tree's nodes against the cache length a
step reads halfway through a prompt), runs both ways; if the kernel's output
agrees with SDPA's within bench/correctness.py's tolerance, the faster of a
few timed calls each (bench/timing.py) verifies the trees; where the decoders
replay CUDA graphs, each call is timed as a graph replay too, since the host's
dispatch (the kernel's is the larger) is then not paid per step. The medusa row
records which one did and both times (`tree_attention`,
`tree_attention_sdpa_ms`, `tree_attention_tiled_ms`).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench import checkpoints, correctness, metrics, timing
from bench.env import DTYPES, cache_dir
from bench.errors import BadInput, Unsupported
from bench.runner import Column, Context, Measurement, Sweep
from bench.stats import Stats
from bench.timing import StepTimer
from impls import decoding, decoding_triton, gpt, hf, medusa, medusa_models
from impls.data import DataConfig, TextData, load_data
from impls.gpt import GPT
from impls.medusa_models import PRESETS, MedusaPreset, Part
from impls.train import Progress, quiet

METHODS = ("vanilla", "medusa", "draft", "lookup")
TREES = ("default", "greedy")
COMPILE = {"auto": None, "none": "eager", "cuda-graph": "graph", "inductor": "compile"}
# The small pieces of a greedy step around the forward (mask, acceptance, top-k):
# Triton kernels (impls/decoding_triton.py, the default on a GPU) or PyTorch ops.
STEP_KERNELS = {"auto": None, "triton": True, "torch": False}
# A divergence from greedy decoding counts as a near-tie when the two tokens'
# logits differ by at most this many units in the last place of the decoding
# dtype: a 1-token and an N-token forward round differently, by a few ulps.
NEAR_TIE_ULPS = 4.0
LOOKUP_NGRAM = 3
# How Medusa's verification attends (impls.decoding.TREE_ATTENTION), or auto: the faster of the two, timed.
TREE_ATTENTION = ("auto", *decoding.TREE_ATTENTION)
# The choice's timing: a few calls of one layer's attention each, not a row's budget.
CHOICE_WARMUP_MS, CHOICE_REP_MS = 5.0, 20.0


# ---------------------------------------------------------------------------
# Options


@dataclass(frozen=True)
class MedusaOptions:
    """What the command line asks for; None means the preset's value."""

    model: str = "tiny"  # a preset name or a Hugging Face model folder
    methods: tuple[str, ...] = METHODS
    heads: int = 4
    tree: str = "default"  # default, greedy, or a list of paths (see impls.medusa.parse_tree)
    tree_size: int = medusa.DEFAULT_TREE_SIZE
    max_new_tokens: int | None = None
    prompts: int | None = None
    prompt_len: int | None = None
    prompt_file: str | None = None
    temperature: float = 0.0
    posterior_threshold: float = 0.09
    posterior_alpha: float = 0.3
    dtype: str = "fp32"
    compile: str = "auto"
    step_kernels: str = "auto"  # auto, triton or torch: see STEP_KERNELS
    tree_attention: str = "auto"  # auto, sdpa or tiled: see TREE_ATTENTION
    draft_tokens: int = 4
    lookup_tokens: int = 8
    data: str | None = None
    checkpoint: str | None = None
    base_steps: int | None = None
    heads_steps: int | None = None
    draft_steps: int | None = None
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "methods", tuple(dict.fromkeys(self.methods)))
        if self.model not in PRESETS and not Path(self.model).is_dir():
            raise BadInput(f"--model {self.model!r} is neither a preset ({', '.join(PRESETS)}) nor a folder")
        if self.max_new_tokens is not None and self.max_new_tokens <= 0:
            raise BadInput(f"--max-new-tokens must be positive, got {self.max_new_tokens}")
        for name, value in (("--heads", self.heads), ("--tree-size", self.tree_size),
                            ("--draft-tokens", self.draft_tokens), ("--lookup-tokens", self.lookup_tokens),
                            ("--prompt-len", self.prompt_len), ("--base-steps", self.base_steps),
                            ("--heads-steps", self.heads_steps), ("--draft-steps", self.draft_steps)):
            if value is not None and value < 1:
                raise BadInput(f"{name} must be at least 1, got {value}")
        if self.prompts is not None and self.prompts < 0:
            raise BadInput(f"--prompts must be 0 or more, got {self.prompts}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise BadInput(f"--method must be among {', '.join(METHODS)}, not {', '.join(unknown) or 'nothing'}")
        if self.dtype not in DTYPES:
            raise BadInput(f"--dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.compile not in COMPILE:
            raise BadInput(f"--compile must be one of {', '.join(COMPILE)}, not {self.compile!r}")
        if self.step_kernels not in STEP_KERNELS:
            raise BadInput(f"--step-kernels must be one of {', '.join(STEP_KERNELS)}, not {self.step_kernels!r}")
        if self.tree_attention not in TREE_ATTENTION:
            raise BadInput(f"--tree-attention must be one of {', '.join(TREE_ATTENTION)}, not {self.tree_attention!r}")
        if self.temperature < 0:
            raise BadInput(f"--temperature must be 0 (greedy) or positive, got {self.temperature}")
        if not 0 < self.posterior_threshold <= 1 or not 0 < self.posterior_alpha <= 1:
            raise BadInput("--posterior-threshold and --posterior-alpha must be in (0, 1]")
        if self.prompt_file is not None and not Path(self.prompt_file).is_file():
            raise BadInput(f"--prompt-file {self.prompt_file}: no such file")
        if self.data is not None and self.data not in _data_presets():
            raise BadInput(f"--data must be one of {', '.join(_data_presets())}, not {self.data!r}")
        if self.tree not in TREES:
            try:
                tree = medusa.parse_tree(self.tree)
            except ValueError as exc:
                raise BadInput(f"--tree: {exc}") from None
            if tree.depth > self.heads:
                raise BadInput(f"--tree is {tree.depth} deep but there are only {self.heads} heads (--heads)")

    @property
    def hf(self) -> bool:
        return self.model not in PRESETS

    @property
    def preset(self) -> MedusaPreset:
        assert not self.hf
        return PRESETS[self.model].with_steps(self.base_steps, self.heads_steps, self.draft_steps)


def _data_presets():
    from impls import data

    return tuple(data.PRESETS)


# ---------------------------------------------------------------------------
# Checkpoint store


class _Cache:
    """impls.medusa_models.Store over bench/checkpoints.py: files under $GENBENCH_CACHE/medusa/."""

    key = staticmethod(checkpoints.key)

    def path(self, kind: str, key: str) -> Path:
        return checkpoints.path("medusa", kind, key)

    def load(self, path: Path, required: tuple[str, ...]) -> dict:
        return checkpoints.load(path, "medusa", required)

    def save(self, path: Path, payload: dict) -> None:
        checkpoints.save(path, payload)


# ---------------------------------------------------------------------------
# Preparing a run: models trained or loaded, prompts, tree


@dataclass
class Prepared:
    """Everything a run needs, built once before the rows."""

    options: MedusaOptions
    device: torch.device
    dtype: torch.dtype
    mode: str  # eager, graph or compile
    model: Any  # GPT, or hf.HFModel
    prompts: list[torch.Tensor]
    max_new: int
    max_len: int
    heads: medusa.MedusaHeads | None = None
    draft: GPT | None = None
    tree: medusa.Tree | None = None
    scores: medusa.HeadScores | None = None
    parts: list[Part] = field(default_factory=list)
    # Filled while the rows run.
    decoders: dict = field(default_factory=dict)  # method -> decoder, or the exception that stopped it
    memory: dict = field(default_factory=dict)  # method -> MiB
    mode_note: str = ""
    tree_attention: TreeAttention | None = None  # chosen before the medusa decoder is built
    reference: list[torch.Tensor] | None = None
    vanilla_ms: float | None = None

    @property
    def hf(self) -> bool:
        return isinstance(self.model, hf.HFModel)

    @property
    def base_params(self) -> int:
        return self.model.num_params() if self.hf else self.model.num_params(non_embedding=False)


def prepare(opts: MedusaOptions, device: torch.device, progress: Progress = quiet,
            train_only: bool = False) -> Prepared:
    """Train or load what the methods need, pick the prompts, check the lengths."""
    dtype = DTYPES[opts.dtype]
    mode = COMPILE[opts.compile] or ("graph" if device.type == "cuda" else "eager")
    if mode != "eager" and device.type != "cuda":
        raise BadInput(f"--compile {opts.compile} needs a CUDA device; on the CPU use --compile none")
    if opts.step_kernels == "triton":
        if not decoding_triton.available(device):
            raise BadInput("--step-kernels triton needs a CUDA device (or TRITON_INTERPRET=1 on the CPU) "
                           f"and triton{': ' + decoding_triton.TRITON_ERROR if decoding_triton.TRITON_ERROR else ''}")
        if opts.temperature > 0 or mode == "compile" or opts.hf:
            raise BadInput("--step-kernels triton is for greedy decoding of genbench's GPT presets, without --compile inductor")
    if opts.hf:
        return _prepare_hf(opts, device, dtype, mode, progress)
    preset = opts.preset
    data_name = opts.data or preset.data
    progress("data", 0, 1, f"corpus {data_name} (built once, then cached)")
    data = load_data(DataConfig.from_name(data_name), cache_dir())
    progress("data", 1, 1, f"{len(data.tokens):,} tokens, vocabulary {data.vocab_size}")
    want = set(opts.methods) | ({"medusa", "draft"} if train_only else set())
    try:
        model, heads, scores, draft, parts = _models(opts, preset, data, device, want, progress)
    except medusa_models.CheckpointMismatch as exc:
        raise BadInput(str(exc)) from None
    tree = _tree(opts, scores) if heads is not None else None

    model = model.to(dtype).eval().requires_grad_(False)
    heads = heads.to(dtype).eval().requires_grad_(False) if heads is not None else None
    draft = draft.to(dtype).eval().requires_grad_(False) if draft is not None else None
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the optimizers' memory, before anything is measured

    prompt_len = opts.prompt_len or preset.prompt_len
    max_new = opts.max_new_tokens or preset.max_new_tokens
    n_prompts = preset.prompts if opts.prompts is None else opts.prompts
    prompts = _corpus_prompts(data, n_prompts, prompt_len, data.encode) + _file_prompts(opts, data.encode)
    depth = _depth(opts, tree)
    max_len = _check_lengths(prompts, max_new, depth, tree.size if tree else 1, model.config.block_size,
                             train_only)
    if opts.tree_attention == "tiled" and tree is not None and "medusa" in opts.methods:
        reason = decoding.tree_attention_why_not(model, tree, mode)
        if reason:
            raise BadInput(f"--tree-attention tiled cannot verify this tree: {reason}")
    return Prepared(opts, device, dtype, mode, model, prompts, max_new, max_len, heads=heads, draft=draft, tree=tree,
                    scores=scores, parts=parts)


def _models(opts: MedusaOptions, preset: MedusaPreset, data: TextData, device: torch.device, want: set[str],
            progress: Progress):
    """The base model (from --checkpoint, or the preset's), and the heads and the
    draft model if a method in `want` needs them, from impls/medusa_models.py."""
    store = _Cache()
    if opts.checkpoint:
        path = Path(opts.checkpoint)
        if not path.is_file():
            raise BadInput(f"--checkpoint {path}: no such file")
        model, base = medusa_models.base_from_file(path, preset, data, device, store)
    else:
        model, base = medusa_models.trained_base(preset, data, device, store, opts.seed, progress)
    parts = [base]
    heads = scores = draft = None
    if "medusa" in want:
        heads, part, scores = medusa_models.trained_heads(preset, model, base, opts.heads, data, device, store,
                                                          opts.seed, progress)
        parts.append(part)
    if "draft" in want:
        draft, part = medusa_models.trained_draft(preset, data, device, store, opts.seed, progress)
        parts.append(part)
    return model, heads, scores, draft, parts


def _tree(opts: MedusaOptions, scores: medusa.HeadScores) -> medusa.Tree:
    if opts.tree == "default":
        return medusa.default_tree(opts.heads, opts.tree_size)
    if opts.tree == "greedy":
        return medusa.greedy_tree(scores.rank_accuracy, opts.tree_size)
    return medusa.parse_tree(opts.tree)


def _prepare_hf(opts: MedusaOptions, device, dtype, mode, progress) -> Prepared:
    reason = hf.why_not()
    if reason:
        raise BadInput(reason)
    if not hf.is_model_folder(opts.model):
        raise BadInput(f"--model {opts.model}: no config.json there, so not a Hugging Face model folder")
    if opts.checkpoint:
        raise BadInput("--checkpoint is for genbench's own GPT; a Hugging Face folder is its own checkpoint")
    try:
        lm = hf.load(opts.model, device, dtype)
    except (OSError, ValueError) as exc:
        first = (str(exc).splitlines() or [""])[0]
        raise BadInput(f"--model {opts.model}: transformers cannot load it offline ({first})") from None
    data_name = opts.data or "stdlib"
    progress("data", 0, 1, f"corpus {data_name} for prompts")
    data = load_data(DataConfig.from_name(data_name), cache_dir())
    progress("data", 1, 1, "")
    if lm.tokenizer is not None:
        tok = lm.tokenizer

        def encode(text):
            return tok.encode(text, add_special_tokens=False)
    else:
        if lm.vocab_size < data.vocab_size:
            raise BadInput(f"--model {opts.model} has no tokenizer and a vocabulary of {lm.vocab_size}, smaller than "
                           f"the {data_name} tokenizer's {data.vocab_size}: add its tokenizer to the folder")
        encode = data.encode
    prompt_len = opts.prompt_len or 64
    max_new = opts.max_new_tokens or 128
    n_prompts = 8 if opts.prompts is None else opts.prompts
    if lm.tokenizer is not None:
        # Corpus text re-encoded with the model's own tokenizer.
        texts = [data.decode(ids) for ids in data.prompts(n_prompts, 4 * prompt_len)] if n_prompts else []
        prompts = [torch.tensor(encode(t)[:prompt_len], dtype=torch.long) for t in texts]
    else:
        prompts = _corpus_prompts(data, n_prompts, prompt_len, encode)
    prompts += _file_prompts(opts, encode)
    depth = opts.lookup_tokens if "lookup" in opts.methods else 0
    max_len = _check_lengths(prompts, max_new, depth, 1, lm.max_positions, False)
    note = f"eager: Hugging Face models run eagerly here (asked for {mode})" if mode != "eager" else ""
    return Prepared(opts, device, dtype, "eager", lm, prompts, max_new, max_len,
                    parts=[Part("base", lm.num_params(), True, str(opts.model), {})], mode_note=note)


def _corpus_prompts(data: TextData, n: int, length: int, encode) -> list[torch.Tensor]:
    if n == 0:
        return []
    try:
        return list(data.prompts(n, length))
    except ValueError as exc:
        raise BadInput(f"--prompt-len {length}: {exc}") from None


def _file_prompts(opts: MedusaOptions, encode) -> list[torch.Tensor]:
    """Prompts from --prompt-file: the whole file, or parts separated by lines holding only '---'."""
    if not opts.prompt_file:
        return []
    text = Path(opts.prompt_file).read_text(encoding="utf-8", errors="replace")
    parts, current = [], []
    for line in text.splitlines(keepends=True):
        if line.strip() == "---":
            parts.append("".join(current))
            current = []
        else:
            current.append(line)
    parts.append("".join(current))
    prompts = [torch.tensor(encode(p), dtype=torch.long) for p in parts if p.strip()]
    if not prompts:
        raise BadInput(f"--prompt-file {opts.prompt_file} holds no text")
    return prompts


def _depth(opts: MedusaOptions, tree: medusa.Tree | None) -> int:
    """Most tokens past its root that any method's step may look at."""
    depths = [0]
    if "medusa" in opts.methods and tree is not None:
        depths.append(tree.depth)
    if "draft" in opts.methods:
        depths.append(opts.draft_tokens)
    if "lookup" in opts.methods:
        depths.append(opts.lookup_tokens)
    return max(depths)


def _check_lengths(prompts, max_new: int, depth: int, tree_size: int, block_size: int, train_only: bool) -> int:
    """The cache length every decoder gets, after checking that every position fits the model.

    The last run of steps may pass max_new by up to `depth` tokens, and its last
    step looks `depth` further: positions stay below P + max_new + 2 * depth.
    """
    if train_only:
        return 0
    if not prompts:
        raise BadInput("no prompts: give --prompts N (N > 0) or --prompt-file")
    longest = max(p.numel() for p in prompts)
    need = longest + max_new + 2 * depth + 1
    if need > block_size:
        raise BadInput(f"the longest prompt ({longest} tokens) + --max-new-tokens {max_new} + {2 * depth + 1} "
                       f"for speculation needs {need} positions; the model has {block_size}")
    # Slots: the tree's N nodes are written after cur, and capturing a step runs
    # a few from slot 1 (impls.decoding.Decoder.prepare); a multiple of 64 keeps
    # the attention mask's rows aligned for the fused attention kernels.
    slots = max(longest + max_new + depth, 1 + (decoding.WARMUP_STEPS + 1) * (depth + 1)) + tree_size + 2
    return 64 * math.ceil(slots / 64)


# ---------------------------------------------------------------------------
# Rows


@dataclass(frozen=True)
class MedusaRow:
    method: str
    model: str
    dtype: str
    batch: int
    max_new_tokens: int
    prompts: int
    temperature: float
    heads: int
    tree: str


def _make_decoder(prep: Prepared, method: str, mode: str):
    o = prep.options
    common = dict(max_len=prep.max_len, temperature=o.temperature)
    spec = dict(posterior_threshold=o.posterior_threshold, posterior_alpha=o.posterior_alpha)
    if prep.hf:
        if method == "vanilla":
            return hf.HFVanillaDecoder(prep.model, **common)
        return hf.HFLookupDecoder(prep.model, o.lookup_tokens, LOOKUP_NGRAM, **common, **spec)
    common.update(mode=mode, fused=STEP_KERNELS[o.step_kernels])
    if method == "vanilla":
        return decoding.VanillaDecoder(prep.model, **common)
    if method == "medusa":
        return decoding.MedusaDecoder(prep.model, prep.heads, prep.tree, **common, **spec,
                                      tree_attention=prep.tree_attention.used)
    if method == "draft":
        return decoding.DraftDecoder(prep.model, prep.draft, o.draft_tokens, **common, **spec)
    return decoding.LookupDecoder(prep.model, o.lookup_tokens, LOOKUP_NGRAM, **common, **spec)


@dataclass(frozen=True)
class TreeAttention:
    """How Medusa's verification attends, and why: `used` is sdpa or tiled;
    sdpa_ms and tiled_ms the median of one layer's verification attention,
    where both were timed, at `length` cache slots."""

    asked: str  # auto, sdpa or tiled
    used: str
    sdpa_ms: float | None = None
    tiled_ms: float | None = None
    length: int = 0
    why: str = ""  # why auto took sdpa without timing, or the kernel's disagreement

    def line(self) -> str:
        """One line for the terminal."""
        timed = (f": one layer's attention {self.tiled_ms:.4g} ms tiled, {self.sdpa_ms:.4g} ms sdpa at "
                 f"{self.length} cache slots" if self.sdpa_ms is not None and self.tiled_ms is not None else "")
        chose = " (the faster)" if self.asked == "auto" and timed and not self.why else f" (--tree-attention {self.asked})"
        return f"medusa verified its trees with {self.used}{chose}{timed}" + (f"; {self.why}" if self.why else "")


def choose_tree_attention(prep: Prepared, device: torch.device, mode: str) -> TreeAttention:
    """The attention Medusa's verification uses: the one asked for, or with auto
    the faster on a GPU where the decode kernel can run and agrees with SDPA.
    Wherever the kernel runs its output is checked against SDPA's, and on a GPU
    both are timed, whichever was asked for (see the module docstring)."""
    asked = prep.options.tree_attention
    if asked == "auto" and device.type != "cuda":
        return TreeAttention(asked, "sdpa", why="auto times the two on a GPU only")
    reason = decoding.tree_attention_why_not(prep.model, prep.tree, mode)
    if reason:
        if asked == "tiled":
            raise RuntimeError(f"--tree-attention tiled cannot run: {reason}")
        return TreeAttention(asked, "sdpa", why=f"tiled cannot run here: {reason}")
    # Halfway through a median prompt, in the cache length such a step reads (impls.decoding.BUCKET).
    N = prep.tree.size
    cur = int(statistics.median(p.numel() for p in prep.prompts)) + prep.max_new // 2
    length = min(prep.max_len, decoding.BUCKET * math.ceil((cur + N) / decoding.BUCKET))
    q, k, v, masks = decoding.tree_attention_inputs(prep.model, prep.tree, min(cur, length - N), length,
                                                    torch.Generator().manual_seed(prep.options.seed))
    calls = {name: (lambda m=m: gpt.cache_attention(q, k, v, m)) for name, m in masks.items()}
    with torch.no_grad():
        err = correctness.rel_err(calls["tiled"](), calls["sdpa"]())
        if device.type == "cuda" and mode == "graph":
            # The decoder replays its steps from CUDA graphs, so the host's cost of a call is not paid
            # per step: time the replays, or the kernel's Python dispatch would decide the choice.
            calls = {name: decoding.capture(fn, device) for name, fn in calls.items()}
        ms = {name: timing.measure(fn, device=device, warmup_ms=CHOICE_WARMUP_MS, rep_ms=CHOICE_REP_MS).median
              for name, fn in calls.items()} if device.type == "cuda" else {}
    why = "" if correctness.passes(err, prep.dtype) else \
        f"tiled's output differs from sdpa's by {err:.3g} (relative), over the {prep.options.dtype} tolerance"
    if asked == "tiled" and why:
        raise RuntimeError(f"--tree-attention tiled: {why}")
    used = asked if asked != "auto" else ("tiled" if not why and ms["tiled"] < ms["sdpa"] else "sdpa")
    return TreeAttention(asked, used, ms.get("sdpa"), ms.get("tiled"), length, why)


def _unsupported(prep: Prepared, method: str) -> str | None:
    if prep.hf and method in ("medusa", "draft"):
        return (f"{method} needs {'heads' if method == 'medusa' else 'a draft model'} trained for the model; "
                "genbench trains them for its own GPT presets only (a Hugging Face model runs vanilla and lookup)")
    return None


def _build_all(prep: Prepared, ctx: Context) -> None:
    """Build, capture and warm up every method's decoder, measuring its memory.

    The speed mode is all or none: if capturing or compiling fails for any
    method, every method runs eagerly and the rows say why.
    """
    methods = [m for m in dict.fromkeys(("vanilla", *prep.options.methods)) if not _unsupported(prep, m)]
    if prep.options.temperature > 0:
        methods = [m for m in methods if m in prep.options.methods]  # no greedy reference to compute

    def build(method: str, mode: str):
        holder = []
        if method == "medusa" and prep.tree_attention is None:  # outside the memory measured: its inputs, the timer's
            prep.tree_attention = choose_tree_attention(prep, ctx.device, mode)

        def make_and_warm():
            dec = _make_decoder(prep, method, mode)
            dec.prepare()
            dec.generate(prep.prompts[0], prep.max_new)  # warm-up, discarded
            holder.append(dec)

        # On a CPU there is no allocator counter: peak_memory_mib does not call fn there.
        prep.memory[method] = ctx.peak_memory_mib(make_and_warm) if ctx.device.type == "cuda" else make_and_warm()
        return holder[0]

    for attempt in ([prep.mode, "eager"] if prep.mode != "eager" else ["eager"]):
        prep.decoders.clear()
        failed = None
        for method in methods:
            try:
                prep.decoders[method] = build(method, attempt)
            except torch.OutOfMemoryError as exc:
                prep.decoders[method] = exc
            except Exception as exc:  # the fallback decides; the row shows the reason
                if attempt != "eager":
                    failed = (method, exc)
                    break
                prep.decoders[method] = exc
        if failed is None:
            prep.mode = attempt
            return
        method, exc = failed
        prep.mode_note = (f"eager: {prep.mode} failed for {method} ({type(exc).__name__}: "
                          f"{(str(exc).strip().splitlines() or [''])[0][:120]}), so every method ran eager")
        prep.decoders.clear()
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
            torch.cuda.empty_cache()


@torch.no_grad()
def _plain_logits(prep: Prepared, ids: torch.Tensor) -> torch.Tensor:
    """Logits at every position of ids (T,) from a forward without any cache."""
    if prep.hf:
        return prep.model.logits(ids)
    return prep.model(ids[None].to(prep.device))[0][0]


def _divergence(prep: Prepared, prompt: torch.Tensor, want: torch.Tensor, got: torch.Tensor,
                logits: torch.Tensor | None = None) -> float | None:
    """None if got == want, else how far apart (ulps) the two tokens' logits are
    at the first difference, after the prompt and want's tokens before it."""
    diff = (want != got).nonzero()
    if len(diff) == 0:
        return None
    j = int(diff[0])
    if logits is None:
        row = _plain_logits(prep, torch.cat([prompt, want[:j]]))[-1]
    else:
        row = logits[j]
    a, b = float(row[want[j]]), float(row[got[j]])
    return metrics.gap_in_ulps(a - b, max(abs(a), abs(b)), torch.finfo(prep.dtype).eps)


def _check(prep: Prepared, method: str, outputs: list[torch.Tensor]) -> tuple[dict, int]:
    """Greedy identity: each output against vanilla's (vanilla's against a
    cache-free forward). Returns the row's values and the unexplained count."""
    gaps = []
    for i, (prompt, out) in enumerate(zip(prep.prompts, outputs)):
        if method == "vanilla":
            # Teacher-forced: the cache-free argmax after each prefix of the output.
            logits = _plain_logits(prep, torch.cat([prompt, out]))[prompt.numel() - 1:-1]  # (max_new, V)
            gaps.append(_divergence(prep, prompt, out, logits.argmax(-1).cpu(), logits))
        else:
            gaps.append(_divergence(prep, prompt, prep.reference[i], out))
    diverged = [g for g in gaps if g is not None]
    near = [g for g in diverged if g <= NEAR_TIE_ULPS]
    values = dict(
        identical_to_greedy=f"{len(gaps) - len(diverged)}/{len(gaps)}",
        near_tie_divergences=len(near),
        unexplained_divergences=len(diverged) - len(near),
        divergence_gap_ulps=";".join(f"{g:.3g}" for g in diverged),
    )
    return values, len(diverged) - len(near)


def _spec(prep: Prepared, method: str) -> str:
    o = prep.options
    if method == "medusa":
        return (f"tree {o.tree if o.tree in TREES else 'custom'}: {prep.tree.size} nodes, depth {prep.tree.depth}, "
                f"attention {prep.tree_attention.used if prep.tree_attention else 'sdpa'}")
    if method == "draft":
        c = prep.draft.config
        return f"draft {c.n_layer}L/{c.n_embd} ({prep.draft.num_params(False) / 1e6:.1f}M), {o.draft_tokens} guesses"
    if method == "lookup":
        return f"n-gram <= {LOOKUP_NGRAM}, {o.lookup_tokens} guesses"
    return ""


def run(prep: Prepared, cfg: MedusaRow, ctx: Context) -> Measurement:
    reason = _unsupported(prep, cfg.method)
    if reason:
        raise Unsupported(reason)
    if not prep.decoders:
        _build_all(prep, ctx)
    dec = prep.decoders[cfg.method]
    if isinstance(dec, Exception):
        raise dec
    greedy = cfg.temperature == 0
    if greedy and prep.reference is None and cfg.method != "vanilla":
        ref = prep.decoders["vanilla"]
        if isinstance(ref, Exception):
            raise RuntimeError(f"no vanilla reference to check against: {ref}")
        prep.reference = [ref.generate(p, prep.max_new) for p in prep.prompts]

    prefill_timer, decode_timer = StepTimer(ctx.device), StepTimer(ctx.device)
    outputs, steps, hist = [], [], []
    with ctx.telemetry() as window:  # the GPU's clocks, power and energy over every timed prompt
        for i, prompt in enumerate(prep.prompts):
            torch.manual_seed(ctx.seed + i)  # the same samples for every method when sampling
            with prefill_timer.step():
                dec.prefill(prompt)
            with decode_timer.step():
                dec.decode(prep.max_new)
            outputs.append(dec.tokens(prep.max_new))
            steps.append(dec.steps())
            h = dec.accept_histogram()
            hist = [a + b for a, b in zip(hist, h)] if hist else h
            ctx.step(i + 1, len(prep.prompts), "prompt")
    prefill_ms, decode_ms = prefill_timer.samples(), decode_timer.samples()
    total_ms = [a + b for a, b in zip(prefill_ms, decode_ms)]
    stats = Stats.of(total_ms)
    if cfg.method == "vanilla":
        prep.vanilla_ms = stats.median
        if greedy:
            prep.reference = outputs
    values = dict(
        tokens_per_s=statistics.median(metrics.per_second(prep.max_new, ms) for ms in total_ms),
        speedup=metrics.speedup(prep.vanilla_ms, stats.median) if prep.vanilla_ms else None,
        mean_accept_length=metrics.mean_accept_length(hist),
        accept_hist=";".join(map(str, hist)),
        ms_per_step=statistics.median(ms / max(1, s) for ms, s in zip(decode_ms, steps)),
        steps_per_prompt=sum(steps) / len(steps),
        prefill_ms=statistics.median(prefill_ms),
        peak_mem_MiB=prep.memory.get(cfg.method),
        base_params_M=prep.base_params / 1e6,
        extra_params_M=_extra_params(prep, cfg.method) / 1e6,
        speed=(prep.mode_note or prep.mode) + ("+triton" if getattr(dec, "fused", False) else ""),
        spec=_spec(prep, cfg.method),
        **_energy(window.telemetry, sum(steps), prep.max_new * len(prep.prompts)),
    )
    if cfg.method == "medusa" and prep.tree_attention is not None:
        t = prep.tree_attention
        values.update(tree_attention=t.used, tree_attention_sdpa_ms=t.sdpa_ms, tree_attention_tiled_ms=t.tiled_ms)
    if cfg.method == "medusa" and prep.scores is not None:
        values.update(head_top1=";".join(f"{v:.3f}" for v in prep.scores.top1),
                      head_top5=";".join(f"{v:.3f}" for v in prep.scores.top5))
    status, reason = "ok", ""
    if greedy:
        check, unexplained = _check(prep, cfg.method, outputs)
        values.update(check)
        if unexplained:
            status = "mismatch"
            reason = (f"{unexplained} of {len(outputs)} outputs differ from greedy decoding without a near-tie "
                      f"(gaps in ulps: {check['divergence_gap_ulps']})")
        elif check["near_tie_divergences"]:
            reason = (f"{check['near_tie_divergences']} output(s) part from greedy at a near-tie "
                      f"(<= {NEAR_TIE_ULPS:g} ulps)")
    ctx.profile(lambda: (dec.prefill(prep.prompts[0]), dec.decode(prep.max_new)))  # --profile: one generation
    return Measurement(values, stats=stats, status=status, reason=reason)


def _energy(telemetry, steps: int, tokens: int) -> dict:
    """Joules per decoding step and generated tokens per joule, from the energy
    of the whole timed loop (prefill and decode of every prompt), where NVML
    measured it: the prefill's share lands on the steps, as it does on a user."""
    energy = telemetry.energy_J if telemetry is not None else None
    return dict(joules_per_step=metrics.joules_per_step(energy, steps),
                tokens_per_J=metrics.tokens_per_joule(tokens, energy))


def _extra_params(prep: Prepared, method: str) -> int:
    if method == "medusa" and prep.heads is not None:
        return sum(p.numel() for p in prep.heads.parameters())
    if method == "draft" and prep.draft is not None:
        return prep.draft.num_params(False)
    return 0


DISPLAY = (
    Column("tokens_per_s", "tok/s", "{:.4g}"),
    Column("median_ms", "ms/prompt", "{:.4g}"),
    Column("ms_per_step", "ms/step", "{:.3g}"),
    Column("mean_accept_length", "accept", "{:.2f}"),
    Column("identical_to_greedy", "greedy", "{}"),
    Column("peak_mem_MiB", "MiB", "{:.0f}"),
)

METRICS = ("tokens_per_s", "speedup", "mean_accept_length", "accept_hist", "ms_per_step", "steps_per_prompt",
           "joules_per_step", "tokens_per_J", "prefill_ms", "peak_mem_MiB", "identical_to_greedy",
           "near_tie_divergences", "unexplained_divergences", "divergence_gap_ulps", "head_top1", "head_top5", "base_params_M", "extra_params_M", "speed", "spec",
           "tree_attention", "tree_attention_sdpa_ms", "tree_attention_tiled_ms")


def configs(prep: Prepared) -> list[MedusaRow]:
    o = prep.options
    # vanilla first: its times and outputs are what the others are measured against
    methods = sorted(o.methods, key=lambda m: m != "vanilla")
    return [MedusaRow(method=m, model=o.model if not prep.hf else Path(o.model).name, dtype=o.dtype, batch=1,
                      max_new_tokens=prep.max_new, prompts=len(prep.prompts), temperature=o.temperature,
                      heads=o.heads, tree=o.tree) for m in methods]


def sweep(prep: Prepared) -> Sweep:
    return Sweep(
        suite="medusa",
        configs=configs(prep),
        run=lambda cfg, ctx: run(prep, cfg, ctx),
        params=tuple(f.name for f in dataclasses.fields(MedusaRow)),
        metrics=METRICS,
        display=DISPLAY,
        label="method",
        baseline="vanilla",
        note="spec",
    )


# ---------------------------------------------------------------------------
# `genbench medusa train`: what was trained, as rows


@dataclass(frozen=True)
class TrainRow:
    part: str  # base, draft, head1 .. headK
    model: str


TRAIN_METRICS = ("params_M", "steps", "train_seconds", "val_loss", "top1", "top5", "cached", "checkpoint")


def train_sweep(prep: Prepared) -> Sweep:
    rows = {}
    for part in prep.parts:
        if part.name == "heads":
            info = part.info
            for k in range(len(info.get("loss", ()))):
                rows[f"head{k + 1}"] = dict(params_M=part.params / len(info["loss"]) / 1e6, steps=info.get("steps"),
                                           train_seconds=info.get("seconds"), val_loss=info["loss"][k],
                                           top1=info["top1"][k], top5=info["top5"][k], cached=part.cached,
                                           checkpoint=part.path)
        else:
            rows[part.name] = dict(params_M=part.params / 1e6, steps=part.info.get("steps"),
                                   train_seconds=part.info.get("seconds"), val_loss=part.info.get("val_loss"),
                                   cached=part.cached, checkpoint=part.path)
    model = prep.options.model

    def run_train(cfg: TrainRow, ctx: Context) -> Measurement:
        return Measurement(rows[cfg.part])

    return Sweep(
        suite="medusa-train",
        configs=[TrainRow(name, model) for name in rows],
        run=run_train,
        params=("part", "model"),
        metrics=TRAIN_METRICS,
        display=(Column("params_M", "M params", "{:.2f}"), Column("steps", "steps", "{}"),
                 Column("train_seconds", "s", "{:.1f}"), Column("val_loss", "val loss", "{:.3f}"),
                 Column("top1", "top-1", "{:.3f}"), Column("top5", "top-5", "{:.3f}")),
        label="part",
        primary="val_loss",
    )
