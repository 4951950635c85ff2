"""Benchmark: llama32_nb's Llama (its default, the speed layer on) vs transformers' LlamaForCausalLM on the same random
weights, 2 threads.

Decode tokens/s with the KV cache (fp32, bf16) at the Llama 3.2 1B shape, the fp32 share of the
memory-bandwidth roofline (weight bytes per token over the read bandwidth probed before and after each
timed round), prefill tokens/s (a 512-token prompt in fp32, 64 in bf16), and training tokens/s (forward + backward +
AdamW) on a tiny config. Ours and transformers run interleaved, round by round; the table gives the best-round
ratio and the median of same-round ratios. Not a test: prints the CPU model, a table with ratios, and the kernels the
speed layer chose on this machine.

    .venv/bin/python bench/bench_decoder.py [--quick] [--train-only]
"""
import argparse, copy, gc, sys, time

import torch
import torch.nn.functional as F
import transformers

from llama32_nb.decoder import Llama, LlamaConfig, hf_name
from llama32_nb.core import cpu_model
from llama32_nb.kernels import kernel_report, use_fast_kernels

torch.set_num_threads(2)


def hf_state_dict(ours: Llama) -> dict:
    "Our weights under transformers' names (no output matrix when tied)."
    return {hf_name(k): v for k, v in ours.state_dict().items()
            if not (ours.cfg.tie_embeddings and k == "lm_head.weight")}


def hf_config(c: LlamaConfig) -> transformers.LlamaConfig:
    d = c.to_hf_dict()
    return transformers.LlamaConfig(**{k: v for k, v in d.items() if k not in ("architectures", "torch_dtype")})


@torch.no_grad()
def build_pair(cfg: LlamaConfig, dtype=torch.float32, seed=0):
    "Our model with cheap random weights, and an HF model *sharing the same tensors* (no second copy)."
    with torch.device("meta"): ours = Llama(cfg, init=False)
    ours = ours.to_empty(device="cpu").to(dtype)
    g = torch.Generator().manual_seed(seed)
    for n, p in ours.named_parameters():
        if p.dim() == 1: p.fill_(1.0)
        else: p.normal_(0.0, 0.02, generator=g)
    ours.lm_head.weight = ours.embed_tokens.weight if cfg.tie_embeddings else ours.lm_head.weight
    with torch.device("meta"): hf = transformers.LlamaForCausalLM(hf_config(cfg))
    hf.load_state_dict(hf_state_dict(ours), strict=False, assign=True)
    if cfg.tie_embeddings: hf.lm_head.weight = hf.model.embed_tokens.weight
    hf.model.rotary_emb.inv_freq = hf.model.rotary_emb.original_inv_freq = ours.inv_freq("cpu").clone()
    return ours.eval(), hf.eval()


def best(fn, reps):
    ts = []
    for _ in range(reps):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return min(ts)


_PROBE_TENSORS, BW_READINGS = {}, []
def bandwidth(gb=1.0, reps=3) -> float:
    """Memory read bandwidth (bytes/s) right now: the fastest of `reps` sums over a tensor much larger than the caches.
    The machine's bandwidth drifts (other tenants; readings from ~30 to ~60 GB/s were seen on the 2-core benchmark
    machine), so the script probes next to every timed decode round and keeps every reading in `BW_READINGS`."""
    if gb not in _PROBE_TENSORS: _PROBE_TENSORS[gb] = torch.ones(int(gb * 1e9 / 4)); _PROBE_TENSORS[gb].sum()
    x = _PROBE_TENSORS[gb]
    BW_READINGS.append(x.numel() * 4 / best(lambda: x.sum(), reps))
    return BW_READINGS[-1]


def median(xs):
    xs = sorted(xs); return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


