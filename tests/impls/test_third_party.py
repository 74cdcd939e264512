"""The third-party adapters (impls/attention/third_party.py) on a CPU, against
stand-in modules put in sys.modules: each stand-in takes the library's real
signature, checks the layout, dtypes and flags it is given, and computes the
answer from what it was given, in the library's own conventions (window_size,
window_left, cu_seqlens, block tables, attention biases), with naive attention.
A wrong argument is then either a failed check or a wrong output."""

import sys
import types

import pytest
import torch

from bench.runner import Context, measure_one
from impls.attention import naive, third_party
from impls.attention.naive import NO_MASKS, Masks, Varlen, alibi_slopes
from suites import attention as suite
from tests.suites.test_attention_serving import within_flash_attention_rule

DTYPE = torch.bfloat16
ATOL = 1e-3


def _naive_bshd(q, k, v, causal, scale, masks):
    """naive attention on (B, S, H, D) tensors."""
    return naive.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal, scale, masks).transpose(1, 2)


def _per_sequence(q, k, v, cu_q, cu_k, fn):
    """Packed (T, H, D) q, k, v with int32 offsets: fn on each (1, S, H, D) pair, packed back."""
    assert cu_q.dtype == torch.int32 and cu_k.dtype == torch.int32, "cu_seqlens must be int32"
    assert cu_q[-1] == q.shape[0] and cu_k[-1] == k.shape[0]
    outs = [fn(q[None, a:b], k[None, c:d], v[None, c:d])[0] if b > a else q[a:b]
            for a, b, c, d in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist())]
    return torch.cat(outs)


# flash-attention 2 and 3

def _flash_masks(q, window_size, softcap, alibi_slopes_=None):
    if tuple(window_size) != (-1, -1):
        assert window_size[1] == 0, "genbench's window has no keys to the right"
    if alibi_slopes_ is not None:
        assert alibi_slopes_.dtype == torch.float32 and alibi_slopes_.shape == (q.shape[-2],)
        assert torch.equal(alibi_slopes_.double(), alibi_slopes(q.shape[-2]))
    return Masks(None if tuple(window_size) == (-1, -1) else window_size[0] + 1, softcap or None,
                 alibi_slopes_ is not None)


def _check_bshd(*ts):
    for t in ts:
        assert t.dim() == 4 and t.stride(-1) == 1, "flash-attention takes (B, S, H, D), last dim contiguous"


def _flash_module(calls, fa3=False):
    m = types.ModuleType("flash_attn_interface" if fa3 else "flash_attn")
    wrap = (lambda out: (out, None)) if fa3 else (lambda out: out)  # some FA3 builds return (out, lse)

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                        alibi_slopes=None, deterministic=False, return_attn_probs=False):
        _check_bshd(q, k, v)
        calls.append(("func", dict(causal=causal, window_size=window_size, softcap=softcap, heads=q.shape[2])))
        return wrap(_naive_bshd(q, k, v, causal, softmax_scale, _flash_masks(q, window_size, softcap, alibi_slopes)))

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                               deterministic=False, return_attn_probs=False, block_table=None):
        assert q.dim() == 3 and q.stride(-1) == 1, "packed (T, H, D)"
        assert max_seqlen_q == int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
        calls.append(("varlen", dict(causal=causal, cu=cu_seqlens_q.tolist())))
        masks = _flash_masks(q, window_size, softcap, alibi_slopes)
        return wrap(_per_sequence(q, k, v, cu_seqlens_q, cu_seqlens_k,
                                  lambda a, b, c: _naive_bshd(a, b, c, causal, softmax_scale, masks)))

    def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                                cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                                softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                rotary_interleaved=True, alibi_slopes=None, num_splits=0, page_table=None):
        table = page_table if fa3 else block_table
        assert (page_table if not fa3 else block_table) is None, "FA2 names it block_table, FA3 page_table"
        assert table.dtype == torch.int32 and cache_seqlens.dtype == torch.int32
        _check_bshd(q, k_cache, v_cache)
        B, n = table.shape
        kc, vc = (c[table.long()].reshape(B, -1, *c.shape[2:]) for c in (k_cache, v_cache))  # (B, n*P, Hkv, D)
        assert (cache_seqlens == kc.shape[1]).all()
        calls.append(("kvcache", dict(causal=causal, page=k_cache.shape[1])))
        return wrap(_naive_bshd(q, kc, vc, causal, softmax_scale, _flash_masks(q, window_size, softcap, alibi_slopes)))

    m.flash_attn_func, m.flash_attn_varlen_func, m.flash_attn_with_kvcache = (
        flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache)
    return m


