"""The models the Medusa suite decodes with, by preset: a base GPT, Medusa heads
for it and a draft model, each taken from a checkpoint store when it holds
them, else trained by impls/train.py and put there.

    preset = PRESETS["tiny"]
    base, part = trained_base(preset, data, device, store, seed=0, progress=progress)
    heads, heads_part, scores = trained_heads(preset, base, part, 4, data, device, store, seed=0)
    draft, draft_part = trained_draft(preset, data, device, store, seed=0)

Every model comes back in fp32 on `device`, with a `Part` saying what it is,
whether it came from the store and where it lives. A checkpoint is keyed by a
hash of everything its training depended on (CODE_VERSION, the model config,
the corpus file, the training settings, the seed; the heads' key builds on
the base model's), so a changed preset trains anew.

Where checkpoints live is the caller's choice: `store` is any object with the
four methods of `Store` (genbench passes bench/checkpoints.py's, under
$GENBENCH_CACHE/medusa/), so this module does the training and knows nothing
of the harness. A checkpoint that is not the model asked for raises
`CheckpointMismatch`, naming the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from impls import medusa
from impls.data import TextData
from impls.gpt import GPT, GPTConfig
from impls.train import HeadsTraining, LMTraining, Progress, quiet, train_heads, train_lm

CODE_VERSION = 1  # part of every checkpoint key: bump when training changes
REQUIRED = ("kind", "config", "state_dict")  # entries every checkpoint holds


@dataclass(frozen=True)
class MedusaPreset:
    base: GPTConfig  # vocab_size is replaced by the tokenizer's
    data: str  # impls.data preset
    base_train: LMTraining
    heads_train: HeadsTraining
    draft: GPTConfig
    draft_train: LMTraining
    prompt_len: int  # benchmark prompts, from the val split
    max_new_tokens: int
    prompts: int

    def with_steps(self, base: int | None = None, heads: int | None = None, draft: int | None = None) -> MedusaPreset:
        """This preset with the step counts given (None keeps the preset's)."""
        return dataclasses.replace(self, base_train=_steps(self.base_train, base),
                                   heads_train=_steps(self.heads_train, heads),
                                   draft_train=_steps(self.draft_train, draft))

    def base_config(self, data: TextData) -> GPTConfig:
        return dataclasses.replace(self.base, vocab_size=data.vocab_size)

    def draft_config(self, data: TextData) -> GPTConfig:
        # At least the base model's context: the draft decodes the same positions.
        return dataclasses.replace(self.draft, vocab_size=data.vocab_size,
                                   block_size=max(self.draft.block_size, self.base.block_size))


def _steps(training, steps: int | None):
    # An explicit step count is taken as asked: no time budget cuts it short.
    return training if steps is None else dataclasses.replace(training, steps=steps, max_seconds=None)


PRESETS = {
    # CPU smoke runs. Too little training for good text: its greedy output soon
    # repeats itself, which speculation finds easy.
    "tiny": MedusaPreset(
        base=GPTConfig.from_name("tiny"),
        data="stdlib-small",
        base_train=LMTraining(steps=300, batch_size=8, seq_len=128, lr=6e-3),
        heads_train=HeadsTraining(prompts=96, prompt_len=32, gen_len=64, steps=100, batch_size=256, lr=3e-3),
        draft=GPTConfig(n_layer=1, n_head=2, n_embd=64, block_size=256),
        draft_train=LMTraining(steps=100, batch_size=8, seq_len=128, lr=6e-3),
        prompt_len=32, max_new_tokens=48, prompts=4,
    ),
    # Sized for one GPU.
    "small": MedusaPreset(
        base=GPTConfig.from_name("small"),
        data="stdlib",
        base_train=LMTraining(steps=2000, batch_size=32, seq_len=512, lr=1e-3, warmup=50),
        heads_train=HeadsTraining(prompts=1024, prompt_len=64, gen_len=192, steps=600, batch_size=8192, lr=1e-3),
        draft=GPTConfig(n_layer=2, n_head=4, n_embd=256, block_size=512),
        draft_train=LMTraining(steps=1000, batch_size=32, seq_len=512, lr=2e-3, warmup=50),
        prompt_len=128, max_new_tokens=256, prompts=16,
    ),
    # 211M parameters (impls.gpt "medium"): a real batch-1 decoding workload on a
    # datacenter GPU. The step counts are set to bind there before the time
    # budgets, so that a preset trains the same models each time; slower GPUs
    # stop at the budgets. The heads learn from continuations as
    # long as the benchmark's (128-token prompts, hundreds of new tokens), where
    # the base model's greedy text settles into the repetitions that speculation feeds on.
    "medium": MedusaPreset(
        base=GPTConfig.from_name("medium"),
        data="stdlib",
        base_train=LMTraining(steps=1100, batch_size=32, seq_len=512, lr=6e-4, warmup=50, max_seconds=100),
        heads_train=HeadsTraining(prompts=12288, prompt_len=128, gen_len=448, steps=8000, batch_size=8192, lr=1e-3,
                                  gen_batch=1024, max_seconds=120),
        draft=GPTConfig(n_layer=2, n_head=8, n_embd=512, block_size=1024),
        draft_train=LMTraining(steps=1000, batch_size=32, seq_len=512, lr=2e-3, warmup=50, max_seconds=20),
        prompt_len=128, max_new_tokens=512, prompts=16,
    ),
}


class Store(Protocol):
    """Where checkpoints are kept: what a caller passes as `store`."""

    def key(self, *parts: Any) -> str:
        """A short, stable hash of `parts` (JSON-able values)."""

    def path(self, kind: str, key: str) -> Path:
        """Where the checkpoint `kind` with this key lives (it may not exist yet)."""

    def load(self, path: Path, required: tuple[str, ...]) -> dict:
        """The payload saved at `path`, on the CPU; raises if it is unreadable or lacks a `required` entry."""

    def save(self, path: Path, payload: dict) -> None:
        """Write `payload` (tensors and plain values) to `path`."""


class CheckpointMismatch(ValueError):
    """A checkpoint that holds something other than the model asked for."""


@dataclass
class Part:
    """One trained (or loaded) component, for the train table and the notes."""

    name: str
    params: int
    cached: bool
    path: str
    info: dict
    key: str = ""  # its checkpoint key, which the heads' key builds on


def gpt_from(payload: dict, expected: GPTConfig, path: Path, what: str) -> GPT:
    """A GPT from a checkpoint, after checking it is the model asked for."""
    try:
        stored = GPTConfig(**payload["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointMismatch(f"{path}: its config cannot be read as a GPTConfig ({exc})") from None
    if stored.vocab_size != expected.vocab_size:
        raise CheckpointMismatch(f"{path}: vocabulary {stored.vocab_size} does not match the tokenizer's "
                                 f"{expected.vocab_size}")
    if stored != expected:
        diff = ", ".join(f"{f.name} {getattr(stored, f.name)} != {getattr(expected, f.name)}"
                         for f in dataclasses.fields(GPTConfig) if getattr(stored, f.name) != getattr(expected, f.name))
        raise CheckpointMismatch(f"{path}: the {what} config does not match ({diff})")
    model = GPT(stored)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise CheckpointMismatch(f"{path}: weights do not fit the config ({str(exc).splitlines()[0]})") from None
    return model


def _cached_or_trained(store: Store, kind: str, key: str, progress: Progress,
                       build: Callable[[], tuple[Any, dict, dict]],
                       restore: Callable[[dict, Path], Any]) -> tuple[Any, Part]:
    """Load checkpoint `kind` with this key if the store has it, else train it and save it."""
    path = store.path(kind, key)
    if path.exists():
        payload = store.load(path, REQUIRED)
        progress(kind, 1, 1, f"cached: {path}")
        obj = restore(payload, path)
        return obj, Part(kind, payload["info"].get("params", 0), True, str(path), payload["info"], key)
    obj, info, extra = build()
    payload = dict(kind=kind, key=key, info=info, state_dict={k: v.detach().cpu() for k, v in obj.state_dict().items()},
                   **extra)
    store.save(path, payload)
    return obj, Part(kind, info.get("params", 0), False, str(path), info, key)


def trained_base(preset: MedusaPreset, data: TextData, device: torch.device, store: Store, seed: int = 0,
                 progress: Progress = quiet) -> tuple[GPT, Part]:
    """The preset's base GPT on this corpus, from the store or trained by impls/train.py and stored."""
    config, training = preset.base_config(data), preset.base_train
    key = store.key(CODE_VERSION, "base", asdict(config), data.path.name, asdict(training), seed)

    def build():
        m, info = train_lm(config, data, training, device, seed, progress, "base")
        return m, info, dict(config=asdict(config), data=data.path.name, train=asdict(training))

    return _cached_or_trained(store, "base", key, progress, build,
                              lambda p, path: gpt_from(p, config, path, "base model").to(device))


def base_from_file(path: Path, preset: MedusaPreset, data: TextData, device: torch.device, store: Store) -> tuple[GPT, Part]:
    """A base GPT from a checkpoint file of one's own, checked against the preset's config."""
    payload = store.load(path, REQUIRED)
    if payload.get("kind") != "base":
        raise CheckpointMismatch(f"{path} holds a {payload.get('kind')!r} model, not a base model")
    model = gpt_from(payload, preset.base_config(data), path, "base model")
    # A file without its key (not written by genbench) is keyed by its bytes, for the heads' key.
    key = payload.get("key") or hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return model.to(device), Part("base", model.num_params(False), True, str(path), payload.get("info", {}), key)


def trained_heads(preset: MedusaPreset, model: GPT, base: Part, n_heads: int, data: TextData, device: torch.device,
                  store: Store, seed: int = 0,
                  progress: Progress = quiet) -> tuple[medusa.MedusaHeads, Part, medusa.HeadScores]:
    """n_heads Medusa heads for the base model `base` describes, from the store or
    self-distilled by impls/train.py and stored; with their scores on held-out text."""
    training = preset.heads_train
    n_embd = model.config.n_embd
    key = store.key(CODE_VERSION, "heads", base.key, n_heads, asdict(training), seed)

    def build():
        h, info = train_heads(model, data, n_heads, training, device, seed, progress)
        return h, info, dict(config=dict(n_heads=n_heads, n_embd=n_embd, vocab_size=data.vocab_size),
                             base=base.key, train=asdict(training))

    def restore(p, path):
        cfg = p["config"]
        if (cfg.get("n_embd"), cfg.get("vocab_size"), cfg.get("n_heads")) != (n_embd, data.vocab_size, n_heads):
            raise CheckpointMismatch(f"{path}: heads for n_embd {cfg.get('n_embd')}, vocabulary {cfg.get('vocab_size')}, "
                                     f"{cfg.get('n_heads')} heads do not fit this base model")
        h = medusa.MedusaHeads(n_embd, data.vocab_size, n_heads)
        h.load_state_dict(p["state_dict"])
        return h.to(device)

    heads, part = _cached_or_trained(store, "heads", key, progress, build, restore)
    info = part.info
    scores = medusa.HeadScores(tuple(info["loss"]), tuple(info["top1"]), tuple(info["top5"]),
                               tuple(tuple(r) for r in info["rank_accuracy"]))
    return heads, part, scores


def trained_draft(preset: MedusaPreset, data: TextData, device: torch.device, store: Store, seed: int = 0,
                  progress: Progress = quiet) -> tuple[GPT, Part]:
    """The preset's draft GPT on this corpus, from the store or trained by impls/train.py and stored."""
    config, training = preset.draft_config(data), preset.draft_train
    key = store.key(CODE_VERSION, "draft", asdict(config), data.path.name, asdict(training), seed)

    def build():
        m, info = train_lm(config, data, training, device, seed + 3, progress, "draft")
        return m, info, dict(config=asdict(config), data=data.path.name, train=asdict(training))

    return _cached_or_trained(store, "draft", key, progress, build,
                              lambda p, path: gpt_from(p, config, path, "draft model").to(device))
