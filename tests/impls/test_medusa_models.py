"""Tests for impls/medusa_models.py: the Medusa suite's models trained once and
then taken from a store, and checkpoints that are not the model asked for."""

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch

from impls import medusa_models
from impls.data import DataConfig, load_data
from impls.gpt import GPTConfig
from impls.medusa_models import CheckpointMismatch, gpt_from

CPU = torch.device("cpu")


class DictStore:
    """A Store in a folder, without the harness: what the protocol asks, and no more."""

    def __init__(self, root: Path):
        self.root, self.saved = root, []

    def key(self, *parts):
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:8]

    def path(self, kind, key):
        return self.root / f"{kind}-{key}.pt"

    def load(self, path, required):
        payload = torch.load(path, weights_only=True)
        assert set(required) <= set(payload)
        return payload

    def save(self, path, payload):
        self.saved.append(path.name)
        torch.save(payload, path)


def test_models_are_trained_once_then_loaded_from_the_store(tmp_path):
    data = load_data(DataConfig.from_name("bytes"), tmp_path / "cache")
    preset = medusa_models.PRESETS["tiny"].with_steps(base=2, heads=2, draft=2)
    assert preset.base_train.steps == 2 and preset.base_train.max_seconds is None
    store = DictStore(tmp_path)

    def all_three():
        base, part = medusa_models.trained_base(preset, data, CPU, store)
        heads, heads_part, scores = medusa_models.trained_heads(preset, base, part, 2, data, CPU, store)
        draft, draft_part = medusa_models.trained_draft(preset, data, CPU, store)
        return (base, heads, draft), (part, heads_part, draft_part), scores

    models, parts, scores = all_three()
    assert [p.cached for p in parts] == [False] * 3 and len(store.saved) == 3
    assert len(scores.top1) == 2 and models[2].config.block_size == models[0].config.block_size
    again, parts2, scores2 = all_three()
    assert [p.cached for p in parts2] == [True] * 3 and len(store.saved) == 3  # nothing trained the second time
    assert [p.key for p in parts2] == [p.key for p in parts] and scores2 == scores
    for a, b in zip(models, again):
        for x, y in zip(a.state_dict().values(), b.state_dict().values()):
            assert torch.equal(x, y)
    # heads for another base model are another checkpoint
    other = dataclasses.replace(parts[0], key="another base")
    _, part, _ = medusa_models.trained_heads(preset, models[0], other, 2, data, CPU, store)
    assert not part.cached and len(store.saved) == 4


def test_a_checkpoint_whose_config_is_impossible_is_bad_input(tmp_path):
    # n_embd 100 over 3 heads: GPTConfig raises ValueError (an assert before, gone under python -O).
    payload = {"config": {"n_embd": 100, "n_head": 3}}
    with pytest.raises(CheckpointMismatch, match="its config cannot be read as a GPTConfig .n_embd 100 is not a multiple"):
        gpt_from(payload, GPTConfig(), tmp_path / "base.pt", "base model")


def test_a_file_holding_other_weights_is_no_base_model(tmp_path):
    path = tmp_path / "heads.pt"
    torch.save(dict(kind="heads", config={}, state_dict={}), path)
    with pytest.raises(CheckpointMismatch, match="holds a 'heads' model, not a base model"):
        medusa_models.base_from_file(path, medusa_models.PRESETS["tiny"], None, CPU, DictStore(tmp_path))
