"""Benchmark: llama32_nb's VisionEncoder vs transformers' MllamaVisionModel on the same random weights, 2 threads.

The real Llama 3.2 Vision encoder shape (width 1280, 16 heads, 560-px tiles: 4 x 1608 tokens inside the encoder) on
one image with 1 real tile and with 4 (both always carry 4 tile slots, as both codebases do), in fp32 and bf16.
Ours and transformers run interleaved, round by round, inside one process; the table gives the best time of each, the
best-round ratio and the median of same-round ratios (> 1: ours faster), and the peak extra memory of one forward
pass (CUDA: `max_memory_allocated`; CPU: the peak resident-set growth, sampled every 2 ms). Not a test.

The full encoder (32 local + 8 global layers) takes minutes per forward pass on a 2-core CPU; `--local-layers` and
`--global-layers` keep every per-layer shape real but run fewer layers (the ratio per layer is what matters), and
`--rounds` sets the number of interleaved rounds.

    .venv/bin/python bench/bench_vision.py [--rounds 3] [--local-layers 32] [--global-layers 8] [--dtypes fp32,bf16]
"""
import argparse, gc, os, threading, time

import torch
import transformers

from llama32_nb.core import cpu_model, default_device
from llama32_nb.vision import VisionConfig, VisionEncoder, to_hf_vision, tile_layouts

torch.set_num_threads(2)


@torch.no_grad()
def build_pair(cfg: VisionConfig, dtype, device, seed=0):
    "Our encoder with cheap random weights (non-zero gates), and transformers' sharing every tensor it can."
    with torch.device("meta"): ours = VisionEncoder(cfg)
    ours = ours.to_empty(device=device).to(dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    for n, p in ours.named_parameters():
        if "gate" in n: p.fill_(0.5)
        elif p.dim() == 1: p.fill_(1.0 if n.endswith("weight") and "norm" in n else 0.0)
        else: p.normal_(0.0, 0.02, generator=g)
    hd = {k: v for k, v in cfg.to_hf_dict().items() if k != "model_type"}
    with torch.device("meta"): hf = transformers.MllamaVisionModel(transformers.MllamaVisionConfig(**hd))
    hf.load_state_dict(to_hf_vision(ours.state_dict(), cfg), strict=True, assign=True)
    return ours.eval(), hf.to(device).eval()


def rss() -> int:
    with open("/proc/self/statm") as f: return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_extra_memory(fn, device):
    "`(fn(), peak memory above the level before the call in bytes)`."
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
        out = fn(); torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated() - base
    base, peak, stop = rss(), [0], threading.Event()
    def sample():
        while not stop.is_set(): peak[0] = max(peak[0], rss()); time.sleep(0.002)
    t = threading.Thread(target=sample); t.start()
    try: out = fn()
    finally: stop.set(); t.join()
    return out, max(peak[0], rss()) - base


def timed(fn, device) -> float:
    if device.type == "cuda": torch.cuda.synchronize()
    t = time.perf_counter(); fn()
    if device.type == "cuda": torch.cuda.synchronize()
    return time.perf_counter() - t


def median(xs):
    xs = sorted(xs); n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


@torch.inference_mode()
def bench_cell(cfg, dtype, layout, rounds, device):
    ours, hf = build_pair(cfg, dtype, device)
    r, c = layout
    ids = {rc: i + 1 for i, rc in enumerate(tile_layouts(cfg.max_tiles))}
    g = torch.Generator().manual_seed(1)
    px = torch.zeros(1, 1, cfg.max_tiles, 3, cfg.image_size, cfg.image_size)
    px[0, 0, : r * c] = torch.randn(r * c, 3, cfg.image_size, cfg.image_size, generator=g)
    px = px.to(device)
    ar = torch.tensor([[[r, c]]], device=device)
    hf_in = dict(pixel_values=px.to(dtype), aspect_ratio_ids=torch.tensor([[ids[layout]]], device=device),
                 aspect_ratio_mask=(torch.arange(cfg.max_tiles, device=device) < r * c).long().view(1, 1, -1))
    run_ours = lambda: ours(px, ar)
    run_hf = lambda: hf(**hf_in).last_hidden_state
    run_ours(); run_hf()                            # warm-up: ours times its kernel candidates on first use
    a, mem_ours = peak_extra_memory(run_ours, device)
    b, mem_hf = peak_extra_memory(run_hf, device)
    D = cfg.width                                                    # the global outputs agree (hf_compat aside)
    diff = (a[..., :D].float() - b[..., :D].float()).abs().max().item()
    del a, b
    t_ours, t_hf = [], []
    for i in range(rounds):                                          # interleaved, alternating who goes first
        for fn, ts in ((run_ours, t_ours), (run_hf, t_hf))[:: 1 if i % 2 == 0 else -1]: ts.append(timed(fn, device))
    ratios = [h / o for o, h in zip(t_ours, t_hf)]
    del ours, hf; gc.collect()
    return dict(t_ours=min(t_ours), t_hf=min(t_hf), best_ratio=min(t_hf) / min(t_ours), median_ratio=median(ratios),
                spread=(min(ratios), max(ratios)), mem_ours=mem_ours, mem_hf=mem_hf, diff=diff)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-layers", type=int, default=32)
    ap.add_argument("--global-layers", type=int, default=8)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--tiles", default="1,4", help="real tiles per image: 1 -> layout (1, 1), 4 -> (2, 2)")
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    device = torch.device(args.device) if args.device else default_device()
    n_local = args.local_layers
    inter = tuple(i for i in (3, 7, 15, 23, 30) if i < n_local) or (n_local - 1,)
    cfg = VisionConfig.llama32_vision(n_layers=n_local, n_global_layers=args.global_layers, intermediate_layers=inter)
    print(f"CPU: {cpu_model()}")
    print(f"device {device}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds")
    print(f"encoder: real 11B/90B shape (width 1280, 560-px tiles, 1608 tokens/tile), {n_local} local + "
          f"{args.global_layers} global layers (intermediates {list(inter)}); random weights\n")
    print(f"{'dtype':>5} {'tiles':>5} | {'ours s':>8} {'HF s':>8} | {'best ratio':>10} {'median':>7} {'spread':>13} | "
          f"{'ours MB':>8} {'HF MB':>8} | max|Δ| global")
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    for dn in args.dtypes.split(","):
        for nt in (int(x) for x in args.tiles.split(",")):
            layout = {1: (1, 1), 2: (1, 2), 3: (1, 3), 4: (2, 2)}[nt]
            r = bench_cell(cfg, dtypes[dn], layout, args.rounds, device)
            print(f"{dn:>5} {nt:>5} | {r['t_ours']:8.2f} {r['t_hf']:8.2f} | {r['best_ratio']:9.2f}× "
                  f"{r['median_ratio']:6.2f}× {r['spread'][0]:5.2f}–{r['spread'][1]:.2f}× | "
                  f"{r['mem_ours'] / 2**20:8.0f} {r['mem_hf'] / 2**20:8.0f} | {r['diff']:.2e}", flush=True)
    print("\nratio = transformers' time / ours (> 1: ours faster). Memory: peak extra over the level before the call.")


if __name__ == "__main__":
    main()
