"""Batch-1 decoding loops on one GPT with a static KV cache: vanilla greedy (or
sampled) decoding, Medusa heads with tree verification, speculative decoding
with a small draft model, and prompt-lookup (n-gram) decoding.

    dec = MedusaDecoder(model, heads, tree, max_len=1024, mode="graph")
    tokens = dec.generate(prompt, max_new=256)       # (256,) on the CPU
    dec.steps(), dec.accept_histogram()              # how many tokens each step kept

Every decoder keeps its whole state in fixed-size device tensors: the token
sequence `seq`, `cur` (how many tokens have their K/V in the cache; seq[cur] is
the next token, already chosen but not yet run through the model), and the
acceptance counts. One decoding step is a function of that state with static
shapes and no host synchronization, so it runs eagerly (CPU), captured once in a
CUDA graph and replayed ("graph"), or compiled by torch.compile and then
captured ("compile"). The same mode applies to every method of a comparison.
The host only reads `cur` every few steps to know when to stop. On a GPU the
pieces of a greedy step around the forward (mask, acceptance, bookkeeping, the
heads' top-k) are single Triton kernels (impls/decoding_triton.py; `fused`),
for every method alike.

Attention reads the first `length` slots of the static cache, masked, not all
of them: a step is captured once per cache length in steps of BUCKET slots,
and each run of steps replays the shortest one that holds every slot the run
can write. Attention kernels walk every slot they are given, so without
buckets a verification forward would pay for the cache's full length from the
first token.

The attention of a verification step is SDPA with the tree's (N, length)
mask, or with `tree_attention="tiled"` the split-KV decode kernel of
impls/attention/flash_triton.py with the tree as one int64 of bits per node
(gpt.TreeMask), reading only the slots up to the tree's last
(`tree_attention_why_not` says where it cannot run; `tree_attention_inputs`
gives one layer's inputs both ways, for choosing between them).

Greedy decoding is lossless for every speculative method here: a guessed token
is kept only if it is the base model's own argmax after the tokens before it,
so the output is the vanilla greedy output (up to rounding differences between
a 1-token and an N-token forward, which can flip a near-tie).
"""

from __future__ import annotations

import functools
import math

import torch

from impls import decoding_triton, medusa
from impls.gpt import GPT, TreeMask

MODES = ("eager", "graph", "compile")
TREE_ATTENTION = ("sdpa", "tiled")  # how a step's attention reads the tree: a dense mask, or the decode kernel's bits
WARMUP_STEPS = 3  # calls before a CUDA graph capture: allocator, cuBLAS handles, compilation
BUCKET = 128  # cache lengths a step is captured for: multiples of this, and max_len


