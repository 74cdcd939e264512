"""FlashAttention kernels for Hopper written in Gluon, Triton's explicit layer: the forward and the backward.

    from impls.attention import flash_gluon
    if flash_gluon.supported(q, k, v) is None:
        o, lse, config = flash_gluon.forward(q, k, v, causal, scale)   # lse in base 2, as flash_triton's
        dk, dv, config = flash_gluon.backward_dkdv(q, k, v, do, lse, delta, causal, scale)
        dq, config = flash_gluon.backward_dq(q, k, v, do, lse, delta, causal, scale)
        dq, dk, dv, config = flash_gluon.backward(q, k, v, do, lse, delta, causal, scale)  # head dim 128
        flash_gluon.describe("dq", config)   # "ws BLOCK_M=128 BLOCK_N=64 stages=3 1 loader warp + ..."

These are the kernels, their launches and their tuner; impls/attention/flash.py's
attention() decides when they run instead of flash_triton.py's. Each launch
returns the configuration it ran (given, or chosen by the tuner).

Why a second forward: the Triton-language kernel in flash_triton.py spends
the sum of its matmul and softmax time on every key block: one instruction
stream does both, Triton 3.6 waits on each async `wgmma` before the softmax,
and no knob of the language changed that (docs/attention-kernels.md). Gluon,
which ships with Triton, exposes warp specialization, mbarriers and async
`wgmma` directly, which is how FlashAttention-3 (Shah et al., 2024,
arXiv:2407.08608) hides the softmax:
- one loader warp issues every TMA copy (Q once, then K and V blocks into a
  ring of shared-memory stages, each stage refilled once both consumers have
  arrived on its "empty" barrier);
- two consumer warpgroups own 64 query rows each. Per key block j each issues
  S_j = Q K_j^T and O += P_{j-1} V_{j-1} back to back, waits for S_j only,
  and computes the softmax of block j while the tensor cores run the P V
  product;
- with "pingpong" the two warpgroups also take turns issuing (two mbarriers
  pass the turn), so one's softmax runs under the other's products.

Layout: one program owns 128 rows of Q of one head. Q, K and V are read through 2-d tensor
descriptors over their storage with the sequence stride as the row stride,
so both contiguous (B, H, S, D) tensors and transposed (B, S, H, D) views
run without a copy: a head's tile starts at row (b*stride_b + h*stride_h) //
stride_s and column (...) % stride_s of that matrix. A block past a head's
last row reads the next head's rows (or zeros past the end of the storage);
those keys are masked to -inf and those query rows are never stored.

The backward's kernels have the same split. dK/dV (`backward_dkdv`): the
loader streams Q and dO blocks past 128 resident key rows, 64 per consumer
warpgroup. dQ (`backward_dq`): K and V blocks stream past 128 resident query
rows, as in the forward. At head dim 128 one kernel does both (`backward`):
the dK/dV program also forms dQ from its dS^T and adds it into an fp32
accumulator by TMA (FlashAttention-3's arrangement), five products a block
where the pair runs seven. delta = rowsum(dO * O) is flash_triton's, and all
read the same base-2 log-sum-exp. No Triton interpreter runs Gluon, so these
kernels are tested on the GPU only (tests/impls/test_flash_gluon.py);
docs/attention-kernels.md has how they were developed and measured.
"""

from __future__ import annotations

import functools

import torch

from impls.attention import ahead, tuning

try:
    import triton
    import triton.language as tl
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from impls.attention import gluon_compat

    GLUON_ERROR: str | None = None
except Exception as exc:  # noqa: BLE001 - any import failure makes the kernel unavailable; supported() says why
    GLUON_ERROR = f"gluon not importable: {type(exc).__name__}: {exc}"

LOG2E = 1.4426950408889634


class Tuner:
    """The fastest of a kernel's configs for each shape key, timed once, then kept
    for the process and on disk (beside Triton's own cache), as triton.autotune
    keeps its choices; the device, the Triton version, the ptxas that assembles
    the kernels and the list of configs are part of the key, so a new list, a
    new GPU or another build of the kernels is timed again.
    """

    def __init__(self, kernel: str):
        self.kernel = kernel
        self.chosen: dict[str, list] = {}  # as on disk: "kernel|device|triton version|key|configs" -> config
        self._memo: dict[tuple, tuple] = {}  # this process's answers, looked up on every call
        self._preferred: dict[tuple, tuple] = {}  # (key, device) -> config shipped by impls/attention/tuning.py
        self._use_disk = True

    def prefer(self, key: tuple, config: tuple, device: str) -> None:
        """Take `config` for `key` on `device` without timing, where it is among the configs asked about."""
        self._preferred.setdefault((key, device), config)

    def forget(self) -> None:
        """Drop every choice, shipped, cached on disk or made in this process: the next pick times again."""
        self.chosen.clear()
        self._memo.clear()
        self._preferred.clear()
        self._use_disk = False

    @staticmethod
    def path() -> str:
        import os
        folder = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
        return os.path.join(folder, "genbench-gluon-tuning.json")

    def pick(self, key: tuple, configs: list, time_ms, device: str = "") -> tuple:
        """The config with the least time_ms(config); one config is returned untimed."""
        import json
        import os
        if len(configs) == 1:
            return configs[0]
        memo = (key, device, tuple(configs))
        if memo in self._memo:
            return self._memo[memo]
        if tuning.untimed():
            return configs[0]
        if self._preferred.get((key, device)) in configs:
            self._memo[memo] = self._preferred[(key, device)]
            return self._memo[memo]
        version = triton.__version__ if GLUON_ERROR is None else "-"
        name = f"{self.kernel}|{device}|triton {version} ptxas {gluon_compat.ptxas()}|{key}|{configs}"
        if name not in self.chosen and self._use_disk:
            try:
                with open(self.path()) as f:
                    self.chosen.update(json.load(f))
            except (OSError, ValueError):
                pass
        if name not in self.chosen:
            if ahead.active():
                raise ahead.Untuned(f"the {self.kernel} kernel's config for {key} is not chosen yet")
            times = {c: time_ms(c) for c in configs}
            self.chosen[name] = list(min(times, key=times.get))
            try:
                os.makedirs(os.path.dirname(self.path()), exist_ok=True)
                tmp = f"{self.path()}.{os.getpid()}"
                with open(tmp, "w") as f:
                    json.dump(self.chosen, f, indent=0)
                os.replace(tmp, self.path())
            except OSError:
                pass  # the choice still holds for this process
        self._memo[memo] = tuple(self.chosen[name])
        return self._memo[memo]

