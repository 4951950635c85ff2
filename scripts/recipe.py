#!/usr/bin/env python
"""`make recipe`: the Llama 3.2 recipe in miniature, on the shipped data, on CPU.

Each stage reads what earlier stages wrote into the run folder and writes its own artifacts, figures and a
section of `report.md`, with a progress bar. The stages are the keys of `STAGES` below: tokenizer (train our BPE on
the corpus, compare compression with the real Llama 3 vocabulary), pretraining (the tiny Llama), samples (text from
it). Later components add one stage each.

    python scripts/recipe.py [--out runs/NAME] [--stages tokenizer,...] [--ship]
"""
from __future__ import annotations
import argparse, json, sys, time
from datetime import datetime
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from tqdm.auto import tqdm

from llama32_nb.core import cpu_model, data_dir, set_seed, set_threads


class Run:
    "A run folder: artifacts, figures and a markdown report built section by section."
    def __init__(self, out: Path, ship: bool = False):
        self.out, self.ship = out, ship
        out.mkdir(parents=True, exist_ok=True)
        self.sections: list[str] = []
        self.metrics: dict = {}

    def section(self, title: str, body: str): self.sections.append(f"## {title}\n\n{body.strip()}\n")

    def figure(self, fig, name: str, caption: str) -> str:
        fig.savefig(self.out / name, dpi=110, bbox_inches="tight"); plt.close(fig)
        return f"![{caption}]({name})\n\n*{caption}*\n"

    def write(self):
        head = (f"# llama32-nb recipe report\n\nRun folder `{self.out}`, written {datetime.now():%Y-%m-%d %H:%M} "
                f"on {cpu_model()}.\n\n")
        (self.out / "report.md").write_text(head + "\n".join(self.sections))
        (self.out / "metrics.json").write_text(json.dumps(self.metrics, indent=2))


def md_table(header: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:,.3f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]) + "\n"


# ---------------------------------------------------------------------------------------------------
LANGS = ["en", "de", "fr", "it", "pt", "hi", "es", "th"]
TOK_VOCAB = 2048  # the tiny model's vocabulary: small enough that the embedding stays small


def stage_tokenizer(run: Run):
    "Train our byte-level BPE on the corpus; compare bytes/token with the real Llama 3 vocabulary."
    from llama32_nb.tokenizer import Tokenizer
    d = data_dir()
    corpus = (d / "tinyshakespeare.txt").read_text(encoding="utf-8")
    langs = {l: (d / "lang" / f"{l}.txt").read_text(encoding="utf-8") for l in LANGS
             if (d / "lang" / f"{l}.txt").exists()}
    bar = tqdm(total=4, desc="tokenizer", unit="step")
    t0 = time.time()
    tok = Tokenizer.train([corpus], TOK_VOCAB)
    train_s = time.time() - t0
    tok.save(run.out / "tokenizer")
    assert Tokenizer.load(run.out / "tokenizer").encode(corpus[:5000]) == tok.encode(corpus[:5000])
    bar.update()
    # a multilingual vocabulary of the same size, to show what the training data does to compression
    multi = Tokenizer.train([corpus[:300_000], *langs.values()], TOK_VOCAB); bar.update()
    llama3 = Tokenizer.llama3(); bar.update()
    bpt = lambda t, s: len(s.encode("utf-8")) / max(1, len(t.encode(s)))
    texts = {"shakespeare (val 10%)": corpus[int(len(corpus) * 0.9):], **langs}
    rows = [[name, round(bpt(tok, s), 3), round(bpt(multi, s), 3), round(bpt(llama3, s), 3)]
            for name, s in texts.items()]
    bar.update(); bar.close()
    run.metrics["tokenizer"] = dict(vocab_size=TOK_VOCAB, train_seconds=round(train_s, 2),
                                    bytes_per_token={r[0]: dict(ours=r[1], ours_multilingual=r[2], llama3=r[3])
                                                     for r in rows})
    fig, ax = plt.subplots(figsize=(8, 3.5))
    xs = range(len(rows)); w = 0.27
    ax.bar([x - w for x in xs], [r[1] for r in rows], w, label=f"ours, Shakespeare, {TOK_VOCAB}")
    ax.bar(list(xs), [r[2] for r in rows], w, label=f"ours, multilingual, {TOK_VOCAB}")
    ax.bar([x + w for x in xs], [r[3] for r in rows], w, label="Llama 3 (128,256)")
    ax.set_xticks(list(xs), [r[0].split(" ")[0] for r in rows]); ax.set_ylabel("bytes per token (higher = better)")
    ax.legend(fontsize=8); ax.set_title("Compression of our trained vocabularies vs the real Llama 3 vocabulary")
    run.section("Tokenizer", f"""
Trained a {TOK_VOCAB}-token byte-level BPE on `data/tinyshakespeare.txt` ({len(corpus):,} characters) in
{train_s:.1f} s; saved to `tokenizer/` (the tiny model's tokenizer). A multilingual vocabulary of the same size
was trained on part of the corpus plus the 8 language samples. Bytes per token on each text:

{md_table(["text", f"ours (Shakespeare, {TOK_VOCAB})", f"ours (multilingual, {TOK_VOCAB})", "Llama 3 (128,256)"], rows)}
{run.figure(fig, "tokenizer_compression.png", "Bytes per token: higher means fewer tokens for the same text.")}
""")
    return tok