# FlashInfer

def _infer(q, k, v, causal, pos_encoding_mode, window_left, logits_soft_cap, sm_scale=None):
    """q (Sq, H, D), k, v (Sk, Hkv, D) in FlashInfer's conventions -> (Sq, H, D)."""
    assert pos_encoding_mode in ("NONE", "ALIBI")
    masks = Masks(None if window_left < 0 else window_left + 1, logits_soft_cap or None, pos_encoding_mode == "ALIBI")
    return _naive_bshd(q[None], k[None], v[None], causal, sm_scale, masks)[0]


def _nhd(t, layout):
    """A page or sequence in `layout`: (P, Hkv, D) for NHD, (Hkv, P, D) for HND -> (P, Hkv, D)."""
    assert layout in ("NHD", "HND")
    return t if layout == "NHD" else t.transpose(0, 1)


def _flashinfer_module(calls):
    m = types.ModuleType("flashinfer")

    def single_decode_with_kv_cache(q, k, v, kv_layout="NHD", pos_encoding_mode="NONE", use_tensor_cores=False,
                                    q_scale=None, k_scale=None, v_scale=None, window_left=-1, logits_soft_cap=None,
                                    sm_scale=None, rope_scale=None, rope_theta=None):
        assert q.dim() == 2 and k.dim() == 3
        calls.append(("single_decode", kv_layout))
        return _infer(q[None], _nhd(k, kv_layout), _nhd(v, kv_layout), False, pos_encoding_mode, window_left,
                      logits_soft_cap, sm_scale)[0]

    def single_prefill_with_kv_cache(q, k, v, custom_mask=None, packed_custom_mask=None, causal=False,
                                     kv_layout="NHD", pos_encoding_mode="NONE", use_fp16_qk_reduction=False,
                                     sm_scale=None, window_left=-1, logits_soft_cap=None, rope_scale=None,
                                     rope_theta=None):
        assert q.dim() == 3 and q.is_contiguous(), "q (Sq, H, D)"
        calls.append(("single_prefill", kv_layout))
        return _infer(q, _nhd(k, kv_layout), _nhd(v, kv_layout), causal, pos_encoding_mode, window_left,
                      logits_soft_cap, sm_scale)

    class _Paged:
        def __init__(self, workspace, kv_layout="NHD"):
            assert workspace.dtype == torch.uint8
            self.layout = kv_layout

        def _plan(self, qo_indptr, indptr, indices, last_page_len, page_size, causal, masks):
            for t in (qo_indptr, indptr, indices, last_page_len):
                assert t is None or t.dtype == torch.int32
            self.qo, self.indptr, self.indices, self.last = qo_indptr, indptr, indices, last_page_len
            self.page_size, self.causal, self.masks = page_size, causal, masks

        def run(self, q, paged_kv_cache):
            k_cache, v_cache = paged_kv_cache
            outs = []
            for b in range(len(self.indptr) - 1):
                pages = self.indices[self.indptr[b]:self.indptr[b + 1]].long()
                kb, vb = (torch.cat([_nhd(c[p], self.layout) for p in pages])[: (len(pages) - 1) * self.page_size
                                                                               + int(self.last[b])]
                          for c in (k_cache, v_cache))
                qb = q[b:b + 1] if self.qo is None else q[self.qo[b]:self.qo[b + 1]]
                outs.append(_infer(qb, kb, vb, self.causal, *self.masks))
            return torch.cat(outs)

    class BatchDecodeWithPagedKVCacheWrapper(_Paged):
        def plan(self, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size,
                 pos_encoding_mode="NONE", window_left=-1, logits_soft_cap=None, q_data_type=None, kv_data_type=None,
                 sm_scale=None):
            calls.append(("batch_decode", self.layout))
            self._plan(None, indptr, indices, last_page_len, page_size, False,
                       (pos_encoding_mode, window_left, logits_soft_cap))

    class BatchPrefillWithPagedKVCacheWrapper(_Paged):
        def plan(self, qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, num_qo_heads,
                 num_kv_heads, head_dim_qk, page_size, causal=False, pos_encoding_mode="NONE", window_left=-1,
                 logits_soft_cap=None, q_data_type=None, kv_data_type=None, sm_scale=None):
            calls.append(("batch_prefill", self.layout))
            self._plan(qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, page_size, causal,
                       (pos_encoding_mode, window_left, logits_soft_cap))

    class BatchPrefillWithRaggedKVCacheWrapper:
        def __init__(self, workspace, kv_layout="NHD"):
            assert kv_layout == "NHD"

        def plan(self, qo_indptr, kv_indptr, num_qo_heads, num_kv_heads, head_dim_qk, causal=False,
                 pos_encoding_mode="NONE", window_left=-1, logits_soft_cap=None, q_data_type=None,
                 kv_data_type=None, sm_scale=None):
            calls.append(("ragged", "NHD"))
            self.qo, self.kv, self.causal = qo_indptr, kv_indptr, causal
            self.masks = (pos_encoding_mode, window_left, logits_soft_cap)

        def run(self, q, k, v):
            assert q.dim() == 3 and q.is_contiguous()
            return _per_sequence(q, k, v, self.qo, self.kv, lambda a, b, c: _infer(a[0], b[0], c[0], self.causal,
                                                                                   *self.masks)[None])

    for obj in (single_decode_with_kv_cache, single_prefill_with_kv_cache, BatchDecodeWithPagedKVCacheWrapper,
                BatchPrefillWithPagedKVCacheWrapper, BatchPrefillWithRaggedKVCacheWrapper):
        setattr(m, obj.__name__, obj)
    return m


