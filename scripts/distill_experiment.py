#!/usr/bin/env python
"""The Minitron experiment in miniature at full budget, on the shipped teacher (`artifacts/teacher-llama`):

1. the four arms (student from scratch with CE / with KD, the teacher pruned to the student's shape with CE / with KD)
   for `--steps` steps of 8 x 256 tokens on each seed, and the headline (how many times fewer tokens prune + KD needs
   to reach the scratch CE student's final loss), per seed and on the mean curves;
2. every importance criterion, the teacher pruned to the student's shape and retrained `--retrain` KD steps, per seed;
3. width- vs depth-pruned students of equal size (`--depth-layers` blocks kept), `--wd-steps` KD steps, per seed.

Writes everything to `artifacts/teacher-llama/distill_experiment.json` (what notebook 12, the README and a test read)
and prints the figures with the CPU. About 25 min on 2 CPU cores at the defaults.

    python scripts/distill_experiment.py [--steps 256] [--seeds 0,1] [--retrain 64] [--wd-steps 64] [--out FILE]
"""
import argparse, json, platform, sys, time
from pathlib import Path

import torch
from llama32_nb.core import cpu_model, set_threads
from llama32_nb.distill import (criteria_retraining, distill_experiment, headline, student_shape, summarize,
                                width_vs_depth)
from llama32_nb.pretraining import artifacts_dir, corpus_blocks
from llama32_nb.pruning import load_teacher


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--retrain", type=int, default=64, help="KD steps after pruning, per criterion")
    ap.add_argument("--wd-steps", type=int, default=64, help="KD steps for the width/depth students")
    ap.add_argument("--depth-layers", type=int, default=3, help="blocks the depth-pruned student keeps")
    ap.add_argument("--val-blocks", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=artifacts_dir() / "teacher-llama" / "distill_experiment.json")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    seeds = tuple(int(s) for s in args.seeds.split(","))
    if len(seeds) < 2: raise SystemExit("quality claims need >= 2 seeds")
    teacher, tok = load_teacher()
    train, val = corpus_blocks(tok, teacher.cfg.max_seq_len, progress=False)
    calib, val = train[:64, :-1], val[:args.val_blocks]
    print(f"CPU: {cpu_model()}; torch {torch.__version__}; teacher {teacher.num_params():,} parameters", flush=True)
    t0 = time.time()
    tick = lambda name, seed: print(f"  {name} seed {seed} done, {time.time() - t0:.0f} s", flush=True)
    res = distill_experiment(teacher, train, val, calib, steps=args.steps, seeds=seeds,
                             batch_size=args.batch_size, progress=tick)
    t1 = time.time()
    crit = {seed: criteria_retraining(teacher, train, val, calib, steps=args.retrain, seed=seed,
                                      batch_size=args.batch_size) for seed in seeds}
    t2 = time.time()
    wd = width_vs_depth(teacher, train, val, calib, steps=args.wd_steps, n_layers=args.depth_layers, seeds=seeds,
                        batch_size=args.batch_size, progress=tick)
    t3 = time.time()
    per_seed = {s: headline(dict(runs={n: [r[i]] for n, r in res["runs"].items()})) for i, s in enumerate(seeds)}
    out = dict(command="python scripts/distill_experiment.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               cpu=cpu_model(), torch=torch.__version__, python=platform.python_version(),
               val_blocks=len(val), calib_blocks=len(calib), batch_size=args.batch_size, block=teacher.cfg.max_seq_len,
               student_shape=student_shape(tok.vocab_size), experiment=res, summary=summarize(res),
               headline=headline(res), headline_per_seed=per_seed,
               criteria=dict(steps=args.retrain, seeds=crit), width_vs_depth=wd, width_vs_depth_summary=summarize(wd),
               seconds=dict(arms=round(t1 - t0, 1), criteria=round(t2 - t1, 1), width_vs_depth=round(t3 - t2, 1)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, default=float))
    print(f"teacher {res['teacher_val']:.3f} on {len(val)} held-out blocks; {args.steps} steps x {args.batch_size} x "
          f"{teacher.cfg.max_seq_len} tokens per arm")
    for name, s in out["summary"].items():
        print(f"{name:11s} start {s['start']:.3f}  final {s['final']:.3f}  spread {s['spread']:.3f}")
    h = out["headline"]
    print(f"headline (mean curves): pruned KD reaches scratch CE's final {h['target']:.3f} after "
          f"{h['tokens_needed']:,.0f} tokens: {h['ratio']:.1f}x fewer{'' if h['exact'] else ' (a bound)'}; per seed: "
          + ", ".join(f"{s}: {v['ratio']:.1f}x" for s, v in per_seed.items()))
    for name in crit[seeds[0]]:
        print(f"{name:22s} " + "  ".join(f"seed {s}: {crit[s][name]['pruned']:.3f} -> {crit[s][name]['retrained']:.3f}"
                                         for s in seeds))
    for name, s in out["width_vs_depth_summary"].items():
        print(f"{name:6s} {wd['shapes'][name]['params']:,} params  start {s['start']:.3f}  final {s['final']:.3f}  "
              f"spread {s['spread']:.3f}")
    print(f"seconds: {out['seconds']}; wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