# ---------------------------------------------------------------------------------------------------
SAMPLE_PROMPTS = ["ROMEO:\n", "JULIET:\nO Romeo, Romeo!", "First Citizen:\n", "KING RICHARD III:\nNow is the winter of"]


def _load_run_tokenizer(run: Run):
    from llama32_nb.tokenizer import Tokenizer
    p = run.out / "tokenizer"
    if not p.is_file():
        raise SystemExit(f"{p} is missing: run the tokenizer stage first (--stages tokenizer,pretraining,...)")
    return Tokenizer.load(p)


def stage_pretraining(run: Run):
    """Pretrain the tiny Llama on tiny Shakespeare with the tokenizer stage's vocabulary; loss curves, perplexity,
    throughput."""
    import shutil
    import torch
    from llama32_nb.pretraining import (pretrain_tiny_llama, plot_history, load_artifacts, save_artifacts, evaluate,
                                        corpus_blocks, artifacts_dir)
    tok = _load_run_tokenizer(run)
    tr = pretrain_tiny_llama(tok, run.out, progress=True)       # resumes from <run>/checkpoint if interrupted
    f = tr.facts
    # the shipped copy is bf16: check what that costs on the validation set
    _, val = corpus_blocks(tok, f["block_size"], progress=False)
    m16, _ = load_artifacts(run.out / "tiny-llama", device=tr.device)
    m16 = m16.to(torch.bfloat16).float()
    f["final_val_loss_bf16_weights"] = evaluate(m16, val, 16)
    if run.ship:                                              # regenerate the repository's artifacts/tiny-llama
        dest = artifacts_dir() / "tiny-llama"
        if dest.exists(): shutil.rmtree(dest)
        save_artifacts(tr.model, tok, dest, dtype=torch.bfloat16, extra=f)
        f["shipped_to"] = str(dest)
    run.metrics["pretraining"] = {k: v for k, v in f.items() if k != "train_config"}
    run.metrics["pretraining"]["train_config"] = f["train_config"]
    h = tr.history
    fig = plot_history(h, title=f"tiny Llama ({f['params'] / 1e6:.1f} M parameters) on tiny Shakespeare")
    c = f["train_config"]
    rows = [["parameters", f"{f['params']:,}"],
            ["training tokens", f"{f['train_tokens']:,} ({f['epochs']} epochs of {f['train_blocks']} blocks)"],
            ["steps x tokens/step", f"{f['steps']} x {c['batch_size'] * c['grad_accum'] * f['block_size']:,}"],
            ["peak / final lr", f"{c['lr']:g} / {c['min_lr']:g} (warmup {c['warmup_steps']}, cosine)"],
            ["train loss (mean of last 20 steps)", round(f["final_train_loss"], 3)],
            ["validation loss (all held-out blocks)", round(f["final_val_loss"], 3)],
            ["validation perplexity", round(f["val_perplexity"], 1)],
            ["validation loss, bf16-rounded weights", round(f["final_val_loss_bf16_weights"], 3)],
            ["throughput", f"{f['tokens_per_second']:,} tokens/s on {f['device']} ({cpu_model()}) "
                           f"({f['train_seconds']:.0f} s of training steps)"]]
    run.section("Pretraining", f"""
A {f['params']:,}-parameter Llama (width 256, 4 layers, 8 query / 2 key-value heads, SwiGLU 768, tied embeddings,
256-token context) trained from scratch on the first 90% of tiny Shakespeare, tokenized with the tokenizer stage's
vocabulary and packed into {f['block_size']}+1-token blocks; the last 10% ({f['val_blocks']} blocks) is held out.
AdamW (0.9, 0.95, weight decay {c['weight_decay']}), gradient clipping at {c['grad_clip']}, linear warmup + \
cosine decay.
Model and tokenizer (Hugging Face layout) are in `tiny-llama/`; the resumable checkpoint is in `checkpoint/`.

{md_table(["", "value"], rows)}
{run.figure(fig, "pretraining_loss.png",
            "Training loss per step (faint) and its moving average; validation loss on the held-out tail.")}
""")
    return tr


