"""Tests for impls/medusa.py: the heads against a float64 loop, trees drawn by
hand, the acceptance rules on made-up logits, and KV compaction against
decoding the accepted tokens in a line."""

import math

import pytest
import torch

from impls import decoding, medusa
from impls.gpt import GPT, GPTConfig

# The hand-drawn tree of these tests, breadth-first (node: path):
#   0: root
#   1: (0)    2: (1)
#   3: (0,0)  4: (0,1)  5: (1,0)
#   6: (0,0,0)
HAND = medusa.Tree(((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)))


def test_hand_tree_buffers():
    b = HAND.buffers()
    assert HAND.size == 7 and HAND.depth == 3
    assert b.depth.tolist() == [0, 1, 1, 2, 2, 2, 3]
    # root at 0; head d's rank r at 1 + (d - 1) * TOPK + r
    T = medusa.TOPK
    assert b.flat_index.tolist() == [0, 1, 2, 1 + T, 1 + T + 1, 1 + T, 1 + 2 * T]
    ancestors = {i: set(torch.nonzero(b.ancestors[i]).flatten().tolist()) for i in range(7)}
    assert ancestors == {0: {0}, 1: {0, 1}, 2: {0, 2}, 3: {0, 1, 3}, 4: {0, 1, 4}, 5: {0, 2, 5}, 6: {0, 1, 3, 6}}
    # leaves (0,1), (1,0), (0,0,0): the node ids down each path, padded with 0
    assert b.retrieve.tolist() == [[0, 1, 4, 0], [0, 2, 5, 0], [0, 1, 3, 6]]
    assert b.valid.tolist() == [[True, True, True, False], [True, True, True, False], [True] * 4]


def test_hand_tree_mask_and_positions():
    b = HAND.buffers()
    cur = torch.tensor([3])
    mask = medusa.tree_mask(b, cur, max_len=12)
    assert mask.shape == (7, 12)
    assert mask[:, :3].all()  # the prefix, slots 0..2, is seen by every node
    assert torch.equal(mask[:, 3:10], b.ancestors)  # the tree sits at slots 3..9
    assert not mask[:, 10:].any()  # stale slots past the tree
    # node 6 = (0,0,0): prefix plus root, (0), (0,0) and itself
    assert torch.nonzero(mask[6]).flatten().tolist() == [0, 1, 2, 3, 4, 6, 9]
    assert (cur + b.depth).tolist() == [3, 4, 4, 5, 5, 5, 6]  # positions: prefix length + depth
    assert (cur + b.node).tolist() == list(range(3, 10))  # cache slots: one per node


def test_tree_bits_by_hand():
    # Bit j of node i: node i attends to node j (HAND's ancestor sets in test_hand_tree_buffers).
    assert medusa.tree_bits(HAND.buffers()).tolist() == [0b1, 0b11, 0b101, 0b1011, 0b10011, 0b100101, 0b1001011]
    # A chain of 64 nodes: node i sees 0..i; node 63's 64 bits are all ones, -1 in two's complement.
    bits = medusa.tree_bits(medusa.Tree.chain(63).buffers())
    assert bits.dtype == torch.int64 and bits[62] == 2**63 - 1 and bits[63] == -1 and bits[5] == 0b111111
    with pytest.raises(ValueError, match="65 nodes"):
        medusa.tree_bits(medusa.Tree.chain(64).buffers())


def test_tree_candidates_follow_the_ranks():
    b = HAND.buffers()
    topk = torch.arange(3 * medusa.TOPK).reshape(3, medusa.TOPK) + 100  # head k rank r -> 100 + 10k + r
    tokens = medusa.tree_candidates(torch.cat([torch.tensor([7]), topk.flatten()]), b)
    assert tokens.tolist() == [7, 100, 101, 110, 111, 110, 120]


def test_parse_and_validate_trees():
    assert medusa.parse_tree("0; 1 ;0.0;0.1").paths == ((0,), (1,), (0, 0), (0, 1))
    assert medusa.parse_tree(HAND.spec()) == HAND
    for bad, message in [("0.0", "no parent"), ("0;x", "cannot read"), ("0;12", "ranks must be"), (";", "no paths")]:
        with pytest.raises(ValueError, match=message):
            medusa.parse_tree(bad)
    assert medusa.Tree.chain(3).paths == ((0,), (0, 0), (0, 0, 0))


