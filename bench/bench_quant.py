"""Benchmark: decode speed of our quantized models (packed integer kernels) vs llama.cpp on the same random weights.

The Llama 3.2 1B shape (width 2048, 32 query / 8 key-value heads of 64, SwiGLU 8192, vocab 128,256, tied output) with
all 16 blocks (`--layers` for fewer; tokens/s scale about as 1/size for every contender alike), random weights built
in bf16 and shared by every row, 2 threads on both sides (`--threads`). Rows, each compared with the llama.cpp row of
its family:

  ours bf16                          the float model (our speed layer), for scale
  ours 8da8w + EO8 (packed)          int8 weights, one scale per row; int8 per-token activations; our int8 kernel
  ours 8da4w + EO8 (packed)          int4 weights in groups of 32, int8 activations, our int4 kernel; int8 output layer
                                     (EO8, as Meta's edge releases), which reads 0.44 bytes a weight more than Q4_0's
  ours 8da4w, 4-bit head (packed)    the same with the output layer in int4 groups of 32 too, as a Q4_0 file has it
                                     (`quantize_output_8da4w`)
  ... bf16 scales                    the two 8da4w rows with group scales rounded to bf16 (`scale_dtype`), as
                                     ExecuTorch keeps them on the device: 2 bytes a scale, Q4_0's 4.5 bits a weight
  llama.cpp Q8_0 / Q4_0              llama-cpp-python running our own GGUF exports (`export_gguf`) of the same weights

The quantized models of ours are `quantize_linears` / `quantize_8da4w` (+ `quantize_output_8da4w`) + `quantize_eo8` +
`use_packed_kernels` (notebook 16); they keep activations and the KV cache in fp32, so llama.cpp gets an F32 KV cache
too (`--kv f16` for its default). With `--reference-rows` (about 10 GB more at 16 layers): our fp32 model, the
fake-quantized 8da4w reference, and llama.cpp F32. Decode speed counts the tokens after the first (the prompt's prefill excluded), greedy,
with the KV cache; each round times every contender once, interleaved, and the table gives each row's best round and
the median over rounds of its same-round ratio to llama.cpp (> 1: ours faster). The GGUF files are cached (`--cache`)
between runs. Not a test.

    .venv/bin/python bench/bench_quant.py [--quick] [--layers 16] [--rounds 5] [--tokens 32] [--kv f32|f16]
                                          [--threads 2] [--reference-rows]
"""
import argparse, copy, gc, os, resource, tempfile, time
from pathlib import Path

import torch

from llama32_nb.core import cpu_model
from llama32_nb.decoder import Llama, LlamaConfig
from llama32_nb.export import export_gguf
from llama32_nb.quant import (decode_speed, model_bytes, quantize_8da4w, quantize_eo8, quantize_linears,
                              quantize_output_8da4w, use_packed_kernels)
from llama32_nb.tokenizer import Tokenizer

torch.set_num_threads(2)


@torch.no_grad()
def random_model(cfg: LlamaConfig, seed=0, dtype=torch.float32) -> Llama:
    "Cheap random weights (N(0, 0.02), norms 1), built directly in `dtype`, tied output."
    with torch.device("meta"): m = Llama(cfg, init=False)
    m = m.to(dtype).to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    for p in m.parameters():
        if p.dim() == 1: p.fill_(1.0)
        else: p.normal_(0.0, 0.02, generator=g)
    m.lm_head.weight = m.embed_tokens.weight
    return m.eval()


def packed(base: Llama, bits: int, int4_head: bool = False, embed=None, scale_dtype=torch.float32) -> Llama:
    """A copy of `base` quantized (8da8w or 8da4w + EO8; activations and KV cache fp32) and packed. The copy shares
    `base`'s bf16 table until `quantize_eo8` replaces it, and then `embed` (an earlier copy's identical int8 table)."""
    m = copy.deepcopy(base, memo={id(base.embed_tokens.weight): base.embed_tokens.weight})
    m = quantize_linears(m, 8, None) if bits == 8 else quantize_8da4w(m, 32, scale_dtype)
    if int4_head: quantize_output_8da4w(m, 32, scale_dtype)  # the output layer in int4 groups of 32, as Q4_0 has it
    m = quantize_eo8(m)
    if embed is not None:
        assert torch.equal(embed.weight.bfloat16(), m.embed_tokens.weight)
        m.embed_tokens = embed
        if not int4_head: m.lm_head.weight = embed.weight
    use_packed_kernels(m.float())
    gc.collect()
    return m


def cpp_decode(lm, prompt, n):
    "llama.cpp greedy decode tokens/s, timed from the first token out (the prefill excluded), as `decode_speed`."
    lm.reset()
    it = lm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0)
    next(it); t = time.perf_counter(); k = 0
    for _ in it:
        k += 1
        if k == n: break
    return n / (time.perf_counter() - t)