class StaticKV:
    """A model's KV cache with every layer's K and V in one tensor.

    GPT.setup_cache gives each layer its own buffers; here they become views of
    one (layers, 2, B, H, L, D) tensor, so compacting the accepted path is one
    gather and one scatter for the whole model instead of four per layer
    (GPT.move_cache does the same copy layer by layer). Each decoder owns one;
    `bind` points the model's layers at it, so several decoders can share a
    model.
    """

    def __init__(self, model: GPT, max_len: int, batch: int = 1):
        model.setup_cache(batch=batch, max_len=max_len)
        self.caches = [block.attn.kv_cache for block in model.transformer.h]
        k = self.caches[0].k
        self.store = torch.zeros((len(self.caches), 2, *k.shape), dtype=k.dtype, device=k.device)
        self.model, self.max_len = model, max_len
        self.attend(max_len)

    def attend(self, length: int) -> None:
        """Make attention see the first `length` slots: every layer's K and V
        become (B, H, length, D) views of the store."""
        assert 0 < length <= self.max_len
        for i, cache in enumerate(self.caches):
            cache.k, cache.v = self.store[i, 0, :, :, :length], self.store[i, 1, :, :, :length]
        self.length = length

    def bind(self) -> None:
        for block, cache in zip(self.model.transformer.h, self.caches):
            block.attn.kv_cache = cache

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy K/V at slots src to slots dst in every layer (gathered first, so overlaps are safe)."""
        self.store[:, :, :, :, dst] = self.store[:, :, :, :, src]


def tree_attention_why_not(model: GPT, tree: medusa.Tree, mode: str = "eager") -> str | None:
    """None if a step of `tree` on `model` can attend through the decode kernel (tree_attention="tiled"), else why not."""
    from impls.attention import flash, flash_triton

    cfg, w = model.config, model.lm_head.weight
    if tree.size > flash_triton.TREE_MAX_Q:
        return f"a tree of {tree.size} nodes: the decode kernel's tree mask holds at most {flash_triton.TREE_MAX_Q}"
    if cfg.pos_encoding == "alibi":
        return "ALiBi's bias needs the dense mask"
    if mode == "compile":
        return "torch.compile does not trace the decode kernel's launch"
    q = torch.empty(1, cfg.n_head, tree.size, cfg.n_embd // cfg.n_head, dtype=w.dtype, device=w.device)
    bits = torch.zeros(tree.size, dtype=torch.int64, device=w.device)
    return flash.supported(q, q, q, tree_bits=bits)


def tree_attention_inputs(model: GPT, tree: medusa.Tree, cur: int, length: int,
                          generator: torch.Generator | None = None) -> tuple:
    """(q, k, v, masks): one layer's attention in a verification step of `tree` at
    cur against a cache of `length` slots, on random inputs of the model's shape
    and dtype; masks maps each of TREE_ATTENTION to the mask gpt.cache_attention
    takes for it, as the decoders build them."""
    cfg, w = model.config, model.lm_head.weight
    H, D, N = cfg.n_head, cfg.n_embd // cfg.n_head, tree.size
    assert cur + N <= length, f"the tree's {N} slots from {cur} do not fit {length}"
    b = tree.buffers(w.device)
    q, k, v = (torch.randn(1, H, n, D, generator=generator).to(w) for n in (N, length, length))
    cur_t = torch.tensor([cur], device=w.device)
    dense = torch.full((N, length), float("-inf"), dtype=w.dtype, device=w.device)
    dense.masked_fill_(medusa.tree_mask(b, cur_t, length), 0.0)
    return q, k, v, {"sdpa": dense[None, None], "tiled": TreeMask(medusa.tree_bits(b), (cur_t + N).to(torch.int32))}


def capture(fn, device: torch.device):
    """Record fn's kernels once in a CUDA graph; return its replay.

    Warm-up runs on a side stream, as torch.cuda.graphs asks, so that lazy
    initialization (cuBLAS workspaces, autotuning, compilation) is not captured.
    """
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(WARMUP_STEPS):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


class DecodeLoop:
    """The host side every decoder shares, here and in impls/hf.py: steps run in
    runs between reads of `cur`, and the tokens and counts read back.

    A subclass sets the state `seq`, `cur`, `hist`, `prompt_len`, `depth`
    (most candidates one step accepts after its root), `width` (slots one step
    writes from cur on), `lengths` (the cache lengths a step is prepared for)
    and, in prepare(), `_runs` (cache length -> one step); and it defines
    prefill().
    """

    name = ""
    temperature = 0.0

    def prefill(self, prompt: torch.Tensor) -> None:
        """Run the prompt (P,) through the model and choose the first new token; resets every counter."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Whatever the steps need before the first decode (a capture, a compilation)."""

    def _pick(self, logits: torch.Tensor) -> torch.Tensor:
        """The next root: argmax, or a sample at the temperature."""
        if self.temperature > 0:
            return medusa.sample(logits, self.temperature)
        return logits.argmax(dim=-1)

    @torch.no_grad()
    def decode(self, max_new: int) -> None:
        """Step until at least max_new tokens follow the prompt.

        Each step keeps between 1 and D + 1 tokens, so after
        ceil(remaining / (D + 1)) steps the target cannot have been passed by
        more than D tokens; `cur` is read (one host sync) only after each such
        run of steps. A run is also cut where it could outgrow the shortest
        cache length that holds it, so that it replays that length's step.
        Vanilla decoding (D = 0) syncs only there.
        """
        if not self._runs:
            raise RuntimeError("call prepare() before decoding")
        done = 1  # prefill chose the first token
        while done < max_new:
            cur = self.prompt_len + done - 1
            length = next(n for n in self.lengths if n >= cur + self.width)  # the last one always holds it
            # The k-th step of a run starts at most (k - 1)(D + 1) slots further on.
            fits = (length - self.width - cur) // (self.depth + 1) + 1
            run = self._runs[length]
            for _ in range(max(1, min(fits, math.ceil((max_new - done) / (self.depth + 1))))):
                run()
            done = int(self.cur.item()) - self.prompt_len + 1

    def generate(self, prompt: torch.Tensor, max_new: int) -> torch.Tensor:
        self.prepare()
        self.prefill(prompt)
        self.decode(max_new)
        return self.tokens(max_new)

    def tokens(self, n: int) -> torch.Tensor:
        """The first n generated tokens (n,), on the CPU."""
        return self.seq[self.prompt_len:self.prompt_len + n].to("cpu", copy=True)  # seq is reused

    def accept_histogram(self) -> list[int]:
        """Steps of the last generation by tokens kept: [steps keeping 1, 2, ..., D + 1]."""
        return self.hist.tolist()

    def steps(self) -> int:
        return sum(self.accept_histogram())


