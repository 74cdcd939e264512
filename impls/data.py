"""Offline text for training and prompting the GPT: a corpus, a tokenizer, batches.

The default corpus is the Python standard library's own .py sources, which every
machine with Python has, so nothing is downloaded. Users may pass their own text
files or folders instead. A byte-level BPE tokenizer is trained on the corpus with
HuggingFace `tokenizers`; a plain byte tokenizer (vocabulary 256) needs no training.

    data = load_data(DataConfig.from_name("stdlib"), cache)  # first call builds, later calls reuse
    x, y = data.get_batch("train", batch_size=8, seq_len=256, generator=torch.Generator().manual_seed(0))
    prompts = data.prompts(n=16, length=64)              # (16, 64) token ids from the held-out tail

The trained tokenizer and the token array are cached under `cache`/data/, keyed
by a hash of the inputs. The caller picks `cache` (genbench passes the harness's
bench.env.cache_dir()), so this module knows nothing of where genbench keeps files.
A cached file that cannot be read back (a truncated tokens.npy) raises
`CorruptCache`, naming the file and the folder to delete.
"""

import hashlib
import json
import os
import shutil
import sysconfig
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

# Part of every cache key: bump it whenever reading, tokenizing or the files written change.
CODE_VERSION = 1
EOT = "<|endoftext|>"  # separates documents in the BPE token stream
# Suffixes a folder given in `paths` contributes; a file named directly is always read.
TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst")
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


class CorruptCache(OSError):
    """A file of a built corpus in the cache cannot be read back: a fault of the
    disk or of an interrupted copy, not of the configuration, so an OSError."""


@dataclass(frozen=True)
class DataConfig:
    paths: tuple[str, ...] = ()  # text files or folders; empty means the standard library's sources
    max_bytes: int = 32 * 2**20  # read at most this much text, in sorted file order
    tokenizer: str = "bpe"  # "bpe" (trained here) or "byte" (256 ids, no training)
    # 8192 BPE tokens: on ~30 MB of code it still merges whole identifiers and indents,
    # ids fit in uint16, and the embedding stays a modest share of the small presets
    # (50257 x 128 would be four times the rest of `tiny`). Ignored by "byte".
    vocab_size: int = 8192
    val_fraction: float = 0.05  # the last 5% of tokens are held out

    def __post_init__(self):
        object.__setattr__(self, "paths", tuple(str(p) for p in self.paths))  # lists in, tuple kept
        if self.tokenizer not in ("bpe", "byte"):
            raise ValueError(f"tokenizer must be 'bpe' or 'byte', got {self.tokenizer!r}")
        if self.tokenizer == "bpe" and not 257 <= self.vocab_size <= 2**16:
            raise ValueError(f"BPE vocab_size must be in [257, 65536] (256 bytes + 1 special), got {self.vocab_size}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be between 0 and 1, got {self.val_fraction}")
        if self.max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {self.max_bytes}")

    @classmethod
    def from_name(cls, name: str, **overrides) -> "DataConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown data preset {name!r}; known presets: {', '.join(PRESETS)}")
        return replace(PRESETS[name], **overrides)


PRESETS = {
    "stdlib": DataConfig(),
    # A few seconds to build: for tiny models and smoke runs.
    "stdlib-small": DataConfig(max_bytes=4 * 2**20, vocab_size=2048),
    "bytes": DataConfig(max_bytes=4 * 2**20, tokenizer="byte"),
}


