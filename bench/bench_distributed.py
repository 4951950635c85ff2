"""Does the distributed machinery slow the one-process Trainer down? The Trainer of this tree against the Trainer of
the commit before issue 15 (c79308c, read with `git show`), the same tiny runs interleaved in one process; prints
the ratio of step times (ours / before) per round and their median, and the CPU model.

    python bench/bench_distributed.py [--rounds 5] [--steps 20]"""
import argparse, importlib.util, statistics, subprocess, sys, tempfile, time
from pathlib import Path
import torch

ROOT = Path(__file__).resolve().parent.parent
BASE = "c79308c"


def baseline_module():
    "llama32_nb.pretraining as it was at BASE, importable next to today's package (relative imports made absolute)."
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{BASE}:llama32_nb/pretraining.py"], check=True,
                         capture_output=True, text=True).stdout.replace("from .", "from llama32_nb.")
    f = Path(tempfile.mkdtemp()) / "pretraining_before.py"; f.write_text(src)
    spec = importlib.util.spec_from_file_location("pretraining_before", f)
    mod = importlib.util.module_from_spec(spec); sys.modules[spec.name] = mod   # (dataclasses look it up)
    spec.loader.exec_module(mod)
    return mod


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from llama32_nb.core import cpu_model, set_seed, set_threads
    from llama32_nb.decoder import Llama, LlamaConfig
    import llama32_nb.pretraining as ours
    before = baseline_module()
    set_threads()
    blocks = ours.pack_blocks(torch.arange(40_000) * 7 % 256, 64)
    mcfg = LlamaConfig.toy(max_seq_len=64)
    def run(mod):
        cfg = mod.TrainConfig(max_steps=args.steps, batch_size=8, grad_accum=2, warmup_steps=2, eval_every=10_000)
        set_seed(0); t = mod.Trainer(Llama(mcfg), cfg, blocks, None, device="cpu")
        t0 = time.perf_counter(); t.fit(progress=False)
        return (time.perf_counter() - t0) / args.steps, t.history["loss"]
    run(ours); run(before)                                          # warm-up
    ratios = []
    for r in range(args.rounds):
        (a, la), (b, lb) = run(ours), run(before)
        assert la == lb, "the two Trainers no longer compute the same losses"
        ratios.append(a / b)
        print(f"round {r}: ours {a * 1e3:.1f} ms/step, before {b * 1e3:.1f} ms/step, ratio {a / b:.3f}")
    t0, n = time.perf_counter(), 10_000                              # what a one-process step adds, alone
    for _ in range(n):
        with ours.grad_sync(None, True): pass
        ours.mean_over_ranks(1.0, "cpu"); ours.full_tensor(torch.zeros(()))
    print(f"the added calls of one step (grad_sync, mean_over_ranks, full_tensor): "
          f"{(time.perf_counter() - t0) / n * 1e6:.1f} µs")
    print(f"median ratio ours/before: {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}); "
          f"{args.rounds} rounds x {args.steps} steps; CPU: {cpu_model()}; {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
