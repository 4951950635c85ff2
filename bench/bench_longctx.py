"""Benchmark: a long-prompt prefill through the shipped tiny Llama (trained at 256 tokens, stretched with llama3
scaling), ours (`llama32_nb.longctx.prefill`, chunked, O(T) memory) vs transformers' own chunked prefill
(`generate(..., prefill_chunk_size=C, max_new_tokens=1)`), fp32, 2 threads.

Every measurement runs in a fresh subprocess so that its peak resident memory (ru_maxrss) is its own; the parent
runs ours and transformers' alternately, length by length, and prints time, peak RSS, the RSS the process had before
the prefill (Python + torch + the model), the KV-cache bytes (formula and allocation), the budget
weights + KV cache + one chunk's activations (`prefill_memory`), and the ratios. Not a test.

    .venv/bin/python bench/bench_longctx.py [--max-len 131072] [--hf-max-len 16384] [--chunk 2048] [--reps 1]
"""
import argparse, json, os, resource, subprocess, sys, time

MiB = 2 ** 20


def rss_now() -> int:
    "Current resident set size in bytes (Linux /proc)."
    with open("/proc/self/statm") as f: return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(impl: str, T: int, chunk: int) -> dict:
    import torch
    from llama32_nb.core import set_seed
    from llama32_nb.longctx import long_context, prefill, prefill_memory, rope_scaling
    from llama32_nb.pretraining import load_artifacts
    from llama32_nb.generation import kv_cache_bytes
    torch.set_num_threads(2); set_seed(0)
    tiny, _ = load_artifacts(device="cpu")
    L0 = tiny.cfg.max_seq_len
    rs = rope_scaling("llama3", max(1.0, T / L0), L0)
    model = long_context(tiny, rs, max(T, L0))
    tokens = torch.randint(0, model.cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))
    out = dict(impl=impl, T=T, chunk=chunk, kv_formula=kv_cache_bytes(model.cfg, T, torch.float32),
               budget=prefill_memory(model.cfg, T, chunk)["total"])
    if impl == "ours":
        prefill(model, tokens[:, :min(T, 2 * chunk)], chunk)                 # warm-up: kernel choices, allocator
        base = rss_now()
        t0 = time.perf_counter()
        logits, cache = prefill(model, tokens, chunk)
        out["seconds"] = time.perf_counter() - t0
        out["kv_allocated"] = cache.k.nbytes + cache.v.nbytes
    else:
        import transformers
        import tempfile
        with tempfile.TemporaryDirectory() as d:                     # our config.json carries the llama3 scaling
            model.save_pretrained(d, dtype=torch.float32)
            hf = transformers.LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        del model, tiny
        gen = dict(max_new_tokens=1, do_sample=False, prefill_chunk_size=chunk, pad_token_id=0,
                   return_dict_in_generate=True, output_logits=True)
        ones = torch.ones_like(tokens)                         # else generate masks every id equal to pad_token_id
        with torch.no_grad(): hf.generate(tokens[:, :min(T, 2 * chunk)], attention_mask=ones[:, :min(T, 2 * chunk)],
                                          **gen)
        base = rss_now()
        t0 = time.perf_counter()
        with torch.no_grad(): res = hf.generate(tokens, attention_mask=ones, **gen)
        out["seconds"] = time.perf_counter() - t0
        logits = res.logits[0]
        out["kv_allocated"] = None
    out["rss_before"] = base
    out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out["logits_head"] = logits.reshape(-1)[:256].tolist()
    if impl == "ours" and T <= 4096:                      # a spot check of the prefill against the plain forward
        with torch.no_grad(): ref = model(tokens, last_only=True)[:, -1]
        out["max_diff_vs_forward"] = float((ref - logits).abs().max())
    return out


def run(impl, T, chunk, timeout):
    p = subprocess.run([sys.executable, __file__, "--worker", impl, "--T", str(T), "--chunk", str(chunk)],
                       capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        return dict(impl=impl, T=T, error=(p.stderr.strip().splitlines() or ["?"])[-1][:200], rc=p.returncode)
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-len", type=int, default=131072, help="longest prompt for ours (default 131,072)")
    ap.add_argument("--hf-max-len", type=int, default=16384, help="longest prompt for transformers")
    ap.add_argument("--min-len", type=int, default=4096)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=1, help="alternating rounds per length")
    ap.add_argument("--timeout", type=int, default=7200, help="seconds per measurement")
    ap.add_argument("--worker", choices=["ours", "hf"]); ap.add_argument("--T", type=int)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.worker, a.T, a.chunk))); return
    from llama32_nb.core import cpu_model
    print(f"CPU: {cpu_model()}; 2 threads; fp32; chunk {a.chunk}; load average {os.getloadavg()[0]:.1f} at start "
          "(timings under shared load are noisy)", flush=True)
    lengths, T = [], a.min_len
    while T < a.max_len: lengths.append(T); T *= 2
    lengths.append(a.max_len)
    hdr = (f"{'impl':5s} {'T':>7s} {'time s':>8s} {'tok/s':>7s} {'peak RSS':>9s} {'RSS before':>10s} "
           f"{'peak-before':>11s} {'KV (formula)':>12s} {'budget':>8s} {'peak/budget':>11s} "
           f"{'(peak-before)/budget':>20s}")
    print(hdr, flush=True)
    results = []
    for T in lengths:
        for _ in range(a.reps):
            for impl in (["ours", "hf"] if T <= a.hf_max_len else ["ours"]):
                r = run(impl, T, a.chunk, a.timeout); results.append(r)
                if "error" in r: print(f"{impl:5s} {T:7d} failed: {r['error']}", flush=True); continue
                print(f"{impl:5s} {T:7d} {r['seconds']:8.1f} {T / r['seconds']:7.0f} {r['peak_rss'] / MiB:7.0f}Mi "
                      f"{r['rss_before'] / MiB:8.0f}Mi {(r['peak_rss'] - r['rss_before']) / MiB:9.0f}Mi "
                      f"{r['kv_formula'] / MiB:10.0f}Mi {r['budget'] / MiB:6.0f}Mi {r['peak_rss'] / r['budget']:11.2f} "
                      f"{(r['peak_rss'] - r['rss_before']) / r['budget']:20.2f}"
                      + (f"  |Δ| vs forward {r['max_diff_vs_forward']:.1e}" if "max_diff_vs_forward" in r else "")
                      + (f"  KV allocated = formula: {r['kv_allocated'] == r['kv_formula']}" if r.get("kv_allocated")
                         else ""), flush=True)
    print("\nspeed, transformers' time / ours (>1: ours faster), per length both completed:")
    for T in lengths:
        o = [r for r in results if r["T"] == T and r["impl"] == "ours" and "seconds" in r]
        h = [r for r in results if r["T"] == T and r["impl"] == "hf" and "seconds" in r]
        if o and h:
            diff = max(abs(a - b) for a, b in zip(o[0]["logits_head"], h[0]["logits_head"]))
            print(f"  T={T:7d}: {min(x['seconds'] for x in h) / min(x['seconds'] for x in o):.2f}x; last logits agree: "
                  f"max |Δ| {diff:.1e} (first 256 of them)")
    print(f"transformers was run up to {a.hf_max_len:,} tokens (--hf-max-len); beyond, ours only.")


if __name__ == "__main__":
    main()
