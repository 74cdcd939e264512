"""Triton kernels for the small pieces of a batch-1 decoding step.

At batch 1 a decoding step of a small GPT is latency-bound: hundreds of
kernels of a few microseconds each, captured in a CUDA graph. Around the
model's forward, a Medusa step runs about 30 more small PyTorch kernels (tree
mask, acceptance, commit, top-k of the heads; tools/medusa_step_costs.py
measures their share). Here each of those pieces is one kernel:

    tree_mask(ancestors, cur, length, dtype)   # (N, length) additive attention mask
    greedy_commit(pred, tokens, retrieve, valid, cur, seq, hist, src, dst, last, root)
                                               # accept the longest greedy path and append it
    topk_rows(x, k, out)                       # the k best indices of each row, best first

The same kernels serve every greedy decoder (vanilla and the chain methods are
trees too: one node, or a chain of k), so every method gets the same care. The
PyTorch versions in impls/medusa.py and impls/decoding.py stay the reference and
the path on CPUs, for sampling and under torch.compile; tests/impls/
test_decoding_triton.py checks these against them through Triton's interpreter
(TRITON_INTERPRET=1, set before triton is imported).
"""

from __future__ import annotations


import torch

from impls.triton_import import INTERPRET, TRITON_ERROR, tl, triton

MAX_TOPK_BLOCK = 16384  # a row of topk_rows lives in registers: vocabularies up to this size


def available(device: torch.device) -> bool:
    """Whether these kernels can run on `device`: a CUDA GPU, or any tensor under the interpreter."""
    return triton is not None and (torch.device(device).type == "cuda" or INTERPRET)


