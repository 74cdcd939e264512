"""A user's own Hugging Face causal LM, from a local folder and offline, for
vanilla and prompt-lookup decoding.

    lm = load("path/to/model", device, torch.bfloat16)   # transformers, local_files_only=True
    dec = HFLookupDecoder(lm, k=8)
    tokens = dec.generate(prompt, max_new=128)

Both decoders use the model's own dynamic KV cache (cropped back to the
accepted length after a lookup verification) and run eagerly, one
Python-driven step at a time: the same care for both, so their ratio is fair.
Medusa heads and a draft model would have to be trained for the user's model,
and its attention would have to take a tree mask through transformers' many
attention implementations; those methods are genbench-GPT only.

transformers is an optional dependency (pip install 'genbench[hf]').
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from impls import medusa
from impls.decoding import DecodeLoop, lookup_continuation


def why_not() -> str | None:
    """None if transformers can be imported, else what to install."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return "a Hugging Face model needs transformers: pip install 'genbench[hf]'"
    return None


def is_model_folder(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file()


class HFModel:
    """A causal LM and, when the folder has one, its tokenizer."""

    def __init__(self, path: str | Path, device: torch.device, dtype: torch.dtype):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.path = Path(path)
        # Cast after loading rather than through from_pretrained's dtype argument,
        # whose name changed between transformers 4 and 5.
        self.model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
        self.model = self.model.to(device=device, dtype=dtype).eval()
        self.device, self.dtype = device, dtype
        self.tokenizer = None
        if any((self.path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        cfg = self.model.config
        self.vocab_size = int(cfg.vocab_size)
        self.max_positions = int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 0)
                                 or 2**31)
        self.name = getattr(cfg, "model_type", "hf")
        # transformers renamed past_key_values to cache (in and out) during 5.x.
        self.cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Plain forward without a cache: ids (T,) -> logits (T, V)."""
        return self.model(input_ids=ids[None].to(self.device), use_cache=False).logits[0]


class HFVanillaDecoder(DecodeLoop):
    """Greedy (or sampled) decoding, one token per forward, with the model's cache.

    The loop (runs of steps, the tokens and counts read back) is
    impls.decoding's; a step here is one eager forward whose host-side
    position `cur_int` slices the model's dynamic cache.
    """

    name = "vanilla"
    mode = "eager"
    depth = 0

    def __init__(self, lm: HFModel, *, max_len: int, temperature: float = 0.0, **_):
        self.lm, self.temperature = lm, temperature
        self.seq = torch.zeros(max_len + self.depth + 2, dtype=torch.long, device=lm.device)
        self.cur = torch.zeros(1, dtype=torch.long, device=lm.device)
        self.prompt_len, self.cur_int, self.cache = 0, 0, None
        self.hist = torch.zeros(self.depth + 1, dtype=torch.long)  # on the CPU: counted by the host
        # The dynamic cache has no fixed length to prepare steps for: one eager step serves every length.
        self.width, self.lengths = self.depth + 1, [max_len]
        self._runs = {max_len: self._step}

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.lm.model(input_ids=ids[None], use_cache=True, **{self.lm.cache_arg: self.cache})
        self.cache = out.get(self.lm.cache_arg)
        return out.logits[0]  # (T, V)

    def prepare(self) -> None:
        """Nothing to capture: Hugging Face models run eagerly here."""

    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor) -> None:
        P = prompt.numel()
        self.cache = None
        self.seq.zero_()
        self.seq[:P] = prompt.to(self.lm.device)
        self.seq[P] = self._pick(self._forward(self.seq[:P])[-1])
        self.prompt_len, self.cur_int = P, P
        self.cur.fill_(P)
        self.hist.zero_()

    def _step(self) -> None:
        p = self.cur_int
        self.seq[p + 1] = self._pick(self._forward(self.seq[p:p + 1])[-1])
        self._advance(0)

    def _advance(self, n: int) -> None:
        self.hist[n] += 1
        self.cur_int += n + 1
        self.cur.fill_(self.cur_int)


class HFLookupDecoder(HFVanillaDecoder):
    """Prompt-lookup decoding: k guesses verified in one forward, then the
    cache cropped back to the tokens kept."""

    name = "lookup"

    def __init__(self, lm: HFModel, k: int = 8, max_ngram: int = 3, *, max_len: int, temperature: float = 0.0,
                 posterior_threshold: float = 0.09, posterior_alpha: float = 0.3, **_):
        self.depth = k
        super().__init__(lm, max_len=max_len, temperature=temperature)
        self.k, self.max_ngram = k, max_ngram
        self.posterior_threshold, self.posterior_alpha = posterior_threshold, posterior_alpha
        self.b = medusa.Tree.chain(k).buffers(lm.device)

    def _step(self) -> None:
        p = self.cur_int
        chain = torch.cat([self.seq[p:p + 1], lookup_continuation(self.seq, self.cur, self.k, self.max_ngram)])
        logits = self._forward(chain)  # (k + 1, V)
        if self.temperature > 0:
            acc = medusa.typical_accept(chain, logits, self.b, self.temperature, self.posterior_threshold,
                                        self.posterior_alpha)
        else:
            acc = medusa.greedy_accept(chain, logits, self.b)
        n = int(acc.n.item())
        if not hasattr(self.cache, "crop"):
            raise RuntimeError("this transformers version's cache has no crop(): rejected guesses cannot be dropped")
        if self.k > n:
            # Drop the rejected guesses, keeping the root and the n accepted ones. A
            # negative count means "remove this many" in transformers 4 and 5 alike
            # (5 refuses the older positive "keep this many").
            self.cache.crop(-(self.k - n))
        self.seq[p:p + n + 1] = chain[:n + 1]
        self.seq[p + n + 1] = acc.bonus
        self._advance(n)


def load(path: str | Path, device: torch.device, dtype: torch.dtype) -> HFModel:
    return HFModel(path, device, dtype)
