"""Tests for impls/decoding_triton.py: each kernel against the PyTorch code it
replaces, on the CPU through Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 there) or on a GPU."""

import pytest
import torch

from impls import decoding_triton as dt
from impls import medusa

# On a GPU every test runs the kernels there: all belong to the GPU selection (-m gpu).
pytestmark = [pytest.mark.skipif(dt.triton is None, reason=dt.TRITON_ERROR or ""), pytest.mark.gpu]
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TREES = {
    "root": medusa.Tree(()),  # vanilla
    "chain": medusa.Tree.chain(4),  # draft and lookup
    "hand": medusa.Tree(((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0))),
    "default": medusa.default_tree(4, 64),
}


@pytest.mark.parametrize("tree", TREES)
@pytest.mark.parametrize("cur,length", [(0, 64), (3, 64), (100, 1000), (57, 128)])
def test_tree_mask_is_the_additive_form_of_the_bool_one(tree, cur, length):
    b = TREES[tree].buffers(DEV)
    length = max(length, cur + TREES[tree].size)  # the tree fits, as the decoders ensure
    want = medusa.tree_mask(b, torch.tensor([cur], device=DEV), length)
    got = dt.tree_mask(b.ancestors.to(torch.uint8), torch.tensor([cur], device=DEV), length, torch.float32)
    assert got.shape == want.shape
    assert torch.equal(got == 0, want) and torch.equal(got == float("-inf"), ~want)


def _reference_commit(pred, tokens, b, cur, seq, hist):
    """greedy_accept and Decoder._commit as the PyTorch path runs them."""
    acc = medusa.greedy_accept(tokens, torch.nn.functional.one_hot(pred, 50).float(), b)
    path = b.retrieve[acc.path].reshape(-1)
    src, dst = medusa.accepted_slots(cur, path)
    n = int(acc.n)
    p = int(cur)
    seq[p:p + n + 1] = tokens[path][:n + 1]
    seq[p + n + 1] = acc.bonus
    hist[n] += 1
    return src, dst, acc.last, acc.bonus, p + n + 1


@pytest.mark.parametrize("tree", TREES)
def test_greedy_commit_matches_accept_then_commit(tree):
    t = TREES[tree]
    b = t.buffers(DEV)
    D1, N = t.depth + 1, t.size
    g = torch.Generator().manual_seed(0)
    lengths = set()
    for trial in range(40):
        # Tokens from a small alphabet on odd trials, so that predictions often
        # agree with a child, a large one on even trials, so that they rarely do:
        # paths of every length get accepted, from none to the whole depth.
        alphabet = 3 if trial % 2 else 50
        tokens = torch.randint(0, alphabet, (N,), generator=g)
        pred = torch.randint(0, alphabet, (N,), generator=g)
        if trial % 5 == 1 and t.paths:  # force the first leaf's path to be fully accepted
            nodes = b.retrieve[0][b.valid[0]].cpu()
            pred[nodes[:-1]] = tokens[nodes[1:]]
        tokens, pred = tokens.to(DEV), pred.to(DEV)
        start = int(torch.randint(0, 20, (1,), generator=g))
        seq0 = torch.randint(100, 200, (64,), generator=g).to(DEV)
        hist0 = torch.randint(0, 5, (D1,), generator=g).to(DEV)
        cur = torch.tensor([start], device=DEV)

        seq_w, hist_w = seq0.clone(), hist0.clone()
        src_w, dst_w, last_w, bonus_w, cur_w = _reference_commit(pred, tokens, b, cur, seq_w, hist_w)

        seq, hist, cur_g = seq0.clone(), hist0.clone(), cur.clone()
        src, dst, last, root = (torch.full((k,), -1, device=DEV) for k in (D1, D1, 1, 1))
        dt.greedy_commit(pred, tokens, b.retrieve, b.valid.to(torch.uint8), cur_g, seq, hist, src, dst, last, root)
        n = cur_w - start - 1
        lengths.add(n)
        assert int(cur_g) == cur_w, trial
        assert torch.equal(hist, hist_w), trial
        assert torch.equal(seq[:start + n + 2], seq_w[:start + n + 2]), trial  # what the step keeps
        assert torch.equal(seq[start + D1 + 1:], seq0[start + D1 + 1:]), trial  # nothing written past the tree
        assert torch.equal(src, src_w) and torch.equal(dst, dst_w), trial
        assert int(last) == int(last_w) and int(root) == int(bonus_w), trial
    assert max(lengths) == t.depth and min(lengths) == 0, lengths  # both ends were exercised


@pytest.mark.parametrize("V", [8192, 1000, 10])
def test_topk_rows_matches_torch_topk(V):
    g = torch.Generator().manual_seed(V)
    x = torch.randperm(5 * V, generator=g).reshape(5, V).float().to(DEV)  # distinct values: no ties to break
    out = torch.zeros(5, 12, dtype=torch.long, device=DEV)
    dt.topk_rows(x.to(torch.bfloat16 if V == 10 else torch.float32), 10, out)
    assert torch.equal(out[:, :10], x.topk(10, dim=-1).indices)
    assert not out[:, 10:].any()  # only the first k columns are written


def test_topk_rows_takes_the_lowest_index_among_ties():
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]], device=DEV)
    out = torch.zeros(1, 4, dtype=torch.long, device=DEV)
    assert dt.topk_rows(x, 4, out).tolist() == [[1, 2, 4, 3]]
