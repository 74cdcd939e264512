"""bench/checkpoints.py: where cached weights live, atomic saves, safe loads."""

import pytest
import torch

from bench import checkpoints
from bench.errors import BadInput

REQUIRED = ("kind", "config", "state_dict")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GENBENCH_CACHE", str(tmp_path / "cache"))


def test_key_is_stable():
    # Written out by hand: a cache made by an earlier version must keep its file name.
    assert checkpoints.key(1, "heads", "abc", 4, {"steps": 20, "lr": 1e-3}, 0) == "379e82729bf19a51"
    assert checkpoints.key(1, {"a": 1, "b": 2}) == checkpoints.key(1, {"b": 2, "a": 1})  # dict order does not count
    assert checkpoints.key(1, "base") != checkpoints.key(2, "base")


def test_save_then_load(tmp_path):
    path = checkpoints.path("medusa", "base", "0123456789abcdef")
    assert path == tmp_path / "cache" / "medusa" / "base-0123456789abcdef.pt"
    weights = {"w": torch.arange(6.0).reshape(2, 3)}
    checkpoints.save(path, dict(kind="base", config={"n_layer": 2}, state_dict=weights, info={"steps": 3}))
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # the temporary file was renamed into place
    payload = checkpoints.load(path, "medusa", REQUIRED)
    assert payload["kind"] == "base" and payload["info"] == {"steps": 3}
    assert torch.equal(payload["state_dict"]["w"], weights["w"])


class _NotWeights:
    pass


def test_unreadable_or_foreign_files_are_bad_input(tmp_path):
    junk = checkpoints.path("medusa", "base", "0123456789abcdef")  # in the cache: genbench's to rebuild
    junk.parent.mkdir(parents=True)
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(BadInput, match=r"cannot read checkpoint .*base-0123456789abcdef\.pt \(\w+\); delete it to retrain"):
        checkpoints.load(junk, "medusa", REQUIRED)
    own = tmp_path / "junk.pt"  # the user's own file (--checkpoint): not ours to delete
    own.write_bytes(b"not a checkpoint")
    with pytest.raises(BadInput) as info:
        checkpoints.load(own, "medusa", REQUIRED)
    assert "retrain" not in str(info.value) and "delete" not in str(info.value)
    assert f"give a .pt file written by genbench (its medusa checkpoints are in {tmp_path / 'cache' / 'medusa'})" in str(info.value)
    # weights_only: a pickled object of any other class is refused, not run
    code = tmp_path / "code.pt"
    torch.save({"kind": _NotWeights(), "config": {}, "state_dict": {}}, code)
    with pytest.raises(BadInput, match="cannot read checkpoint"):
        checkpoints.load(code, "medusa", REQUIRED)
    partial = tmp_path / "partial.pt"
    torch.save({"kind": "base", "state_dict": {}}, partial)
    with pytest.raises(BadInput, match=r"partial\.pt is not a genbench medusa checkpoint \(no kind/config/state_dict\)"):
        checkpoints.load(partial, "medusa", REQUIRED)
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(BadInput, match="is not a genbench medusa checkpoint"):
        checkpoints.load(tensor, "medusa", REQUIRED)