if triton is not None:

    @triton.jit
    def _tree_mask_kernel(anc_ptr, cur_ptr, out_ptr, L, N, BLOCK_L: tl.constexpr):
        # Row i of the mask: 0 where node i may look (the prefix below cur, its
        # ancestors' slots cur + j and its own), -inf elsewhere.
        i = tl.program_id(0)
        s = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
        cur = tl.load(cur_ptr)
        rel = s - cur
        in_tree = (rel >= 0) & (rel < N) & (s < L)
        anc = tl.load(anc_ptr + i * N + rel, mask=in_tree, other=0)
        seen = (s < cur) | (anc != 0)
        value = tl.where(seen, 0.0, float("-inf"))
        tl.store(out_ptr + i * L + s, value.to(out_ptr.dtype.element_ty), mask=s < L)

    @triton.jit
    def _greedy_commit_kernel(pred_ptr, tok_ptr, retrieve_ptr, valid_ptr, cur_ptr, seq_ptr, hist_ptr,
                              src_ptr, dst_ptr, last_ptr, root_ptr, P, D1,
                              BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
        # One program. Rows are the tree's root-to-leaf paths, columns depths 0..D.
        row = tl.arange(0, BLOCK_P)
        col = tl.arange(0, BLOCK_D)
        r, d = row[:, None], col[None, :]
        inside = (r < P) & (d < D1)
        node = tl.load(retrieve_ptr + r * D1 + d, mask=inside, other=0)
        parent = tl.load(retrieve_ptr + r * D1 + d - 1, mask=inside & (d >= 1), other=0)
        valid = tl.load(valid_ptr + r * D1 + d, mask=inside, other=0)
        # A candidate is right when it is the base model's argmax after its parent.
        hit = (tl.load(tok_ptr + node) == tl.load(pred_ptr + parent)) & (valid != 0) & inside
        first_miss = tl.min(tl.where(hit | (d == 0), BLOCK_D, d), axis=1)  # (BLOCK_P,) padding counts as a miss
        run = tl.where(row < P, tl.minimum(first_miss, BLOCK_D) - 1, -1)  # candidates accepted on each path
        n = tl.max(run, axis=0)
        path = tl.min(tl.where(run == n, row, BLOCK_P), axis=0)  # the first longest path, as torch.argmax
        nodes = tl.sum(tl.where(r == path, node, 0), axis=0)  # (BLOCK_D,) its node ids, root first
        last = tl.sum(tl.where(col == n, nodes, 0), axis=0)
        bonus = tl.load(pred_ptr + last)  # the base model's token after the last accepted node: the next root
        cur = tl.load(cur_ptr)
        in_path = col < D1
        tl.store(src_ptr + col, cur + nodes, mask=in_path)
        tl.store(dst_ptr + col, cur + col, mask=in_path)
        tokens = tl.load(tok_ptr + nodes, mask=in_path, other=0)
        tl.store(seq_ptr + cur + col, tl.where(col == n + 1, bonus, tokens), mask=col <= n + 1)
        tl.store(last_ptr, last)
        tl.store(root_ptr, bonus)
        # Every thread has read cur (and may still be storing at offsets from it)
        # before the one that owns cur and hist updates them.
        tl.debug_barrier()
        tl.store(hist_ptr + n, tl.load(hist_ptr + n) + 1)
        tl.store(cur_ptr, cur + n + 1)

    @triton.jit
    def _topk_rows_kernel(x_ptr, out_ptr, V, stride_x, stride_out, K: tl.constexpr, BLOCK: tl.constexpr):
        # The whole row in registers; K rounds of max, lowest index among ties, then masked out.
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_x + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        for i in tl.static_range(K):
            best = tl.max(x, axis=0)
            idx = tl.minimum(tl.min(tl.where(x == best, offs, BLOCK), axis=0), V - 1)  # NaN rows stay in range
            tl.store(out_ptr + row * stride_out + i, idx.to(out_ptr.dtype.element_ty))
            x = tl.where(offs == idx, float("-inf"), x)


def tree_mask(ancestors: torch.Tensor, cur: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """(N, length) additive mask: row i is 0 on the slots below cur and on
    cur + j for each ancestor j of node i (itself included), -inf elsewhere.

    ancestors (N, N) uint8, cur (1,) on the device. The additive form of
    impls.medusa.tree_mask, which GPT.forward would otherwise convert.
    """
    N = ancestors.shape[0]
    out = torch.empty(N, length, dtype=dtype, device=ancestors.device)
    block = min(1024, triton.next_power_of_2(length))
    _tree_mask_kernel[(N, triton.cdiv(length, block))](ancestors, cur, out, length, N, BLOCK_L=block, num_warps=4)
    return out


def greedy_commit(pred, tokens, retrieve, valid, cur, seq, hist, src, dst, last, root) -> None:
    """impls.medusa.greedy_accept followed by Decoder._commit, in one kernel.

    pred (N,): the base model's argmax after each node; tokens (N,): the tree's
    tokens; retrieve (P, D + 1) int64 and valid (P, D + 1) uint8: the tree's
    paths. Appends the accepted path and the next root to seq at cur, counts the
    step in hist and advances cur (all in place); writes the K/V slots to copy
    (src, dst (D + 1,)), the last accepted node (last (1,)) and the next root (root (1,)).
    """
    P, D1 = retrieve.shape
    _greedy_commit_kernel[(1,)](pred, tokens, retrieve, valid, cur, seq, hist, src, dst, last, root, P, D1,
                                BLOCK_P=max(2, triton.next_power_of_2(P)),
                                BLOCK_D=max(2, triton.next_power_of_2(D1 + 1)), num_warps=1)


def topk_rows(x: torch.Tensor, k: int, out: torch.Tensor) -> torch.Tensor:
    """The indices of the k largest entries of each row of x (R, V), best first, into out (R, >= k)."""
    R, V = x.shape
    block = triton.next_power_of_2(V)
    if block > MAX_TOPK_BLOCK or k > V:
        raise ValueError(f"topk_rows takes k <= V <= {MAX_TOPK_BLOCK}, got k={k}, V={V}")
    if x.stride(1) != 1 or out.stride(1) != 1:
        raise ValueError("topk_rows needs rows stored contiguously (stride 1 along them)")
    _topk_rows_kernel[(R,)](x, out, V, x.stride(0), out.stride(0), K=k, BLOCK=block,
                            num_warps=8 if block >= 4096 else 4)
    return out