# xformers

def _xformers_modules(calls):
    bias = types.ModuleType("xformers.ops.fmha.attn_bias")

    class LowerTriangularMask:
        def interpret(self, q_len, kv_len):
            assert q_len == kv_len, "top-left: only right for square inputs"
            return True, None, None

    class LowerTriangularFromBottomRightMask:
        def interpret(self, q_len, kv_len):
            return True, None, None

    class LowerTriangularFromBottomRightLocalAttentionMask:
        def __init__(self, _window_size):
            self.window = _window_size

        def interpret(self, q_len, kv_len):
            return True, self.window, None

    class BlockDiagonalMask:
        causal, window = False, None

        @classmethod
        def from_seqlens(cls, q_seqlen, kv_seqlen=None):
            assert all(n > 0 for n in q_seqlen), "xformers takes no empty sequence"
            mask = cls()
            mask.lengths = tuple(q_seqlen)
            return mask

        def interpret(self, q_len, kv_len):
            assert sum(self.lengths) == q_len == kv_len
            return self.causal, self.window, Varlen(self.lengths)

    class BlockDiagonalCausalMask(BlockDiagonalMask):
        causal = True

        def make_local_attention(self, window_size):
            local = BlockDiagonalCausalMask.from_seqlens(self.lengths)
            local.window = window_size
            return local

    for cls in (LowerTriangularMask, LowerTriangularFromBottomRightMask,
                LowerTriangularFromBottomRightLocalAttentionMask, BlockDiagonalMask, BlockDiagonalCausalMask):
        setattr(bias, cls.__name__, cls)

    ops = types.ModuleType("xformers.ops")

    def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None, *, op=None):
        grouped = query.shape if query.dim() == 5 else None
        if grouped:  # (B, S, Hkv, G, D): K and V broadcast over the group
            assert key.stride(3) == 0 and value.stride(3) == 0, "GQA: K, V expanded, not copied"
            query, key, value = query.flatten(2, 3), key[:, :, :, 0], value[:, :, :, 0]
        assert query.dim() == 4
        B, Sq, H, D = query.shape
        causal, window, varlen = (False, None, None) if attn_bias is None else attn_bias.interpret(Sq, key.shape[1])
        calls.append(("xformers", type(attn_bias).__name__))
        masks = Masks(window=window)
        out = naive.attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), causal, scale,
                              masks, varlen)
        out = out.transpose(1, 2)  # (B, S, H, D), 5-D again for 5-D inputs, as xformers returns
        return out.unflatten(2, grouped[2:4]) if grouped else out
    ops.memory_efficient_attention = memory_efficient_attention
    fmha = types.ModuleType("xformers.ops.fmha")
    fmha.attn_bias, ops.fmha = bias, fmha
    return {"xformers": types.ModuleType("xformers"), "xformers.ops": ops, "xformers.ops.fmha": fmha,
            "xformers.ops.fmha.attn_bias": bias}


@pytest.fixture
def installed(monkeypatch):
    """installed(name) puts the stand-in of `name` (a ROWS key) in sys.modules and returns its call log."""
    third_party._planned.cache_clear()

    def install(name):
        calls = []
        modules = {"flash-attn": lambda: {"flash_attn": _flash_module(calls)},
                   "flash-attn3": lambda: {"flash_attn_interface": _flash_module(calls, fa3=True)},
                   "flashinfer": lambda: {"flashinfer": _flashinfer_module(calls)},
                   "xformers": lambda: _xformers_modules(calls)}[name]()
        for key, module in modules.items():
            monkeypatch.setitem(sys.modules, key, module)
        return calls

    yield install
    third_party._planned.cache_clear()