if GLUON_ERROR is None:
    _tma_load = gluon_compat.tma_load  # renamed between Triton releases
    _tma_add = gluon_compat.tma_add  # named from Triton 3.8

    @gluon.jit
    def _origin(offset, stride_s):
        # (row, column) of a head's first element in the 2-d view whose row stride is stride_s.
        return (offset // stride_s).to(gl.int32), (offset % stride_s).to(gl.int32)

    @gluon.jit
    def _load_kv_ring(k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty,
                      k_row, k_col, v_row, v_col, n_blocks, c0):
        # Key blocks 0 .. n_blocks-1 of K and V into a ring of stages, at ring
        # positions c0 .. c0 + n_blocks - 1; a stage is refilled once both
        # consumer warpgroups have arrived on its "empty" barrier.
        STAGES: gl.constexpr = k_smem.shape[0]
        BLOCK_N: gl.constexpr = k_smem.shape[1]
        for j in range(n_blocks):
            st = (c0 + j) % STAGES
            free = (((c0 + j) // STAGES) & 1) ^ 1  # a fresh barrier's "previous" phase counts as complete
            mbarrier.wait(k_empty.index(st), free)
            mbarrier.expect(k_ready.index(st), k_desc.block_type.nbytes)
            _tma_load(k_desc, [k_row + j * BLOCK_N, k_col], k_ready.index(st), k_smem.index(st))
            mbarrier.wait(v_empty.index(st), free)
            mbarrier.expect(v_ready.index(st), v_desc.block_type.nbytes)
            _tma_load(v_desc, [v_row + j * BLOCK_N, v_col], v_ready.index(st), v_smem.index(st))

    @gluon.jit
    def _loader(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty,
                q_row, q_col, k_row, k_col, v_row, v_col, start_m, n_blocks):
        if len(q_smem.shape) == 3:  # 192 rows: three 64-row boxes (a TMA box is a power of 2)
            mbarrier.expect(q_bar, 3 * q_desc.block_type.nbytes)
            for i in gl.static_range(3):
                _tma_load(q_desc, [q_row + start_m + i * 64, q_col], q_bar, q_smem.index(i))
        else:
            mbarrier.expect(q_bar, q_desc.block_type.nbytes)
            _tma_load(q_desc, [q_row + start_m, q_col], q_bar, q_smem)
        _load_kv_ring(k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty,
                      k_row, k_col, v_row, v_col, n_blocks, 0)

    @gluon.jit
    def _consumer(q, row0, my_turn, other_turn, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty,
                  O, LSE, stride_ob, stride_oh, stride_os, b, h, bh, S, start_m, n_blocks, mask_from, qk_scale,
                  causal, pingpong):
        # Partition arguments cannot be constexprs in this Gluon: tile sizes come
        # from the shared-memory shapes, and causal/pingpong are runtime flags.
        # q is this warpgroup's 64-row slice of the Q tile, starting at row0.
        s_layout: gl.constexpr = _mma_layout(k_smem.shape[1])
        rows = start_m + row0 + gl.arange(0, q.shape[0], layout=gl.SliceLayout(1, s_layout))
        mbarrier.wait(q_bar, 0)
        o, m_i, l_i = _attend(q, 0, rows, my_turn, other_turn, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty,
                              S, n_blocks, mask_from, qk_scale, causal, pingpong)
        _store_tile(o, m_i, l_i, rows, O, LSE, stride_ob, stride_oh, stride_os, b, h, bh, S, start_m + row0)

    @gluon.constexpr_function
    def _mma_layout(n):
        # A warpgroup's wgmma accumulator layout for an (m, n) tile.
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, 16])

    @gluon.jit
    def _attend(q, c0, rows, my_turn, other_turn, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty,
                S, n_blocks, mask_from, qk_scale, causal, pingpong):
        # One warpgroup's rows against key blocks 0 .. n_blocks-1, which sit at
        # positions c0 .. c0 + n_blocks - 1 of the K/V ring. Returns the
        # unnormalised output and the running max and sum. The last V stage is
        # not released here: a one-tile program has nothing left to load.
        ROWS: gl.constexpr = q.shape[0]
        HEAD_DIM: gl.constexpr = q.shape[1]
        STAGES: gl.constexpr = k_smem.shape[0]
        BLOCK_N: gl.constexpr = k_smem.shape[1]
        s_layout: gl.constexpr = _mma_layout(BLOCK_N)
        o_layout: gl.constexpr = _mma_layout(HEAD_DIM)
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        m_i = gl.full([ROWS], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([ROWS], gl.float32, gl.SliceLayout(1, s_layout))
        o = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)

        st0 = c0 % STAGES
        mbarrier.wait(k_ready.index(st0), (c0 // STAGES) & 1)
        mbarrier.wait(my_turn, 0, pred=pingpong != 0)
        s_tok = warpgroup_mma(q, k_smem.index(st0).permute((1, 0)),
                              gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout), use_acc=False, is_async=True)
        mbarrier.arrive(other_turn, count=1, pred=pingpong != 0)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s_tok, ))
        mbarrier.arrive(k_empty.index(st0), count=1)
        if mask_from == 0:
            p, alpha, m_i, l_i = _softmax_update(s, m_i, l_i, qk_scale, 0, rows, S, causal, s_layout, True)
        else:
            p, alpha, m_i, l_i = _softmax_update(s, m_i, l_i, qk_scale, 0, rows, S, causal, s_layout, False)
        p_prev = gl.convert_layout(p.to(q.dtype), p_layout)

        for j in range(1, gl.maximum(mask_from, 1)):
            o, m_i, l_i, p_prev = _key_block(j, c0 + j, o, m_i, l_i, p_prev, q, my_turn, other_turn, k_smem, v_smem,
                                             k_ready, v_ready, k_empty, v_empty, qk_scale, rows, S, causal, pingpong,
                                             s_layout, p_layout, False)
        for j in range(gl.maximum(mask_from, 1), n_blocks):
            o, m_i, l_i, p_prev = _key_block(j, c0 + j, o, m_i, l_i, p_prev, q, my_turn, other_turn, k_smem, v_smem,
                                             k_ready, v_ready, k_empty, v_empty, qk_scale, rows, S, causal, pingpong,
                                             s_layout, p_layout, True)
        last = c0 + n_blocks - 1
        mbarrier.wait(v_ready.index(last % STAGES), (last // STAGES) & 1)
        o_tok = warpgroup_mma(p_prev, v_smem.index(last % STAGES), o, is_async=True)
        o = warpgroup_mma_wait(num_outstanding=0, deps=(o_tok, ))
        return o, m_i, l_i

    @gluon.jit
    def _store_tile(o, m_i, l_i, rows, O, LSE, stride_ob, stride_oh, stride_os, b, h, bh, S, first_row):
        # o / l into O (rows first_row .., in O's layout) and the base-2 log-sum-exp into LSE.
        ROWS: gl.constexpr = o.shape[0]
        HEAD_DIM: gl.constexpr = o.shape[1]
        o_layout: gl.constexpr = o.type.layout
        l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
        o = o / l_o[:, None]
        gl.store(LSE + bh.to(gl.int64) * S + rows, m_i + gl.log2(l_i), mask=rows < S)
        o_rows = first_row + gl.arange(0, ROWS, layout=gl.SliceLayout(1, o_layout))
        o_cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        o_ptrs = O + b * stride_ob + h * stride_oh + o_rows[:, None].to(gl.int64) * stride_os + o_cols[None, :]
        gl.store(o_ptrs, o.to(O.dtype.element_ty), mask=o_rows[:, None] < S)

    @gluon.jit
    def _softmax_update(s, m_i, l_i, qk_scale, start_n, rows, S, causal, s_layout: gl.constexpr, MASK: gl.constexpr):
        # One key block's online-softmax update on raw scores s = q k^T (fp32): the
        # block's probabilities against the new running max, the factor alpha that
        # rescales what was summed before, the new max and sum. The causal flag is a
        # run-time value: it only matters in the masked (diagonal and tail) blocks.
        if MASK:
            cols = start_n + gl.arange(0, s.shape[1], layout=gl.SliceLayout(0, s_layout))
            keep = (cols[None, :] < S) & ((cols[None, :] <= rows[:, None]) | (causal == 0))
            s = gl.where(keep, s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s * qk_scale - m_new[:, None])
        l_i = l_i * alpha + gl.sum(p, 1)
        return p, alpha, m_new, l_i

    @gluon.jit
    def _key_block(j, c, o, m_i, l_i, p_prev, q, my_turn, other_turn, k_smem, v_smem, k_ready, v_ready, k_empty,
                   v_empty, qk_scale, rows, S, causal, pingpong, s_layout: gl.constexpr, p_layout: gl.constexpr,
                   MASK: gl.constexpr):
        # Key block j >= 1 for one consumer warpgroup, at position c of the K/V ring.
        ROWS: gl.constexpr = q.shape[0]
        STAGES: gl.constexpr = k_smem.shape[0]
        BLOCK_N: gl.constexpr = k_smem.shape[1]
        st = c % STAGES
        prev = c - 1
        mbarrier.wait(k_ready.index(st), (c // STAGES) & 1)
        mbarrier.wait(v_ready.index(prev % STAGES), (prev // STAGES) & 1)
        mbarrier.wait(my_turn, j & 1, pred=pingpong != 0)
        s_tok = warpgroup_mma(q, k_smem.index(st).permute((1, 0)),
                              gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout), use_acc=False, is_async=True)
        o_tok = warpgroup_mma(p_prev, v_smem.index(prev % STAGES), o, is_async=True)
        mbarrier.arrive(other_turn, count=1, pred=pingpong != 0)
        s = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok, ))
        mbarrier.arrive(k_empty.index(st), count=1)
        p, alpha, m_i, l_i = _softmax_update(s, m_i, l_i, qk_scale, j * BLOCK_N, rows, S, causal, s_layout, MASK)
        o, p_prev = warpgroup_mma_wait(num_outstanding=0, deps=(o_tok, p_prev))
        mbarrier.arrive(v_empty.index(prev % STAGES), count=1)
        o = o * gl.convert_layout(alpha, gl.SliceLayout(1, o.type.layout))[:, None]
        p_new = gl.convert_layout(p.to(q.dtype), p_layout)
        return o, m_i, l_i, p_new

    @gluon.jit
    def _row_block(S, H, GROUP, CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
        # This program's BLOCK_M query rows of one head (heaviest row blocks
        # first when causal), the key blocks they visit, and the first of
        # those that needs a mask (the diagonal, or the partial last block).
        n_m = gl.cdiv(S, BLOCK_M)
        if CAUSAL:
            start_m = (n_m - 1 - gl.program_id(0)) * BLOCK_M
            hi = gl.minimum(start_m + BLOCK_M, S)
            mask_from = start_m // BLOCK_N
        else:
            start_m = gl.program_id(0) * BLOCK_M
            hi = S
            mask_from = S // BLOCK_N
        bh = gl.program_id(1)
        b = (bh // H).to(gl.int64)
        h = (bh % H).to(gl.int64)
        return start_m, bh, b, h, h // GROUP, gl.cdiv(hi, BLOCK_N), mask_from

    @gluon.jit
    def _kv_ring(k_desc, v_desc, STAGES: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                 CONSUMERS: gl.constexpr = 2):
        # The K/V stages and their barriers; "empty" waits for every consumer warpgroup.
        k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
        v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=CONSUMERS)
            mbarrier.init(v_empty.index(i), count=CONSUMERS)
        return k_smem, v_smem, k_ready, v_ready, k_empty, v_empty

    @gluon.jit
    def _fwd_kernel(q_desc, k_desc, v_desc, O, LSE,
                    stride_qb, stride_qh, stride_qs,
                    stride_kb, stride_kh, stride_ks,
                    stride_vb, stride_vh, stride_vs,
                    stride_ob, stride_oh, stride_os,
                    H, GROUP, S, qk_scale,
                    HEAD_DIM: gl.constexpr, CAUSAL: gl.constexpr,
                    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                    PINGPONG: gl.constexpr, CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr):
        # Two consumer warpgroups of 64 rows, or three (BLOCK_M 192, "ws" only).
        gl.static_assert((BLOCK_M == 128) | ((BLOCK_M == 192) & (not PINGPONG)))
        gl.static_assert(num_warps == 4)  # the first consumer; the others and the loader are workers
        start_m, bh, b, h, hk, n_blocks, mask_from = _row_block(S, H, GROUP, CAUSAL, BLOCK_M, BLOCK_N)
        q_row, q_col = _origin(b * stride_qb + h * stride_qh, stride_qs)
        k_row, k_col = _origin(b * stride_kb + hk * stride_kh, stride_ks)
        v_row, v_col = _origin(b * stride_vb + hk * stride_vh, stride_vs)

        if BLOCK_M == 192:  # shapes are powers of 2: the fourth 64-row slice is unused
            q_smem = gl.allocate_shared_memory(q_desc.dtype, [4, 64, HEAD_DIM], q_desc.layout)
        else:
            q_smem = gl.allocate_shared_memory(q_desc.dtype, [BLOCK_M, HEAD_DIM], q_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_smem, v_smem, k_ready, v_ready, k_empty, v_empty = _kv_ring(k_desc, v_desc, STAGES, BLOCK_N, HEAD_DIM,
                                                                      BLOCK_M // 64)
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        mbarrier.init(turn.index(0), count=1)
        mbarrier.init(turn.index(1), count=1)
        mbarrier.arrive(turn.index(0), count=1)  # the first warpgroup issues first

        shared = (k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty,
                  O, LSE, stride_ob, stride_oh, stride_os, b, h, bh, S, start_m, n_blocks, mask_from, qk_scale,
                  CAUSAL * 1, PINGPONG * 1)
        loads = (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty,
                 q_row, q_col, k_row, k_col, v_row, v_col, start_m, n_blocks)
        if BLOCK_M == 192:  # no ping-pong here: the turn barriers are passed but never waited on
            gl.warp_specialize([
                (_consumer, (q_smem.index(0), 0, turn.index(0), turn.index(1)) + shared),
                (_consumer, (q_smem.index(1), 64, turn.index(1), turn.index(0)) + shared),
                (_consumer, (q_smem.index(2), 128, turn.index(1), turn.index(0)) + shared),
                (_loader, loads),
            ], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, 24])
        else:
            gl.warp_specialize([
                (_consumer, (q_smem.slice(0, 64), 0, turn.index(0), turn.index(1)) + shared),
                (_consumer, (q_smem.slice(64, 64), 64, turn.index(1), turn.index(0)) + shared),
                (_loader, loads),
            ], [4, 1], [CONSUMER_REGS, 24])

    # ----------------------------------------------------------------------
    # Persistent forward (non-causal): one program per SM walks the (head,
    # row block) tiles with a stride of the grid, so the last wave is not a
    # partial one (2048 tiles on 132 SMs are 15.5 waves). The K/V ring and its
    # barrier phases carry on from tile to tile; Q is double-buffered, four
    # 64-row slices (buffer, warpgroup), so the next tile's Q loads while the
    # last one's blocks finish.
    # ----------------------------------------------------------------------

    @gluon.jit
    def _persistent_loader(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_empty,
                           k_ready, v_ready, k_empty, v_empty, stride_qb, stride_qh, stride_qs,
                           stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                           H, GROUP, S, n_m, n_tiles):
        ROWS: gl.constexpr = q_smem.shape[1]
        BLOCK_N: gl.constexpr = k_smem.shape[1]
        n_blocks = gl.cdiv(S, BLOCK_N)
        c = 0
        i = 0
        for tile in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
            bh = tile // n_m
            start_m = (tile % n_m) * (2 * ROWS)
            b = (bh // H).to(gl.int64)
            h = (bh % H).to(gl.int64)
            hk = h // GROUP
            q_row, q_col = _origin(b * stride_qb + h * stride_qh, stride_qs)
            k_row, k_col = _origin(b * stride_kb + hk * stride_kh, stride_ks)
            v_row, v_col = _origin(b * stride_vb + hk * stride_vh, stride_vs)
            qb = i % 2
            mbarrier.wait(q_empty.index(qb), ((i // 2) & 1) ^ 1)
            bar = q_ready.index(qb)
            mbarrier.expect(bar, 2 * q_desc.block_type.nbytes)
            _tma_load(q_desc, [q_row + start_m, q_col], bar, q_smem.index(2 * qb))
            _tma_load(q_desc, [q_row + start_m + ROWS, q_col], bar, q_smem.index(2 * qb + 1))
            _load_kv_ring(k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty,
                          k_row, k_col, v_row, v_col, n_blocks, c)
            c += n_blocks
            i += 1

    @gluon.jit
    def _persistent_consumer(wg, q_smem, turn, k_smem, v_smem, q_ready, q_empty, k_ready, v_ready, k_empty, v_empty,
                             O, LSE, stride_ob, stride_oh, stride_os, H, S, n_m, n_tiles, qk_scale):
        ROWS: gl.constexpr = q_smem.shape[1]
        STAGES: gl.constexpr = k_smem.shape[0]
        BLOCK_N: gl.constexpr = k_smem.shape[1]
        s_layout: gl.constexpr = _mma_layout(BLOCK_N)
        n_blocks = gl.cdiv(S, BLOCK_N)
        mask_from = S // BLOCK_N
        c = 0
        i = 0
        for tile in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
            bh = tile // n_m
            first_row = (tile % n_m) * (2 * ROWS) + wg * ROWS
            b = (bh // H).to(gl.int64)
            h = (bh % H).to(gl.int64)
            qb = i % 2
            q = q_smem.index(2 * qb + wg)
            rows = first_row + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
            mbarrier.wait(q_ready.index(qb), (i // 2) & 1)
            o, m_i, l_i = _attend(q, c, rows, turn, turn, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty,
                                  S, n_blocks, mask_from, qk_scale, 0, 0)
            last = c + n_blocks - 1
            mbarrier.arrive(v_empty.index(last % STAGES), count=1)  # the ring goes on into the next tile
            mbarrier.arrive(q_empty.index(qb), count=1)
            _store_tile(o, m_i, l_i, rows, O, LSE, stride_ob, stride_oh, stride_os, b, h, bh, S, first_row)
            c += n_blocks
            i += 1

    @gluon.jit
    def _fwd_persistent_kernel(q_desc, k_desc, v_desc, O, LSE,
                               stride_qb, stride_qh, stride_qs,
                               stride_kb, stride_kh, stride_ks,
                               stride_vb, stride_vh, stride_vs,
                               stride_ob, stride_oh, stride_os,
                               H, GROUP, S, n_tiles, qk_scale,
                               HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                               CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr):
        # grid: (number of SMs or fewer,); n_tiles = cdiv(S, 128) * B * H; q_desc has 64-row blocks.
        gl.static_assert(num_warps == 4)
        gl.static_assert(128 % BLOCK_N == 0)
        n_m = gl.cdiv(S, 128)
        q_smem = gl.allocate_shared_memory(q_desc.dtype, [4, 64, HEAD_DIM], q_desc.layout)
        q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        k_smem, v_smem, k_ready, v_ready, k_empty, v_empty = _kv_ring(k_desc, v_desc, STAGES, BLOCK_N, HEAD_DIM)
        turn = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())  # unused: no ping-pong here
        for i in gl.static_range(2):
            mbarrier.init(q_ready.index(i), count=1)
            mbarrier.init(q_empty.index(i), count=2)
        mbarrier.init(turn, count=1)

        shared = (q_smem, turn, k_smem, v_smem, q_ready, q_empty, k_ready, v_ready, k_empty, v_empty,
                  O, LSE, stride_ob, stride_oh, stride_os, H, S, n_m, n_tiles, qk_scale)
        gl.warp_specialize([
            (_persistent_consumer, (0, ) + shared),
            (_persistent_consumer, (1, ) + shared),
            (_persistent_loader, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_empty,
                                  k_ready, v_ready, k_empty, v_empty, stride_qb, stride_qh, stride_qs,
                                  stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                                  H, GROUP, S, n_m, n_tiles)),
        ], [4, 1], [CONSUMER_REGS, 24])

    # ----------------------------------------------------------------------
    # Backward, dK and dV: one program owns 128 key rows of one kv head (64
    # per consumer warpgroup; K and V resident in shared memory, and at head
    # dim 64 in registers too) and streams the 64-row Q and dO blocks of every
    # query head of its group past them, with their lse and delta, the loader
    # warp keeping a ring of STAGES blocks ahead. Per block each warpgroup
    # issues S^T = K Q^T and dP^T = V dO^T, forms P^T from S^T while dP^T
    # runs, then dS^T = P^T (dP^T - delta). The dK += dS^T Q product of a
    # block is issued with the next block's S^T and dP^T, so it runs while
    # that block's P^T is formed (_dkdv_block); at head dim 64 so is the
    # dV += P^T dO product, and the two warpgroups take turns issuing.
    # ----------------------------------------------------------------------

    @gluon.jit
    def _dkdv_loader(k_desc, v_desc, q_desc, do_desc, lse_desc, delta_desc, k_smem, v_smem, q_smem, do_smem,
                     lse_smem, delta_smem, kv_bar, ready, empty, k_row, k_col, v_row, v_col, start_n, b, hk, H,
                     GROUP, S, LSE_S, stride_qb, stride_qh, stride_qs, stride_db, stride_dh, stride_ds, q_lo, n_q):
        STAGES: gl.constexpr = q_smem.shape[0]
        BLOCK_M: gl.constexpr = q_smem.shape[1]
        stage_bytes: gl.constexpr = (q_desc.block_type.nbytes + do_desc.block_type.nbytes
                                     + lse_desc.block_type.nbytes + delta_desc.block_type.nbytes)
        mbarrier.expect(kv_bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        _tma_load(k_desc, [k_row + start_n, k_col], kv_bar, k_smem)
        _tma_load(v_desc, [v_row + start_n, v_col], kv_bar, v_smem)
        t = 0
        for g in range(GROUP):
            h = hk * GROUP + g
            q_row, q_col = _origin(b * stride_qb + h * stride_qh, stride_qs)
            d_row, d_col = _origin(b * stride_db + h * stride_dh, stride_ds)
            l_row = ((b * H + h) * LSE_S).to(gl.int32)  # lse and delta are flat rows, LSE_S a head
            for i in range(q_lo, n_q):
                st = t % STAGES
                mbarrier.wait(empty.index(st), ((t // STAGES) & 1) ^ 1)
                bar = ready.index(st)
                mbarrier.expect(bar, stage_bytes)
                _tma_load(lse_desc, [l_row + i * BLOCK_M], bar, lse_smem.index(st))
                _tma_load(delta_desc, [l_row + i * BLOCK_M], bar, delta_smem.index(st))
                _tma_load(q_desc, [q_row + i * BLOCK_M, q_col], bar, q_smem.index(st))
                _tma_load(do_desc, [d_row + i * BLOCK_M, d_col], bar, do_smem.index(st))
                t += 1

    @gluon.jit
    def _dkdv_block(t, i, dk, dv, p16_prev, ds16_prev, k, v, q_smem, do_smem, lse_smem, delta_smem, ready, empty,
                    my_turn, other_turn, krows, S, qk_scale, causal, s_layout: gl.constexpr, MASK: gl.constexpr,
                    LSE_LATE):
        # One 64-row query block for one consumer warpgroup's 64 keys. The
        # previous block's dK product (ds16_prev: its dS^T) is issued between
        # this block's S^T and dP^T, and at head dim 64 its dV product too
        # (p16_prev: its P^T), one wait covering all of them; at head dim 128
        # those registers are not there (ptxas spills and serializes the
        # wgmmas: 3.99 ms against 3.53), so dV's product is issued within its
        # block once P^T is formed. A stage is released a block later, hence
        # three stages. lse and delta are read from the stage in the layout of
        # S^T's columns: no exchange between threads, no barrier. LSE_LATE reads
        # lse after S^T's wait rather than before it: with CUDA 13.4's ptxas
        # (Triton 3.9) 4 of the 16 values held across the wait spill at head dim 64,
        # with 12.8's (3.6) the earlier read is 1-3% faster (docs/measurements.md).
        STAGES: gl.constexpr = q_smem.shape[0]
        BLOCK_M: gl.constexpr = q_smem.shape[1]
        ROWS: gl.constexpr = k.shape[0]
        DV_LATE: gl.constexpr = k.shape[1] == 64
        st = t % STAGES
        prev = gl.maximum(t - 1, 0) % STAGES  # at t == 0 p16_prev and ds16_prev are zeros
        qrows = i * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, s_layout))
        mbarrier.wait(ready.index(st), (t // STAGES) & 1)
        q = q_smem.index(st)
        do = do_smem.index(st)
        zero = gl.zeros([ROWS, BLOCK_M], gl.float32, s_layout)
        op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=dv.type.layout, k_width=2)
        if DV_LATE:
            mbarrier.wait(my_turn, t & 1)
        st_tok = warpgroup_mma(k, q.permute((1, 0)), zero, use_acc=False, is_async=True)
        if DV_LATE:
            dv_tok = warpgroup_mma(p16_prev, do_smem.index(prev), dv, is_async=True)
        dk_tok = warpgroup_mma(ds16_prev, q_smem.index(prev), dk, is_async=True)
        dpt_tok = warpgroup_mma(v, do.permute((1, 0)), zero, use_acc=False, is_async=True)
        if DV_LATE:
            mbarrier.arrive(other_turn, count=1)
        if LSE_LATE:
            s_t = warpgroup_mma_wait(num_outstanding=2 + DV_LATE, deps=(st_tok, ))
            lse = lse_smem.index(st).load(qrows.type.layout)
        else:
            lse = lse_smem.index(st).load(qrows.type.layout)
            s_t = warpgroup_mma_wait(num_outstanding=2 + DV_LATE, deps=(st_tok, ))
        p_t = gl.exp2(s_t * qk_scale - lse[None, :])
        if MASK:
            keep = (qrows[None, :] < S) & ((qrows[None, :] >= krows[:, None]) | (causal == 0))
            p_t = gl.where(keep, p_t, 0.0)
        p_t = p_t.to(q.dtype)
        if DV_LATE:
            dv, dk, dp_t, p16_prev, ds16_prev = warpgroup_mma_wait(
                num_outstanding=0, deps=(dv_tok, dk_tok, dpt_tok, p16_prev, ds16_prev))
        else:
            p16 = gl.convert_layout(p_t, op_layout)
            dv_tok = warpgroup_mma(p16, do, dv, is_async=True)
            dp_t, dk, ds16_prev = warpgroup_mma_wait(num_outstanding=1, deps=(dpt_tok, dk_tok, ds16_prev))
        mbarrier.arrive(empty.index(prev), count=1, pred=t > 0)
        delta = delta_smem.index(st).load(qrows.type.layout)
        ds_t = p_t.to(gl.float32) * (dp_t - delta[None, :])
        if DV_LATE:
            p16 = gl.convert_layout(p_t, op_layout)
            ds16 = gl.convert_layout(ds_t.to(q.dtype), op_layout)
        else:
            ds16 = gl.convert_layout(ds_t.to(q.dtype), op_layout)
            dv, p16 = warpgroup_mma_wait(num_outstanding=0, deps=(dv_tok, p16))
        return dk, dv, p16, ds16

    @gluon.jit
    def _dkdv_consumer(k, v, row0, my_turn, other_turn, q_smem, do_smem, lse_smem, delta_smem, kv_bar, ready, empty,
                       DK, DV, stride_dkb, stride_dkh, stride_dks, stride_dvb, stride_dvh, stride_dvs,
                       b, hk, GROUP, S, start_n, q_lo, n_q, diag_hi, full_q, qk_scale, sm_scale, causal,
                       LSE_LATE):
        # A partition's arguments reach it as values, constexprs included (Triton 3.6 and 3.9): LSE_LATE
        # is an i1 here, so both of _dkdv_block's branches on it compile and the dead one is dropped. A
        # choice whose branches cannot both compile must come from a type (a shape or a dtype).
        ROWS: gl.constexpr = k.shape[0]
        HEAD_DIM: gl.constexpr = k.shape[1]
        STAGES: gl.constexpr = q_smem.shape[0]
        BLOCK_M: gl.constexpr = q_smem.shape[1]
        s_layout: gl.constexpr = _mma_layout(BLOCK_M)
        acc_layout: gl.constexpr = _mma_layout(HEAD_DIM)
        krows = start_n + row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
        dk = gl.zeros([ROWS, HEAD_DIM], gl.float32, acc_layout)
        dv = gl.zeros([ROWS, HEAD_DIM], gl.float32, acc_layout)
        mbarrier.wait(kv_bar, 0)
        if HEAD_DIM == 64:
            # K and V into registers as the A operand of S^T and dP^T (16 registers
            # a thread each), so those products read only Q and dO from shared
            # memory. A 64x64x16 step with both operands there reads 4 KB in the 32
            # clocks it computes, the whole of shared memory's 128 bytes a clock.
            # At head dim 128 the registers are not there.
            a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2)
            k = k.load(a_layout)
            v = v.load(a_layout)
        op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
        p16 = gl.zeros([ROWS, BLOCK_M], q_smem.dtype, op_layout)  # the previous block's P^T and dS^T
        ds16 = gl.zeros([ROWS, BLOCK_M], q_smem.dtype, op_layout)
        t = 0
        for g in range(GROUP):
            for i in range(q_lo, diag_hi):  # causal: the blocks that cross the diagonal
                dk, dv, p16, ds16 = _dkdv_block(t, i, dk, dv, p16, ds16, k, v, q_smem, do_smem, lse_smem, delta_smem,
                                                ready, empty, my_turn, other_turn, krows, S, qk_scale, causal,
                                                s_layout, True, LSE_LATE)
                t += 1
            for i in range(diag_hi, gl.maximum(diag_hi, full_q)):
                dk, dv, p16, ds16 = _dkdv_block(t, i, dk, dv, p16, ds16, k, v, q_smem, do_smem, lse_smem, delta_smem,
                                                ready, empty, my_turn, other_turn, krows, S, qk_scale, causal,
                                                s_layout, False, LSE_LATE)
                t += 1
            for i in range(gl.maximum(diag_hi, full_q), n_q):  # the partial last block
                dk, dv, p16, ds16 = _dkdv_block(t, i, dk, dv, p16, ds16, k, v, q_smem, do_smem, lse_smem, delta_smem,
                                                ready, empty, my_turn, other_turn, krows, S, qk_scale, causal,
                                                s_layout, True, LSE_LATE)
                t += 1
        last = (t - 1) % STAGES  # the last block's products still owed
        dk_tok = warpgroup_mma(ds16, q_smem.index(last), dk, is_async=True)
        if HEAD_DIM == 64:
            dv_tok = warpgroup_mma(p16, do_smem.index(last), dv, is_async=True)
            dv, dk, p16, ds16 = warpgroup_mma_wait(num_outstanding=0, deps=(dv_tok, dk_tok, p16, ds16))
        else:
            dk, ds16 = warpgroup_mma_wait(num_outstanding=0, deps=(dk_tok, ds16))
        mbarrier.arrive(empty.index(last), count=1)
        _store_dkdv(dk, dv, start_n + row0, DK, DV, stride_dkb, stride_dkh, stride_dks, stride_dvb, stride_dvh,
                    stride_dvs, b, hk, S, sm_scale)

    @gluon.jit
    def _store_dkdv(dk, dv, row0, DK, DV, stride_dkb, stride_dkh, stride_dks, stride_dvb, stride_dvh, stride_dvs,
                    b, hk, S, sm_scale):
        # A warpgroup's finished dK (scaled here) and dV rows row0 .. row0 + 63, those before S.
        acc_layout: gl.constexpr = dk.type.layout
        rows = row0 + gl.arange(0, dk.shape[0], layout=gl.SliceLayout(1, acc_layout))
        cols = gl.arange(0, dk.shape[1], layout=gl.SliceLayout(0, acc_layout))
        keep = rows[:, None] < S
        dk_ptrs = DK + b * stride_dkb + hk * stride_dkh + rows[:, None].to(gl.int64) * stride_dks + cols[None, :]
        gl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=keep)
        dv_ptrs = DV + b * stride_dvb + hk * stride_dvh + rows[:, None].to(gl.int64) * stride_dvs + cols[None, :]
        gl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=keep)

    @gluon.jit
    def _key_rows(S, H, GROUP, CAUSAL: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr):
        # This program's first key row, batch and kv head, and the query blocks it meets: q_lo .. n_q - 1,
        # those before diag_hi crossing the causal diagonal.
        start_n = gl.program_id(0) * BLOCK_N
        bhk = gl.program_id(1)
        b = (bhk // (H // GROUP)).to(gl.int64)
        hk = (bhk % (H // GROUP)).to(gl.int64)
        n_q = gl.cdiv(S, BLOCK_M)
        if CAUSAL:
            q_lo = start_n // BLOCK_M  # queries above start_n see none of these keys
            diag_hi = gl.minimum(gl.cdiv(start_n + BLOCK_N, BLOCK_M), n_q)
        else:
            q_lo = 0
            diag_hi = 0
        return start_n, b, hk, n_q, q_lo, diag_hi

    @gluon.jit
    def _dkdv_buffers(k_desc, v_desc, q_desc, do_desc, lse_desc, delta_desc, STAGES: gl.constexpr,
                      BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr):
        # The resident K and V tiles, the ring of Q, dO, lse and delta stages, and their barriers.
        k_smem = gl.allocate_shared_memory(k_desc.dtype, [BLOCK_N, HEAD_DIM], k_desc.layout)
        v_smem = gl.allocate_shared_memory(v_desc.dtype, [BLOCK_N, HEAD_DIM], v_desc.layout)
        q_smem = gl.allocate_shared_memory(q_desc.dtype, [STAGES, BLOCK_M, HEAD_DIM], q_desc.layout)
        do_smem = gl.allocate_shared_memory(do_desc.dtype, [STAGES, BLOCK_M, HEAD_DIM], do_desc.layout)
        lse_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], lse_desc.layout)
        delta_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], delta_desc.layout)
        kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(kv_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)
        return k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, kv_bar, ready, empty

    @gluon.jit
    def _dkdv_kernel(k_desc, v_desc, q_desc, do_desc, lse_desc, delta_desc, DK, DV,
                     stride_qb, stride_qh, stride_qs,
                     stride_kb, stride_kh, stride_ks,
                     stride_vb, stride_vh, stride_vs,
                     stride_db, stride_dh, stride_ds,
                     stride_dkb, stride_dkh, stride_dks,
                     stride_dvb, stride_dvh, stride_dvs,
                     H, GROUP, S, LSE_S, qk_scale, sm_scale,
                     HEAD_DIM: gl.constexpr, CAUSAL: gl.constexpr,
                     BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr, LSE_LATE: gl.constexpr,
                     CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr):
        gl.static_assert(BLOCK_N == 128)  # two consumer warpgroups of 64 key rows
        gl.static_assert(num_warps == 4)
        gl.static_assert(BLOCK_N % BLOCK_M == 0)
        start_n, b, hk, n_q, q_lo, diag_hi = _key_rows(S, H, GROUP, CAUSAL, BLOCK_N, BLOCK_M)
        k_row, k_col = _origin(b * stride_kb + hk * stride_kh, stride_ks)
        v_row, v_col = _origin(b * stride_vb + hk * stride_vh, stride_vs)
        full_q = S // BLOCK_M
        k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, kv_bar, ready, empty = _dkdv_buffers(
            k_desc, v_desc, q_desc, do_desc, lse_desc, delta_desc, STAGES, BLOCK_N, BLOCK_M, HEAD_DIM)
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())  # head dim 64 only
        mbarrier.init(turn.index(0), count=1)
        mbarrier.init(turn.index(1), count=1)
        mbarrier.arrive(turn.index(0), count=1)  # the first warpgroup issues first

        shared = (q_smem, do_smem, lse_smem, delta_smem, kv_bar, ready, empty, DK, DV,
                  stride_dkb, stride_dkh, stride_dks, stride_dvb, stride_dvh, stride_dvs,
                  b, hk, GROUP, S, start_n, q_lo, n_q, diag_hi, full_q, qk_scale, sm_scale, CAUSAL * 1, LSE_LATE)
        gl.warp_specialize([
            (_dkdv_consumer, (k_smem.slice(0, 64), v_smem.slice(0, 64), 0, turn.index(0), turn.index(1)) + shared),
            (_dkdv_consumer, (k_smem.slice(64, 64), v_smem.slice(64, 64), 64, turn.index(1), turn.index(0)) + shared),
            (_dkdv_loader, (k_desc, v_desc, q_desc, do_desc, lse_desc, delta_desc, k_smem, v_smem, q_smem, do_smem,
                            lse_smem, delta_smem, kv_bar, ready, empty, k_row, k_col, v_row, v_col, start_n, b, hk, H,
                            GROUP, S, LSE_S, stride_qb, stride_qh, stride_qs, stride_db, stride_dh, stride_ds, q_lo, n_q)),
        ], [4, 1], [CONSUMER_REGS, 24])
    # ----------------------------------------------------------------------
    # Backward, dQ: one program owns 128 query rows of one head (64 per
    # consumer warpgroup, Q and dO resident) and streams K and V blocks past
    # them through the same ring as the forward. Per block each warpgroup
    # issues S = Q K^T and dP = dO V^T together, forms P from S while dP runs,
    # then dS = P (dP - delta), and issues dQ += dS K.
    # ----------------------------------------------------------------------

    @gluon.jit
    def _dq_loader(q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, qdo_bar,
                   k_ready, v_ready, k_empty, v_empty, q_row, q_col, d_row, d_col, k_row, k_col, v_row, v_col,
                   start_m, n_blocks):
        mbarrier.expect(qdo_bar, q_desc.block_type.nbytes + do_desc.block_type.nbytes)
        _tma_load(q_desc, [q_row + start_m, q_col], qdo_bar, q_smem)
        _tma_load(do_desc, [d_row + start_m, d_col], qdo_bar, do_smem)
        _load_kv_ring(k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty,
                      k_row, k_col, v_row, v_col, n_blocks, 0)

    @gluon.jit
    def _dq_block(j, dq, q, do, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, lse, delta, rows, S,
                  qk_scale, causal, s_layout: gl.constexpr, MASK: gl.constexpr):
        STAGES: gl.constexpr = k_smem.shape[0]
        BLOCK_N: gl.constexpr = k_smem.shape[1]
        ROWS: gl.constexpr = q.shape[0]
        st = j % STAGES
        ph = (j // STAGES) & 1
        k = k_smem.index(st)
        v = v_smem.index(st)
        mbarrier.wait(k_ready.index(st), ph)
        mbarrier.wait(v_ready.index(st), ph)
        zero = gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout)
        s_tok = warpgroup_mma(q, k.permute((1, 0)), zero, use_acc=False, is_async=True)
        dp_tok = warpgroup_mma(do, v.permute((1, 0)), zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok, ))
        p = gl.exp2(s * qk_scale - lse[:, None])
        if MASK:
            cols = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            keep = (cols[None, :] < S) & ((cols[None, :] <= rows[:, None]) | (causal == 0))
            p = gl.where(keep, p, 0.0)
        dp = warpgroup_mma_wait(num_outstanding=0, deps=(dp_tok, ))
        mbarrier.arrive(v_empty.index(st), count=1)
        ds = p * (dp - delta[:, None])
        acc_layout: gl.constexpr = dq.type.layout
        ds16 = gl.convert_layout(ds.to(q.dtype), gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2))
        dq_tok = warpgroup_mma(ds16, k, dq, is_async=True)
        dq, ds16 = warpgroup_mma_wait(num_outstanding=0, deps=(dq_tok, ds16))
        mbarrier.arrive(k_empty.index(st), count=1)
        return dq

    @gluon.jit
    def _dq_consumer(q, do, row0, k_smem, v_smem, qdo_bar, k_ready, v_ready, k_empty, v_empty,
                     DQ, LSE, DELTA, stride_dqb, stride_dqh, stride_dqs, b, h, bh, S, start_m, n_blocks, mask_from,
                     qk_scale, sm_scale, causal):
        ROWS: gl.constexpr = q.shape[0]
        HEAD_DIM: gl.constexpr = q.shape[1]
        BLOCK_N: gl.constexpr = k_smem.shape[1]
        s_layout: gl.constexpr = _mma_layout(BLOCK_N)
        acc_layout: gl.constexpr = _mma_layout(HEAD_DIM)
        rows = start_m + row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
        lse = gl.load(LSE + bh.to(gl.int64) * S + rows, mask=rows < S, other=0.0)
        delta = gl.load(DELTA + bh.to(gl.int64) * S + rows, mask=rows < S, other=0.0)
        dq = gl.zeros([ROWS, HEAD_DIM], gl.float32, acc_layout)
        mbarrier.wait(qdo_bar, 0)
        for j in range(0, mask_from):
            dq = _dq_block(j, dq, q, do, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, lse, delta, rows, S,
                           qk_scale, causal, s_layout, False)
        for j in range(mask_from, n_blocks):
            dq = _dq_block(j, dq, q, do, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, lse, delta, rows, S,
                           qk_scale, causal, s_layout, True)
        o_rows = start_m + row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, acc_layout))
        cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, acc_layout))
        ptrs = DQ + b * stride_dqb + h * stride_dqh + o_rows[:, None].to(gl.int64) * stride_dqs + cols[None, :]
        gl.store(ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=o_rows[:, None] < S)

    @gluon.jit
    def _dq_kernel(q_desc, do_desc, k_desc, v_desc, DQ, LSE, DELTA,
                   stride_qb, stride_qh, stride_qs,
                   stride_db, stride_dh, stride_ds,
                   stride_kb, stride_kh, stride_ks,
                   stride_vb, stride_vh, stride_vs,
                   stride_dqb, stride_dqh, stride_dqs,
                   H, GROUP, S, qk_scale, sm_scale,
                   HEAD_DIM: gl.constexpr, CAUSAL: gl.constexpr,
                   BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                   CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr):
        gl.static_assert(BLOCK_M == 128)  # two consumer warpgroups of 64 query rows
        gl.static_assert(num_warps == 4)
        gl.static_assert(BLOCK_M % BLOCK_N == 0)
        start_m, bh, b, h, hk, n_blocks, mask_from = _row_block(S, H, GROUP, CAUSAL, BLOCK_M, BLOCK_N)
        q_row, q_col = _origin(b * stride_qb + h * stride_qh, stride_qs)
        d_row, d_col = _origin(b * stride_db + h * stride_dh, stride_ds)
        k_row, k_col = _origin(b * stride_kb + hk * stride_kh, stride_ks)
        v_row, v_col = _origin(b * stride_vb + hk * stride_vh, stride_vs)

        q_smem = gl.allocate_shared_memory(q_desc.dtype, [BLOCK_M, HEAD_DIM], q_desc.layout)
        do_smem = gl.allocate_shared_memory(do_desc.dtype, [BLOCK_M, HEAD_DIM], do_desc.layout)
        qdo_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_smem, v_smem, k_ready, v_ready, k_empty, v_empty = _kv_ring(k_desc, v_desc, STAGES, BLOCK_N, HEAD_DIM)
        mbarrier.init(qdo_bar, count=1)

        shared = (k_smem, v_smem, qdo_bar, k_ready, v_ready, k_empty, v_empty,
                  DQ, LSE, DELTA, stride_dqb, stride_dqh, stride_dqs, b, h, bh, S, start_m, n_blocks, mask_from,
                  qk_scale, sm_scale, CAUSAL * 1)
        gl.warp_specialize([
            (_dq_consumer, (q_smem.slice(0, 64), do_smem.slice(0, 64), 0) + shared),
            (_dq_consumer, (q_smem.slice(64, 64), do_smem.slice(64, 64), 64) + shared),
            (_dq_loader, (q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, qdo_bar,
                          k_ready, v_ready, k_empty, v_empty, q_row, q_col, d_row, d_col, k_row, k_col, v_row, v_col,
                          start_m, n_blocks)),
        ], [4, 1], [CONSUMER_REGS, 24])

    # ----------------------------------------------------------------------
    # Backward, dK, dV and dQ in one kernel (head dim 128): five products a
    # block pair where the dK/dV and dQ kernels together run seven. The dK/dV
    # kernel's program (128 key rows, 64 per warpgroup, Q and dO blocks
    # streamed past) also writes each block's dS^T to shared memory; once both
    # halves are in, each warpgroup forms dQ for 64 of the head's columns over
    # all 128 keys and stages it for a one-warp reducer partition, which adds
    # it into an fp32 accumulator in global memory by TMA. FlashAttention-3's
    # backward is arranged this way (Shah et al., 2024), with its order of the
    # products in a block and its layout of the staged dQ tile (_register_order).
    # ----------------------------------------------------------------------

    @gluon.jit
    def _barriers(N: gl.constexpr, count: gl.constexpr):
        # N mbarriers, each completing a phase once `count` arrivals are in.
        bars = gl.allocate_shared_memory(gl.int64, [N, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(N):
            mbarrier.init(bars.index(i), count=count)
        return bars

    @gluon.jit
    def _register_order(dq):
        # A warpgroup's [64, 64] fp32 wgmma accumulator relabelled, moving no
        # value, as [16, 256] in the order its registers hold it: thread
        # w*32 + lane keeps rows w*16 + mh*8 + lane//4 and columns
        # ng*8 + (lane%4)*2 + nb in register ng*4 + mh*2 + nb, so flat index
        # ng*512 + thread*4 + mh*2 + nb gives each thread four consecutive
        # floats (one 16-byte store) and each warp 512 consecutive bytes. With
        # the fp32 accumulator of this layout, one TMA copy adds the tile
        # (16 KB) into 16 KB of consecutive addresses. dq_from_accumulator() undoes it.
        x = gl.reshape(dq, [4, 2, 8, 8, 4, 2])  # (w, mh, lane//4, ng, lane%4, nb)
        x = gl.permute(x, (3, 0, 2, 4, 1, 5))  # (ng, w, lane//4, lane%4, mh, nb)
        return gl.reshape(x, [16, 256])

    @gluon.jit
    def _dq_reducer(dqa_desc, dq0_smem, dq1_smem, dq0_full, dq1_full, dq_empty, b, hk, H, GROUP, NQB, q_lo, n_q):
        # dqW_smem: warpgroup W's staging slots, each one 64x64 dQ tile in
        # register order; dqW_full: one barrier a slot; dq_empty: one a slot
        # for both warpgroups. Warpgroup W's tile of query block i of head bh
        # is added at row ((bh * NQB + i) * 2 + W) * 16 of the [rows, 256]
        # accumulator. A slot is freed once both copies out of it have read it.
        SLOTS: gl.constexpr = dq0_smem.shape[0]
        TILE_ROWS: gl.constexpr = dq0_smem.shape[1]
        t = 0
        for g in range(GROUP):
            bh = b * H + hk * GROUP + g
            for i in range(q_lo, n_q):
                slot = t % SLOTS
                ph = (t // SLOTS) & 1
                row = ((bh * NQB + i) * 2 * TILE_ROWS).to(gl.int32)
                mbarrier.wait(dq0_full.index(slot), ph)
                _tma_add(dqa_desc, [row, 0], dq0_smem.index(slot))
                mbarrier.wait(dq1_full.index(slot), ph)
                _tma_add(dqa_desc, [row + TILE_ROWS, 0], dq1_smem.index(slot))
                tma.store_wait(2 * (SLOTS - 1))  # block t - SLOTS + 1's two copies have read their slot
                mbarrier.arrive(dq_empty.index((t + 1) % SLOTS), count=1, pred=t >= SLOTS - 1)
                t += 1
        tma.store_wait(0)

    @gluon.jit
    def _bwd_block(t, i, dk, dv, k, v, k_cols, q_smem, do_smem, lse_smem, delta_smem, ready, empty,
                   ds0, ds1, ds_mine, ds_full, ds_empty, dq_smem, dq_full, dq_empty, krows, S, qk_scale, causal,
                   s_layout: gl.constexpr, MASK: gl.constexpr):
        # One 64-row query block for one warpgroup's 64 keys: S^T and dP^T
        # issued together; P^T formed, then dS^T, which goes to shared memory;
        # dV's product; once both halves of dS^T are in, dQ's product (64
        # columns over the 128 keys), then dK's; dQ staged for the reducer
        # while dK's product runs. Nothing is carried across blocks, unlike
        # the dK/dV kernel's loop: an earlier version that carried dK's
        # product into the next block spilled twice as much and only tied the
        # pair of kernels (docs/attention-kernels.md).
        STAGES: gl.constexpr = q_smem.shape[0]
        BLOCK_M: gl.constexpr = q_smem.shape[1]
        ROWS: gl.constexpr = k.shape[0]
        SLOTS: gl.constexpr = dq_smem.shape[0]
        DS_BUFFERS: gl.constexpr = ds0.shape[0]
        DQ_COLS: gl.constexpr = k_cols.shape[1]
        st = t % STAGES
        qrows = i * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, s_layout))
        mbarrier.wait(ready.index(st), (t // STAGES) & 1)
        q = q_smem.index(st)
        do = do_smem.index(st)
        zero = gl.zeros([ROWS, BLOCK_M], gl.float32, s_layout)
        op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=dv.type.layout, k_width=2)
        st_tok = warpgroup_mma(k, q.permute((1, 0)), zero, use_acc=False, is_async=True)
        dpt_tok = warpgroup_mma(v, do.permute((1, 0)), zero, use_acc=False, is_async=True)
        lse = lse_smem.index(st).load(qrows.type.layout)
        s_t = warpgroup_mma_wait(num_outstanding=1, deps=(st_tok, ))
        p_t = gl.exp2(s_t * qk_scale - lse[None, :])
        if MASK:  # keys past S too: their rows of dS^T would reach dQ
            keep = (qrows[None, :] < S) & (krows[:, None] < S) & ((qrows[None, :] >= krows[:, None]) | (causal == 0))
            p_t = gl.where(keep, p_t, 0.0)
        p_t = p_t.to(q.dtype)
        dp_t = warpgroup_mma_wait(num_outstanding=0, deps=(dpt_tok, ))
        delta = delta_smem.index(st).load(qrows.type.layout)
        ds_t = (p_t.to(gl.float32) * (dp_t - delta[None, :])).to(q.dtype)
        # dS^T to buffer t % DS_BUFFERS once both dQ products of its last block have read it.
        buf = t % DS_BUFFERS
        ph = (t // DS_BUFFERS) & 1
        mbarrier.wait(ds_empty.index(buf), ph ^ 1)
        ds_mine.index(buf).store(ds_t)
        fence_async_shared()
        mbarrier.arrive(ds_full.index(buf), count=1)
        p16 = gl.convert_layout(p_t, op_layout)
        dv_tok = warpgroup_mma(p16, do, dv, is_async=True)
        ds16 = gl.convert_layout(ds_t, op_layout)
        mbarrier.wait(ds_full.index(buf), ph)
        dq_zero = gl.zeros([BLOCK_M, DQ_COLS], gl.float32, _mma_layout(DQ_COLS))
        # dQ over the first warpgroup's 64 keys, then the second's: two products, one accumulator.
        dq_tok = warpgroup_mma(ds0.index(buf).permute((1, 0)), k_cols.slice(0, 64), dq_zero, use_acc=False,
                               is_async=True)
        dq_tok = warpgroup_mma(ds1.index(buf).permute((1, 0)), k_cols.slice(64, 64), dq_tok, is_async=True)
        dv, p16 = warpgroup_mma_wait(num_outstanding=2, deps=(dv_tok, p16))
        dk_tok = warpgroup_mma(ds16, q, dk, is_async=True)
        dq = warpgroup_mma_wait(num_outstanding=1, deps=(dq_tok, ))
        mbarrier.arrive(ds_empty.index(buf), count=1)
        slot = t % SLOTS
        mbarrier.wait(dq_empty.index(slot), ((t // SLOTS) & 1) ^ 1)
        dq_smem.index(slot).store(_register_order(dq))
        fence_async_shared()
        mbarrier.arrive(dq_full.index(slot), count=1)
        dk, ds16 = warpgroup_mma_wait(num_outstanding=0, deps=(dk_tok, ds16))
        mbarrier.arrive(empty.index(st), count=1)
        return dk, dv

    @gluon.jit
    def _bwd_consumer(k, v, k_cols, ds_mine, dq_smem, dq_full, row0, ds0, ds1, ds_full, ds_empty, dq_empty,
                      q_smem, do_smem, lse_smem, delta_smem, kv_bar, ready, empty,
                      DK, DV, stride_dkb, stride_dkh, stride_dks, stride_dvb, stride_dvh, stride_dvs,
                      b, hk, GROUP, S, start_n, q_lo, n_q, diag_hi, full_q, qk_scale, sm_scale, causal):
        ROWS: gl.constexpr = k.shape[0]
        HEAD_DIM: gl.constexpr = k.shape[1]
        s_layout: gl.constexpr = _mma_layout(q_smem.shape[1])
        acc_layout: gl.constexpr = _mma_layout(HEAD_DIM)
        krows = start_n + row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
        dk = gl.zeros([ROWS, HEAD_DIM], gl.float32, acc_layout)
        dv = gl.zeros([ROWS, HEAD_DIM], gl.float32, acc_layout)
        mbarrier.wait(kv_bar, 0)
        t = 0
        for g in range(GROUP):
            for i in range(q_lo, diag_hi):  # causal: the blocks that cross the diagonal
                dk, dv = _bwd_block(t, i, dk, dv, k, v, k_cols, q_smem, do_smem, lse_smem, delta_smem, ready, empty,
                                    ds0, ds1, ds_mine, ds_full, ds_empty, dq_smem, dq_full, dq_empty, krows, S,
                                    qk_scale, causal, s_layout, True)
                t += 1
            for i in range(diag_hi, gl.maximum(diag_hi, full_q)):
                dk, dv = _bwd_block(t, i, dk, dv, k, v, k_cols, q_smem, do_smem, lse_smem, delta_smem, ready, empty,
                                    ds0, ds1, ds_mine, ds_full, ds_empty, dq_smem, dq_full, dq_empty, krows, S,
                                    qk_scale, causal, s_layout, False)
                t += 1
            for i in range(gl.maximum(diag_hi, full_q), n_q):  # the partial last block, or every block
                dk, dv = _bwd_block(t, i, dk, dv, k, v, k_cols, q_smem, do_smem, lse_smem, delta_smem, ready, empty,
                                    ds0, ds1, ds_mine, ds_full, ds_empty, dq_smem, dq_full, dq_empty, krows, S,
                                    qk_scale, causal, s_layout, True)
                t += 1
        _store_dkdv(dk, dv, start_n + row0, DK, DV, stride_dkb, stride_dkh, stride_dks, stride_dvb, stride_dvh,
                    stride_dvs, b, hk, S, sm_scale)

    @gluon.jit
    def _bwd_kernel(k_desc, v_desc, q_desc, do_desc, lse_desc, delta_desc, dqa_desc, DK, DV,
                    stride_qb, stride_qh, stride_qs,
                    stride_kb, stride_kh, stride_ks,
                    stride_vb, stride_vh, stride_vs,
                    stride_db, stride_dh, stride_ds,
                    stride_dkb, stride_dkh, stride_dks,
                    stride_dvb, stride_dvh, stride_dvs,
                    H, GROUP, S, NQB, LSE_S, qk_scale, sm_scale,
                    HEAD_DIM: gl.constexpr, CAUSAL: gl.constexpr, STAGES: gl.constexpr, DQ_SLOTS: gl.constexpr,
                    DS_BUFFERS: gl.constexpr,
                    CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr):
        BLOCK_N: gl.constexpr = 128
        BLOCK_M: gl.constexpr = 64
        gl.static_assert(HEAD_DIM == 128)  # each warpgroup forms 64 columns of dQ
        gl.static_assert(num_warps == 4)
        start_n, b, hk, n_q, q_lo, diag_hi = _key_rows(S, H, GROUP, CAUSAL, BLOCK_N, BLOCK_M)
        k_row, k_col = _origin(b * stride_kb + hk * stride_kh, stride_ks)
        v_row, v_col = _origin(b * stride_vb + hk * stride_vh, stride_vs)
        full_q = (S // BLOCK_M) * (start_n + BLOCK_N <= S).to(gl.int32)  # a partial key tile masks every block
        k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, kv_bar, ready, empty = _dkdv_buffers(
            k_desc, v_desc, q_desc, do_desc, lse_desc, delta_desc, STAGES, BLOCK_N, BLOCK_M, HEAD_DIM)
        ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, BLOCK_M], k_desc.dtype)
        ds0_smem = gl.allocate_shared_memory(k_desc.dtype, [DS_BUFFERS, 64, BLOCK_M], ds_layout)  # a warpgroup's half
        ds1_smem = gl.allocate_shared_memory(k_desc.dtype, [DS_BUFFERS, 64, BLOCK_M], ds_layout)
        tile: gl.constexpr = dqa_desc.block_type.shape
        dq0_smem = gl.allocate_shared_memory(gl.float32, [DQ_SLOTS, tile[0], tile[1]], dqa_desc.layout)
        dq1_smem = gl.allocate_shared_memory(gl.float32, [DQ_SLOTS, tile[0], tile[1]], dqa_desc.layout)
        ds_full, ds_empty = _barriers(DS_BUFFERS, 2), _barriers(DS_BUFFERS, 2)  # both warpgroups arrive
        dq0_full, dq1_full, dq_empty = _barriers(DQ_SLOTS, 1), _barriers(DQ_SLOTS, 1), _barriers(DQ_SLOTS, 1)

        shared = (ds0_smem, ds1_smem, ds_full, ds_empty, dq_empty,
                  q_smem, do_smem, lse_smem, delta_smem, kv_bar, ready, empty, DK, DV,
                  stride_dkb, stride_dkh, stride_dks, stride_dvb, stride_dvh, stride_dvs,
                  b, hk, GROUP, S, start_n, q_lo, n_q, diag_hi, full_q, qk_scale, sm_scale, CAUSAL * 1)
        gl.warp_specialize([
            (_bwd_consumer, (k_smem.slice(0, 64), v_smem.slice(0, 64), k_smem.slice(0, 64, dim=1),
                             ds0_smem, dq0_smem, dq0_full, 0) + shared),
            (_bwd_consumer, (k_smem.slice(64, 64), v_smem.slice(64, 64), k_smem.slice(64, 64, dim=1),
                             ds1_smem, dq1_smem, dq1_full, 64) + shared),
            (_dkdv_loader, (k_desc, v_desc, q_desc, do_desc, lse_desc, delta_desc, k_smem, v_smem, q_smem, do_smem,
                            lse_smem, delta_smem, kv_bar, ready, empty, k_row, k_col, v_row, v_col, start_n, b, hk, H,
                            GROUP, S, LSE_S, stride_qb, stride_qh, stride_qs, stride_db, stride_dh, stride_ds, q_lo, n_q)),
            (_dq_reducer, (dqa_desc, dq0_smem, dq1_smem, dq0_full, dq1_full, dq_empty, b, hk, H, GROUP, NQB,
                           q_lo, n_q)),
        ], [4, 1, 1], [CONSUMER_REGS, 24, 24])

if GLUON_ERROR is None:
    @triton.jit
    def _dq_from_accumulator_kernel(DQA, DQ, stride_b, stride_h, stride_s, H, S, scale):
        # One 64-row query block of one head: its two tiles (8192 floats) read in order, put back as
        # [64, 128] (dq_from_accumulator has the layout), scaled and cast.
        i = tl.program_id(0)
        bh = tl.program_id(1)
        n_blocks = tl.cdiv(S, 64)
        x = tl.load(DQA + (bh.to(tl.int64) * n_blocks + i) * 8192 + tl.arange(0, 8192))
        x = tl.reshape(x, [2, 8, 4, 8, 4, 2, 2])  # (W, c, w, r, l, mh, n)
        x = tl.permute(x, (2, 5, 3, 0, 1, 4, 6))  # (w, mh, r, W, c, l, n)
        x = tl.reshape(x, [64, 128])
        rows = i * 64 + tl.arange(0, 64)
        cols = tl.arange(0, 128)
        ptrs = DQ + (bh // H) * stride_b + (bh % H) * stride_h + rows[:, None].to(tl.int64) * stride_s + cols[None, :]
        tl.store(ptrs, (x * scale).to(DQ.dtype.element_ty), mask=rows[:, None] < S)

# --------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, STAGES, kind) for _fwd_kernel; kind "pingpong" makes
# the two consumer warpgroups take turns at the tensor cores, "ws" lets them
# run freely. Shared memory: a 128-row Q tile plus STAGES K and V tiles; at
# D=128 a 128x128 bf16 tile is 32 KB, so 128x128 fits three stages (224 KB of
# the 227). Kind "persistent" is _fwd_persistent_kernel, non-causal only (the
# tuner leaves it out of causal choices). BLOCK_M 192 is three consumer
# warpgroups of 64 rows, with 160 registers a thread each (consumer_regs):
# at D=64 a 64x128 tile's softmax fits there, and the third warpgroup keeps the
# tensor cores busy while two compute (1.137 against 1.215 ms on the H100;
# with 64-key blocks 1.267, so not offered).
CONFIGS = {
    64: [(128, 128, 2, "ws"), (128, 128, 2, "pingpong"), (128, 128, 3, "pingpong"), (128, 128, 2, "persistent"),
         (192, 128, 2, "ws")],
    128: [(128, 128, 2, "ws"), (128, 128, 2, "pingpong"), (128, 128, 3, "pingpong"), (128, 64, 4, "pingpong"),
          (128, 128, 2, "persistent")],
}
CONSUMER_REGS = 240  # per thread of each consumer warpgroup; the loader warp keeps 24


def consumer_regs(block_m: int) -> int:
    """Registers a thread of each consumer warpgroup of the forward kernel with BLOCK_M rows: 64K in all."""
    return 160 if block_m == 192 else CONSUMER_REGS
# Head dims where `tiled` runs these kernels instead of flash_triton's, where
# they are the faster (docs/attention-kernels.md; D=64: docs/measurements.md).
PREFERRED_HEAD_DIMS = (64, 128)

FWD_TUNER = Tuner("fwd")


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """None if forward() runs these inputs here, else a short reason (flash_triton's kernel runs them)."""
    if GLUON_ERROR is not None:
        return GLUON_ERROR
    if not (q.is_cuda and torch.cuda.get_device_capability(q.device)[0] == 9):
        return "the Gluon kernel is written for Hopper (sm_90) GPUs"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return "the Gluon kernel takes fp16 and bf16"
    if q.shape[-1] not in CONFIGS:
        return f"the Gluon kernel takes head dims {sorted(CONFIGS)}"
    for t in (q, k, v):
        if t.dtype != q.dtype or _view_2d(t) is None:
            return "a tensor's layout has no 2-d TMA view (16-byte aligned rows, heads not straddling rows)"
    return None


def _view_2d(t: torch.Tensor):
    """(rows, row stride) of the 2-d matrix over t's storage whose rows are t's sequence positions, or None.

    Every (batch, head) must start inside a row with its D columns in that row,
    and the row stride and base must be 16-byte aligned, as TMA requires.
    """
    if t.data_ptr() % 16:
        return None
    return _view_2d_of(tuple(t.shape), tuple(t.stride()), t.element_size())


@functools.lru_cache(maxsize=256)
def _view_2d_of(shape, strides, itemsize):
    # Pure in the shape and strides, so each layout is worked out once (this runs on every call).
    B, H, S, D = shape
    sb, sh, ss, sd = strides
    if sd != 1 or ss < D or (ss * itemsize) % 16:
        return None
    offs = [b * sb + h * sh for b in range(B) for h in range(H)]
    if max(o % ss for o in offs) + D > ss:
        return None
    return (max(offs) + (S - 1) * ss) // ss + 1, ss


def _descriptor(t: torch.Tensor, block_rows: int) -> "TensorDescriptor":
    rows, ss = _view_2d(t)
    D = t.shape[-1]
    gl_dtype = gl.float16 if t.dtype == torch.float16 else gl.bfloat16
    layout = gl.NVMMASharedLayout.get_default_for([block_rows, D], gl_dtype)
    return TensorDescriptor(t, [rows, ss], [ss, 1], [block_rows, D], layout)


def _tma_rows(t: torch.Tensor) -> torch.Tensor:
    # lse or delta (B, H, S) as the dK/dV loader reads them, a flat row of heads whose each
    # head starts 16-byte aligned: a TMA box starting off that alignment faults ("illegal instruction", S=333).
    S = t.shape[-1]
    if S % 4 == 0 and t.is_contiguous() and t.data_ptr() % 16 == 0:
        return t
    rows = t.new_zeros(*t.shape[:-1], -(-S // 4) * 4)
    rows[..., :S] = t
    return rows


def _row_descriptor(t: torch.Tensor, block: int) -> "TensorDescriptor":
    # A contiguous (B, H, S) fp32 tensor (lse, delta) as one flat row read `block` values at a time.
    flat = t.view(-1)
    layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=1)
    return TensorDescriptor(flat, [flat.numel()], [1], [block], layout)


def _launch(q, k, v, o, lse, causal, scale, config):
    B, H, S, D = q.shape
    block_m, block_n, stages, kind = config
    grid = (triton.cdiv(S, block_m), B * H)
    q_desc = _descriptor(q, 64 if block_m == 192 else block_m)  # 192 rows load as three 64-row boxes
    args = (q_desc, _descriptor(k, block_n), _descriptor(v, block_n), o, lse,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
            H, H // k.shape[1], S, scale * LOG2E, D, bool(causal), block_m, block_n, stages)
    # 4 warps launch the kernel: they become the first consumer warpgroup, the
    # second one and the loader warp are warp_specialize's workers.
    if kind == "persistent":
        if causal:
            raise ValueError("the persistent forward is non-causal only")
        n_tiles = triton.cdiv(S, block_m) * B * H
        n_sm = torch.cuda.get_device_properties(q.device).multi_processor_count
        return ahead.launch(_fwd_persistent_kernel, (min(n_tiles, n_sm), ),
            _descriptor(q, 64), _descriptor(k, block_n), _descriptor(v, block_n), o, lse,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
            H, H // k.shape[1], S, n_tiles, scale * LOG2E, D, block_n, stages, CONSUMER_REGS, num_warps=4)
    return ahead.launch(_fwd_kernel, grid, *args, kind == "pingpong", consumer_regs(block_m), num_warps=4)


def _time_ms(fn) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=5, rep=25, return_mode="median")


def _tune(q, k, v, o, lse, causal, scale):
    # One choice per (length bucket, head dim, causal, dtype), as triton.autotune keys it.
    key = (triton.next_power_of_2(q.shape[2]), q.shape[-1], bool(causal), str(q.dtype))
    configs = [c for c in CONFIGS[q.shape[-1]] if not (causal and c[3] == "persistent")]
    return FWD_TUNER.pick(key, configs,
                          lambda c: _time_ms(lambda: _launch(q, k, v, o, lse, causal, scale, c)),
                          torch.cuda.get_device_name(q.device))


def forward(q, k, v, causal: bool, scale: float, config: tuple[int, int, int, str] | None = None):
    """(o, lse, config) for q (B, H, S, D), k and v (B, Hkv, S, D): o in q's layout, lse (B, H, S) base 2,
    fp32, and the config that ran (`config`, or the tuner's choice)."""
    B, H, S, D = q.shape
    o = torch.empty_like(q)
    lse = torch.empty((B, H, S), device=q.device, dtype=torch.float32)
    if config is None:
        config = _tune(q, k, v, o, lse, causal, scale)
    _launch(q, k, v, o, lse, causal, scale, config)
    return o, lse, config


# (BLOCK_M, STAGES, LSE_LATE) of the dK/dV kernel: 64-row Q and dO blocks streamed past
# 128 resident key rows; a stage holds one Q and one dO block (16 KB each at D=128).
# 128-row blocks at D=64 spill (368-544 bytes a thread) and took 1.7x as long (docs/measurements.md).
# LSE_LATE (see _dkdv_block) is a config, not a version test: on the H100 at head dim 64 with 3
# stages it took 0.89-0.90x the time on Triton 3.9 and 1.01-1.03x on 3.6, with 2 stages 1.00-1.02x on both.
BWD_CONFIGS = [(64, 2, 0), (64, 3, 0), (64, 3, 1)]
DKDV_TUNER = Tuner("dkdv")


def supported_bwd(q, k, v, do) -> str | None:
    """None if backward_dkdv() runs these inputs here, else a short reason."""
    reason = supported(q, k, v)
    if reason is None and (do.dtype != q.dtype or _view_2d(do) is None):
        reason = "dO has no 2-d TMA view"
    if reason is None and q.shape[0] * q.shape[1] * (-(-q.shape[2] // 4) * 4) >= 2**31:
        reason = "B*H*S is past the int32 TMA coordinates of the flat lse row"
    return reason


def _launch_dkdv(q, k, v, do, dk, dv, lse, delta, causal, scale, config):
    B, H, S, D = q.shape
    block_m, stages, lse_late = config
    grid = (triton.cdiv(S, 128), B * k.shape[1])
    lse_rows, delta_rows = _tma_rows(lse), _tma_rows(delta)
    return ahead.launch(_dkdv_kernel, grid,
        _descriptor(k, 128), _descriptor(v, 128), _descriptor(q, block_m), _descriptor(do, block_m),
        _row_descriptor(lse_rows, block_m), _row_descriptor(delta_rows, block_m), dk, dv,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
        H, H // k.shape[1], S, lse_rows.shape[-1], scale * LOG2E, scale,
        D, bool(causal), 128, block_m, stages, bool(lse_late), CONSUMER_REGS, num_warps=4,
    )


def backward_dkdv(q, k, v, do, lse, delta, causal: bool, scale: float, config: tuple[int, int, int] | None = None):
    """(dk, dv, config) from the forward's base-2 lse and delta = rowsum(dO * O), as flash_triton's dK/dV kernel."""
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    if config is None:
        key = (triton.next_power_of_2(q.shape[2]), q.shape[-1], bool(causal), str(q.dtype), q.shape[1] // k.shape[1])
        config = DKDV_TUNER.pick(key, BWD_CONFIGS,
                                 lambda c: _time_ms(lambda: _launch_dkdv(q, k, v, do, dk, dv, lse, delta, causal,
                                                                         scale, c)),
                                 torch.cuda.get_device_name(q.device))
    _launch_dkdv(q, k, v, do, dk, dv, lse, delta, causal, scale, config)
    return dk, dv, config


# (BLOCK_N, STAGES) of the dQ kernel: 128 resident query rows, K/V blocks of
# BLOCK_N keys through the ring.
DQ_CONFIGS = [(64, 3), (128, 2)]
DQ_TUNER = Tuner("dq")

# (STAGES, DQ_SLOTS, DS_BUFFERS) of the one-kernel backward (_bwd_kernel): Q/dO stages, dQ staging
# slots a warpgroup, and dS^T buffers. On the H100 at B 2 x H 16 x 8k, head dim 128, two slots or two
# dS^T buffers were as fast in one of two alternations and 15-20% slower in the other, three stages
# 3% slower (docs/measurements.md, 2026-12-07, session 20): one config, so nothing is tuned;
# `python -m tools.gluon_bwd5 --config 2 2 1` times another against the pair.
FUSED_CONFIGS = [(2, 1, 1)]
FUSED_HEAD_DIMS = (128,)  # each consumer warpgroup forms half of dQ's columns: 64
FUSED_TUNER = Tuner("bwd")
TUNERS = {"fwd": FWD_TUNER, "dkdv": DKDV_TUNER, "dq": DQ_TUNER, "bwd": FUSED_TUNER}  # for impls/attention/tuning.py


def _launch_dq(q, k, v, do, dq, lse, delta, causal, scale, config):
    B, H, S, D = q.shape
    block_n, stages = config
    grid = (triton.cdiv(S, 128), B * H)
    return ahead.launch(_dq_kernel, grid,
        _descriptor(q, 128), _descriptor(do, 128), _descriptor(k, block_n), _descriptor(v, block_n),
        dq, lse, delta,
        *q.stride()[:3], *do.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dq.stride()[:3],
        H, H // k.shape[1], S, scale * LOG2E, scale,
        D, bool(causal), 128, block_n, stages, CONSUMER_REGS, num_warps=4,
    )


def backward_dq(q, k, v, do, lse, delta, causal: bool, scale: float, config: tuple[int, int] | None = None):
    """(dq, config) from the forward's base-2 lse and delta = rowsum(dO * O), as flash_triton's dQ kernel."""
    dq = torch.empty_like(q)
    if config is None:
        key = (triton.next_power_of_2(q.shape[2]), q.shape[-1], bool(causal), str(q.dtype))
        config = DQ_TUNER.pick(key, DQ_CONFIGS,
                               lambda c: _time_ms(lambda: _launch_dq(q, k, v, do, dq, lse, delta, causal, scale, c)),
                               torch.cuda.get_device_name(q.device))
    _launch_dq(q, k, v, do, dq, lse, delta, causal, scale, config)
    return dq, config


def _dq_accumulator(B: int, H: int, S: int, device) -> torch.Tensor:
    # _bwd_kernel's fp32 dQ, zeroed: per head and 64-row query block, two 64x64 tiles in register order.
    return torch.zeros(B * H * triton.cdiv(S, 64) * 64 * 128, device=device, dtype=torch.float32)


def _accumulator_descriptor(dqa: torch.Tensor) -> "TensorDescriptor":
    # The accumulator as rows of 256 floats, one tile (16 rows, 16 KB) a copy: unswizzled, as the
    # staged tile is written in register order.
    flat = dqa.view(-1, 256)
    layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)
    return TensorDescriptor(flat, list(flat.shape), [256, 1], [16, 256], layout)


def _launch_bwd(q, k, v, do, dk, dv, dqa, lse, delta, causal, scale, config):
    B, H, S, D = q.shape
    stages, slots, ds_buffers = config
    grid = (triton.cdiv(S, 128), B * k.shape[1])
    lse_rows, delta_rows = _tma_rows(lse), _tma_rows(delta)
    return ahead.launch(_bwd_kernel, grid,
        _descriptor(k, 128), _descriptor(v, 128), _descriptor(q, 64), _descriptor(do, 64),
        _row_descriptor(lse_rows, 64), _row_descriptor(delta_rows, 64), _accumulator_descriptor(dqa), dk, dv,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
        H, H // k.shape[1], S, triton.cdiv(S, 64), lse_rows.shape[-1], scale * LOG2E, scale,
        D, bool(causal), stages, slots, ds_buffers, CONSUMER_REGS, num_warps=4,
    )


def dq_from_accumulator(dqa: torch.Tensor, dq: torch.Tensor, scale: float):
    """dq (B, H, S, 128, any strides, fp16/bf16) = scale * the dQ that _bwd_kernel added into dqa.

    dqa holds, per head and 64-row query block, warpgroup W's 64 columns as a
    4096-float tile in register order (_register_order): row w*16 + mh*8 + r
    and column W*64 + c*8 + l*2 + n at c*512 + w*128 + r*16 + l*4 + mh*2 + n.
    One program a block and head reads its 32 KB in order and writes it back as rows.
    """
    B, H, S, D = dq.shape
    grid = (triton.cdiv(S, 64), B * H)
    return ahead.launch(_dq_from_accumulator_kernel, grid, dqa, dq, *dq.stride()[:3], H, S, scale, num_warps=8)


def backward(q, k, v, do, lse, delta, causal: bool, scale: float, config: tuple[int, int, int] | None = None):
    """(dq, dk, dv, config): the three gradients from one kernel (head dim 128), from the forward's base-2
    lse and delta = rowsum(dO * O) as the other backward kernels take them; dq in q's layout."""
    B, H, S, D = q.shape
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    if config is None:
        def time_ms(c):  # the timed launches add into an accumulator of their own
            scratch = _dq_accumulator(B, H, S, q.device)
            return _time_ms(lambda: _launch_bwd(q, k, v, do, dk, dv, scratch, lse, delta, causal, scale, c))

        key = (triton.next_power_of_2(S), D, bool(causal), str(q.dtype), H // k.shape[1])
        config = FUSED_TUNER.pick(key, FUSED_CONFIGS, time_ms, torch.cuda.get_device_name(q.device))
    dqa = _dq_accumulator(B, H, S, q.device)
    _launch_bwd(q, k, v, do, dk, dv, dqa, lse, delta, causal, scale, config)
    dq = torch.empty_like(q)
    dq_from_accumulator(dqa, dq, scale)
    return dq, dk, dv, config


def describe(kernel: str, config: tuple) -> str:
    """A config of the "fwd", "dkdv", "dq" or "bwd" (one-kernel) kernel as the `kernel` column shows it."""
    warps = "1 loader warp + 2 consumer warpgroups"
    if kernel == "bwd":
        return (f"ws BLOCK_N=128 BLOCK_M=64 stages={config[0]} dq-slots={config[1]} ds-buffers={config[2]} "
                "1 loader warp + 1 reducer warp + 2 consumer warpgroups")
    if kernel == "fwd":
        block_m, block_n, stages, kind = config
        return f"{kind} BLOCK_M={block_m} BLOCK_N={block_n} stages={stages} {warps.replace('2', str(block_m // 64))}"
    if kernel == "dkdv":
        return f"ws BLOCK_N=128 BLOCK_M={config[0]} stages={config[1]} {'lse-late ' * bool(config[2])}{warps}"
    assert kernel == "dq", f"no Gluon kernel {kernel!r}"
    return f"ws BLOCK_M=128 BLOCK_N={config[0]} stages={config[1]} {warps}"
