"""Medusa: extra decoding heads that guess several tokens ahead, and the tree
that checks those guesses in one forward pass (Cai et al. 2024, "Medusa: Simple
LLM Inference Acceleration Framework with Multiple Decoding Heads").

    heads = MedusaHeads.from_lm_head(model.lm_head.weight[:model.config.vocab_size], n_heads=4)
    logits = heads(hidden)                    # (C,)... -> (K, ..., V): head k guesses token t+k+2

    tree = default_tree(n_heads=4, size=64)   # or greedy_tree(measured_rank_accuracy, 64), parse_tree("0;1;0.0")
    b = tree.buffers(device)
    tokens = tree_candidates(torch.cat([root, head_topk.flatten()]), b)   # (N,) the tree's tokens
    mask = tree_mask(b, cur_len, max_len)                 # (N, max_len) who sees whom
    bits = tree_bits(b)                                   # (N,) int64: the same, for the decode kernel
    logits, _, hidden = model(tokens[None], input_pos=cur_len + b.depth,
                              cache_pos=cur_len + b.node, mask=mask[None, None], return_hidden=True)
    acc = greedy_accept(tokens, logits[0], b)             # or typical_accept(...) when sampling
    src, dst = accepted_slots(cur_len, b.retrieve[acc.path])   # compact the K/V of the accepted path

Positions t are counted as in the paper: the base model's own head reads the
hidden state at t and predicts t+1; Medusa head k (k = 1..K) reads the same
hidden state and predicts t+k+1. In code the heads are indexed from 0, so
`logits[k]` predicts t+k+2.

A tree is a set of paths of ranks: the path (0, 2) is "head 1's best token,
then head 2's third best". Every node's tokens come from the root (the base
model's next token) and the heads' top-k; one forward pass scores them all, with
each node attending to the prefix and its own ancestors only. Everything here
has static shapes and no host synchronization, so a whole decoding step can be
captured in a CUDA graph.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

TOPK = 10  # ranks a tree may use from each head; every step takes this many per head
DEFAULT_TREE_SIZE = 64  # nodes with the root, as in the paper's 64-token sparse trees


class MedusaHeads(nn.Module):
    """K Medusa heads: head k maps the last hidden state h (after ln_f) to
    logits for the token k+1 places after the base model's next token.

    Each head is one residual SiLU block and a projection to the vocabulary,
    h_k = h + SiLU(W_k h + b_k), logits_k = U_k h_k (Medusa-1, section 2.1.1).
    The K heads' weights are stacked so that all of them run as two batched
    matmuls, whatever K is.
    """

    def __init__(self, n_embd: int, vocab_size: int, n_heads: int):
        super().__init__()
        if n_heads < 1:
            raise ValueError(f"Medusa needs at least one head, got {n_heads}")
        self.n_heads, self.n_embd, self.vocab_size = n_heads, n_embd, vocab_size
        # Zero residual weights: every head starts as the identity followed by
        # its projection, i.e. (with U_k copied from lm_head) as the base
        # model's next-token head, which the paper reports trains faster.
        self.weight = nn.Parameter(torch.zeros(n_heads, n_embd, n_embd))  # (K, C_out, C_in)
        self.bias = nn.Parameter(torch.zeros(n_heads, n_embd))  # (K, C)
        self.proj = nn.Parameter(torch.empty(n_heads, vocab_size, n_embd))  # (K, V, C)
        nn.init.normal_(self.proj, mean=0.0, std=0.02)

    @classmethod
    def from_lm_head(cls, lm_head_weight: torch.Tensor, n_heads: int) -> "MedusaHeads":
        """Heads whose projections start as copies of the base model's lm_head (V, C): the
        rows of the real vocabulary, without a padded GPT's extra rows."""
        vocab_size, n_embd = lm_head_weight.shape
        heads = cls(n_embd, vocab_size, n_heads).to(device=lm_head_weight.device, dtype=lm_head_weight.dtype)
        with torch.no_grad():
            heads.proj.copy_(lm_head_weight.detach()[None].expand(n_heads, -1, -1))
        return heads

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., C) -> logits (K, ..., V)."""
        lead = hidden.shape[:-1]
        x = hidden.reshape(1, -1, self.n_embd).expand(self.n_heads, -1, -1)  # (K, M, C)
        h = x + F.silu(torch.baddbmm(self.bias[:, None, :], x, self.weight.transpose(1, 2)))
        logits = torch.bmm(h, self.proj.transpose(1, 2))  # (K, M, V)
        return logits.view(self.n_heads, *lead, self.vocab_size)


def topk_indices(logits: torch.Tensor, k: int, chunk: int = 128) -> torch.Tensor:
    """Indices of the k largest logits along the last dim, (..., V) -> (..., k), best first.

    In two passes when V splits into chunks: the top k of every chunk, then the
    top k of those. The answer is the same (every overall top-k entry is in its
    chunk's top k), but a decoding step's one (K, V) top-k becomes many short
    ones the GPU runs side by side: torch.topk gives each row a single thread
    block, which leaves a GPU mostly idle for a few long rows.
    """
    V = logits.shape[-1]
    if V % chunk or V // chunk < 2 or chunk < k:
        return logits.topk(k, dim=-1).indices
    lead = logits.shape[:-1]
    part = logits.reshape(*lead, V // chunk, chunk).topk(k, dim=-1)  # (..., V / chunk, k)
    offsets = torch.arange(0, V, chunk, device=logits.device).view(-1, 1)
    values = part.values.reshape(*lead, -1)
    index = (part.indices + offsets).reshape(*lead, -1)
    return index.gather(-1, values.topk(k, dim=-1).indices)


def head_targets(seq: torch.Tensor, n_heads: int, start: int) -> torch.Tensor:
    """Self-distillation targets: seq (B, T) -> (K, B, T), -1 where there is none.

    seq holds prompts (positions < start) continued greedily by the base model
    (positions >= start). Head k at position t is asked for seq[t + k + 2], a
    token the base model itself chose, and only from t = start - 1 on: earlier
    targets would be corpus text, which the base model would not have written.
    """
    B, T = seq.shape
    out = torch.full((n_heads, B, T), -1, dtype=torch.long, device=seq.device)
    for k in range(n_heads):
        ahead = k + 2
        if T - ahead > start - 1:
            out[k, :, start - 1:T - ahead] = seq[:, start - 1 + ahead:]
    return out


@dataclass(frozen=True)
class HeadScores:
    """How well each head predicts its target on held-out sequences."""

    loss: tuple[float, ...]  # cross-entropy per head (nats)
    top1: tuple[float, ...]
    top5: tuple[float, ...]
    rank_accuracy: tuple[tuple[float, ...], ...]  # (K, TOPK): P(target is the head's rank-i token)


def head_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per head: logits (K, ..., V), targets (K, ...) with -1 ignored -> (K,)."""
    K, V = logits.shape[0], logits.shape[-1]
    # Summed and divided by the count (at least 1) rather than averaged, so that
    # a head with no target in a batch gets 0, not NaN.
    return torch.stack([
        F.cross_entropy(logits[k].reshape(-1, V).float(), targets[k].reshape(-1), ignore_index=-1, reduction="sum")
        / (targets[k] >= 0).sum().clamp_min(1)
        for k in range(K)
    ])


def head_counts(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hits per rank (K, TOPK), targets per head (K,)) for accumulating accuracies over batches."""
    K, V = logits.shape[0], logits.shape[-1]
    top = logits.reshape(K, -1, V).topk(min(TOPK, V), dim=-1).indices  # (K, M, TOPK)
    t = targets.reshape(K, -1, 1)
    hits = ((top == t) & (t >= 0)).sum(dim=1)  # (K, TOPK)
    if hits.shape[1] < TOPK:
        hits = F.pad(hits, (0, TOPK - hits.shape[1]))
    return hits, (targets.reshape(K, -1) >= 0).sum(dim=1)


def head_scores(losses: Sequence[float], hits: torch.Tensor, counts: torch.Tensor) -> HeadScores:
    rank = (hits.double() / counts.clamp_min(1)[:, None].double()).tolist()
    return HeadScores(
        loss=tuple(float(x) for x in losses),
        top1=tuple(r[0] for r in rank),
        top5=tuple(sum(r[:5]) for r in rank),
        rank_accuracy=tuple(tuple(r) for r in rank),
    )


# ---------------------------------------------------------------------------
# Trees


@dataclass(frozen=True)
class Tree:
    """A sparse candidate tree: the root plus `paths`, each a tuple of ranks.

    Path (r1, ..., rd) is the node at depth d whose token is head d's rank-rd
    guess, below the node (r1, ..., r(d-1)). Stored breadth-first; every prefix
    of a path is itself a path, so every node has its parent in the tree.
    """

    paths: tuple[tuple[int, ...], ...]

    def __post_init__(self):
        paths = tuple(sorted({tuple(int(r) for r in p) for p in self.paths}, key=lambda p: (len(p), p)))
        object.__setattr__(self, "paths", paths)
        for p in paths:
            if not p:
                raise ValueError("the root is implicit; a path has at least one rank")
            if any(r < 0 or r >= TOPK for r in p):
                raise ValueError(f"path {'.'.join(map(str, p))}: ranks must be in 0..{TOPK - 1}")
            if len(p) > 1 and p[:-1] not in paths:
                raise ValueError(f"path {'.'.join(map(str, p))} has no parent {'.'.join(map(str, p[:-1]))} in the tree")

    @classmethod
    def chain(cls, length: int) -> "Tree":
        """A single path of `length` nodes below the root: draft and lookup proposals."""
        return cls(tuple((0,) * d for d in range(1, length + 1)))

    @property
    def size(self) -> int:
        return len(self.paths) + 1

    @property
    def depth(self) -> int:
        return max((len(p) for p in self.paths), default=0)

    def spec(self) -> str:
        """The text form parse_tree reads back."""
        return ";".join(".".join(map(str, p)) for p in self.paths)

    def buffers(self, device=None) -> "TreeBuffers":
        nodes = [()] + list(self.paths)
        index = {p: i for i, p in enumerate(nodes)}
        N, D = len(nodes), self.depth
        depth = torch.tensor([len(p) for p in nodes])
        # Root first, then head d's rank-r guess sits at 1 + (d-1)*TOPK + r in tree_candidates' list.
        flat = torch.tensor([0] + [1 + (len(p) - 1) * TOPK + p[-1] for p in self.paths])
        ancestors = torch.zeros(N, N, dtype=torch.bool)
        for i, p in enumerate(nodes):
            for d in range(len(p) + 1):
                ancestors[i, index[p[:d]]] = True  # its own ancestors and itself
        children = {p[:-1] for p in self.paths}
        leaves = [p for p in nodes if p not in children]
        retrieve = torch.zeros(len(leaves), D + 1, dtype=torch.long)
        valid = torch.zeros(len(leaves), D + 1, dtype=torch.bool)
        for row, leaf in enumerate(leaves):
            for d in range(len(leaf) + 1):
                retrieve[row, d] = index[leaf[:d]]
                valid[row, d] = True
        # Visibility by slot offset from cur_len, clamped to -1..N and shifted by one:
        # column 0 is the prefix (always seen), columns 1..N the tree, N + 1 what lies beyond.
        visible = torch.cat([torch.ones(N, 1, dtype=torch.bool), ancestors, torch.zeros(N, 1, dtype=torch.bool)], dim=1)
        to = dict(device=device)
        return TreeBuffers(
            flat_index=flat.to(**to), depth=depth.to(**to), node=torch.arange(N, **to),
            ancestors=ancestors.to(**to), visible=visible.to(**to), retrieve=retrieve.to(**to), valid=valid.to(**to),
        )


@dataclass(frozen=True)
class TreeBuffers:
    """A tree as tensors. N nodes (root = 0), P root-to-leaf paths, D = depth."""

    flat_index: torch.Tensor  # (N,) where each node's token is in cat([root], head_topk.flatten())
    depth: torch.Tensor  # (N,) the position offset: the node's token sits at cur_len + depth
    node: torch.Tensor  # (N,) 0..N-1: the cache slot offset the node's K/V are written to
    ancestors: torch.Tensor  # (N, N) bool: node i attends to node j
    visible: torch.Tensor  # (N, N + 2) the same, padded for tree_mask's lookup
    retrieve: torch.Tensor  # (P, D + 1) node ids along each path, padded with 0
    valid: torch.Tensor  # (P, D + 1) bool: which of those are real


def parse_tree(text: str) -> Tree:
    """'0;1;0.0;0.1' -> Tree: paths of ranks separated by ';', ranks within a path by '.'."""
    paths = []
    for part in text.replace(",", ";").split(";"):
        part = part.strip()
        if not part:
            continue
        try:
            paths.append(tuple(int(r) for r in part.split(".")))
        except ValueError:
            raise ValueError(f"cannot read tree path {part!r}: ranks are integers joined by '.', e.g. 0.1.0") from None
    if not paths:
        raise ValueError("the tree has no paths (example: 0;1;0.0)")
    return Tree(tuple(paths))


def greedy_tree(rank_accuracy: Sequence[Sequence[float]], size: int) -> Tree:
    """The tree of `size` nodes (root included) with the most expected accepted tokens.

    As in Medusa's sparse-tree construction (section 2.1.2): a node's chance of
    being accepted is estimated as the product of its ranks' accuracies along
    its path, assuming the heads are independent, and the expected number of
    accepted tokens is the sum of those chances over the tree's nodes. Adding
    nodes best-first maximizes that sum: a child's chance is never above its
    parent's, so parents are always taken before their children.
    rank_accuracy[k][r]: how often head k's rank-r token is the right one.
    """
    if size < 1:
        raise ValueError(f"a tree has at least its root: size must be >= 1, got {size}")
    K = len(rank_accuracy)
    frontier = [(-float(rank_accuracy[0][r]), (r,)) for r in range(len(rank_accuracy[0]))] if K else []
    heapq.heapify(frontier)
    paths = []
    while frontier and len(paths) < size - 1:
        neg, path = heapq.heappop(frontier)
        paths.append(path)
        d = len(path)
        if d < K:
            for r, acc in enumerate(rank_accuracy[d]):
                heapq.heappush(frontier, (neg * float(acc), path + (r,)))
    return Tree(tuple(paths))


def prior_rank_accuracy(n_heads: int) -> list[list[float]]:
    """A stand-in for measured accuracies, for the default tree.

    Head 1 right at rank 1 six times in ten, each further head 0.8 times as
    often, and half of each head's misses spread over ranks 2..10, falling
    geometrically: close to the top-1 and top-5 accuracies the Medusa paper
    plots for its heads (figure 4), and no data needed.
    """
    table = []
    for k in range(n_heads):
        top1 = 0.6 * 0.8**k
        tail = [0.6**i for i in range(TOPK - 1)]
        scale = 0.5 * (1 - top1) / sum(tail)
        table.append([top1] + [scale * t for t in tail])
    return table


def default_tree(n_heads: int, size: int = DEFAULT_TREE_SIZE) -> Tree:
    return greedy_tree(prior_rank_accuracy(n_heads), size)


# ---------------------------------------------------------------------------
# One verification step


def tree_candidates(candidates: torch.Tensor, b: TreeBuffers) -> torch.Tensor:
    """candidates (1 + K * TOPK,): the root, then each head's top-k -> the tree's tokens (N,)."""
    return candidates[b.flat_index]


def tree_mask(b: TreeBuffers, cur_len: torch.Tensor, max_len: int) -> torch.Tensor:
    """(N, max_len) bool: node i sees every slot of the prefix (< cur_len) and
    the slots cur_len + j of its ancestors j; cur_len (1,) may live on the device."""
    N = b.ancestors.shape[0]
    rel = torch.arange(max_len, device=b.ancestors.device) - cur_len  # (L,) slot relative to the tree
    # One gather from a padded table instead of comparisons and masks: fewer
    # small kernels per decoding step.
    return b.visible[:, rel.clamp(-1, N) + 1]


def tree_bits(b: TreeBuffers) -> torch.Tensor:
    """The tree mask as the split-KV decode kernel takes it (flash_triton.Features.tree_bits):
    (N,) int64, bit j of entry i set when node i attends to node j. N <= 64;
    node 63's bit is the int64's sign bit, so the bits are summed as Python
    integers and wrapped to two's complement, not shifted in int64."""
    N = b.ancestors.shape[0]
    if N > 64:
        raise ValueError(f"a tree of {N} nodes does not fit one int64 of bits per node (at most 64)")
    rows = [sum(1 << j for j, seen in enumerate(row) if seen) for row in b.ancestors.tolist()]
    return torch.tensor([r - (1 << 64) if r >= 1 << 63 else r for r in rows], dtype=torch.int64,
                        device=b.ancestors.device)


@dataclass(frozen=True)
class Accepted:
    """The verdict of one step, each a (1,) tensor left on the device.

    (1,) rather than 0-d: indexing with a 0-d integer tensor reads it on the
    host, which would synchronize and break CUDA-graph capture.
    """

    path: torch.Tensor  # which row of retrieve was taken
    n: torch.Tensor  # candidates accepted after the root (0..D)
    last: torch.Tensor  # node id of the last accepted node
    bonus: torch.Tensor  # the base model's token after it: the next step's root


def greedy_accept(tokens: torch.Tensor, logits: torch.Tensor, b: TreeBuffers) -> Accepted:
    """Keep the longest path whose every token is the base model's argmax after
    its parent; the result is exactly what greedy decoding would have produced.

    tokens (N,), logits (N, V): the base model's logits after each node.
    """
    pred = logits.argmax(dim=-1)  # (N,) the greedy token after each node
    cand = tokens[b.retrieve]  # (P, D + 1)
    hit = (cand[:, 1:] == pred[b.retrieve[:, :-1]]) & b.valid[:, 1:]  # (P, D)
    run = hit.long().cumprod(dim=1).sum(dim=1)  # (P,) accepted prefix length
    # Siblings hold distinct tokens, so at most one child matches at each depth:
    # every longest path shares the same accepted nodes.
    path = run.argmax().reshape(1)
    n = run[path]
    last = b.retrieve[path, n]
    return Accepted(path, n, last, pred[last])


def sample(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """One token from softmax(logits / temperature) per row, without a host sync:
    argmax(p / E) with E ~ Exp(1) draws index i with probability p_i."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return (probs / torch.empty_like(probs).exponential_()).argmax(dim=-1)


# The entropy in typical acceptance is the reference implementation's,
# -sum p log(p + 1e-5) (FasterDecoding/Medusa, medusa/model/utils.py,
# evaluate_posterior and get_typical_posterior_mask, commit e2a5d20), so that
# accept lengths compare with its own. On a flat distribution over V tokens
# exp(-H) is then 1/V + 1e-5 rather than 1/V: a threshold 1 + V * 1e-5 times
# the exact entropy's (1.5x at V = 50257), which accepts fewer candidates.
TYPICAL_ENTROPY_EPS = 1e-5


def typical_threshold(probs: torch.Tensor, posterior_threshold: float, posterior_alpha: float,
                      entropy_eps: float = TYPICAL_ENTROPY_EPS) -> torch.Tensor:
    """min(epsilon, delta * exp(-H)) for each row of probs (N, V) -> (N,), with
    H = -sum p log(p + entropy_eps); entropy_eps=0 gives the exact entropy
    (0 log 0 taken as 0)."""
    entropy = -torch.xlogy(probs, probs + entropy_eps).sum(dim=-1)  # (N,)
    return torch.clamp(posterior_alpha * torch.exp(-entropy), max=posterior_threshold)


def typical_accept(tokens: torch.Tensor, logits: torch.Tensor, b: TreeBuffers, temperature: float,
                   posterior_threshold: float, posterior_alpha: float,
                   entropy_eps: float = TYPICAL_ENTROPY_EPS) -> Accepted:
    """Typical acceptance (Medusa section 2.3.1), for sampling at a temperature.

    A candidate x after context c is accepted when the base model gives it
    p(x | c) > min(epsilon, delta * exp(-H(p(. | c)))): a fixed floor epsilon
    (posterior_threshold) lowered to delta (posterior_alpha) times exp(-entropy)
    where the base model is unsure (`typical_threshold`, entropy as the
    reference computes it). The longest accepted prefix wins, ties broken by the
    higher joint probability, as in the reference's default (fast) path. The
    next root is sampled from softmax(logits / temperature) after the last
    accepted node; the reference's default instead takes the argmax there
    (generate_candidates with fast=True), so its output has no randomness.
    """
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (N, V)
    limit = typical_threshold(probs, posterior_threshold, posterior_alpha, entropy_eps)  # (N,)
    parent = b.retrieve[:, :-1]  # (P, D)
    cand = tokens[b.retrieve][:, 1:]  # (P, D)
    p = probs[parent, cand]  # (P, D) the base model's probability of each candidate
    ok = (p > limit[parent]) & b.valid[:, 1:]
    kept = ok.long().cumprod(dim=1)  # (P, D) 1 on the accepted prefix
    run = kept.sum(dim=1)
    loglik = (torch.log(p.clamp_min(1e-30)) * kept).sum(dim=1)
    path = torch.where(run == run.max(), loglik, torch.full_like(loglik, -math.inf)).argmax().reshape(1)
    n = run[path]
    last = b.retrieve[path, n]
    return Accepted(path, n, last, sample(logits[last], temperature))


def accepted_slots(cur_len: torch.Tensor, path_nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cache slots to copy from and to so that the accepted path becomes consecutive.

    The tree's node j was written at slot cur_len + j; the path's d-th node must
    end up at slot cur_len + d, its position. All D + 1 slots of the path are
    moved, accepted or not: those past the accepted length lie beyond the new
    cur_len, where the next step writes before it reads, and a fixed size keeps
    the step free of host synchronization.
    """
    dst = cur_len + torch.arange(path_nodes.numel(), device=path_nodes.device)
    return cur_len + path_nodes, dst