def stage_samples(run: Run):
    "Greedy and sampled continuations of a few prompts from the pretrained tiny Llama."
    from llama32_nb.pretraining import load_artifacts
    p = run.out / "tiny-llama"
    if not (p / "config.json").is_file(): raise SystemExit(f"{p} is missing: run the pretraining stage first")
    model, tok = load_artifacts(p)
    out, samples = [], {}
    for prompt in tqdm(SAMPLE_PROMPTS, desc="samples", unit="prompt"):
        ids = tok.encode(prompt)
        greedy = tok.decode(model.generate(ids, max_new_tokens=80, temperature=0.0, tokenizer=tok))
        sampled = tok.decode(model.generate(ids, max_new_tokens=80, temperature=0.8, top_k=50, seed=0, tokenizer=tok))
        samples[prompt] = dict(greedy=greedy, sampled=sampled)
        out.append(f"**Prompt** `{prompt.replace(chr(10), ' / ')}`\n\nGreedy:\n\n```\n{prompt}{greedy}\n```\n\n"
                   f"Sampled (temperature 0.8, top-k 50, seed 0):\n\n```\n{prompt}{sampled}\n```\n")
    run.metrics["samples"] = samples
    run.section("Samples", "80 new tokens per prompt from `tiny-llama/`.\n\n" + "\n".join(out))


# ---------------------------------------------------------------------------------------------------
LONGCTX_BUDGET = dict(zero_shot_rows=2, val_blocks=16, stages=(512, 1024), steps=8, batch_size=1, trials=8,
                      seeds=(0, 1))


