"""tools/medusa_step_costs.py: a tiny model's run on CPU (eager, two repetitions), the file it writes."""

import json


def test_tiny_run_writes_every_step(run_tool, tmp_path):
    # Without TRITON_INTERPRET the step's Triton kernels are left out on CPU, as the tool does where they cannot run.
    done = run_tool("medusa_step_costs", str(tmp_path), "--steps-only", "--shape", "64x2", TRITON_INTERPRET="0")
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((tmp_path / "step_costs.json").read_text())
    assert (data["config"]["n_embd"], data["config"]["n_layer"], data["config"]["n_head"]) == (64, 2, 1)
    names = [r["name"] for r in data["rows"]]
    assert {"eager step vanilla L=1024", "eager step medusa N=64 L=1024", "eager step lookup k=8 L=1024",
            "greedy_accept N=64", "tree_mask N=256", "kv move (6 slots)"} <= set(names), names
    assert not any(n.startswith("forward") for n in names)  # --steps-only
    assert all(r["ms"] > 0 for r in data["rows"])


def test_help_names_the_options(run_tool):
    done = run_tool("medusa_step_costs", "--help")
    assert done.returncode == 0, done.stderr[-3000:]
    assert all(flag in done.stdout for flag in ("--steps-only", "--shape", "--shapes", "--compile"))