class ByteTokenizer:
    """UTF-8 bytes as token ids: vocabulary 256, nothing to train, exact round trip."""

    vocab_size = 256
    eot_id = None  # no room for a separator: documents are simply concatenated

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        # A cut through a multi-byte character decodes to U+FFFD rather than failing.
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class BPETokenizer:
    """A trained HuggingFace byte-level BPE tokenizer behind the same small interface."""

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        self.vocab_size = hf_tokenizer.get_vocab_size()
        self.eot_id = hf_tokenizer.token_to_id(EOT)

    @classmethod
    def train(cls, texts: list[str], vocab_size: int) -> "BPETokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        hf = Tokenizer(models.BPE())
        # GPT-2's scheme: split on its regex, map bytes to printable characters, so any
        # text encodes (no unknown token) and decoding gives back the exact bytes.
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer, length=len(texts))
        return cls(hf)

    @classmethod
    def load(cls, path) -> "BPETokenizer":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))

    def save(self, path):
        self.hf.save(str(path))

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts)]  # Rust, parallel over texts

    def decode(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(paths=()) -> list[Path]:
    """The files a corpus is read from, in a fixed order.

    With no paths: every .py file under the standard library, site-packages left out
    (that is installed third-party code, different on every machine). Folders are walked
    in sorted order; files named directly are kept in the order given.
    """
    if not paths:
        return _walk(stdlib_dir(), (".py",))
    files = []
    for p in map(Path, paths):
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files.extend(_walk(p, TEXT_SUFFIXES))
        else:
            raise ValueError(f"text path {str(p)!r} is neither a file nor a folder")
    if not files:
        raise ValueError(f"no text files ({', '.join(TEXT_SUFFIXES)}) found under {', '.join(map(str, paths))}")
    return files


def _walk(root: Path, suffixes) -> list[Path]:
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        found.extend(Path(folder) / n for n in sorted(names) if n.endswith(suffixes) and not n.startswith("."))
    return found


def read_documents(files: list[Path], max_bytes: int, strict: bool = False) -> tuple[list[str], int]:
    """(texts, number skipped): one text per file, up to max_bytes in all, the last one cut short.

    Files that are not UTF-8 are skipped (the standard library's tests keep a few on
    purpose, to test bad encodings); with strict=True they are an error instead.
    """
    texts, skipped, budget = [], 0, max_bytes
    for f in files:
        raw = f.read_bytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if strict:
                raise ValueError(f"{f} is not UTF-8 text: {e}") from e
            skipped += 1
            continue
        # Cutting may split a multi-byte character; "ignore" drops that partial tail.
        texts.append(raw[:budget].decode("utf-8", errors="ignore"))
        budget -= min(len(raw), budget)
        if budget == 0:
            break
    return texts, skipped


def _cache_key(config: DataConfig, files: list[Path]) -> str:
    # Path, size and mtime stand in for content: cheap to check on every call, and any
    # edit changes at least the mtime.
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    vocab = config.vocab_size if config.tokenizer == "bpe" else 256
    blob = json.dumps([CODE_VERSION, config.tokenizer, vocab, config.max_bytes, stats])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _encode(tokenizer, texts: list[str]) -> np.ndarray:
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32
    if tokenizer.eot_id is None:
        return np.frombuffer("".join(texts).encode("utf-8"), dtype=np.uint8).astype(dtype)
    parts = []
    for ids in tokenizer.encode_batch(texts):
        parts += [np.asarray(ids, dtype=dtype), np.asarray([tokenizer.eot_id], dtype=dtype)]
    return np.concatenate(parts)


def _build(config: DataConfig, files: list[Path], out: Path):
    """Read, train the tokenizer if needed, tokenize; write everything into folder `out`."""
    start = time.perf_counter()
    texts, skipped = read_documents(files, config.max_bytes, strict=bool(config.paths))
    if config.tokenizer == "bpe":
        tokenizer = BPETokenizer.train(texts, config.vocab_size)
        tokenizer.save(out / "tokenizer.json")
    else:
        tokenizer = ByteTokenizer()
    tokens = _encode(tokenizer, texts)
    with open(out / "tokens.npy", "wb") as fh:
        np.save(fh, tokens)
    meta = dict(config=asdict(config), code_version=CODE_VERSION, files=len(texts), skipped_files=skipped,
                chars=sum(map(len, texts)), tokens=len(tokens), vocab_size=tokenizer.vocab_size,
                build_seconds=round(time.perf_counter() - start, 2))
    (out / "meta.json").write_text(json.dumps(meta, indent=1))


class TextData:
    """A tokenized corpus with its tokenizer, split into train and a held-out val tail."""

    def __init__(self, config: DataConfig, tokenizer, tokens: torch.Tensor, meta: dict, path: Path):
        self.config, self.tokenizer, self.meta, self.path = config, tokenizer, meta, path
        self.vocab_size = tokenizer.vocab_size
        n_val = int(len(tokens) * config.val_fraction)
        if not 0 < n_val < len(tokens):
            raise ValueError(f"{len(tokens)} tokens are too few to hold out {config.val_fraction:.0%} for validation")
        self.tokens = tokens  # (N,) int32
        self.train, self.val = tokens[:-n_val], tokens[-n_val:]  # views, disjoint

    def split(self, name: str) -> torch.Tensor:
        if name not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {name!r}")
        return self.train if name == "train" else self.val

    def get_batch(self, split: str, batch_size: int, seq_len: int, *, generator=None, seed=None, device="cpu"):
        """(x, y), both (batch_size, seq_len) int64, y being x shifted left by one token.

        Windows start at random offsets drawn from a CPU torch.Generator, so the same seed
        gives the same batches on any device and at any precision. Pass a seeded
        `generator` and call repeatedly for a stream of batches, or `seed` for one batch.
        """
        if (generator is None) == (seed is None):
            raise TypeError("get_batch takes exactly one of generator= or seed=")
        data = self.split(split)
        if len(data) <= seq_len:
            raise ValueError(f"the {split} split has {len(data)} tokens; seq_len {seq_len} needs more than that")
        if generator is None:
            generator = torch.Generator().manual_seed(seed)
        starts = torch.randint(len(data) - seq_len, (batch_size,), generator=generator)
        rows = data[starts[:, None] + torch.arange(seq_len + 1)].long()  # (B, T + 1)
        x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
        if torch.device(device).type == "cuda":
            # Pinned host memory lets the copy overlap with work already queued on the GPU.
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)

    def prompts(self, n: int, length: int, device="cpu") -> torch.Tensor:
        """(n, length) int64 prompts from the val split, starting at n evenly spaced offsets."""
        if len(self.val) < length:
            raise ValueError(f"the val split has {len(self.val)} tokens, fewer than a prompt of {length}")
        starts = torch.linspace(0, len(self.val) - length, n).long()
        return self.val[starts[:, None] + torch.arange(length)].long().to(device)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids)