class Decoder(DecodeLoop):
    """State and steps shared by every method on a GPT with a static cache; subclasses define `_step`."""

    def __init__(self, model: GPT, *, max_len: int, tree: medusa.Tree = medusa.Tree(()), mode: str = "eager",
                 temperature: float = 0.0, posterior_threshold: float = 0.09, posterior_alpha: float = 0.3,
                 fused: bool | None = None, tree_attention: str = "sdpa"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        if mode != "eager" and not model.lm_head.weight.is_cuda:
            raise ValueError(f"mode {mode!r} needs a model on a CUDA device; eager runs anywhere")
        self.model, self.mode, self.temperature = model, mode, temperature
        # Typical acceptance (medusa.typical_accept), used when temperature > 0.
        self.posterior_threshold, self.posterior_alpha = posterior_threshold, posterior_alpha
        self.device = model.lm_head.weight.device
        # The tree one step verifies: vanilla's is the root alone, the chain
        # methods' a chain of k guesses, Medusa's the heads' candidates.
        self.tree, self.b = tree, tree.buffers(self.device)
        self.depth = tree.depth  # most candidates one step can accept after its root
        self.width = tree.size  # cache slots one step writes from cur on
        # The step's mask, acceptance and bookkeeping as Triton kernels
        # (impls/decoding_triton.py): by default on a GPU, for greedy decoding,
        # in eager and graph modes (torch.compile fuses the PyTorch version itself).
        can_fuse = decoding_triton.available(self.device) and temperature == 0 and mode != "compile"
        if fused and not can_fuse:
            raise ValueError("fused steps need triton on a GPU (or its interpreter), greedy decoding "
                             "(temperature 0), and a mode other than compile")
        self.fused = can_fuse and self.device.type == "cuda" if fused is None else fused
        if tree_attention not in TREE_ATTENTION:
            raise ValueError(f"tree_attention must be one of {', '.join(TREE_ATTENTION)}, not {tree_attention!r}")
        reason = tree_attention_why_not(model, tree, mode) if tree_attention == "tiled" else None
        if reason:
            raise ValueError(f"tree_attention tiled cannot run here: {reason}")
        self.tree_attention = tree_attention
        if tree_attention == "tiled":
            self._bits = medusa.tree_bits(self.b)  # (N,) int64
        self.max_len = max_len
        self.kv = StaticKV(model, max_len)
        self.kvs = [self.kv]  # every cache a step reads (a draft model has its own)
        # Capturing runs a few steps from slot 1 (see prepare): shorter lengths
        # could not hold them, and a longer one serves the prompts that would use them.
        need = 1 + (WARMUP_STEPS + 1) * (self.depth + 1) + self.width
        if max_len < need:
            raise ValueError(f"max_len {max_len}: the cache cannot hold the steps of a capture, which need {need} slots")
        self.lengths = sorted({min(n, max_len) for n in range(BUCKET, max_len + BUCKET, BUCKET) if n >= need} | {max_len})
        to = dict(device=self.device, dtype=torch.long)
        # Tokens by position. Steps write D + 2 tokens past cur; the margin keeps that in bounds.
        self.seq = torch.zeros(max_len + self.depth + 2, **to)
        self.cur = torch.zeros(1, **to)
        self.hist = torch.zeros(self.depth + 1, **to)  # steps by candidates accepted after the root
        self._one = torch.ones(1, **to)
        self._span = torch.arange(self.depth + 1, **to)  # 0..D
        if self.fused:  # the kernels' inputs and outputs, kept so that a captured step reuses them
            self._ancestors = self.b.ancestors.to(torch.uint8)
            self._valid = self.b.valid.to(torch.uint8)
            self._src, self._dst = torch.zeros(2, self.depth + 1, **to)  # K/V slots to compact
            self._last = torch.zeros(1, **to)  # the last accepted node
            self._root = torch.zeros(1, **to)  # the next root (Medusa points it into its candidates)
        self.prompt_len = 0
        self._runs: dict[int, object] = {}  # cache length -> the step, captured (or not) for it

    # -- the pieces a subclass fills in

    def _step(self) -> None:
        """One decoding step: advance `cur` by the tokens kept, choose the next root."""
        raise NotImplementedError

    def _after_prefill(self, prompt: torch.Tensor, hidden: torch.Tensor) -> None:
        """Extra state a method derives from the prompt (heads' guesses, the draft's cache)."""

    # -- shared

    def _accept(self, tokens: torch.Tensor, logits: torch.Tensor, b: medusa.TreeBuffers) -> medusa.Accepted:
        if self.temperature > 0:
            return medusa.typical_accept(tokens, logits, b, self.temperature, self.posterior_threshold,
                                         self.posterior_alpha)
        return medusa.greedy_accept(tokens, logits, b)

    def _commit(self, path_tokens: torch.Tensor, n: torch.Tensor, bonus: torch.Tensor) -> None:
        """Append path_tokens[:n + 1] (the root and n accepted candidates) and the next root."""
        p = self.cur
        span = self._span[:path_tokens.numel()]
        self.seq[p + span] = path_tokens  # anything past n is overwritten by later steps
        self.seq[p + n + 1] = bonus
        self.hist.index_add_(0, n, self._one)
        self.cur.add_(n + 1)

    def _mask(self) -> torch.Tensor | TreeMask | None:
        """The attention mask of this step's tree at cur, (1, 1, N, length), or its
        bits for the decode kernel; None lets the model build its causal one
        (vanilla and chains on the PyTorch path)."""
        if self.tree_attention == "tiled":
            return TreeMask(self._bits, (self.cur + self.width).to(torch.int32))
        if self.fused:
            return decoding_triton.tree_mask(self._ancestors, self.cur, self.kv.length, self.kv.store.dtype)[None, None]
        if self.b.retrieve.shape[0] == 1:  # the root alone, or one chain: causal, the model's own mask
            return None
        return medusa.tree_mask(self.b, self.cur, self.kv.length)[None, None]

    def _fused_accept(self, tokens: torch.Tensor, logits: torch.Tensor) -> None:
        """Greedy acceptance and _commit as one kernel; fills _src, _dst, _last, _root."""
        decoding_triton.greedy_commit(logits.argmax(dim=-1), tokens, self.b.retrieve, self._valid, self.cur,
                                      self.seq, self.hist, self._src, self._dst, self._last, self._root)

    def _eager_step(self, length: int) -> None:
        self._attend(length)
        self._step()

    def _attend(self, length: int) -> None:
        for kv in self.kvs:
            kv.attend(length)

    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor) -> None:
        """Run the prompt (P,) through the model (eagerly: its length varies) and
        choose the first new token; resets every counter."""
        P = prompt.numel()
        if not 0 < P < self.max_len - self.depth - 1:
            raise ValueError(f"a prompt of {P} tokens does not fit {self.max_len} cache slots with a step of "
                             f"{self.depth + 1} tokens after it")
        self.kv.bind()
        self._attend(self.max_len)
        prompt = prompt.to(self.device)
        self.seq.zero_()
        self.seq[:P] = prompt
        self.hist.zero_()
        logits, _, hidden = self.model(prompt[None], input_pos=torch.arange(P, device=self.device), return_hidden=True)
        self.seq[P] = self._pick(logits[0, -1])
        self.cur.fill_(P)
        self.prompt_len = P
        self._after_prefill(prompt, hidden[0, -1])

    def prepare(self) -> None:
        """Capture (or compile and capture) the step once per cache length;
        eager mode needs nothing.

        Capturing runs a few steps, so it is done on a throwaway one-token
        prompt before the first real prefill. Compiled steps get one length,
        the longest: each length would be a compilation of its own.
        """
        if self._runs:
            return
        if self.mode == "eager":
            self._runs = {n: functools.partial(self._eager_step, n) for n in self.lengths}
            return
        if self.mode == "compile":
            self.lengths = [self.max_len]
        fn = self._step
        if self.mode == "compile":
            fn = torch.compile(fn, fullgraph=True, dynamic=False)
        for n in self.lengths:
            self.prefill(torch.zeros(1, dtype=torch.long, device=self.device))
            self._attend(n)
            with torch.no_grad():
                self._runs[n] = capture(fn, self.device)


