"""Tests for impls/data.py: corpus files, tokenizers, the on-disk cache, splits and batches."""

import ast
import os
from pathlib import Path

import pytest
import torch

import impls.data
from impls.data import BPETokenizer, ByteTokenizer, CorruptCache, DataConfig, corpus_files, load_data, read_documents

SAMPLE = "def add(a, b):\n    return a + b\n\n# naïve café ✓ 🐍\nclass Point:\n    x: int = 0\n"


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_data_does_not_reach_into_the_harness():
    # impls/ is what is measured; where the cache lives is bench's to say, passed in as `cache`.
    tree = ast.parse(Path(impls.data.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {m for m in imported if m.split(".")[0] == "bench"}


def test_byte_tokenizer_roundtrip():
    tok = ByteTokenizer()
    ids = tok.encode(SAMPLE)
    assert all(0 <= i < 256 for i in ids)
    assert len(ids) == len(SAMPLE.encode("utf-8"))  # one id per byte, not per character
    assert tok.decode(ids) == SAMPLE


def test_bpe_tokenizer_trains_and_roundtrips(tmp_path):
    texts = [SAMPLE * 50, "for i in range(10):\n    print(i)\n" * 50]
    tok = BPETokenizer.train(texts, vocab_size=300)
    assert tok.vocab_size == 300
    ids = tok.encode(SAMPLE)
    assert len(ids) < len(SAMPLE.encode("utf-8"))  # merges were learned
    assert tok.decode(ids) == SAMPLE
    unseen = "ünïcödé never seen: ∮ 日本"
    assert tok.decode(tok.encode(unseen)) == unseen  # byte-level: no unknown token
    tok.save(tmp_path / "t.json")
    assert BPETokenizer.load(tmp_path / "t.json").encode(SAMPLE) == ids


def test_stdlib_corpus_files():
    files = corpus_files()
    assert len(files) > 100 and files == corpus_files()  # deterministic
    assert all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts or "__pycache__" in f.parts for f in files)
    assert any(f.name == "os.py" for f in files)
    texts, _ = read_documents(files, max_bytes=100_000)
    assert sum(len(t.encode("utf-8")) for t in texts) <= 100_000
    assert sum(len(t.encode("utf-8")) for t in texts) > 99_000  # the last file is cut to fill the budget
    assert len(texts) < 100  # reading stopped once the budget was spent


def test_user_files_and_folders(tmp_path, cache):
    folder = tmp_path / "notes"
    _write(folder / "b.txt", "second\n")
    _write(folder / "a.md", "first\n")
    _write(folder / "sub" / "c.py", "third\n")
    (folder / "image.bin").write_bytes(bytes(range(256)))  # not a text suffix: left out
    single = _write(tmp_path / "extra.log", "fourth\n")  # named directly: read whatever its suffix
    files = corpus_files([str(folder), str(single)])
    assert [f.name for f in files] == ["a.md", "b.txt", "c.py", "extra.log"]

    data = load_data(DataConfig(paths=(str(folder), str(single)), tokenizer="byte", val_fraction=0.25), cache)
    assert data.decode(data.tokens.tolist()) == "first\nsecond\nthird\nfourth\n"
    with pytest.raises(ValueError, match="neither a file nor a folder"):
        corpus_files([str(tmp_path / "missing.txt")])


def test_user_file_not_utf8_is_an_error(tmp_path, cache):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        load_data(DataConfig(paths=(str(bad),), tokenizer="byte"), cache)


def test_a_file_too_short_to_hold_out_validation_is_an_error(tmp_path, cache):
    # 3 bytes: 5% of them rounds to no validation token. A ValueError, which the commands show as one line.
    tiny = _write(tmp_path / "tiny.txt", "hi\n")
    with pytest.raises(ValueError, match="3 tokens are too few to hold out 5%"):
        load_data(DataConfig(paths=(str(tiny),), tokenizer="byte"), cache)
    data = load_data(DataConfig(paths=(str(_write(tmp_path / "more.txt", SAMPLE * 20)),), tokenizer="byte"), cache)
    with pytest.raises(TypeError, match="exactly one of generator= or seed="):
        data.get_batch("train", 2, 8)


def test_bpe_cache_is_reused(tmp_path, cache, monkeypatch):
    corpus = _write(tmp_path / "corpus.txt", SAMPLE * 200)
    calls = []
    real_train = BPETokenizer.train.__func__

    def counting_train(cls, texts, vocab_size):
        calls.append(vocab_size)
        return real_train(cls, texts, vocab_size)

    monkeypatch.setattr(BPETokenizer, "train", classmethod(counting_train))
    config = DataConfig(paths=(str(corpus),), vocab_size=300)
    first = load_data(config, cache)
    tokens_file = first.path / "tokens.npy"
    mtime = tokens_file.stat().st_mtime_ns
    second = load_data(config, cache)
    assert calls == [300]  # trained once
    assert second.path == first.path and tokens_file.stat().st_mtime_ns == mtime
    assert torch.equal(first.tokens, second.tokens)
    assert first.tokens.max().item() < 300 and first.meta["tokens"] == len(first.tokens)
    assert (first.tokens == first.tokenizer.eot_id).sum().item() == 1  # one document, one separator after it

    load_data(DataConfig(paths=(str(corpus),), vocab_size=320), cache)  # another vocabulary: another key
    assert calls == [300, 320]
    # An edit that keeps the size is still seen, through the mtime (pushed on a second in
    # case the file system's clock is coarse).
    _write(corpus, (SAMPLE * 200).replace("add", "sub"))
    assert corpus.stat().st_size == len((SAMPLE * 200).encode("utf-8"))
    os.utime(corpus, ns=(mtime + 10**9, mtime + 10**9))
    third = load_data(config, cache)
    assert calls == [300, 320, 300] and third.path != first.path


def test_split_is_the_disjoint_tail(tmp_path, cache):
    # 950 'a' then 50 'b' bytes: with 5% held out, val is exactly the b's.
    corpus = _write(tmp_path / "ab.txt", "a" * 950 + "b" * 50)
    data = load_data(DataConfig(paths=(str(corpus),), tokenizer="byte", val_fraction=0.05), cache)
    a, b = ord("a"), ord("b")
    assert len(data.train) == 950 and len(data.val) == 50
    assert torch.all(data.train == a) and torch.all(data.val == b)
    x, y = data.get_batch("train", 32, 16, seed=0)
    assert torch.all(x == a) and torch.all(y == a)  # no window crosses into val
    x, y = data.get_batch("val", 32, 16, seed=0)
    assert torch.all(x == b) and torch.all(y == b)
    with pytest.raises(ValueError, match="split"):
        data.get_batch("test", 1, 4, seed=0)
    with pytest.raises(ValueError, match="seq_len"):
        data.get_batch("val", 1, 50, seed=0)


def test_batches_are_deterministic_and_shifted(cache):
    data = load_data(DataConfig(tokenizer="byte", max_bytes=200_000), cache)
    x1, y1 = data.get_batch("train", 4, 32, seed=7)
    x2, y2 = data.get_batch("train", 4, 32, seed=7)
    x3, _ = data.get_batch("train", 4, 32, seed=8)
    assert x1.dtype == y1.dtype == torch.int64 and x1.shape == y1.shape == (4, 32)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # y is x one token on
    # A seeded generator gives a reproducible stream of different batches.
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    s1 = [data.get_batch("train", 2, 8, generator=g1)[0] for _ in range(3)]
    s2 = [data.get_batch("train", 2, 8, generator=g2)[0] for _ in range(3)]
    assert all(torch.equal(p, q) for p, q in zip(s1, s2)) and not torch.equal(s1[0], s1[1])


def test_prompts_come_from_val(cache):
    data = load_data(DataConfig(tokenizer="byte", max_bytes=200_000), cache)
    p = data.prompts(5, 40)
    assert p.shape == (5, 40) and p.dtype == torch.int64
    assert torch.equal(p, data.prompts(5, 40))
    val = data.val.tolist()
    for row in p.tolist():
        assert any(val[i:i + 40] == row for i in range(len(val) - 39))
    assert p[0].tolist() == val[:40] and p[-1].tolist() == val[-40:]  # spread over the whole tail
    with pytest.raises(ValueError, match="fewer than a prompt"):
        data.prompts(1, len(val) + 1)


def test_config_presets_and_validation():
    assert DataConfig.from_name("stdlib") == DataConfig()
    assert DataConfig.from_name("bytes", max_bytes=10).max_bytes == 10
    with pytest.raises(ValueError, match="stdlib"):
        DataConfig.from_name("wikipedia")
    with pytest.raises(ValueError, match="tokenizer"):
        DataConfig(tokenizer="sentencepiece")
    with pytest.raises(ValueError, match="vocab_size"):
        DataConfig(vocab_size=100)
    assert DataConfig(paths=["x.txt"]).paths == ("x.txt",)  # a list from the CLI becomes a tuple


def test_build_lands_in_the_cache_given(cache):
    load_data(DataConfig(tokenizer="byte", max_bytes=10_000), cache)
    built = list((cache / "data").iterdir())
    assert len(built) == 1 and (built[0] / "meta.json").exists()
    assert ".tmp-" not in built[0].name  # the build folder was renamed into place


def test_a_damaged_cache_file_is_named_with_what_to_do(tmp_path, cache):
    corpus = _write(tmp_path / "corpus.txt", SAMPLE * 20)
    config = DataConfig(paths=(str(corpus),), tokenizer="byte")
    built = load_data(config, cache)
    tokens = built.path / "tokens.npy"
    tokens.write_bytes(tokens.read_bytes()[:-10])  # truncated, as by a full disk or an interrupted copy
    with pytest.raises(CorruptCache) as info:
        load_data(config, cache)
    assert str(info.value).startswith(f"the cached corpus file {tokens} cannot be read (ValueError: ")
    assert str(info.value).endswith(f"delete {built.path} and the next run builds it again")
    assert not isinstance(info.value, ValueError)  # not mistaken for a bad --data by the commands