@torch.inference_mode()
def decode_tps(ours, hf, n_new, reps, weight_bytes, prompt_len=8, ref_logits=None):
    """Greedy generate tokens/s with the KV cache (n_new tokens after a short prompt), ours and HF interleaved.
    Each of our rounds sits between two bandwidth probes; its roofline share = its bytes/s over the higher probe."""
    prompt = torch.randint(0, ours.cfg.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    def ours_gen(n): return ours.generate(prompt[0], n, stop_tokens=())
    def hf_gen(n): return hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                                      pad_token_id=0)
    ours_gen(2); hf_gen(2)
    t, shares = {"ours": [], "hf": []}, []
    for _ in range(reps):   # interleaved, so background load hits both alike
        bw0 = bandwidth()
        t0 = time.perf_counter(); ours_gen(n_new); t["ours"].append(time.perf_counter() - t0)
        shares.append(n_new / t["ours"][-1] * weight_bytes / max(bw0, bandwidth()))
        t0 = time.perf_counter(); hf_gen(n_new); t["hf"].append(time.perf_counter() - t0)
    res = {k: n_new / min(v) for k, v in t.items()}
    res["median_ratio"] = median([h / o for o, h in zip(t["ours"], t["hf"])])
    res["shares"] = shares
    a, b = ours_gen(n_new), hf_gen(n_new)[0, prompt_len:].tolist()
    # tokens equal before the first difference
    res["agree"] = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
    res["same_tokens"] = res["agree"] == len(a) == len(b)
    lo, lh = ours(prompt)[0, -1].float(), hf(prompt).logits[0, -1].float()
    res["logit_err"] = ((lo - lh).abs().max() / lh.abs().max()).item()
    res["same_argmax"] = lo.argmax().item() == lh.argmax().item()
    res["logits"] = lo
    if ref_logits is not None:   # e.g. the fp32 model's: which of the two bf16 models is closer to it?
        res["err_ours"], res["err_hf"] = [((l - ref_logits).abs().max() / ref_logits.abs().max()).item()
                                          for l in (lo, lh)]
    return res


@torch.inference_mode()
def prefill_tps(ours, hf, T, reps):
    toks = torch.randint(0, ours.cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(1))
    def o(): ours(toks, 0, ours.new_cache(1, T), last_only=True)
    def h(): hf(toks, use_cache=True, logits_to_keep=1)
    o(); h()
    t = {"ours": [], "hf": []}
    for _ in range(reps):   # interleaved
        for name, fn in (("ours", o), ("hf", h)):
            t0 = time.perf_counter(); fn(); t[name].append(time.perf_counter() - t0)
    return {"ours": T / min(t["ours"]), "hf": T / min(t["hf"]),
            "median_ratio": median([h / o for o, h in zip(t["ours"], t["hf"])])}