class VanillaDecoder(Decoder):
    """Plain autoregressive decoding: one forward of one token per step."""

    name = "vanilla"

    def _step(self):
        p = self.cur
        token = self.seq[p]
        logits, _ = self.model(token[None], input_pos=p, mask=self._mask())
        if self.fused:
            self._fused_accept(token, logits[0])
            return
        self.seq[p + 1] = self._pick(logits[0, -1])
        self.cur.add_(1)  # nothing else to count: every step keeps exactly one token

    def accept_histogram(self) -> list[int]:
        return [int(self.cur.item()) - self.prompt_len]


class MedusaDecoder(Decoder):
    """Medusa: verify a tree of the heads' guesses in one forward pass."""

    name = "medusa"

    def __init__(self, model: GPT, heads: medusa.MedusaHeads, tree: medusa.Tree, *, max_len: int, **kw):
        if tree.depth > heads.n_heads:
            raise ValueError(f"a tree of depth {tree.depth} needs as many heads, not {heads.n_heads}")
        super().__init__(model, max_len=max_len, tree=tree, **kw)
        self.heads = heads
        # The next root, then each head's top-k: what tree_candidates places in the tree.
        self.cand = torch.zeros(1 + heads.n_heads * medusa.TOPK, dtype=torch.long, device=self.device)
        if self.fused:
            self._root = self.cand[:1]  # the acceptance kernel writes the next root straight into it

    def _guess(self, hidden: torch.Tensor) -> None:
        """hidden (1, C) -> the heads' top-k tokens, into cand[1:]."""
        logits = self.heads(hidden.reshape(1, -1)).reshape(self.heads.n_heads, -1)  # (K, V)
        top = self.cand[1:].view(self.heads.n_heads, medusa.TOPK)
        if self.fused and logits.shape[-1] <= decoding_triton.MAX_TOPK_BLOCK:
            decoding_triton.topk_rows(logits, medusa.TOPK, top)
        else:
            top.copy_(medusa.topk_indices(logits, medusa.TOPK))

    def _after_prefill(self, prompt, hidden):
        self.cand[:1] = self.seq[self.cur]
        self._guess(hidden)

    def _step(self):
        p, b = self.cur, self.b
        tokens = medusa.tree_candidates(self.cand, b)  # (N,)
        logits, _, hidden = self.model(tokens[None], input_pos=p + b.depth, cache_pos=p + b.node,
                                       mask=self._mask(), return_hidden=True)
        if self.fused:
            self._fused_accept(tokens, logits[0])
            self.kv.move(self._src, self._dst)
            last = self._last
        else:
            acc = self._accept(tokens, logits[0], b)
            path = b.retrieve[acc.path].reshape(-1)  # (D + 1,) node ids, root first
            self.kv.move(*medusa.accepted_slots(p, path))
            self._commit(tokens[path], acc.n, acc.bonus)
            self.cand[:1] = acc.bonus
            last = acc.last
        self._guess(hidden[0, last])


