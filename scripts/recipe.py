#!/usr/bin/env python
"""`make recipe`: the Llama 3.2 recipe in miniature, on the shipped data, on CPU.

Each stage reads what earlier stages wrote into the run folder and writes its own artifacts, figures and a
section of `report.md`, with a progress bar. The stages are the keys of `STAGES` below: tokenizer (train our BPE on
the corpus, compare compression with the real Llama 3 vocabulary), pretraining (the tiny Llama), samples (text from
it), vision (Llama 3.2 Vision tiling, a tiny encoder). Later components add one stage each.

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


def stage_vision(run: Run):
    """Llama 3.2 Vision preprocessing on the shipped photo and synthetic images (layouts, resizes, HF ids), and a tiny
    random encoder on the batch: output shape, and how far Meta's intermediate features sit from transformers 5.23's."""
    import matplotlib.cbook as cbook
    import torch
    from llama32_nb.vision import ImageTransform, VisionConfig, VisionEncoder, load_image, synthetic_image, tile_layouts
    tf, rows, ids = ImageTransform(), [], {rc: i + 1 for i, rc in enumerate(tile_layouts())}
    images = {"grace_hopper.jpg": load_image(cbook.get_sample_data("grace_hopper.jpg").read())}
    for w, h in tqdm([(300, 200), (1920, 1080), (4000, 3000), (2000, 300), (1, 20000)], desc="vision", unit="image"):
        images[f"synthetic {w}×{h}"] = synthetic_image(w, h)
    for name, im in images.items():
        p = tf.plan(im)
        rows.append([name, f"{im.size[0]}×{im.size[1]}", str(p.layout), f"{p.resized[0]}×{p.resized[1]}",
                     ids[p.layout]])
    fig, axs = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, name in zip(axs, ["grace_hopper.jpg", "synthetic 1920×1080", "synthetic 2000×300"]):
        canvas, p = tf.canvas(images[name])
        ax.imshow(canvas); ax.set_title(f"{name} → {p.layout}", fontsize=9); ax.set_xticks([]); ax.set_yticks([])
        for i in range(1, p.layout[0]): ax.axhline(i * tf.size, color="yellow")
        for j in range(1, p.layout[1]): ax.axvline(j * tf.size, color="yellow")
    figmd = run.figure(fig, "vision_tiles.png", "Tile canvases (yellow: tile borders; black: padding, -mean/std "
                       "after normalisation).")
    cfg = VisionConfig.tiny(image_size=56, patch_size=14)
    torch.manual_seed(0)
    enc = VisionEncoder(cfg).eval()
    with torch.no_grad():
        for n, prm in enc.named_parameters():
            if "gate" in n: prm.fill_(0.5)
    small = ImageTransform(size=cfg.image_size)
    batch = small.batch([[images["grace_hopper.jpg"]], [images["synthetic 2000×300"]]])
    with torch.no_grad():
        meta = enc(batch["pixel_values"], batch["aspect_ratios"])
        enc.hf_compat = True
        hf = enc(batch["pixel_values"], batch["aspect_ratios"])
    D = cfg.width
    d_glob, d_int = (meta[..., :D] - hf[..., :D]).abs().max().item(), (meta[..., D:] - hf[..., D:]).abs().max().item()
    run.metrics["vision"] = dict(plans=rows, tiny_output_shape=list(meta.shape), max_diff_global=d_glob,
                                 max_diff_intermediate=d_int)
    run.section("Vision preprocessing and encoder", md_table(["image", "size", "layout", "resized", "HF id"], rows)
                + "\n" + figmd + f"\nA tiny random encoder ({cfg.image_size}-px tiles, width {D}) on the two-sample "
                f"batch gives features {list(meta.shape)}. Meta's intermediate features (inputs of the chosen "
                f"layers) vs transformers 5.23's (their outputs): global part max |Δ| = {d_glob:.1e}, intermediate "
                f"part max |Δ| = {d_int:.2f}.\n")


STAGES = {"tokenizer": stage_tokenizer, "pretraining": stage_pretraining, "samples": stage_samples,
          "vision": stage_vision}


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