def train_tps(cfg, B, T, steps, reps):
    """Training tokens/s (forward, backward, AdamW step) on independent copies of the same weights, interleaved round
    by round: transformers (logits, then F.cross_entropy, which is what its `labels=` loss computes), ours the same
    way, ours with `model.loss` (the fused chunked loss our Trainer uses), and ours with the speed layer switched off
    (`use_fast_kernels(model, False)`: plain modules, plain loss), which shows how much of the ratio the speed layer
    makes. Ratios are transformers' time over ours."""
    ours, _ = build_pair(cfg)   # build_pair's transformers model shares our tensors; each optimizer needs its own copy
    ours_fused, ours_plain = copy.deepcopy(ours), use_fast_kernels(copy.deepcopy(ours), False)
    hf = transformers.LlamaForCausalLM(hf_config(cfg))
    hf.load_state_dict({k: v.clone() for k, v in hf_state_dict(ours).items()}, strict=False)
    for m in (hf, ours, ours_fused, ours_plain): m.train()
    x = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(2))
    def make_step(model, loss_fn):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        def step():
            loss = loss_fn(x[:, :-1], x[:, 1:])
            opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        step()
        return step
    steps_fn = {"hf": make_step(hf, lambda a, b: F.cross_entropy(hf(a).logits.flatten(0, 1).float(), b.flatten())),
                "ours": make_step(ours, lambda a, b: F.cross_entropy(ours(a).flatten(0, 1), b.flatten())),
                "fused": make_step(ours_fused, ours_fused.loss), "plain": make_step(ours_plain, ours_plain.loss)}
    t, names = {k: [] for k in steps_fn}, list(steps_fn)
    for r in range(reps):   # interleaved; the order rotates each round, so no model always runs after the same one
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            for _ in range(steps): steps_fn[name]()
            t[name].append(time.perf_counter() - t0)
    tps = {k: B * T * steps / min(v) for k, v in t.items()}
    out = []
    for k in ("ours", "fused", "plain"):
        q = sorted(h / o for o, h in zip(t[k], t["hf"]))          # same-round ratios, for their spread
        out.append({"ours": tps[k], "hf": tps["hf"], "median_ratio": median(q),
                    "quartiles": (q[len(q) // 4], q[(3 * len(q)) // 4])})
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer tokens/reps (smoke run)")
    ap.add_argument("--train-only", action="store_true", help="only the training benchmark")
    args = ap.parse_args()
    n_new, reps = (6, 1) if args.quick else (16, 9)
    print(f"CPU: {cpu_model()}; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"threads {torch.get_num_threads()}")
    rows = []

    if not args.train_only:
        cfg = LlamaConfig.llama32_1b()
        t = time.time(); ours, hf = build_pair(cfg, torch.float32)
        print(f"built 1B pair (shared fp32 weights) in {time.time() - t:.1f}s")
        # every weight is read once per decoded token (tied embedding = output matrix)
        weight_bytes = ours.num_params() * 4
        r = r32 = decode_tps(ours, hf, n_new, reps, weight_bytes)
        sh = r["shares"]
        rows.append(("decode 1B fp32 (tok/s)", r, f"same tokens: {r['same_tokens']}; roofline share per round "
                     f"(bandwidth probed before and after it): median {median(sh):.0%}, min {min(sh):.0%}"))
        bw_max = max(BW_READINGS)
        rows.append(("", None, f"  vs the highest probe of the run ({bw_max / 1e9:.1f} GB/s): best round "
                     f"{r['ours'] * weight_bytes / bw_max:.0%}; readings "
                     f"{min(BW_READINGS) / 1e9:.1f}-{bw_max / 1e9:.1f} GB/s"))
        r = prefill_tps(ours, hf, 512, 1 if args.quick else 3)
        rows.append(("prefill 1B fp32, 512 tok (tok/s)", r, ""))
        ours, hf = ours.to(torch.bfloat16), hf.to(torch.bfloat16)
        hf.model.rotary_emb.inv_freq = ours.inv_freq("cpu").clone()   # keep HF's RoPE buffer fp32, like ours
        gc.collect()
        r = decode_tps(ours, hf, n_new, reps, ours.num_params() * 2, ref_logits=r32["logits"])
        rows.append(("decode 1B bf16 (tok/s)", r, f"first-step logits vs the fp32 model's, max|diff|/max|logit|: ours "
                     f"{r['err_ours']:.1e}, transformers {r['err_hf']:.1e}; "
                     f"same argmax as transformers {r['same_argmax']}; "
                     f"median roofline share {median(r['shares']):.0%}"))
        rows.append(("", None, f"  greedy tokens equal to transformers' for {r['agree']}/{n_new} (random weights: "
                     f"near-tied logits, so a rounding difference can change a token)"))
        r = prefill_tps(ours, hf, 64, 1 if args.quick else 3)
        rows.append(("prefill 1B bf16, 64 tok (tok/s)", r, ""))
        del ours, hf; gc.collect()

    tcfg = LlamaConfig.toy(dim=256, n_layers=4, n_heads=8, n_kv_heads=2, vocab_size=2048, ffn_dim=704, max_seq_len=512)
    r_logits, r_fused, r_plain = train_tps(tcfg, 8, 256, 2, 3 if args.quick else 40)
    def spread(r): return f"; same-round ratio quartiles {r['quartiles'][0]:.2f}-{r['quartiles'][1]:.2f}"
    rows.append(("train tiny fp32, model.loss (tok/s)", r_fused,
                 "dim 256, 4 layers, B=8, T=256, AdamW; fused chunked loss (what Trainer uses)" + spread(r_fused)))
    rows.append(("train tiny fp32, logits+CE (tok/s)", r_logits,
                 "the same, ours through logits + F.cross_entropy like transformers" + spread(r_logits)))
    rows.append(("train tiny fp32, speed layer off", r_plain,
                 "model.loss of Llama with use_fast_kernels(model, False): plain modules and loss" + spread(r_plain)))

    print(f"\n{'benchmark':36}{'ours':>9}{'transformers':>13}{'best/best':>10}{'median':>8}  notes")
    print(f"{'':36}{'':>9}{'':>13}{'':>10}{'ratio':>8}")
    for name, r, note in rows:
        if r is None: print(f"{'':76}  {note}"); continue
        print(f"{name:36}{r['ours']:9.2f}{r['hf']:13.2f}{r['ours'] / r['hf']:9.2f}x{r['median_ratio']:7.2f}x  {note}")
    print("(best/best: best round of ours over best round of transformers; "
          "median: median over rounds of the same-round ratio)")
    print(f"\nkernels the speed layer chose on this CPU ({cpu_model()}), by kind of product:")
    for r in kernel_report():
        ms = ", ".join(f"{k} {v:.3g}" for k, v in r["ms"].items())
        print(f"  {r['kind']:9} {r['dtype']:8} {r['weight']:>12} rows {r['rows']:<5} -> {r['choice']:19} (ms: {ms})")


if __name__ == "__main__":
    sys.exit(main())
