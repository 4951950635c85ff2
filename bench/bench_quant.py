"""Benchmark: decode speed of our quantized model vs llama.cpp on the same random weights, 2 threads.

The Llama 3.2 1B shape (width 2048, 32/8 heads, SwiGLU 8192, vocab 128,256, tied) with `--layers` blocks (default 4
of the real 16, so that it fits a busy 2-core machine; tokens/s scale ~1/layers for both sides alike). Rows: our fp32
and bf16 models, our 8da4w model (fake quantization: the integer arithmetic simulated in fp32, so it is *expected* to
be slower — a packed int4/int8 kernel is future work), and llama.cpp (llama-cpp-python) running our own GGUF exports
of the same weights in F32, Q8_0 and Q4_0. Each round times 32 greedy cached decode steps of every contender,
interleaved; the table gives the best round and the ratio to llama.cpp of the same format family. Not a test.

    .venv/bin/python bench/bench_quant.py [--layers 4] [--rounds 3]
"""
import argparse, copy, tempfile, time
from pathlib import Path

import torch

from llama32_nb.core import cpu_model
from llama32_nb.decoder import Llama, LlamaConfig
from llama32_nb.export import export_gguf
from llama32_nb.quant import model_bytes, quantize_8da4w, quantize_eo8
from llama32_nb.tokenizer import Tokenizer

torch.set_num_threads(2)


@torch.no_grad()
def random_model(cfg: LlamaConfig, seed=0) -> Llama:
    with torch.device("meta"): m = Llama(cfg, init=False)
    m = m.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    for p in m.parameters():
        if p.dim() == 1: p.fill_(1.0)
        else: p.normal_(0.0, 0.02, generator=g)
    m.lm_head.weight = m.embed_tokens.weight
    return m.eval()


def ours_decode(model, prompt, n):
    t = time.perf_counter()
    with torch.no_grad(): model.generate(prompt, max_new_tokens=n, temperature=0.0, stop_tokens=[])
    return n / (time.perf_counter() - t)


def cpp_decode(lm, prompt, n):
    lm.reset(); k = 0
    t = time.perf_counter()
    for _ in lm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0):
        k += 1
        if k == n: break
    return n / (time.perf_counter() - t)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    a = ap.parse_args(argv)
    import llama_cpp
    print(f"CPU: {cpu_model()}; torch {torch.__version__}; llama-cpp-python {llama_cpp.__version__}; 2 threads")
    tok = Tokenizer.llama3()
    cfg = LlamaConfig.llama32_1b(n_layers=a.layers, max_seq_len=256)
    base = random_model(cfg)
    prompt = tok.encode("The quick brown fox jumps over the lazy dog.", bos=True)
    ours = {"ours fp32": base, "ours bf16": copy.deepcopy(base).to(torch.bfloat16),
            "ours 8da4w+EO8 (fake-quant)": quantize_eo8(quantize_8da4w(copy.deepcopy(base)))}
    d = Path(tempfile.mkdtemp())
    cpp = {}
    for qt in ("F32", "Q8_0", "Q4_0"):
        p = export_gguf(base, tok, d / f"m-{qt}.gguf", qt)
        cpp[f"llama.cpp {qt}"] = (llama_cpp.Llama(str(p), n_ctx=256, n_threads=2, verbose=False), p.stat().st_size)
    size = {n: model_bytes(m) for n, m in ours.items()} | {n: s for n, (_, s) in cpp.items()}
    best = dict.fromkeys(list(ours) + list(cpp), 0.0)
    for r in range(a.rounds):
        for n, m in ours.items(): best[n] = max(best[n], ours_decode(m, prompt, a.tokens))
        for n, (lm, _) in cpp.items(): best[n] = max(best[n], cpp_decode(lm, prompt, a.tokens))
        print(f"round {r + 1}: " + ", ".join(f"{n} {v:.1f}" for n, v in best.items()), flush=True)
    ref = {"ours fp32": "llama.cpp F32", "ours bf16": "llama.cpp F32", "ours 8da4w+EO8 (fake-quant)": "llama.cpp Q4_0"}
    print(f"\n1B shape with {a.layers} of 16 layers, {a.tokens} greedy decode steps, best of {a.rounds} interleaved "
          "rounds (measured under load: ratios, not absolute numbers, are the result)")
    print(f"| {'contender':30s} | size MB | decode tok/s | vs llama.cpp |\n|---|---|---|---|")
    for n, v in best.items():
        ratio = f"{v / best[ref[n]]:.2f}x {ref[n]}" if n in ref else ""
        print(f"| {n:30s} | {size[n] / 1e6:7.1f} | {v:12.1f} | {ratio} |")


if __name__ == "__main__":
    main()