def _inputs(B=2, H=4, Hkv=2, Sq=5, Sk=40, D=16, lengths=None, page_size=None):
    g = torch.Generator().manual_seed(0)
    varlen = Varlen(lengths) if lengths else None
    if varlen:
        B, Sq, Sk = 1, varlen.total, varlen.total
    q = torch.randn(B, H, Sq, D, generator=g).to(DTYPE)
    k, v = (torch.randn(B, Hkv, Sk, D, generator=g).to(DTYPE) for _ in range(2))
    kw = {"varlen": varlen} if varlen else {}
    k_in, v_in = k, v
    if page_size:
        k_in, kw["block_table"] = naive.pages(k, page_size, torch.Generator().manual_seed(0))
        v_in, _ = naive.pages(v, page_size, torch.Generator().manual_seed(0))
    return q, k, v, k_in, v_in, kw


def _check(name, causal=True, masks=NO_MASKS, backward=False, **shape):
    """Runs ROWS[name] and checks it by the rule against float64; returns its kernel description."""
    row = third_party.ROWS[name]
    q, k, v, k_in, v_in, kw = _inputs(**shape)
    if masks:
        kw["masks"] = masks
    assert row.why_not(q, k_in, v_in, causal, **kw) is None
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(DTYPE)
    ref_out, ref_grads = naive.reference(q, k, v, causal, dout if backward else None, masks=masks,
                                         varlen=kw.get("varlen"))

    def run(fn, k, v, **kw):
        qs, ks, vs = (t.clone().requires_grad_(backward) for t in (q, k, v))
        out = fn(qs, ks, vs, causal, **kw)
        return [out, *torch.autograd.grad(out, (qs, ks, vs), dout)] if backward else [out]

    got = run(row.attention, k_in, v_in, **kw)
    assert got[0].shape == q.shape and got[0].dtype == DTYPE
    lowp = run(naive.attention, k, v, masks=masks, varlen=kw.get("varlen"))
    assert not within_flash_attention_rule(got, lowp, [ref_out, *(ref_grads or ())], ATOL)
    return row.describe(q, k_in, v_in, causal, **kw)


ALL_MASKS = Masks(window=9, softcap=3.0, alibi=True)


@pytest.mark.parametrize("name", ["flash-attn", "flash-attn3"])
def test_flash_attention(installed, name):
    calls = installed(name)
    fa3 = name == "flash-attn3"
    module = "flash_attn_interface" if fa3 else "flash_attn"
    assert _check(name, backward=True) == f"{module}.flash_attn_func"
    assert calls[-1] == ("func", dict(causal=True, window_size=(-1, -1), softcap=0.0, heads=4))  # (B, S, H, D)
    masks = Masks(window=9, softcap=3.0, alibi=not fa3)
    _check(name, masks=masks, Hkv=1)
    assert calls[-1][1]["window_size"] == (8, 0) and calls[-1][1]["softcap"] == 3.0
    _check(name, causal=False, Sq=50)
    assert _check(name, lengths=(0, 1, 13, 0, 7), backward=True) == f"{module}.flash_attn_varlen_func"
    assert calls[-1] == ("varlen", dict(causal=True, cu=[0, 0, 1, 14, 14, 21]))
    _check(name, masks=masks, lengths=(5, 1, 20))
    page = 256 if not fa3 else 16  # FA2's paged cache takes multiples of 256
    assert _check(name, Sq=1, Sk=2 * page, page_size=page) == f"{module}.flash_attn_with_kvcache"
    assert calls[-1] == ("kvcache", dict(causal=True, page=page))
    _check(name, masks=masks, Sq=3, Sk=2 * page, page_size=page)


def test_flash_attention_declines_what_it_cannot_run(installed):
    installed("flash-attn")
    installed("flash-attn3")
    q, k, v, *_ = _inputs()
    fa2, fa3 = third_party.ROWS["flash-attn"].why_not, third_party.ROWS["flash-attn3"].why_not
    assert fa2(q.float(), k.float(), v.float(), True) == "flash_attn takes fp16 and bf16 only"
    assert "without causal" in fa2(q, k, v, False, masks=Masks(alibi=True))
    assert fa3(q, k, v, True, masks=Masks(alibi=True)) == "flash-attention 3 has no ALiBi"
    _, _, _, k_in, v_in, kw = _inputs(Sq=1, Sk=64, page_size=16)
    assert "multiple of 256" in fa2(q, k_in, v_in, True, **kw) and fa3(q, k_in, v_in, True, **kw) is None