def median(xs):
    xs = sorted(xs); return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--kv", choices=("f32", "f16"), default="f32", help="llama.cpp's KV cache type")
    ap.add_argument("--threads", type=int, default=2, help="threads on each side (default 2)")
    ap.add_argument("--quick", action="store_true", help="2 rounds of 16 tokens, no 4-bit-head row")
    ap.add_argument("--reference-rows", action="store_true", help="add ours fp32, ours fake-quant, llama.cpp F32")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "llama32_nb_bench_quant"))
    a = ap.parse_args(argv)
    if a.quick: a.rounds, a.tokens = min(a.rounds, 2), min(a.tokens, 16)
    import llama_cpp
    torch.set_num_threads(a.threads)
    print(f"CPU: {cpu_model()}; torch {torch.__version__}; llama-cpp-python {llama_cpp.__version__}; "
          f"{a.threads} threads; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}; load average at "
          f"start {os.getloadavg()[0]:.1f}", flush=True)
    t0 = time.time()
    tok = Tokenizer.llama3()
    cfg = LlamaConfig.llama32_1b(n_layers=a.layers, max_seq_len=256)
    base = random_model(cfg, dtype=torch.bfloat16)
    prompt = tok.encode("The quick brown fox jumps over the lazy dog.", bos=True)
    ours = {"ours bf16": base}
    if a.reference_rows:
        ours["ours fp32"] = copy.deepcopy(base).float()
        ours["ours 8da4w + EO8 (fake-quant)"] = quantize_eo8(quantize_8da4w(copy.deepcopy(base))).float()
    ours["ours 8da8w + EO8 (packed)"] = p8 = packed(base, 8)
    ours["ours 8da4w + EO8 (packed)"] = packed(base, 4, embed=p8.embed_tokens)
    if not a.quick: ours["ours 8da4w, 4-bit head (packed)"] = packed(base, 4, int4_head=True, embed=p8.embed_tokens)
    bf = dict(embed=p8.embed_tokens, scale_dtype=torch.bfloat16)
    ours["ours 8da4w + EO8, bf16 scales"] = packed(base, 4, **bf)
    if not a.quick: ours["ours 8da4w, 4-bit head, bf16 scales"] = packed(base, 4, int4_head=True, **bf)
    print(f"our models built in {time.time() - t0:.0f} s", flush=True)
    cache = Path(a.cache); cache.mkdir(parents=True, exist_ok=True)
    cpp, kv = {}, {"f32": 0, "f16": 1}[a.kv]
    for qt in ("Q8_0", "Q4_0") + (("F32",) if a.reference_rows else ()):
        p = cache / f"rand-1b-{a.layers}l-seed0-{qt}.gguf"
        if not p.is_file():
            t = time.time(); export_gguf(base, tok, p.with_suffix(".part"), qt); p.with_suffix(".part").rename(p)
            print(f"wrote {p} ({p.stat().st_size / 1e6:.0f} MB) in {time.time() - t:.0f} s", flush=True)
        lm = llama_cpp.Llama(str(p), n_ctx=256, n_threads=a.threads, n_threads_batch=a.threads, type_k=kv, type_v=kv,
                             verbose=False)
        cpp[f"llama.cpp {qt}"] = (lm, p.stat().st_size)
    gc.collect()
    size = {n: model_bytes(m) for n, m in ours.items()} | {n: s for n, (_, s) in cpp.items()}
    f32 = "llama.cpp F32" if a.reference_rows else None
    ref = {"ours bf16": f32, "ours fp32": f32,
           "ours 8da4w + EO8 (fake-quant)": "llama.cpp Q4_0", "ours 8da8w + EO8 (packed)": "llama.cpp Q8_0",
           "ours 8da4w + EO8 (packed)": "llama.cpp Q4_0", "ours 8da4w, 4-bit head (packed)": "llama.cpp Q4_0",
           "ours 8da4w + EO8, bf16 scales": "llama.cpp Q4_0", "ours 8da4w, 4-bit head, bf16 scales": "llama.cpp Q4_0"}
    runs = {n: [] for n in list(ours) + list(cpp)}
    for r in range(a.rounds):
        for n, m in ours.items(): runs[n].append(decode_speed(m, prompt, a.tokens))
        for n, (lm, _) in cpp.items(): runs[n].append(cpp_decode(lm, prompt, a.tokens))
        print(f"round {r + 1}: " + ", ".join(f"{n} {v[-1]:.2f}" for n, v in runs.items()), flush=True)
    print(f"\n1B shape, {a.layers} of 16 blocks, {a.tokens} greedy decode steps after the first token, {a.rounds} "
          f"interleaved rounds, {a.threads} threads, llama.cpp KV cache {a.kv.upper()}; {cpu_model()}; load average at "
          f"end {os.getloadavg()[0]:.1f}; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.1f} GB")
    print(f"| {'contender':35s} | size MB | decode tok/s (best) | vs llama.cpp: median (best/best) | vs ours bf16 |")
    print("|---|---|---|---|---|")
    for n, v in runs.items():
        other = ref.get(n)
        vs = (f"{median([x / y for x, y in zip(v, runs[other])]):.2f}x ({max(v) / max(runs[other]):.2f}x) "
              f"{other.split()[-1]}" if other else "")
        vb = f"{median([x / y for x, y in zip(v, runs['ours bf16'])]):.2f}x" if n != "ours bf16" else ""
        print(f"| {n:35s} | {size[n] / 1e6:7.0f} | {max(v):19.2f} | {vs:32s} | {vb:12s} |")
    print("(size: bytes in memory for ours, of which a packed model's head is its own copy of the int8 table; "
          "the file's bytes for llama.cpp)")


if __name__ == "__main__":
    main()
