"""tools/step_profile.py on CPU: a tiny preset with a vocabulary that padding changes (100 -> 128)."""

import io

from rich.console import Console

from tools import step_profile


def test_times_and_profiles_each_vocab_multiple(tmp_path):
    out = io.StringIO()
    results = step_profile.main(
        ["--model", "tiny", "--batch", "2", "--seq-len", "16", "--precision", "fp32", "--vocab-size", "100",
         "--steps", "3", "--warmup", "1", "--device", "cpu", "--trace-dir", str(tmp_path)],
        console=Console(file=out, width=200))
    assert [(r.vocab_multiple, r.vocab_size, r.padded_vocab_size) for r in results] == [(1, 100, 100), (64, 100, 128)]
    for r in results:
        assert r.stats.n == 2 and r.stats.median > 0  # 3 steps, the first one dropped
        assert r.tokens_per_s == 2 * 16 / (r.stats.median / 1e3)
        assert r.top and r.trace.is_file()
        assert any(op.name in ("aten::mm", "aten::addmm") for op in r.top)  # the matmuls, by CPU self time
    text = out.getvalue()
    assert "vocabulary 100 -> 128 rows (multiple 64)" in text and "speedup vs first" in text