def test_flashinfer(installed):
    calls = installed("flashinfer")
    assert _check("flashinfer", B=1, Sq=1) == "flashinfer.single_decode_with_kv_cache"
    assert _check("flashinfer", B=1, Sq=7, masks=ALL_MASKS) == "flashinfer.single_prefill_with_kv_cache"
    assert calls[-2:] == [("single_decode", "HND"), ("single_prefill", "HND")]  # our K, V as they are
    described = _check("flashinfer", Sq=1, masks=ALL_MASKS)
    assert described == "flashinfer.BatchDecodeWithPagedKVCacheWrapper (a page per sequence)"
    assert _check("flashinfer", Sq=6, Hkv=1).startswith("flashinfer.BatchPrefillWithPagedKVCacheWrapper")
    assert calls[-2:] == [("batch_decode", "HND"), ("batch_prefill", "HND")]
    assert _check("flashinfer", Sq=1, Sk=64, page_size=16) == "flashinfer.BatchDecodeWithPagedKVCacheWrapper"
    _check("flashinfer", Sq=4, Sk=64, page_size=8, masks=ALL_MASKS)
    assert calls[-2:] == [("batch_decode", "NHD"), ("batch_prefill", "NHD")]  # genbench's pages
    assert _check("flashinfer", lengths=(3, 0, 1, 30), masks=ALL_MASKS) == \
        "flashinfer.BatchPrefillWithRaggedKVCacheWrapper"
    q, k, v, *_ = _inputs()
    assert third_party.ROWS["flashinfer"].why_not(q.requires_grad_(), k, v, True) == \
        "FlashInfer has no backward (inference kernels)"


def test_flashinfer_plans_once_per_shape(installed):
    calls = installed("flashinfer")
    q, k, v, k_in, v_in, kw = _inputs(Sq=1, Sk=64, page_size=16)
    for _ in range(3):
        third_party.ROWS["flashinfer"].attention(q, k_in, v_in, True, **kw)
    assert calls == [("batch_decode", "NHD")]


def test_xformers(installed):
    calls = installed("xformers")
    assert _check("xformers", backward=True) == "xformers.ops.memory_efficient_attention"
    assert calls[-1] == ("xformers", "LowerTriangularFromBottomRightMask")
    _check("xformers", Sq=33, Sk=33, Hkv=1, backward=True)
    assert calls[-1] == ("xformers", "LowerTriangularMask")
    _check("xformers", causal=False, Hkv=4)
    _check("xformers", masks=Masks(window=7))
    _check("xformers", lengths=(0, 1, 13, 7), backward=True)
    _check("xformers", lengths=(9, 1, 20), masks=Masks(window=4))
    assert calls[-1] == ("xformers", "BlockDiagonalCausalMask")
    q, k, v, k_in, v_in, kw = _inputs(Sq=1, Sk=64, page_size=16)
    why = third_party.ROWS["xformers"].why_not
    assert "no block table" in why(q, k_in, v_in, True, **kw)
    assert "no ALiBi or soft-capping" in why(q, k, v, True, masks=Masks(softcap=2.0))


@pytest.mark.parametrize("name, module", [("flash-attn", "flash_attn"), ("flash-attn3", "flash_attn_interface"),
                                          ("flashinfer", "flashinfer"), ("xformers", "xformers")])
def test_absent_library_is_an_unsupported_row(monkeypatch, name, module):
    monkeypatch.setitem(sys.modules, module, None)  # an import of it raises ModuleNotFoundError
    if module == "xformers":
        monkeypatch.setitem(sys.modules, "xformers.ops", None)
    opts = suite.AttentionOptions(q_lens=(1,), kv_lens=(32,), heads=2, head_dim=16, causal=(True,), impls=(name,))
    m = measure_one(suite.sweep(opts), opts.configs()[0], Context(torch.device("cpu"), warmup_ms=1, rep_ms=5))
    assert m.status == "unsupported" and m.reason == f"{module} not installed"


def test_installed_library_is_a_measured_row(installed):
    installed("flash-attn")
    opts = suite.AttentionOptions(q_lens=(3,), kv_lens=(32,), heads=4, kv_heads=2, head_dim=16, causal=(True,),
                                  impls=("flash-attn",), window=8)
    m = measure_one(suite.sweep(opts), opts.configs()[0], Context(torch.device("cpu"), warmup_ms=1, rep_ms=5))
    assert m.status == "ok", m.reason
    assert m.values["kernel"] == "flash_attn.flash_attn_func" and m.values["rel_err"] < 1e-2