class _ChainDecoder(Decoder):
    """Speculation along one chain of k guesses, checked by one causal forward
    of k + 1 tokens: the chain sits at consecutive positions, so its K/V land in
    place and nothing needs compacting."""

    def __init__(self, model: GPT, k: int, **kw):
        if k < 1:
            raise ValueError(f"speculation needs at least one guessed token, got k={k}")
        super().__init__(model, tree=medusa.Tree.chain(k), **kw)
        self.k = k

    def _propose(self) -> torch.Tensor:
        """k guessed tokens (k,) to follow seq[cur]."""
        raise NotImplementedError

    def _step(self):
        p = self.cur
        chain = torch.cat([self.seq[p], self._propose()])  # (k + 1,)
        logits, _ = self.model(chain[None], input_pos=p + self._span, mask=self._mask())
        if self.fused:
            self._fused_accept(chain, logits[0])
            return
        acc = self._accept(chain, logits[0], self.b)
        self._commit(chain, acc.n, acc.bonus)


class DraftDecoder(_ChainDecoder):
    """Speculative decoding (Leviathan et al. 2023; Chen et al. 2023) with greedy
    guesses from a small draft model sharing the tokenizer."""

    name = "draft"

    def __init__(self, model: GPT, draft: GPT, k: int = 4, *, max_len: int, **kw):
        self.draft = draft
        self.draft_kv = StaticKV(draft, max_len)
        super().__init__(model, k, max_len=max_len, **kw)
        self.kvs.append(self.draft_kv)
        self._two = torch.arange(-1, 1, device=self.device)

    def _after_prefill(self, prompt, hidden):
        self.draft_kv.bind()
        self.draft(prompt[None], input_pos=torch.arange(prompt.numel(), device=self.device))

    def _propose(self):
        p = self.cur
        # The draft's cache holds every committed position but possibly the last
        # one (when the whole previous chain was accepted, the draft never saw
        # its last guess): feed the last committed token and the root together,
        # a fixed shape whatever was accepted. Rewriting a slot it already had is harmless.
        pos = p + self._two  # (2,) cur - 1, cur
        logits, _ = self.draft(self.seq[pos][None], input_pos=pos)
        guesses = [logits[0, -1].argmax(dim=-1, keepdim=True)]
        for j in range(1, self.k):
            logits, _ = self.draft(guesses[-1][None], input_pos=p + j)
            guesses.append(logits[0, -1].argmax(dim=-1, keepdim=True))
        return torch.cat(guesses)


