"""tools/tune_attention.py: it imports and answers --help anywhere (tuning itself needs the GPU it tunes for)."""


def test_help_names_the_options(run_tool):
    done = run_tool("tune_attention", "--help")
    assert done.returncode == 0, done.stderr[-3000:]
    assert all(flag in done.stdout for flag in ("--seq", "--head-dim", "--dtype", "--out"))
