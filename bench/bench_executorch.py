"""Benchmark: cached decode of the shipped tiny Llama as an ExecuTorch .pte (XNNPACK) vs our eager model.

Exports `artifacts/tiny-llama` twice with `export_executorch` (fp32, and 8da4w on XNNPACK's int8 x int4 kernels),
checks each .pte against the eager model it came from (max |logit difference| on a prompt plus 8 cached decode
steps: fp32 against our model, 8da4w against `quantize_8da4w` of it), then times `--tokens` greedy cached decode
steps of every contender, interleaved round by round; the table gives the best round. Our eager 8da4w model
simulates the integer arithmetic in fp32 (notebook 16), so it is expected to be the slowest. `--threads` sets both
torch's threads and ExecuTorch's thread pool (default 2; on a machine shared with other jobs, 1 thread keeps the
eager side from waiting on descheduled worker threads). Not a test.

    .venv/bin/python bench/bench_executorch.py [--rounds 5] [--tokens 64] [--threads 2]
"""
import argparse, copy, tempfile, time
from pathlib import Path

import torch

from llama32_nb.core import cpu_model
from llama32_nb.export import export_executorch, load_executorch, pte_vs_eager
from llama32_nb.pretraining import load_artifacts
from llama32_nb.quant import quantize_8da4w



@torch.no_grad()
def eager_rate(model, prompt, n):
    cache = model.new_cache(1, len(prompt) + n)
    t = int(model(torch.tensor([prompt]), 0, cache)[0, -1].argmax())
    t0 = time.perf_counter()
    for i in range(n): t = int(model(torch.tensor([[t]]), len(prompt) + i, cache)[0, -1].argmax())
    return n / (time.perf_counter() - t0)


def pte_rate(runner, prompt, n):
    runner.reset()
    t = int(runner(prompt, 0)[0, -1].argmax())
    t0 = time.perf_counter()
    for i in range(n): t = int(runner([t], len(prompt) + i)[0, -1].argmax())
    return n / (time.perf_counter() - t0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from executorch.version import __version__ as et_version
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
    _unsafe_reset_threadpool(a.threads)
    print(f"CPU: {cpu_model()}; torch {torch.__version__}; executorch {et_version}; {a.threads} thread(s)")
    model, tok = load_artifacts()
    qmodel = quantize_8da4w(copy.deepcopy(model))
    prompt = tok.encode("ROMEO: But soft, what light through yonder window breaks?", bos=True)
    d = Path(tempfile.mkdtemp())
    runners, size = {}, {}
    for q, ref in (("fp32", model), ("8da4w", qmodel)):
        t0 = time.perf_counter()
        p = export_executorch(model, d / f"tiny-{q}.pte", qmode=q)
        runners[q], size[f".pte {q}"] = load_executorch(p), p.stat().st_size
        diff = max(pte_vs_eager(runners[q], ref, prompt, steps=8))
        print(f".pte {q}: {size[f'.pte {q}'] / 1e6:.2f} MB, exported in {time.perf_counter() - t0:.0f} s, "
              f"max |logit difference| vs eager {diff:.1e}", flush=True)
    runs = {"eager fp32": lambda n: eager_rate(model, prompt, n), ".pte fp32": lambda n: pte_rate(runners["fp32"],
            prompt, n), "eager 8da4w": lambda n: eager_rate(qmodel, prompt, n),
            ".pte 8da4w": lambda n: pte_rate(runners["8da4w"], prompt, n)}
    for f in runs.values(): f(a.tokens)                             # warm-up: eager kernels are chosen on first use
    best = dict.fromkeys(runs, 0.0)
    for r in range(a.rounds):
        for n, f in runs.items(): best[n] = max(best[n], f(a.tokens))
        print(f"round {r + 1}: " + ", ".join(f"{n} {v:.0f}" for n, v in best.items()), flush=True)
    print(f"\ntiny Llama, {a.tokens} greedy cached decode steps after a {len(prompt)}-token prompt, best of {a.rounds} "
          "interleaved rounds")
    print(f"| {'contender':12s} | decode tok/s | vs eager fp32 |\n|---|---|---|")
    for n, v in best.items(): print(f"| {n:12s} | {v:12.0f} | {v / best['eager fp32']:.2f}x |")


if __name__ == "__main__":
    main()
