"""The options the training suites' commands share (precision, ddp): the
GPT presets, precisions and corpus presets their help lists, and --data,
--tokenizer and --vocab-size turned into a corpus configuration."""

from __future__ import annotations

import dataclasses

from bench.errors import BadInput

# Names of impls/, written out so that --help need not import torch;
# tests/bench/test_cli.py keeps them equal to the originals.
MODELS = ("tiny", "small", "gpt2-small", "medium")  # impls.gpt.PRESETS
DATA_PRESETS = ("stdlib", "stdlib-small", "bytes")  # impls.data.PRESETS
PRECISIONS = ("fp32", "tf32", "fp16", "bf16", "bf16-pure", "fp8")  # impls.precision.PRECISIONS


def data_config(data: list[str] | None, tokenizer: str | None, vocab_size: int | None, model: str):
    """--data: one preset name, or text files and folders (trained with BPE by default)."""
    from impls import data as textdata
    from impls.gpt import PRESETS as GPT_PRESETS

    data = data or ["stdlib"]
    try:
        if len(data) == 1 and data[0] in textdata.PRESETS:
            config = textdata.DataConfig.from_name(data[0])
        else:
            config = textdata.DataConfig(paths=tuple(data))
            textdata.corpus_files(config.paths)  # a missing path fails now, before anything runs
        overrides = {}
        if tokenizer is not None:
            overrides["tokenizer"] = tokenizer
        # The model preset's vocabulary, unless given or set by the data preset
        # (stdlib-small): gpt2-small then has GPT-2's 50257 tokens and its
        # published 124M parameters. Your own model (precision --model
        # module:function) takes the data's.
        preset_sets_vocab = config.vocab_size != textdata.DataConfig().vocab_size
        if vocab_size or (not preset_sets_vocab and model in GPT_PRESETS):
            overrides["vocab_size"] = vocab_size or GPT_PRESETS[model].vocab_size
        return dataclasses.replace(config, **overrides)
    except ValueError as exc:
        raise BadInput(f"--data: {exc}") from None