def test_greedy_tree_by_hand():
    # chances: (0) .6, (1) .2, (0,0) .6*.5 = .3, (0,1) .06, (1,0) .1, (1,1) .02
    acc = [[0.6, 0.2], [0.5, 0.1]]
    assert medusa.greedy_tree(acc, 4).paths == ((0,), (1,), (0, 0))
    assert medusa.greedy_tree(acc, 5).paths == ((0,), (1,), (0, 0), (1, 0))
    assert medusa.greedy_tree(acc, 100).size == 7  # every node there is, and no more
    tree = medusa.default_tree(4, 64)
    assert tree.size == 64 and 2 <= tree.depth <= 4


def test_heads_start_as_the_base_head_and_match_a_float64_loop():
    torch.manual_seed(0)
    lm_head = torch.randn(50, 16)
    heads = medusa.MedusaHeads.from_lm_head(lm_head, 3)
    h = torch.randn(2, 5, 16)
    logits = heads(h)
    assert logits.shape == (3, 2, 5, 50)
    for k in range(3):  # zero residual weights: every head is lm_head at first
        torch.testing.assert_close(logits[k], h @ lm_head.T)
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, 0.3)
    logits = heads(h)
    for k in range(3):
        w, bias, u = (t.double() for t in (heads.weight[k], heads.bias[k], heads.proj[k]))
        x = h.double()
        ref = (x + torch.nn.functional.silu(x @ w.T + bias)) @ u.T
        torch.testing.assert_close(logits[k].double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("vocab", [8192, 50257, 300, 128])
def test_two_pass_topk_is_torch_topk(vocab):
    # Distinct values (a permutation), so the top k and its order are unique.
    logits = torch.stack([torch.randperm(vocab, generator=torch.Generator().manual_seed(s)).float()
                          for s in range(5)])[:, None, :]  # (K, 1, V), as the heads give them
    got = medusa.topk_indices(logits, 10)
    assert got.shape == (5, 1, 10)
    assert torch.equal(got, logits.topk(10, dim=-1).indices)


def test_two_pass_topk_keeps_the_largest_values_under_ties():
    logits = torch.randn(3, 1024).to(torch.bfloat16)  # bf16 rounding makes ties
    got = medusa.topk_indices(logits, 10)
    assert torch.equal(logits.gather(-1, got), logits.topk(10, dim=-1).values)


def test_head_targets_by_hand():
    seq = torch.arange(10, 18)[None]  # (1, 8): tokens 10..17, prompt 10 11 12
    t = medusa.head_targets(seq, n_heads=2, start=3)
    # head 1 at position t wants seq[t + 2], from t = 2 (last prompt token) while t + 2 <= 7
    assert t[0, 0].tolist() == [-1, -1, 14, 15, 16, 17, -1, -1]
    assert t[1, 0].tolist() == [-1, -1, 15, 16, 17, -1, -1, -1]


def test_head_scores_count_ranks():
    logits = torch.tensor([[[0.0, 3.0, 2.0, 1.0]] * 4])  # one head, 4 positions; ranks: token 1, 2, 3, 0
    targets = torch.tensor([[1, 2, 0, -1]])
    hits, counts = medusa.head_counts(logits, targets)
    assert counts.tolist() == [3] and hits[0, :4].tolist() == [1, 1, 0, 1]
    s = medusa.head_scores([0.5], hits, counts)
    assert s.top1 == pytest.approx((1 / 3,)) and s.top5 == pytest.approx((1.0,))


def test_head_losses_ignore_missing_targets():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    targets = torch.tensor([[1, 2, -1, 4, 0], [-1] * 5])
    losses = medusa.head_losses(logits, targets)
    keep = targets[0] >= 0
    torch.testing.assert_close(losses[0], torch.nn.functional.cross_entropy(logits[0][keep], targets[0][keep]))
    assert losses[1].item() == 0.0  # no target at all: 0, not NaN


def _logits_with_argmax(n_nodes, vocab, argmax):
    logits = torch.zeros(n_nodes, vocab)
    for node, token in argmax.items():
        logits[node, token] = 5.0
    return logits


def test_greedy_accept_takes_the_matching_branch():
    b = HAND.buffers()
    tokens = torch.tensor([5, 7, 8, 9, 10, 11, 12])  # node i's token
    # after the root the model wants 7 (node 1 matches), after node 1 it wants 10
    # (node 4 matches, node 3 does not), after node 4 it wants 3: the bonus
    logits = _logits_with_argmax(7, 16, {0: 7, 1: 10, 4: 3, 2: 11, 3: 12})
    acc = medusa.greedy_accept(tokens, logits, b)
    assert (acc.path.item(), acc.n.item(), acc.last.item(), acc.bonus.item()) == (0, 2, 4, 3)
    # nothing matches: only the root is kept, the bonus is the argmax after it
    acc = medusa.greedy_accept(tokens, _logits_with_argmax(7, 16, {0: 2}), b)
    assert (acc.n.item(), acc.last.item(), acc.bonus.item()) == (0, 0, 2)
    # the deepest path accepted entirely: root -> (0) -> (0,0) -> (0,0,0), bonus after node 6
    acc = medusa.greedy_accept(tokens, _logits_with_argmax(7, 16, {0: 7, 1: 9, 3: 12, 6: 1}), b)
    assert (acc.path.item(), acc.n.item(), acc.last.item(), acc.bonus.item()) == (2, 3, 6, 1)


def _log(probs):
    return torch.log(torch.tensor(probs, dtype=torch.float64)).float()


def test_typical_accept_on_made_up_logits():
    # A chain root -> a -> b -> c over 4 tokens, temperature 1, epsilon 0.09, delta 0.3.
    b = medusa.Tree.chain(3).buffers()
    tokens = torch.tensor([0, 1, 2, 3])  # root, then guesses a=1, b=2, c=3
    logits = torch.stack([
        # after the root: H = -(.7 ln .7 + 3 * .1 ln .1) = 0.9405, .3 e^-H = 0.117 > .09,
        # so the floor is .09 and a (p = .1) passes though it is not the argmax
        _log([0.7, 0.1, 0.1, 0.1]),
        # after a: uniform, H = ln 4, .3 e^-H = .075 < .09: b (p = .25) passes
        _log([0.25, 0.25, 0.25, 0.25]),
        # after b: all but certain of token 0 (H ~ 0, floor .09): c (p ~ 2e-9) fails
        torch.tensor([10.0, -10.0, -10.0, -10.0]),
        torch.zeros(4),
    ])
    acc = medusa.typical_accept(tokens, logits, b, temperature=1.0, posterior_threshold=0.09, posterior_alpha=0.3)
    assert (acc.n.item(), acc.last.item()) == (2, 2)
    assert acc.bonus.item() == 0  # sampled after b, where token 0 has all the mass
    # the same candidates under greedy acceptance: a is not the argmax, nothing past the root
    assert medusa.greedy_accept(tokens, logits, b).n.item() == 0
    # a stricter floor rejects a (p = .1 < .15): nothing past the root
    acc = medusa.typical_accept(tokens, logits, b, temperature=1.0, posterior_threshold=0.15, posterior_alpha=0.9)
    assert acc.n.item() == 0


def test_typical_accept_breaks_ties_by_likelihood():
    # Tree (0), (1): both children pass after the root; the likelier one wins,
    # though it is the second path.
    b = medusa.Tree(((0,), (1,))).buffers()
    tokens = torch.tensor([0, 2, 1])  # node 1 guesses token 2 (p .2), node 2 guesses token 1 (p .3)
    logits = torch.stack([_log([0.4, 0.3, 0.2, 0.1]), torch.zeros(4), torch.zeros(4)])
    acc = medusa.typical_accept(tokens, logits, b, temperature=1.0, posterior_threshold=0.09, posterior_alpha=0.3)
    assert (acc.n.item(), acc.last.item()) == (1, 2)


def test_typical_threshold_is_the_reference_formula_on_a_flat_distribution():
    # FasterDecoding/Medusa's evaluate_posterior: min(epsilon, delta * exp(-H)), H = -sum p log(p + 1e-5).
    # Flat over V = 50257: H = -log(1/V + 1e-5), so the threshold is .3 * (1/V + 1e-5)
    # = .3 * (1.98977e-5 + 1e-5) = 8.96932e-6 (under the floor .09) ...
    flat = torch.softmax(torch.zeros(1, 50257), dim=-1)
    limit = medusa.typical_threshold(flat, posterior_threshold=0.09, posterior_alpha=0.3)
    assert limit.item() == pytest.approx(8.96932e-6, rel=1e-4)
    # ... where the exact entropy, log V, gives .3 / V = 5.96932e-6: 1.5026x lower.
    exact = medusa.typical_threshold(flat, posterior_threshold=0.09, posterior_alpha=0.3, entropy_eps=0.0)
    assert exact.item() == pytest.approx(5.96932e-6, rel=1e-4)
    # A certain distribution: H = -log(1 + 1e-5) ~ 0, .3 e^-H = .3 > .09: the floor.
    assert medusa.typical_threshold(torch.tensor([[1.0, 0.0]]), 0.09, 0.3).item() == pytest.approx(0.09)


def test_typical_accept_rejects_what_only_the_exact_entropy_would_accept():
    # After the root, a near-flat distribution over 50257 tokens where the guess (token 7) has
    # logit ln .4 against 0 elsewhere: p = .4 / (50257 - .6) = 7.959e-6, below the reference's
    # threshold 8.969e-6 and above the exact entropy's 5.969e-6 (both within 1e-9 of the flat ones).
    b = medusa.Tree.chain(1).buffers()
    tokens = torch.tensor([0, 7])
    logits = torch.zeros(2, 50257)
    logits[0, 7] = math.log(0.4)
    args = dict(temperature=1.0, posterior_threshold=0.09, posterior_alpha=0.3)
    assert medusa.typical_accept(tokens, logits, b, **args).n.item() == 0
    assert medusa.typical_accept(tokens, logits, b, **args, entropy_eps=0.0).n.item() == 1


def test_sample_follows_the_distribution():
    torch.manual_seed(0)
    logits = _log([0.7, 0.2, 0.1]).expand(20_000, 3)
    freq = torch.bincount(medusa.sample(logits, 1.0), minlength=3) / 20_000
    # 20k draws: the standard error of each share is below 0.004
    torch.testing.assert_close(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.02, rtol=0)
    # a low temperature sharpens towards the argmax: p ~ .7^10 / sum
    freq = torch.bincount(medusa.sample(logits, 0.1), minlength=3) / 20_000
    assert freq[0] > 0.99


def test_kv_compaction_matches_decoding_the_path_in_a_line():
    # Verify the hand tree after a prefix, accept the path root -> (1) -> (1,0)
    # (nodes 0, 2, 5, written at slots P, P+2, P+5), compact it, and compare
    # the cache with decoding those three tokens one after another.
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=32, block_size=64)
    model = GPT(cfg).eval()
    b = HAND.buffers()
    prefix = torch.randint(64, (9,))
    tokens = torch.randint(64, (7,))
    P, L = prefix.numel(), 64
    with torch.no_grad():
        kv = decoding.StaticKV(model, L)
        model(prefix[None], input_pos=torch.arange(P))
        cur = torch.tensor([P])
        mask = medusa.tree_mask(b, cur, L)[None, None]
        model(tokens[None], input_pos=cur + b.depth, cache_pos=cur + b.node, mask=mask)
        before = kv.store.clone()
        src, dst = medusa.accepted_slots(cur, torch.tensor([0, 2, 5, 0]))
        assert src.tolist() == [P, P + 2, P + 5, P] and dst.tolist() == [P, P + 1, P + 2, P + 3]
        kv.move(src, dst)

        # GPT.move_cache, layer by layer, on the same starting cache
        reference = GPT(cfg).eval()
        reference.load_state_dict(model.state_dict())
        kv_ref = decoding.StaticKV(reference, L)
        kv_ref.store.copy_(before)
        reference.move_cache(src, dst)

        line = GPT(cfg).eval()
        line.load_state_dict(model.state_dict())
        kv_line = decoding.StaticKV(line, L)
        line(torch.cat([prefix, tokens[[0, 2, 5]]])[None], input_pos=torch.arange(P + 3))
    assert torch.equal(kv.store, kv_ref.store)  # one copy for all layers == move_cache's per-layer copies
    # the accepted path now sits at P..P+2 exactly as if decoded in a line (rounding aside)
    torch.testing.assert_close(kv.store[..., :P + 3, :], kv_line.store[..., :P + 3, :], rtol=1e-5, atol=1e-5)
    # the rejected nodes did not leak into the compacted slots
    assert not torch.allclose(kv.store[..., P + 1, :], before[..., P + 1, :])
