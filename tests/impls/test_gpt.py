"""Tests for impls/gpt.py: shapes and counts by hand, KV-cache and tree decoding against the plain forward."""

import math
from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from impls.data import DataConfig, load_data
from impls.gpt import GPT, PRESETS, GPTConfig

# Small enough to count by hand (see test_flops_per_token_hand_count).
HAND = GPTConfig(vocab_size=100, n_layer=2, n_head=2, n_embd=16, block_size=32)


def _model(config=HAND, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return GPT(config).to(dtype).eval()


def test_gpt2_small_param_count():
    # GPT-2 small by hand, C = 768, V = 50257, 1024 positions, biases on:
    #   wte 50257*768 = 38,597,376 (tied: also lm_head), wpe 1024*768 = 786,432
    #   per block: ln_1 2*768 + c_attn 768*2304+2304 + c_proj 768*768+768
    #            + ln_2 2*768 + c_fc 768*3072+3072 + c_proj 3072*768+768 = 7,087,872
    #   12 blocks = 85,054,464; ln_f 2*768 = 1,536
    #   total 124,439,808 (the published "124M"); without wpe 123,653,376
    with torch.device("meta"):  # shapes only: no 500 MB of random numbers
        model = GPT(GPTConfig.from_name("gpt2-small"))
    assert model.num_params(non_embedding=False) == 124_439_808
    assert model.num_params(non_embedding=True) == 124_439_808 - 786_432


def test_gpt2_small_pads_its_vocabulary_to_50304():
    # nanoGPT's padding: 50257 rounded up to a multiple of 64 is 786 * 64 = 50304, 47 rows
    # of 768 more weights, which num_params (the model, for MFU) leaves out.
    with torch.device("meta"):
        padded = GPT(GPTConfig.from_name("gpt2-small"))
        plain = GPT(GPTConfig.from_name("gpt2-small", vocab_multiple=1))
    assert padded.lm_head.weight.shape == padded.transformer.wte.weight.shape == (50304, 768)
    assert plain.lm_head.weight.shape == (50257, 768)
    assert sum(p.numel() for p in padded.parameters()) == 124_439_808 + 47 * 768 == 124_475_904
    assert padded.num_params(False) == plain.num_params(False) == 124_439_808
    assert padded.flops_per_token(1024) == plain.flops_per_token(1024)


def test_every_preset_pads_to_a_multiple_of_64_and_the_8192_ones_keep_their_shape():
    for name, cfg in PRESETS.items():
        assert cfg.padded_vocab_size % 64 == 0 and 0 <= cfg.padded_vocab_size - cfg.vocab_size < 64, name
        if name != "gpt2-small":
            assert cfg.vocab_size == cfg.padded_vocab_size == 8192, name  # checkpoints of these stay loadable
    assert GPTConfig(vocab_size=256).padded_vocab_size == 256  # the byte tokenizer's
    assert GPTConfig(vocab_size=257).padded_vocab_size == 320
    assert GPTConfig(vocab_size=100, vocab_multiple=1).padded_vocab_size == 100
    with pytest.raises(ValueError, match="vocab_multiple"):
        GPTConfig(vocab_multiple=0)


def test_padding_rows_are_never_scored_nor_trained():
    # The padded model (100 -> 128 rows) with the unpadded one's weights in its first 100 rows:
    # the same logits and loss, even where a padding row would win the argmax.
    padded, plain = _model(), _model(replace(HAND, vocab_multiple=1))
    assert padded.lm_head.weight.shape == (128, HAND.n_embd)
    idx = torch.randint(HAND.vocab_size, (2, 12), generator=torch.Generator().manual_seed(6))
    tgt = torch.randint(HAND.vocab_size, (2, 12), generator=torch.Generator().manual_seed(7))
    ref_logits, ref_loss, hidden = plain(idx, tgt, return_hidden=True)
    with torch.no_grad():
        state = plain.state_dict()
        bait = 10 * hidden[0, 0].expand(28, -1)  # rows scoring 10 |h|^2 at position (0, 0)
        for name in ("lm_head.weight", "transformer.wte.weight"):
            state[name] = torch.cat([state[name], bait])
        padded.load_state_dict(state)
    logits, loss = padded(idx, tgt)
    assert logits.shape == (2, 12, HAND.vocab_size)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    assert padded.lm_head(hidden[0, 0]).argmax() >= HAND.vocab_size  # a padding row would have won
    loss.backward()
    assert padded.lm_head.weight.grad[HAND.vocab_size:].abs().max() == 0  # no input, no target: no gradient
    assert padded.lm_head.weight.grad[:HAND.vocab_size].abs().max() > 0


def test_padded_rows_are_work_done_but_not_model_flops():
    # torch's FLOP count of one training step multiplies the 128-row table (2 FLOPs per weight
    # and token forward, 4 backward); flops_per_token, the MFU numerator, counts its 100 rows.
    model = _model()
    C, T = HAND.n_embd, 8
    blocks = HAND.n_layer * 12 * C * C  # qkv 3C², out C², MLP 8C² per block
    x = torch.randint(HAND.vocab_size, (1, T), generator=torch.Generator().manual_seed(8))
    with FlopCounterMode(display=False) as counter:
        model(x, x)[1].backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert counts.get("aten.mm", 0) + counts.get("aten.addmm", 0) == 6 * (blocks + 128 * C) * T
    assert model.flops_per_token(T) == 6 * model.num_params() + 12 * HAND.n_layer * C * T
    assert model.num_params() == sum(p.numel() for p in model.parameters()) - 28 * C - HAND.block_size * C


def test_from_name_overrides_and_rejects_unknown():
    cfg = GPTConfig.from_name("gpt2-small", vocab_size=8192)
    assert (cfg.vocab_size, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == (8192, 12, 12, 768, 1024)
    assert PRESETS["gpt2-small"].vocab_size == 50257  # the preset itself is untouched
    with pytest.raises(ValueError, match="tiny.*gpt2-small"):
        GPTConfig.from_name("gpt5")
    with pytest.raises(ValueError, match="n_embd 100 is not a multiple of n_head 3"):
        GPTConfig(n_embd=100, n_head=3)


def test_presets_sizes():
    with torch.device("meta"):
        sizes = {name: GPT(cfg).num_params(non_embedding=False) for name, cfg in PRESETS.items()}
    assert sizes["tiny"] < 2e6
    assert 20e6 < sizes["small"] < 40e6
    assert sizes["medium"] > 100e6


def test_flops_per_token_hand_count():
    # N without wpe: wte 100*16 = 1600; per block ln_1 32 + c_attn 16*48+48 = 816
    # + c_proj 16*16+16 = 272 + ln_2 32 + c_fc 16*64+64 = 1088 + c_proj 64*16+16 = 1040
    # = 3280, two blocks 6560; ln_f 32. N = 8192.
    # 6N + 12 * n_layer * n_embd * seq_len = 49152 + 12*2*16*32 = 49152 + 12288.
    model = _model()
    assert model.num_params(non_embedding=True) == 8192
    assert model.flops_per_token(32) == 61_440
    assert model.flops_per_token(16) == 49_152 + 6_144


def test_loss_at_init_is_log_vocab():
    # With std-0.02 weights the logits are nearly flat, so the cross-entropy on random
    # targets is ln(V) plus a little (the logits' variance / 2, here ~0.03).
    cfg = GPTConfig.from_name("tiny")
    model = _model(cfg)
    idx = torch.randint(cfg.vocab_size, (4, 64), generator=torch.Generator().manual_seed(1))
    tgt = torch.randint(cfg.vocab_size, (4, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits, loss = model(idx, tgt)
    assert logits.shape == (4, 64, cfg.vocab_size)
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.1


def test_init_scales_residual_projections():
    cfg = GPTConfig(vocab_size=512, n_layer=8, n_head=4, n_embd=256, block_size=64)
    model = _model(cfg)
    block = model.transformer.h[0]
    assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    for w in (block.attn.c_proj.weight, block.mlp.c_proj.weight):
        assert w.std().item() == pytest.approx(0.02 / math.sqrt(2 * 8), rel=0.05)
    assert torch.all(block.attn.c_attn.bias == 0)


def test_tied_embeddings_share_storage():
    model = _model()
    assert model.lm_head.weight is model.transformer.wte.weight
    idx = torch.randint(HAND.vocab_size, (2, 8))
    _, loss = model(idx, idx)
    loss.backward()
    # One tensor, one gradient, fed from both the embedding lookup and the output matmul.
    assert model.transformer.wte.weight.grad is model.lm_head.weight.grad
    with torch.no_grad():
        model.transformer.wte.weight[3].fill_(1.0)
    assert torch.all(model.lm_head.weight[3] == 1.0)


def test_return_hidden_is_post_ln_f():
    model = _model()
    idx = torch.randint(HAND.vocab_size, (2, 10))
    logits, loss, hidden = model(idx, return_hidden=True)
    assert loss is None and hidden.shape == (2, 10, HAND.n_embd)
    torch.testing.assert_close(model.lm_head(hidden)[..., :HAND.vocab_size], logits)  # lm_head has padding rows
    # ln_f output: zero mean per position (gain 1 and bias 0 at init).
    assert hidden.mean(-1).abs().max().item() < 1e-5


def test_kv_cache_decoding_matches_full_forward():
    model = _model()
    B, T, T0 = 2, 20, 7
    idx = torch.randint(HAND.vocab_size, (B, T), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full, _ = model(idx)  # (B, T, V)
        model.setup_cache(batch=B, max_len=HAND.block_size)
        pre, _ = model(idx[:, :T0], input_pos=torch.arange(T0))
        steps = [model(idx[:, t:t + 1], input_pos=torch.tensor([t]))[0] for t in range(T0, T)]
    cached = torch.cat([pre, *steps], dim=1)
    # fp32, same math in a different order: differences are rounding only.
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


def test_explicit_causal_mask_equals_implicit():
    model = _model()
    B, T, L = 2, 12, HAND.block_size
    idx = torch.randint(HAND.vocab_size, (B, T), generator=torch.Generator().manual_seed(4))
    pos = torch.arange(T)
    with torch.no_grad():
        model.setup_cache(batch=B, max_len=L)
        implicit, _ = model(idx, input_pos=pos)
        causal = torch.tril(torch.ones(T, L, dtype=torch.bool))  # row t sees slots 0..t
        explicit, _ = model(idx, input_pos=pos, mask=causal.expand(B, 1, T, L))
        full_view, _ = model(idx, input_pos=pos, mask=torch.ones(B, 1, T, L, dtype=torch.bool) & (torch.arange(L) < T))
    torch.testing.assert_close(explicit, implicit, rtol=1e-6, atol=1e-6)
    # The mask is really used: letting every token see the whole sequence changes early logits.
    assert not torch.allclose(full_view[:, 0], implicit[:, 0], atol=1e-3)


def test_tree_verification_and_move_cache():
    # A Medusa-style step: after a prefix, verify two candidate continuations at once as a
    # tree [a, b1, b2] where b1 and b2 both follow a. Each node's logits must equal those
    # of decoding its own branch in a line; then compacting the accepted branch (a, b2)
    # into consecutive slots must let decoding carry on as if it had been linear.
    model = _model()
    g = torch.Generator().manual_seed(5)
    prefix = torch.randint(HAND.vocab_size, (1, 6), generator=g)
    a, b1, b2, c = torch.randint(HAND.vocab_size, (4,), generator=g).tolist()
    P, L = prefix.shape[1], HAND.block_size
    with torch.no_grad():
        ref1, _ = model(torch.cat([prefix, torch.tensor([[a, b1]])], dim=1))
        ref2, _ = model(torch.cat([prefix, torch.tensor([[a, b2, c]])], dim=1))

        model.setup_cache(batch=1, max_len=L)
        model(prefix, input_pos=torch.arange(P))
        tree = torch.tensor([[a, b1, b2]])
        depth = torch.tensor([0, 1, 1])
        slots = P + torch.arange(3)
        ancestors = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)  # node -> visible nodes
        mask = torch.zeros(3, L, dtype=torch.bool)
        mask[:, :P] = True
        mask[:, P:P + 3] = ancestors
        logits, _ = model(tree, input_pos=P + depth, cache_pos=slots, mask=mask[None, None])
        torch.testing.assert_close(logits[0, 0], ref1[0, P], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits[0, 1], ref1[0, P + 1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits[0, 2], ref2[0, P + 1], rtol=1e-5, atol=1e-5)

        model.move_cache(src_pos=torch.tensor([P, P + 2]), dst_pos=torch.tensor([P, P + 1]))
        nxt, _ = model(torch.tensor([[c]]), input_pos=torch.tensor([P + 2]))
    torch.testing.assert_close(nxt[0, 0], ref2[0, P + 2], rtol=1e-5, atol=1e-5)


def test_configure_optimizer_groups():
    model = _model()
    opt = model.configure_optimizer(weight_decay=0.1, lr=1e-3, betas=(0.9, 0.95), device_type="cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    # every parameter once, the tied one too, with its 28 padding rows (num_params leaves them out)
    assert n == model.num_params(non_embedding=False) + (128 - 100) * HAND.n_embd
    assert not opt.defaults.get("fused")


def test_tiny_training_reduces_loss_on_stdlib(tmp_path):
    # Real text, byte tokenizer (no training), 1 MB of the standard library.
    data = load_data(DataConfig(tokenizer="byte", max_bytes=2**20), tmp_path)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("tiny", vocab_size=data.vocab_size, block_size=64))
    opt = model.configure_optimizer(weight_decay=0.0, lr=3e-3, betas=(0.9, 0.95), device_type="cpu")
    x_val, y_val = data.get_batch("val", 16, 64, seed=0)

    def val_loss():
        model.eval()
        with torch.no_grad():
            loss = model(x_val, y_val)[1].item()
        model.train()
        return loss

    before = val_loss()
    g = torch.Generator().manual_seed(1)
    for _ in range(40):
        x, y = data.get_batch("train", 16, 64, generator=g)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    after = val_loss()
    # Byte frequencies alone (spaces, e, t, newlines) are worth well over a nat.
    assert after < before - 1.0, (before, after)


def test_plain_forward_ignores_the_cache():
    # Training after decoding (or evaluating with a cache still set up) must not touch it.
    model = _model()
    idx = torch.randint(HAND.vocab_size, (1, 12))
    with torch.no_grad():
        before, _ = model(idx)
        model.setup_cache(batch=1, max_len=HAND.block_size)
        model(idx[:, :4], input_pos=torch.arange(4))
        k = model.transformer.h[0].attn.kv_cache.k.clone()
        after, _ = model(idx)
    torch.testing.assert_close(after, before)
    assert torch.equal(model.transformer.h[0].attn.kv_cache.k, k)
