"""Where a batch-1 decoding step's time goes, piece by piece.

Random weights (timing does not depend on them), bf16, every piece captured in
a CUDA graph and replayed, as the medusa suite runs its steps: forwards of 1 to
256 tokens, attention over the static cache by SDPA backend, the heads' top-k,
greedy acceptance, the tree mask, the K/V move, the step's Triton kernels
(impls/decoding_triton.py) and the whole steps of vanilla, Medusa and prompt
lookup. Prints one line per piece and writes OUT_DIR/step_costs.json. From the
repository root:

    python3 -m tools.medusa_step_costs OUT_DIR [--compile] [--steps-only] [--shapes 2048x16,4096x8]

The model is impls.gpt's "medium" shape (--shape 1024x16, n_embd x n_layer).
--steps-only skips the forward and SDPA-backend tables; --shapes adds, for each
n_embd x n_layer, the whole steps of vanilla and Medusa (64 nodes) with the
step's Triton kernels and with PyTorch ops. Without a GPU it runs eagerly in
fp32 with two repetitions: a check that the script runs, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from impls import decoding, decoding_triton, medusa
from impls.gpt import GPT, GPTConfig

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: a smoke test of the script only
VOCAB, PROMPT, MAX_LEN = 8192, 128, 1024
REPS = 300 if DEV.type == "cuda" else 2


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def capture(fn):
    return decoding.capture(fn, DEV) if DEV.type == "cuda" else fn


def per_call_ms(run, reps: int = REPS, reset=None) -> tuple[float, float]:
    """Median and spread (min..max over 5 batches) of one replay, in ms; reset() runs untimed before each batch."""
    for _ in range(20 if DEV.type == "cuda" else 1):
        run()
    times = []
    for _ in range(5):
        if reset is not None:
            reset()
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            run()
        sync()  # replays queue back to back; one sync per batch leaves only its own latency
        times.append((time.perf_counter() - t0) * 1e3 / reps)
    return statistics.median(times), max(times) - min(times)


def kernels_per_call(fn) -> int:
    """Device kernels one eager call launches (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    if DEV.type != "cuda":
        return None
    fn()
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync()
    return sum(1 for e in prof.events() if e.device_type.name == "CUDA" and "Memcpy" not in e.name
               and "Memset" not in e.name)


def whole_steps(model, heads, note, modes, sizes=(64, 128, 256), length=None) -> None:
    """One decoding step of each method, replayed as the suite replays it, at cache length `length`."""
    prompt = torch.randint(VOCAB, (PROMPT,), device=DEV)
    for mode in modes:
        kernels = (True, False) if mode != "compile" and decoding_triton.available(DEV) else (False,)
        decoders = []
        for fused in kernels:
            tag = mode + ("+triton" if fused else "")
            decoders.append((f"{tag} step vanilla", lambda fused=fused: decoding.VanillaDecoder(
                model, max_len=MAX_LEN, mode=mode, fused=fused)))
            for size in sizes if mode != "compile" else (64,):
                tree = medusa.default_tree(heads.n_heads, size)
                decoders.append((f"{tag} step medusa N={size}", lambda tree=tree, fused=fused: decoding.MedusaDecoder(
                    model, heads, tree, max_len=MAX_LEN, mode=mode, fused=fused)))
            if mode != "compile":
                decoders.append((f"{tag} step lookup k=8", lambda fused=fused: decoding.LookupDecoder(
                    model, 8, max_len=MAX_LEN, mode=mode, fused=fused)))
        for name, make in decoders:
            t0 = time.perf_counter()
            dec = make()
            dec.prepare()
            prep_s = time.perf_counter() - t0
            n = length or dec.lengths[-1]
            # Each batch of 40 steps starts from a fresh prefill, so that even a
            # step accepting its whole depth every time stays inside the cache.
            dec.prefill(prompt)
            ms, spread = per_call_ms(dec._runs[n], reps=40 if DEV.type == "cuda" else 2,
                                     reset=lambda dec=dec: dec.prefill(prompt))
            dec.prefill(prompt)
            dec._attend(n)
            k = kernels_per_call(dec._step) if mode == "graph" else None
            note(f"{name} L={n}", ms, spread, k, prepare_s=round(prep_s, 1))


def _shape(text: str) -> tuple[int, int]:
    d, layers = (int(x) for x in text.split("x"))
    return d, layers


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="folder for step_costs.json")
    p.add_argument("--compile", action="store_true", help="also time the whole steps under torch.compile")
    p.add_argument("--steps-only", action="store_true", help="skip the forward and SDPA-backend tables")
    p.add_argument("--shape", type=_shape, default=(1024, 16), help="n_embd x n_layer of the model (default 1024x16)")
    p.add_argument("--shapes", default="", help="comma list of n_embd x n_layer: whole steps of these models too")
    args = p.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    compile_too, steps_only = args.compile, args.steps_only
    shapes = [s for s in args.shapes.split(",") if s]
    torch.manual_seed(0)
    n_embd, n_layer = args.shape
    cfg = GPTConfig(n_layer=n_layer, n_head=max(1, n_embd // 64), n_embd=n_embd, block_size=1024, vocab_size=VOCAB)
    dtype = torch.bfloat16 if DEV.type == "cuda" else torch.float32
    model = GPT(cfg).to(DEV, dtype).eval().requires_grad_(False)
    heads = medusa.MedusaHeads(cfg.n_embd, VOCAB, 5).to(DEV, dtype).eval().requires_grad_(False)
    rows = []

    def note(name, ms, spread, kernels=None, **extra):
        rows.append(dict(name=name, ms=ms, spread_ms=spread, kernels=kernels, **extra))
        print(f"{name:40s} {ms * 1000:8.1f} us  (spread {spread * 1000:5.1f})  kernels {kernels}", flush=True)

    with torch.no_grad():
        kv = decoding.StaticKV(model, MAX_LEN)
        cur = torch.tensor([PROMPT], device=DEV)
        for T in (1, 2, 64, 128, 256) if not steps_only else ():
            tokens = torch.randint(VOCAB, (1, T), device=DEV)
            pos = cur + torch.arange(T, device=DEV)

            def fwd():
                return model(tokens, input_pos=pos)

            note(f"forward T={T}", *per_call_ms(capture(fwd)), kernels_per_call(fwd))

        # Attention over the whole static cache (L slots, masked) by SDPA backend.
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backends = {"auto": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                    "math": SDPBackend.MATH}
        for L in (256, 512, 768, 1024) if not steps_only else ():
            kv_l = decoding.StaticKV(model, L)
            for T in (1, 64):
                tokens = torch.randint(VOCAB, (1, T), device=DEV)
                pos = torch.tensor([100], device=DEV) + torch.arange(T, device=DEV)
                for name, backend in backends.items():
                    def fwd(tokens=tokens, pos=pos):
                        return model(tokens, input_pos=pos)
                    try:
                        if backend is None:
                            run = capture(fwd)
                        else:
                            with sdpa_kernel([backend]):
                                run = capture(fwd)
                        note(f"forward L={L} T={T} sdpa={name}", *per_call_ms(run, reps=100))
                    except RuntimeError as exc:
                        print(f"forward L={L} T={T} sdpa={name}: {str(exc).splitlines()[0][:100]}", flush=True)
        kv.bind()

        hidden = torch.randn(1, cfg.n_embd, device=DEV, dtype=dtype)
        head_logits = heads(hidden)
        note("topk one pass (5, 8192)", *per_call_ms(capture(lambda: head_logits.topk(medusa.TOPK, dim=-1).indices)))
        note("topk two passes (5, 8192)", *per_call_ms(capture(lambda: medusa.topk_indices(head_logits, medusa.TOPK))))

        def guess():
            return heads(hidden).topk(medusa.TOPK, dim=-1).indices

        note("heads + topk", *per_call_ms(capture(guess)), kernels_per_call(guess))
        for size in (64, 128, 256):
            tree = medusa.default_tree(5, size)
            b = tree.buffers(DEV)
            logits = torch.randn(tree.size, VOCAB, device=DEV, dtype=dtype)
            toks = torch.randint(VOCAB, (tree.size,), device=DEV)

            def accept():
                return medusa.greedy_accept(toks, logits, b)

            note(f"greedy_accept N={size}", *per_call_ms(capture(accept)), kernels_per_call(accept))

            def mask():
                return medusa.tree_mask(b, cur, MAX_LEN)

            note(f"tree_mask N={size}", *per_call_ms(capture(mask)), kernels_per_call(mask))
        path = torch.arange(6, device=DEV)

        def move():
            kv.move(*medusa.accepted_slots(cur, path))

        note("kv move (6 slots)", *per_call_ms(capture(move)), kernels_per_call(move))

        # The step's pieces as Triton kernels (impls/decoding_triton.py).
        if decoding_triton.available(DEV):
            K = heads.n_heads
            out_top = torch.zeros(K, medusa.TOPK, dtype=torch.long, device=DEV)
            note("topk triton (5, 8192)", *per_call_ms(capture(
                lambda: decoding_triton.topk_rows(head_logits.reshape(K, -1), medusa.TOPK, out_top))))
            tree = medusa.default_tree(5, 64)
            b = tree.buffers(DEV)
            anc, valid = b.ancestors.to(torch.uint8), b.valid.to(torch.uint8)
            note("tree_mask triton N=64", *per_call_ms(capture(
                lambda: decoding_triton.tree_mask(anc, cur, MAX_LEN, dtype))))
            logits = torch.randn(tree.size, VOCAB, device=DEV, dtype=dtype)
            toks = torch.randint(VOCAB, (tree.size,), device=DEV)
            seq, hist = torch.zeros(MAX_LEN + 8, dtype=torch.long, device=DEV), torch.zeros(6, dtype=torch.long, device=DEV)
            c = cur.clone()
            bufs = [torch.zeros(k, dtype=torch.long, device=DEV) for k in (6, 6, 1, 1)]

            def commit():
                c.fill_(PROMPT)
                decoding_triton.greedy_commit(logits.argmax(dim=-1), toks, b.retrieve, valid, c, seq, hist, *bufs)

            note("argmax + greedy_commit triton N=64", *per_call_ms(capture(commit)))

        modes = ("graph", "compile") if compile_too else ("graph",)
        modes = modes if DEV.type == "cuda" else ("eager",)
        whole_steps(model, heads, note, modes, length=512 if DEV.type == "cuda" else None)
        shape_cfgs = []
        for shape in shapes:
            d, layers = _shape(shape)
            del model, heads, kv
            torch.cuda.empty_cache() if DEV.type == "cuda" else None
            c2 = GPTConfig(n_layer=layers, n_head=max(16, d // 128), n_embd=d, block_size=1024, vocab_size=VOCAB)
            model = GPT(c2).to(DEV, dtype).eval().requires_grad_(False)
            heads = medusa.MedusaHeads(d, VOCAB, 5).to(DEV, dtype).eval().requires_grad_(False)
            kv = None
            print(f"-- shape n_embd {d} x n_layer {layers}: {model.num_params() / 1e6:.0f}M params", flush=True)
            shape_cfgs.append(c2.__dict__)
            whole_steps(model, heads, lambda name, *a, **k: note(f"{shape} {name}", *a, **k), modes[:1], sizes=(64,),
                        length=512 if DEV.type == "cuda" else None)

    (out / "step_costs.json").write_text(json.dumps(dict(
        device=torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu", torch=torch.__version__, config=cfg.__dict__, shapes=shape_cfgs, max_len=MAX_LEN,
        rows=rows), indent=1))


if __name__ == "__main__":
    main()