def load_data(config: DataConfig, cache: Path) -> TextData:
    """The corpus of `config`, built into `cache`/data/ on the first call and read from there afterwards.

    Building is written into a temporary folder and renamed into place, so processes
    racing on the same key (e.g. DDP ranks) never read a half-written cache; to avoid
    building once per rank, let rank 0 call this first and the others after a barrier.
    """
    files = corpus_files(config.paths)
    path = Path(cache) / "data" / _cache_key(config, files)
    if not (path / "meta.json").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f"{path.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _build(config, files, tmp)
        try:
            tmp.rename(path)
        except OSError:  # another process finished first; its copy is just as good
            if not (path / "meta.json").exists():
                raise
            shutil.rmtree(tmp)
    meta = _read_cached(path / "meta.json", lambda f: json.loads(f.read_text()))
    tokenizer = _read_cached(path / "tokenizer.json", BPETokenizer.load) if config.tokenizer == "bpe" else ByteTokenizer()
    tokens = torch.from_numpy(_read_cached(path / "tokens.npy", np.load).astype(np.int32))
    return TextData(config, tokenizer, tokens, meta, path)


def _read_cached(file: Path, read):
    try:
        return read(file)
    except Exception as exc:  # json, numpy and tokenizers each fail in their own way on a damaged file
        why = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CorruptCache(f"the cached corpus file {file} cannot be read ({type(exc).__name__}: {why}); "
                           f"delete {file.parent} and the next run builds it again") from exc
