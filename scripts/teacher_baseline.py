#!/usr/bin/env python
"""Is the shipped teacher clearly better than the student could be on its own? Train the student's shape
(`distill.student_config`) from scratch on exactly the teacher's data and budget, once per seed, and record the
validation losses in `artifacts/teacher-llama/training.json` under `student_from_scratch` (what notebook 12 and the
README quote). About 4-5 min per seed on 2 CPU cores.

    python scripts/teacher_baseline.py [--seeds 0,1] [--out runs/teacher-baseline]
"""
import argparse, json, sys
from dataclasses import asdict, replace
from pathlib import Path

from llama32_nb.core import cpu_model, set_threads
from llama32_nb.distill import student_config
from llama32_nb.pretraining import artifacts_dir, pretrain_tiny_llama
from llama32_nb.pruning import teacher_train_config
from llama32_nb.tokenizer import Tokenizer


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--out", type=Path, default=Path("runs/teacher-baseline"))
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    dest = artifacts_dir() / "teacher-llama" / "training.json"
    tok = Tokenizer.load(artifacts_dir() / "tiny-llama" / "tokenizer.model")   # the teacher's (same corpus vocabulary)
    cfg = teacher_train_config()                                               # as `train_teacher` trains
    runs = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        tr = pretrain_tiny_llama(tok, args.out / f"seed{seed}", model_cfg=student_config(tok.vocab_size),
                                 train_cfg=replace(cfg, seed=seed), progress=True, name="student")
        runs[seed] = dict(params=tr.facts["params"], final_val_loss=tr.facts["final_val_loss"],
                          train_seconds=tr.facts["train_seconds"])
        print(f"seed {seed}: student from scratch {tr.facts['final_val_loss']:.4f}", flush=True)
    facts = json.loads(dest.read_text())
    if {k: v for k, v in facts["train_config"].items() if k != "seed"} != {k: v for k, v in asdict(cfg).items()
                                                                          if k != "seed"}:
        raise SystemExit(f"{dest} was trained with {facts['train_config']}, not {asdict(cfg)}: rerun the teacher stage")
    if Tokenizer.load(dest.parent / "tokenizer.model").encode("To be, or not to be") != tok.encode("To be, or not to be"):
        raise SystemExit("the teacher's tokenizer differs from the tiny Llama's")
    print(f"teacher {facts['final_val_loss']:.4f}")
    facts["student_from_scratch"] = dict(config="distill.student_config", same_budget_as_teacher=True,
                                         cpu=cpu_model(), seeds=runs)
    dest.write_text(json.dumps(facts, indent=2))


if __name__ == "__main__":
    sys.exit(main())
