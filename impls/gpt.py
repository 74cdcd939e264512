"""A small GPT: the decoder-only transformer shared by the precision, DDP and Medusa suites.

One file holds the whole model and nothing of training or timing:

    config = GPTConfig.from_name("tiny", vocab_size=tokenizer.vocab_size)
    model = GPT(config)
    logits, loss = model(idx, targets)                  # training: (B, T) -> (B, T, V)

    model.setup_cache(batch=1, max_len=512)             # decoding with a static KV cache
    logits, _ = model(prompt, input_pos=torch.arange(T0))
    logits, _ = model(next_tok, input_pos=torch.tensor([T0]))
    logits, _ = model(tree_tokens, input_pos=..., cache_pos=..., mask=TreeMask(bits, lengths))  # a speculative tree

Blocks are pre-norm (x + attn(ln(x)), x + mlp(ln(x))). The norm is LayerNorm rather
than RMSNorm because that is what GPT-2 uses: the `gpt2-small` preset then has exactly
the published 124M parameters, and its FLOP and MFU numbers can be set beside others'.

The token table (wte, tied to lm_head) has `padded_vocab_size` rows, the tokenizer's
vocabulary rounded up to a multiple of 64 as nanoGPT does: a (B·T, C) x (C, V) product
whose V is a multiple of 64 tiles evenly on tensor cores, and GPT-2's odd 50257 does not.
The padding rows are never read (token ids are below vocab_size) and never scored: the
logits are sliced back to vocab_size, so the loss, argmax and top-k see the real vocabulary.

Positions are GPT-2's learned table (`wpe`, block_size rows) by default; `pos_encoding`
chooses another of impls/posenc.py: `sinusoidal` (a fixed table added in its place),
`rope` / `rope-gptj` (q and k rotated inside attention, `rope_scaling` for PI or NTK
past the training length), `alibi` (a bias on the scores, through SDPA's attn_mask) or
`none`. Only `learned` has parameters: the others' state_dicts lack `wpe` and nothing else.

With a KV cache, attention is SDPA with the mask the caller gives, or, for a
`TreeMask` (a speculative tree written at the cache's last slots, as Medusa
verifies one), the split-KV decode kernel of impls/attention/flash_triton.py,
which reads the tree's visibility as one int64 of bits per token instead of a
(T, L) mask.
"""

