#!/usr/bin/env python
"""Staged context extension in miniature at full budget, on the shipped tiny Llama (`artifacts/tiny-llama`, trained
at 256 tokens): continued pretraining at 512 and then 1,024 tokens (`--steps` steps of `--batch-size` rows per stage,
corpus text mixed 1:1 with passkey documents whose answers alone are trained), with RoPE scaling set for 1,024 by
llama3, by position interpolation ("linear") and not at all ("none"), on two seeds each. After each stage: the loss on
held-out 256-token blocks (short-context quality); at the end: passkey accuracy and answer NLL per digit at 1,024 and
at 4x (4,096), and the loss by position on held-out 4,096-token rows.

Writes `artifacts/tiny-llama/extension_experiment.json` (what notebook 15, the README and a test read) and prints the
figures with the CPU. The seeds run in parallel worker processes of one thread each; about 40 min on 2 cores.

    python scripts/longctx_experiment.py [--steps 150] [--seeds 0,1] [--trials 20] [--out FILE]
"""
import argparse, json, multiprocessing as mp, platform, sys, time
from pathlib import Path

import torch
from llama32_nb.core import cpu_model, data_dir
from llama32_nb.longctx import (compare_extension, extension_summary, heldout_ids, long_context, long_rows,
                                loss_by_position, smooth)
from llama32_nb.pretraining import artifacts_dir, evaluate, load_artifacts

METHODS = ("llama3", "linear", "none")


def data(tok, args):
    "The training ids (first 90 % of the corpus), held-out short blocks and held-out long rows."
    text = (data_dir() / "tinyshakespeare.txt").read_text(encoding="utf-8")
    ids_val = heldout_ids(tok, text)
    final = args.stages[-1]
    return (tok.encode(text[:int(len(text) * 0.9)]), long_rows(ids_val, 256, args.val_blocks),
            long_rows(ids_val, 4 * final, args.long_rows))


def run_seed(seed: int, args) -> dict:
    "One worker, one thread: every method on one seed; stage rows and the smoothed loss-by-position curve per method."
    torch.set_num_threads(1)
    tiny, tok = load_artifacts()
    ids, val, long_val = data(tok, args)
    final, t0, out = args.stages[-1], time.time(), {}
    for method in METHODS:
        res = compare_extension(tiny, tok, ids, val, tuple(args.stages), args.steps, args.batch_size, seeds=(seed,),
                                methods=(method,), trials=args.trials, long_val=long_val, lr=args.lr)
        m, rows = res[method, seed]
        curve = loss_by_position(long_context(m, m.cfg.rope_scaling, 4 * final), long_val)
        out[method] = dict(rows=rows, curve=smooth(curve, 64).tolist(), seconds=round(time.time() - t0, 1))
        print(f"  seed {seed} {method}: {rows[-1]} [{time.time() - t0:.0f} s]", flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", default="512,1024")
    ap.add_argument("--steps", type=int, default=150, help="optimizer steps per stage")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--trials", type=int, default=20, help="passkey prompts per length")
    ap.add_argument("--val-blocks", type=int, default=16)
    ap.add_argument("--long-rows", type=int, default=6)
    ap.add_argument("--out", type=Path, default=artifacts_dir() / "tiny-llama" / "extension_experiment.json")
    args = ap.parse_args(argv)
    args.stages = [int(s) for s in args.stages.split(",")]
    seeds = tuple(int(s) for s in args.seeds.split(","))
    if len(seeds) < 2: raise SystemExit("quality claims need >= 2 seeds")
    tiny, tok = load_artifacts()
    ids, val, long_val = data(tok, args)
    orig = evaluate(tiny, val)
    base = loss_by_position(long_context(tiny, None, 4 * args.stages[-1]), long_val)
    print(f"CPU: {cpu_model()}; torch {torch.__version__}; original short-context loss {orig:.4f}", flush=True)
    t0 = time.time()
    with mp.get_context("spawn").Pool(len(seeds)) as pool:
        per_seed = dict(zip(seeds, pool.starmap(run_seed, [(s, args) for s in seeds])))
    res = {(m, s): (None, per_seed[s][m]["rows"]) for m in METHODS for s in seeds}
    summary = extension_summary(res, orig)
    out = dict(command="python scripts/longctx_experiment.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               cpu=cpu_model(), torch=torch.__version__, python=platform.python_version(),
               stages=args.stages, steps=args.steps, batch_size=args.batch_size, lr=args.lr, trials=args.trials,
               val_blocks=args.val_blocks, long_rows=args.long_rows, original_val_loss=orig,
               original_curve=smooth(base, 64).tolist(),
               runs={m: {str(s): per_seed[s][m] for s in seeds} for m in METHODS}, summary=summary,
               seconds=round(time.time() - t0, 1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    for r in summary:
        print(f"{r['method']:7s} " + "; ".join(f"{k} {v[0]:+.4f} ({v[1]:+.4f}..{v[2]:+.4f})" for k, v in r.items()
                                              if isinstance(v, tuple)))
    print(f"{out['seconds']:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