def lookup_continuation(seq: torch.Tensor, cur: torch.Tensor, k: int, max_ngram: int = 3) -> torch.Tensor:
    """Prompt-lookup guesses (Saxena 2023, "prompt lookup decoding"): find the
    last n tokens seq[cur - n + 1 .. cur] earlier in seq[..cur] and propose the
    k tokens that followed them, trying n = max_ngram first.

    Among matches the most recent one is taken whose continuation is all known
    (ends by cur): in a repeating stretch that is the latest full period. With no
    match the guesses are seq[cur] repeated, which verification simply rejects.
    Static shapes throughout: seq (S,), cur (1,) -> (k,).
    """
    S = seq.numel()
    start = torch.zeros((), dtype=torch.long, device=seq.device)
    found = torch.zeros((), dtype=torch.bool, device=seq.device)
    for n in range(max_ngram, 0, -1):
        tail = seq[(cur - n + 1 + torch.arange(n, device=seq.device)).clamp(min=0)]  # (n,)
        windows = seq.unfold(0, n, 1)  # (S - n + 1, n)
        starts = torch.arange(S - n + 1, device=seq.device)
        hit = (windows == tail).all(dim=1) & (starts + n + k - 1 <= cur) & (cur - n + 1 >= 0)
        latest = (hit.long() * (starts + 1)).max()  # 1 + start of the latest match, 0 if none
        take = ~found & (latest > 0)
        start = torch.where(take, latest - 1 + n, start)  # where its continuation begins
        found = found | (latest > 0)
    guesses = seq[(start + torch.arange(k, device=seq.device)).clamp(max=S - 1)]
    return torch.where(found, guesses, seq[cur].expand(k))


class LookupDecoder(_ChainDecoder):
    """Prompt-lookup decoding: guesses copied from earlier in the text; no extra model."""

    name = "lookup"

    def __init__(self, model: GPT, k: int = 8, max_ngram: int = 3, *, max_len: int, **kw):
        super().__init__(model, k, max_len=max_len, **kw)
        self.max_ngram = max_ngram

    def _propose(self):
        return lookup_continuation(self.seq, self.cur, self.k, self.max_ngram)


@torch.no_grad()
def greedy_continue(model: GPT, prompts: torch.Tensor, n_new: int) -> torch.Tensor:
    """Continue each row of prompts (B, P) greedily by n_new tokens -> (B, P + n_new).

    Batched, eager, with the model's own static cache: the self-distillation data
    for Medusa heads. The cache is removed afterwards.
    """
    B, P = prompts.shape
    model.setup_cache(batch=B, max_len=P + n_new)
    try:
        out = torch.empty(B, P + n_new, dtype=torch.long, device=prompts.device)
        out[:, :P] = prompts
        logits, _ = model(prompts, input_pos=torch.arange(P, device=prompts.device))
        for t in range(P, P + n_new):
            out[:, t] = logits[:, -1].argmax(dim=-1)
            if t + 1 < P + n_new:
                logits, _ = model(out[:, t:t + 1], input_pos=torch.tensor([t], device=prompts.device))
        return out
    finally:
        model.clear_cache()