def stage_longctx(run: Run, budget: dict | None = None):
    """Long context in miniature: the tiny Llama's zero-shot loss by position to 16x its length under each RoPE
    scaling method, then staged extension (256 -> 512 -> 1,024) with llama3 scaling vs PI vs none, two seeds each:
    short-context loss recovery and passkey accuracy at the final length and at 4x it."""
    import torch
    from llama32_nb.longctx import (ROPE_METHODS, compare_extension, extension_summary, heldout_ids, long_context,
                                    long_rows, loss_by_position, rope_scaling, smooth)
    from llama32_nb.pretraining import evaluate, load_artifacts
    p = run.out / "tiny-llama"
    if not (p / "config.json").is_file(): raise SystemExit(f"{p} is missing: run the pretraining stage first")
    tiny, tok = load_artifacts(p, device="cpu")
    L0 = tiny.cfg.max_seq_len
    text = (data_dir() / "tinyshakespeare.txt").read_text(encoding="utf-8")
    ids_train, ids_val = tok.encode(text[:int(len(text) * 0.9)]), heldout_ids(tok, text)
    b = {**LONGCTX_BUDGET, **(budget or {})}
    bar = tqdm(total=len(ROPE_METHODS) + 1, desc="longctx", unit="part")
    rows = long_rows(ids_val, 16 * L0, b["zero_shot_rows"])
    curves = {}
    for m in ROPE_METHODS:
        mm = long_context(tiny, rope_scaling(m, 16, L0) if m != "none" else None, 16 * L0)
        curves[m] = loss_by_position(mm, rows); bar.update()
    val = long_rows(ids_val, L0, b["val_blocks"])
    orig = evaluate(tiny, val)
    stages, steps, batch, trials, seeds = b["stages"], b["steps"], b["batch_size"], b["trials"], b["seeds"]
    res = compare_extension(tiny, tok, ids_train, val, stages, steps, batch, seeds=seeds, trials=trials)
    bar.update(); bar.close()
    summ = extension_summary(res, orig)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for m, v in curves.items():
        ax.plot((torch.arange(len(v) // 64) + .5) * 64, smooth(v, 64), label=m)
    ax.axvline(L0, color="gray", ls=":"); ax.set_xscale("log", base=2); ax.legend(fontsize=8)
    ax.set_xlabel("position"); ax.set_ylabel("loss (mean over 64 positions)")
    zs = [[m, round(smooth(v, L0)[0].item(), 3), round(v[L0:].mean().item(), 3)] for m, v in curves.items()]
    pk = [k for k in summ[0] if k.startswith("passkey")]
    fmt = lambda t, pct=False: (f"{t[0]:.0%} ({t[1]:.0%}..{t[2]:.0%})" if pct
                                else f"{t[0]:+.3f} ({t[1]:+.3f}..{t[2]:+.3f})")
    ext = [[r["method"], fmt(r["val_loss_delta"]), *[fmt(r[k], True) for k in pk]] for r in summ]
    run.metrics["longctx"] = dict(zero_shot={r[0]: dict(loss_in=r[1], loss_past=r[2]) for r in zs},
                                  original_val_loss=orig, extension=summ,
                                  budget={k: list(v) if isinstance(v, tuple) else v for k, v in b.items()})
    run.section("Long context", f"""
Zero-shot, the tiny Llama (trained at {L0} tokens) on {b["zero_shot_rows"]} held-out rows of {16 * L0} tokens, each
RoPE scaling method set for 16x; mean loss within the training length and past it:

{md_table(["method", f"loss at 0..{L0}", f"loss at {L0}..{16 * L0}"], zs)}
{run.figure(fig, "longctx_loss_by_position.png", "Loss by position past the training length (dotted), per method.")}
Staged extension {L0} -> {' -> '.join(map(str, stages))}, {steps} steps of {batch} row(s) per stage (corpus text
mixed 1:1 with synthetic passkey documents), scaling set for {stages[-1]}, seeds {list(seeds)}. Short-context loss
is on {b["val_blocks"]} held-out {L0}-token blocks, relative to the original model's {orig:.3f}; passkey accuracy over
{trials} trials (mean, min..max over seeds):

{md_table(["method", "Δ short-context loss", *pk], ext)}
A budget this small shows the mechanics, not the result Meta reports: read the numbers as what this many tokens buy.
""")


STAGES = {"tokenizer": stage_tokenizer, "pretraining": stage_pretraining, "samples": stage_samples,
          "longctx": stage_longctx}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="run folder (default runs/<timestamp>)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {list(STAGES)}")
    ap.add_argument("--ship", action="store_true",
                    help="also overwrite the repository's shipped artifacts/ with this run's")
    args = ap.parse_args(argv)
    names = [s for s in args.stages.split(",") if s]
    if bad := [s for s in names if s not in STAGES]: ap.error(f"unknown stage(s) {bad}; known: {list(STAGES)}")
    set_seed(0); set_threads()
    run = Run(args.out or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"), ship=args.ship)
    t0 = time.time()
    for name in names:
        ts = time.time(); print(f"== stage {name}", flush=True)
        STAGES[name](run)
        run.metrics.setdefault("stage_seconds", {})[name] = round(time.time() - ts, 1)
        run.write()
    print(f"recipe done in {time.time() - t0:.0f} s; report: {run.out / 'report.md'}")


if __name__ == "__main__":
    sys.exit(main())
