"""The post-training experiment of notebooks 13 and 14, at full budget: for each seed, SFT of the shipped tiny Llama
on gold transcripts, then `--rounds` rounds of reward model (on all pairs so far) -> rejection sampling -> SFT on the
picks -> on-policy DPO, each round sampling from the previous round's final policy, every stage scored greedily on
held-out prompts by the oracle. Round 1 also runs the failure-mode experiments (a length-biased reward model and
best-of-N against it; DPO without the NLL term, at 10x the learning rate, on oracle labels) and a control (the
RS-SFT's steps spent on gold SFT instead). The seeds run in parallel worker processes of one thread each.

Writes `artifacts/posttrain/rounds.json` (JSON only, no weights): the settings (`dpo.RoundConfig`), every seed's
raw results, the summary across seeds, the command, the CPU and the time. Notebooks 13 and 14 plot it, the README
quotes it, and `tests/test_dpo.py` checks it.

    .venv/bin/python scripts/posttrain_rounds.py [--seeds 0 1] [--rounds 3] [--out PATH]
"""
import argparse, json, os, sys, time
from dataclasses import asdict, fields
from pathlib import Path


def _one_seed(cfg_dict: dict, seed: int) -> dict:
    import torch
    torch.set_num_threads(1)
    from llama32_nb.dpo import RoundConfig, posttrain_rounds
    t0 = time.time()
    note = lambda *a: print(f"[seed {seed}] {' '.join(map(str, a))} done at {time.time() - t0:.0f} s", flush=True)
    return posttrain_rounds(RoundConfig(**cfg_dict), seed, progress=note)


def main(argv=None):
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    import torch
    from llama32_nb.core import cpu_model
    from llama32_nb.pretraining import artifacts_dir
    from llama32_nb.dpo import RoundConfig, summarize_rounds
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", type=Path, default=artifacts_dir() / "posttrain" / "rounds.json")
    for f in fields(RoundConfig):
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default) if f.type != "bool" else int,
                        default=f.default, help=f"RoundConfig.{f.name} (default {f.default})")
    args = ap.parse_args(argv)
    cfg = RoundConfig(**{f.name: (bool(getattr(args, f.name)) if isinstance(f.default, bool) else getattr(args, f.name))
                         for f in fields(RoundConfig)})
    t0 = time.time()
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(min(len(args.seeds), os.cpu_count() or 1), mp_context=ctx) as pool:
        runs = list(pool.map(_one_seed, [asdict(cfg)] * len(args.seeds), args.seeds))
    out = dict(command="python scripts/posttrain_rounds.py " + " ".join(sys.argv[1:] if argv is None else argv),
               cpu=cpu_model(), torch=torch.__version__, threads_per_seed=1, seconds=round(time.time() - t0, 1),
               config=asdict(cfg), runs=runs, summary=summarize_rounds(runs))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    s = out["summary"]["stages"]
    for k, v in s.items():
        print(f"{k:28s} score {v['score']['mean']:.3f} ± {v['score']['spread'] / 2:.3f}   "
              f"pass@1 {v['pass1']['mean']:.3f}   ended {v['ended']['mean']:.2f}")
    print(f"{out['seconds']:.0f} s on {out['cpu']}; wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