import inspect
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from impls import posenc


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 8192  # the tokenizer's (default: impls/data.py's BPE); logits cover exactly these ids
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 256  # longest context: the number of learned positions
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm, as in GPT-2
    vocab_multiple: int = 64  # wte/lm_head rows are padded to a multiple of this (1: no padding)
    pos_encoding: str = "learned"  # one of impls/posenc.py ENCODINGS
    rope_base: float = posenc.ROPE_BASE
    rope_scaling: posenc.RopeScaling | None = None  # RoPE run past its training length (PI, NTK)

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not a multiple of n_head {self.n_head}")
        if self.pos_encoding not in posenc.ENCODINGS:
            raise ValueError(f"unknown pos_encoding {self.pos_encoding!r}; known: {', '.join(posenc.ENCODINGS)}")
        if self.pos_encoding in posenc.ROPE_LAYOUTS:
            posenc.check_head_dim(self.n_embd // self.n_head)
        if self.vocab_multiple < 1:
            raise ValueError(f"vocab_multiple must be at least 1, got {self.vocab_multiple}")

    @property
    def padded_vocab_size(self) -> int:
        """Rows of wte and lm_head: vocab_size rounded up to a multiple of vocab_multiple (50257 -> 50304)."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    @classmethod
    def from_name(cls, name: str, **overrides) -> "GPTConfig":
        """The preset called `name`, with any field replaced by `overrides` (e.g. vocab_size).

        An unknown name raises ValueError listing the known ones.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown GPT preset {name!r}; known presets: {', '.join(PRESETS)}")
        return replace(PRESETS[name], **overrides)


PRESETS = {
    # ~1.5M params with the 8192 vocabulary, 0.4M of them in the blocks: the loss falls
    # visibly within seconds of CPU training, which is what tests and smoke runs need.
    "tiny": GPTConfig(n_layer=2, n_head=4, n_embd=128, block_size=256),
    # ~30M params with the 8192 vocabulary: a model worth training for minutes on one GPU.
    "small": GPTConfig(n_layer=8, n_head=8, n_embd=512, block_size=512),
    # GPT-2's smallest shape: 124,439,808 params with its 50257-token vocabulary (num_params;
    # the token table holds 50304 rows, 36,096 more weights, see GPT.num_params).
    "gpt2-small": GPTConfig(vocab_size=50257, n_layer=12, n_head=12, n_embd=768, block_size=1024),
    # ~210M params: large enough that one decoding step is bound by reading the weights
    # on a datacenter GPU, which is the regime speculative decoding is meant for.
    "medium": GPTConfig(n_layer=16, n_head=16, n_embd=1024, block_size=1024),
}


@dataclass(frozen=True)
class TreeMask:
    """Attention of T new tokens through the split-KV decode kernel instead of SDPA with a mask.

    The tokens' K/V are written at the slots lengths - T .. lengths - 1 of the
    cache; token i sees every slot before them and, among theirs, slot
    lengths - T + j when bit j of bits[i] is set (impls.medusa.tree_bits).
    Slots from lengths on are not read. No ALiBi: its bias lives in a dense mask.
    """

    bits: torch.Tensor  # (T,) int64, T <= 64
    lengths: torch.Tensor  # (B,) int32 on the device: slots each sequence has, the tree's included


def cache_attention(q, k, v, mask, dropout_p: float = 0.0):
    """Attention of new tokens q (B, H, T, D) over the cache k, v (B, H, L, D).

    mask: additive (0 where a query may attend, -inf elsewhere), broadcastable
    to (B, H, T, L), through SDPA; or a TreeMask, through the decode kernel
    (inference only: no dropout, no gradient).
    """
    if isinstance(mask, TreeMask):
        from impls.attention import flash  # triton only where a tree mask is asked for

        assert dropout_p == 0.0, "the decode kernel has no dropout"
        return flash.attention(q, k, v, False, cache_seqlens=mask.lengths, tree_bits=mask.bits)  # the bits alone mask
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


# The sinusoidal table's scale beside token embeddings initialized at std 0.02 (see GPT._positions).
SINUSOIDAL_SCALE = 0.02


class KVCache(nn.Module):
    """Preallocated keys and values for one layer; new entries are written at given slots."""

    def __init__(self, batch, n_head, max_len, head_dim, dtype, device):
        super().__init__()
        shape = (batch, n_head, max_len, head_dim)  # (B, H, L, D)
        # Not persistent: a cache is scratch space and must not end up in a state_dict.
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, cache_pos, k, v):
        # cache_pos: (T,) slots; k, v: (B, H, T, D). Returns the whole cache, (B, H, L, D) each.
        self.k[:, :, cache_pos] = k
        self.v[:, :, cache_pos] = v
        return self.k, self.v


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.rope_layout = posenc.ROPE_LAYOUTS.get(config.pos_encoding)
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.kv_cache = None

    def forward(self, x, cache_pos=None, mask=None, rope=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if rope is not None:  # (cos, sin), each (T, D/2): the new tokens' positions, before K enters any cache
            q, k = (posenc.apply_rope(t, *rope, layout=self.rope_layout) for t in (q, k))
        dropout_p = self.dropout if self.training else 0.0
        if isinstance(mask, torch.Tensor) and mask.is_floating_point():
            mask = mask.to(q.dtype)  # SDPA takes a float mask of the query's dtype only
        if cache_pos is None:  # causal attention over this sequence; any cache is left alone
            # mask: None, or causal's -inf plus a score bias (ALiBi), additive, (H, T, T).
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None)
        else:
            k, v = self.kv_cache.update(cache_pos, k, v)  # (B, H, L, D)
            y = cache_attention(q, k, v, mask, dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        # The tanh approximation is GPT-2's GELU; the exact erf form differs by ~1e-3.
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache_pos=None, mask=None, rope=None):
        x = x + self.attn(self.ln_1(x), cache_pos, mask, rope)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            **({"wpe": nn.Embedding(config.block_size, config.n_embd)} if config.pos_encoding == "learned" else {}),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        # Tied embeddings: one (V_pad, C) matrix both reads tokens in and scores them out.
        # The padding rows are initialized like the others; only their logits, sliced away, use them.
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2 scales the init of each layer's last projection by 1/sqrt(2 * n_layer):
        # every block adds two of them to the residual stream, whose variance would
        # otherwise grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count of the model over its real vocabulary; non_embedding leaves
        out the position table.

        The token table stays in: it is tied to lm_head, so it costs a real matmul per
        token, whereas looking up a position row costs nothing. Its padding rows
        ((padded_vocab_size - vocab_size) x n_embd, 36,096 for gpt2-small) are left out:
        lm_head multiplies them, but they are never read nor scored, an implementation's
        choice rather than the model's, as PaLM keeps recomputation out of model FLOPs.
        So flops_per_token, and the MFU taken from it, count the real vocabulary.
        """
        n = sum(p.numel() for p in self.parameters())  # parameters() yields the tied matrix once
        n -= (self.config.padded_vocab_size - self.config.vocab_size) * self.config.n_embd
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs (forward + backward) per token at context length seq_len.

        6·N + 12·n_layer·n_embd·seq_len, as in the PaLM paper (Chowdhery et al. 2022,
        appendix B) and Chinchilla-style MFU accounting. N = num_params(non_embedding=True)
        covers every matmul with a weight: 2 FLOPs per weight per token forward, twice that
        backward (biases and norm gains add a negligible few). The second term is
        attention's QK^T and AV: 2·2·seq_len·n_embd per layer forward, tripled for the
        backward; it counts the full seq_len×seq_len scores, not the causal half, as PaLM
        does. Norms, GELU and softmax are left out. A forward pass alone is a third of this.
        The token table counts vocab_size rows, not the padded ones (see num_params).
        """
        cfg = self.config
        return 6 * self.num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_embd * seq_len

    def setup_cache(self, batch: int, max_len: int, dtype=None, device=None):
        """Give every layer a zeroed static KV cache of max_len slots; dtype/device default to the model's."""
        w = self.lm_head.weight
        head_dim = self.config.n_embd // self.config.n_head
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache(batch, self.config.n_head, max_len, head_dim,
                                          dtype or w.dtype, device or w.device)

    def clear_cache(self):
        for block in self.transformer.h:
            block.attn.kv_cache = None

    @torch.no_grad()
    def move_cache(self, src_pos: torch.Tensor, dst_pos: torch.Tensor):
        """Copy cached K/V from slots src_pos to slots dst_pos in every layer.

        After tree verification the accepted path sits at scattered slots; Medusa
        (Cai et al. 2024) copies it down to consecutive slots before the next step.
        """
        for block in self.transformer.h:
            cache = block.attn.kv_cache
            cache.k[:, :, dst_pos] = cache.k[:, :, src_pos]  # gather first, so overlaps are safe
            cache.v[:, :, dst_pos] = cache.v[:, :, src_pos]

    def forward(self, idx, targets=None, *, input_pos=None, cache_pos=None, mask=None, return_hidden=False):
        """Logits for every position of idx (B, T), and the loss if targets (B, T) are given.

        Without input_pos this is the plain causal forward used in training; a KV cache, if
        set up, is neither read nor written. With input_pos the cache (see setup_cache) is used: input_pos (T,) gives the new tokens' positions,
        cache_pos (T,) the slots their K/V are written to (default: input_pos), and mask, a
        bool tensor broadcastable to (B, 1, T, max_len), says which slots each new token
        may attend to (default: causal, slot <= position); an additive float mask of the
        cache's dtype is used as it is; a TreeMask runs the decode kernel instead. A Medusa tree passes its own
        mask, positions prefix_len + depth, and distinct slots prefix_len + node index.
        return_hidden also returns the final hidden states (B, T, C), after ln_f.
        """
        B, T = idx.shape
        if input_pos is None:
            if mask is not None:
                raise ValueError("an explicit mask is only taken with input_pos (the KV-cache path)")
            if T > self.config.block_size:
                raise ValueError(f"a sequence of {T} tokens exceeds block_size {self.config.block_size}")
            input_pos = torch.arange(T, device=idx.device)
        else:
            cache = self.transformer.h[0].attn.kv_cache
            if cache is None:
                raise RuntimeError("input_pos needs a KV cache: call setup_cache first")
            cache_pos = input_pos if cache_pos is None else cache_pos
            if mask is None:
                slots = torch.arange(cache.k.shape[2], device=idx.device)
                mask = slots[None, :] <= input_pos[:, None]  # (T, L): causal over slots
            if isinstance(mask, TreeMask):
                if self.config.pos_encoding == "alibi":
                    raise ValueError("ALiBi's bias needs a dense mask: a TreeMask cannot carry it")
            elif mask.dtype == torch.bool:
                # SDPA turns a bool mask into an additive one on every call: done once
                # here instead of once per layer (a kernel per layer per decoding step).
                mask = torch.full(mask.shape, float("-inf"), dtype=cache.k.dtype, device=idx.device).masked_fill_(mask, 0.0)
        x, rope, mask = self._positions(self.transformer.wte(idx), input_pos, cache_pos is not None, mask)
        x = self.transformer.drop(x)  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, cache_pos, mask, rope)
        x = self.transformer.ln_f(x)
        # (B, T, V): the padding rows' scores dropped, so that no softmax, argmax or top-k
        # sees an id the tokenizer does not have. A strided view, not a copy.
        logits = self.lm_head(x)[..., :self.config.vocab_size]
        loss = None
        if targets is not None:
            # Upcast so a bf16/fp16 model's loss is still reduced in fp32; -1 marks ignored targets.
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return (logits, loss, x) if return_hidden else (logits, loss)

    def _positions(self, x, input_pos, cached: bool, mask):
        """The position encoding applied: x (B, T, C) with an absolute table
        added, RoPE's (cos, sin) for the attention layers, and the mask with
        ALiBi's bias added (None: plain causal). With a cache, ALiBi's key
        positions are their slots, as in decoding (a Medusa tree's scattered
        slots would need their own positions)."""
        cfg, rope = self.config, None
        if cfg.pos_encoding == "learned":
            x = x + self.transformer.wpe(input_pos)
        elif cfg.pos_encoding == "sinusoidal":
            # Scaled to the token embeddings' initial std: the ratio Vaswani et al. (2017, 3.4)
            # get by multiplying embeddings of std 1/sqrt(C) by sqrt(C) before adding the table.
            x = x + SINUSOIDAL_SCALE * posenc.sinusoidal(input_pos, cfg.n_embd).to(x.dtype)
        elif cfg.pos_encoding in posenc.ROPE_LAYOUTS:
            rope = posenc.rope_angles(input_pos, cfg.n_embd // cfg.n_head, cfg.rope_base, cfg.rope_scaling)
        elif cfg.pos_encoding == "alibi":
            keys = torch.arange(self.transformer.h[0].attn.kv_cache.k.shape[2], device=x.device) if cached \
                else input_pos
            bias = posenc.alibi_bias(cfg.n_head, input_pos, keys)  # (H, T, T or L)
            if not cached:
                bias = bias.masked_fill(keys[None, :] > input_pos[:, None], float("-inf"))  # causal
            mask = bias if mask is None else mask + bias
        return x, rope, mask

    def configure_optimizer(self, weight_decay: float, lr: float, betas: tuple[float, float], device_type: str):
        """AdamW with weight decay on matrices only (not biases, norms' gains).

        The fused CUDA kernel is used when this torch has it and device_type is "cuda";
        `optimizer.defaults["fused"]` tells the caller which one it got.
        """
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        extra = {"fused": True} if fused else {}
        return torch.optim.AdamW(groups, lr=lr, betas=betas, **extra)
