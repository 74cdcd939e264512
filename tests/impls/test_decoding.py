"""Tests for impls/decoding.py: every speculative method reproduces vanilla
greedy decoding token for token in fp32, speculation really happens on a
predictable model, and each decoding step is one graph without host syncs."""

import copy

import pytest
import torch

from impls import decoding, gpt, medusa
from impls.gpt import GPT, GPTConfig
from tests.conftest import requires_cuda

V = 48
CFG = GPTConfig(vocab_size=V, n_layer=2, n_head=2, n_embd=32, block_size=160)
MAX_LEN = 192


def _next(x):
    return (5 * x + 3) % V  # a permutation of the vocabulary: 5 is prime to 48


def _stream(n_rows, length, g):
    """Rows following x -> 5x + 3 (mod V), with one token in five replaced at random."""
    x = torch.empty(n_rows, length, dtype=torch.long)
    x[:, 0] = torch.randint(V, (n_rows,), generator=g)
    for t in range(1, length):
        noise = torch.rand(n_rows, generator=g) < 0.2
        x[:, t] = torch.where(noise, torch.randint(V, (n_rows,), generator=g), _next(x[:, t - 1]))
    return x


@pytest.fixture(scope="module")
def trained():
    """A tiny GPT that has learned the map, and heads self-distilled from its greedy output."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = GPT(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        x = _stream(16, 33, g)
        _, loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().requires_grad_(False)
    P = 8
    seq = decoding.greedy_continue(model, _stream(64, P, g), 40)
    hidden = model(seq, return_hidden=True)[2][:, P - 1:-2].reshape(-1, CFG.n_embd)
    targets = medusa.head_targets(seq, 3, start=P)[:, :, P - 1:-2].reshape(3, -1)
    heads = medusa.MedusaHeads.from_lm_head(model.lm_head.weight, 3)
    opt = torch.optim.AdamW(heads.parameters(), lr=1e-2)
    for _ in range(100):
        loss = medusa.head_losses(heads(hidden), targets).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, heads.eval().requires_grad_(False)


def _prompts(n=4, length=12, seed=1):
    return list(_stream(n, length, torch.Generator().manual_seed(seed)))


def _decoders(model, heads, draft, tree=None, **kw):
    tree = tree or medusa.default_tree(heads.n_heads, 32)
    return {
        "medusa": decoding.MedusaDecoder(model, heads, tree, max_len=MAX_LEN, **kw),
        "draft": decoding.DraftDecoder(model, draft, 4, max_len=MAX_LEN, **kw),
        "lookup": decoding.LookupDecoder(model, 6, max_len=MAX_LEN, **kw),
    }


def test_every_method_is_greedy_on_a_random_model():
    # Random weights: the guesses are mostly wrong, which exercises rejection.
    torch.manual_seed(3)
    model = GPT(CFG).eval()
    draft = GPT(GPTConfig(vocab_size=V, n_layer=1, n_head=2, n_embd=16, block_size=160)).eval()
    heads = medusa.MedusaHeads.from_lm_head(model.lm_head.weight, 3)
    with torch.no_grad():
        heads.weight.normal_(0, 0.5)
    vanilla = decoding.VanillaDecoder(model, max_len=MAX_LEN)
    decoders = _decoders(model, heads, draft)
    for prompt in _prompts():
        want = vanilla.generate(prompt, 40)
        assert want.shape == (40,)
        for name, dec in decoders.items():
            assert torch.equal(dec.generate(prompt, 40), want), name


def test_speculation_accepts_on_a_predictable_model_and_stays_greedy(trained):
    model, heads = trained
    vanilla = decoding.VanillaDecoder(model, max_len=MAX_LEN)
    # The draft is a copy of the model: every guess must be accepted.
    decoders = _decoders(model, heads, copy.deepcopy(model))
    kept = {name: [] for name in decoders}
    for prompt in _prompts(n=5):
        want = vanilla.generate(prompt, 64)
        assert vanilla.steps() == 63  # prefill chose the first token
        for name, dec in decoders.items():
            assert torch.equal(dec.generate(prompt, 64), want), name
            kept[name].append(dec.accept_histogram())
    mean = {name: sum(sum((i + 1) * c for i, c in enumerate(h)) for h in hs) / sum(sum(h) for h in hs)
            for name, hs in kept.items()}
    assert mean["draft"] > 4.5, mean  # 5 = the root and all 4 guesses, but the last step may stop short
    assert mean["medusa"] > 2.5, mean  # the heads learned the map's next powers
    assert mean["lookup"] > 2.0, mean  # the map cycles, so the text repeats


@pytest.mark.skipif(decoding.decoding_triton.triton is None, reason="needs triton (its interpreter on the CPU)")
def test_triton_step_kernels_decode_exactly_as_the_pytorch_ops(trained):
    # The fused path (impls/decoding_triton.py) against the PyTorch one: same
    # tokens, same acceptance histogram, for every method. Three prompts of 24
    # tokens (each step runs the kernels through the interpreter on a CPU) hold
    # every kind of step: lookup rejects, keeps part of its guesses and all of them.
    model, heads = trained
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, heads = copy.deepcopy(model).to(dev), copy.deepcopy(heads).to(dev)
    draft = copy.deepcopy(model)
    for fused in (False, True):
        decs = {"vanilla": decoding.VanillaDecoder(model, max_len=MAX_LEN, fused=fused),
                **_decoders(model, heads, draft, fused=fused)}
        got = {name: [(dec.generate(p, 24), dec.accept_histogram()) for p in _prompts(n=3)] for name, dec in decs.items()}
        assert all(dec.fused == fused for dec in decs.values())
        if fused:
            for name in got:
                for (tok, hist), (tok_w, hist_w) in zip(got[name], want[name]):
                    assert torch.equal(tok, tok_w) and hist == hist_w, name
        want = got
    lookup = [sum(col) for col in zip(*(hist for _, hist in got["lookup"]))]
    assert lookup[0] and any(lookup[1:-1]) and lookup[-1], lookup


needs_tree_kernel = pytest.mark.skipif(
    decoding.tree_attention_why_not(GPT(CFG), medusa.default_tree(3, 32)) is not None,
    reason=str(decoding.tree_attention_why_not(GPT(CFG), medusa.default_tree(3, 32))))


@needs_tree_kernel
def test_tree_attention_through_the_decode_kernel_is_sdpa_with_the_tree_mask():
    # One layer's verification attention, both ways, at a cur that puts the tree across key blocks.
    torch.manual_seed(0)
    model = GPT(CFG).eval()
    q, k, v, masks = decoding.tree_attention_inputs(model, medusa.default_tree(3, 32), cur=37, length=128)
    want = gpt.cache_attention(q, k, v, masks["sdpa"])
    got = gpt.cache_attention(q, k, v, masks["tiled"])
    assert (got - want).norm() / want.norm() < 1e-5  # fp32 both ways; a wrong bit moves a row by O(1)


@needs_tree_kernel
def test_tiled_tree_attention_decodes_exactly_as_sdpa(trained):
    # Medusa's verification through the decode kernel (the interpreter on a CPU): same tokens, same
    # acceptance, on the trained model (which accepts guesses, so the tree's branches count) and on a
    # random one (whose every token leans on the whole context, so a wrong slot shows). A 12-node tree,
    # branching and as deep as the 3 heads: the interpreter runs a split-KV combine program per node and head.
    torch.manual_seed(1)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tree = medusa.default_tree(3, 12)
    random = (GPT(CFG).eval(), medusa.MedusaHeads(CFG.n_embd, V, 3).eval())
    for (model, heads), prompts, n, accepts in ((trained, _prompts(n=1), 16, True), (random, _prompts(n=1), 6, False)):
        model, heads = copy.deepcopy(model).to(dev), copy.deepcopy(heads).to(dev)
        sdpa, tiled = (decoding.MedusaDecoder(model, heads, tree, max_len=MAX_LEN, tree_attention=a)
                       for a in ("sdpa", "tiled"))
        for prompt in prompts:
            want = sdpa.generate(prompt, n)
            assert torch.equal(tiled.generate(prompt, n), want)
            assert tiled.accept_histogram() == sdpa.accept_histogram()
        if accepts:
            assert sum(sdpa.accept_histogram()[1:]) > 0  # some step kept a guess: the tree's branches were read


def test_tree_attention_refuses_what_the_kernel_cannot_take():
    model = GPT(CFG)
    assert "at most 64" in decoding.tree_attention_why_not(model, medusa.Tree.chain(64))
    assert "ALiBi" in decoding.tree_attention_why_not(GPT(GPTConfig(**{**CFG.__dict__, "pos_encoding": "alibi"})),
                                                      medusa.Tree.chain(3))
    with pytest.raises(ValueError, match="tree_attention must be one of"):
        decoding.VanillaDecoder(model, max_len=MAX_LEN, tree_attention="flash")
    with pytest.raises(ValueError, match="tree_attention tiled cannot run here: a tree of 65 nodes"):
        decoding.LookupDecoder(model, 64, max_len=MAX_LEN, tree_attention="tiled")


def test_decoders_can_share_a_model(trained):
    model, heads = trained
    vanilla = decoding.VanillaDecoder(model, max_len=MAX_LEN)
    med = decoding.MedusaDecoder(model, heads, medusa.default_tree(3, 16), max_len=MAX_LEN)
    prompt = _prompts(1)[0]
    first = vanilla.generate(prompt, 30)
    assert torch.equal(med.generate(prompt, 30), first)
    assert torch.equal(vanilla.generate(prompt, 30), first)  # its own cache again, not Medusa's


def test_cache_lengths_change_which_slots_are_read_not_the_tokens(trained, monkeypatch):
    model, heads = trained
    prompt = _prompts(1)[0]
    want = decoding.VanillaDecoder(model, max_len=MAX_LEN).generate(prompt, 120)
    monkeypatch.setattr(decoding, "BUCKET", 32)  # lengths 32, 64, ..., 192: a generation crosses several
    decoders = {"vanilla": decoding.VanillaDecoder(model, max_len=MAX_LEN), **_decoders(model, heads, copy.deepcopy(model))}
    for name, dec in decoders.items():
        # 32 slots cannot hold the capture's 4 steps from slot 1 of a 32-node tree
        # (1 + 4 * 4 + 32 slots) or of a 6-token lookup chain (1 + 4 * 7 + 7).
        first = 64 if name in ("medusa", "lookup") else 32
        assert dec.lengths == list(range(first, 193, 32)), name
        dec.prepare()
        used = []
        for n, run in list(dec._runs.items()):
            dec._runs[n] = lambda n=n, run=run: (used.append(n), run())
        # A length too short for a step's slots would index past the cache and raise.
        assert torch.equal(dec.generate(prompt, 120), want), name
        assert used == sorted(used) and len(set(used)) >= 4, (name, sorted(set(used)))
        assert used[0] == dec.lengths[0]


@pytest.mark.parametrize("max_new", [1, 2, 7, 33])
def test_decode_stops_within_one_step_of_the_target(trained, max_new):
    model, heads = trained
    tree = medusa.default_tree(3, 16)
    dec = decoding.MedusaDecoder(model, heads, tree, max_len=MAX_LEN)
    dec.generate(_prompts(1)[0], max_new)
    hist = dec.accept_histogram()
    kept = 1 + sum((i + 1) * c for i, c in enumerate(hist))  # prefill's token + every step's
    assert max_new <= kept <= max_new + tree.depth or (max_new == 1 and kept == 1)
    assert dec.steps() == sum(hist)


def test_lookup_continuation_by_hand():
    #            0  1  2  3  4  5  6  7  8  9 10 11
    seq = torch.tensor([1, 2, 3, 4, 5, 9, 9, 2, 3, 0, 0, 0])
    # the last 3 tokens up to cur=8 are 9 2 3: not seen before; 2 3 is, at 1..2, followed by 4 5
    assert decoding.lookup_continuation(seq, torch.tensor([8]), k=2).tolist() == [4, 5]
    # k=4 needs 4 known tokens after the match (3..6 <= 8): still the match at 1
    assert decoding.lookup_continuation(seq, torch.tensor([8]), k=4).tolist() == [4, 5, 9, 9]
    # k=6 just fits (3..8); k=7 would need position 9, unknown for every match: repeat seq[cur]
    assert decoding.lookup_continuation(seq, torch.tensor([8]), k=6).tolist() == [4, 5, 9, 9, 2, 3]
    assert decoding.lookup_continuation(seq, torch.tensor([8]), k=7).tolist() == [3] * 7
    # the most recent match wins: 7 is at 0 (then 1) and at 2 (then 2)
    seq = torch.tensor([7, 1, 7, 2, 7, 0, 0])
    assert decoding.lookup_continuation(seq, torch.tensor([4]), k=1).tolist() == [2]


def test_greedy_continue_matches_the_batch_one_decoder(trained):
    model, _ = trained
    prompts = torch.stack(_prompts(3))
    out = decoding.greedy_continue(model, prompts, 20)
    assert out.shape == (3, 32) and torch.equal(out[:, :12], prompts)
    vanilla = decoding.VanillaDecoder(model, max_len=MAX_LEN)
    for row, prompt in zip(out, prompts):
        assert torch.equal(row[12:], vanilla.generate(prompt, 20))


def test_sampling_is_reproducible(trained):
    model, heads = trained
    dec = decoding.MedusaDecoder(model, heads, medusa.default_tree(3, 16), max_len=MAX_LEN, temperature=0.8)
    prompt = _prompts(1)[0]
    torch.manual_seed(5)
    a = dec.generate(prompt, 30)
    torch.manual_seed(5)
    b = dec.generate(prompt, 30)
    assert torch.equal(a, b) and a.max() < V and a.min() >= 0


def test_every_step_is_one_graph_without_host_syncs(trained):
    # What CUDA-graph capture needs, checked on the CPU: dynamo traces each
    # step as a single graph (fullgraph) only if nothing reads a tensor on the
    # host (.item(), a 0-d tensor as an index, data-dependent shapes or branches).
    model, heads = trained
    draft = GPT(GPTConfig(vocab_size=V, n_layer=1, n_head=2, n_embd=16, block_size=160)).eval()
    decoders = [decoding.VanillaDecoder(model, max_len=MAX_LEN), *_decoders(model, heads, draft).values(),
                decoding.MedusaDecoder(model, heads, medusa.default_tree(3, 16), max_len=MAX_LEN, temperature=0.7)]
    for dec in decoders:
        dec.prefill(_prompts(1)[0])
        torch._dynamo.reset()
        step = torch.compile(dec._step, backend="eager", fullgraph=True)
        with torch.no_grad():
            step()
        assert dec.cur.item() > 12, type(dec).__name__


@requires_cuda
@pytest.mark.parametrize("mode", ["graph", "compile"])
def test_cuda_modes_match_eager(trained, mode):
    model, heads = trained
    model, heads = model.cuda(), heads.cuda()
    draft = GPT(GPTConfig(vocab_size=V, n_layer=1, n_head=2, n_embd=16, block_size=160)).cuda().eval()
    eager = {"vanilla": decoding.VanillaDecoder(model, max_len=MAX_LEN), **_decoders(model, heads, draft)}
    fast = {"vanilla": decoding.VanillaDecoder(model, max_len=MAX_LEN, mode=mode),
            **_decoders(model, heads, draft, mode=mode)}
    for prompt in _prompts():
        prompt = prompt.cuda()
        for name in eager:
            want = eager[name].generate(prompt, 120)  # crosses cache lengths 128 -> 192
            fast[name].prepare()
            fast[name].prefill(prompt)
            fast[name].decode(120)
            assert torch.equal(fast[name].tokens(120), want), (mode, name)
            assert fast[name].accept_histogram() == eager[name].accept_histogram(), (mode, name)


@requires_cuda
def test_cuda_graph_tiled_tree_attention_matches_eager_sdpa(trained):
    # The decode kernel inside a captured step (the launch and its split buffers recorded once, cur read on
    # the device) keeps Medusa's tokens and acceptance, across cache lengths.
    model, heads = (m.cuda() for m in trained)
    tree = medusa.default_tree(3, 32)
    eager = decoding.MedusaDecoder(model, heads, tree, max_len=MAX_LEN)
    graph = decoding.MedusaDecoder(model, heads, tree, max_len=MAX_LEN, mode="graph", tree_attention="tiled")
    for prompt in _prompts():
        want = eager.generate(prompt.cuda(), 120)  # crosses cache lengths 128 -> 192
        assert torch.equal(graph.generate(prompt.cuda(), 120), want)
        assert graph.accept_histogram() == eager.accept_histogram()
