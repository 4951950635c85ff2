"""Benchmark: llama32_nb's Mllama (the vision adapter) vs transformers' MllamaForConditionalGeneration on the same
random weights, 2 threads.

Two cases. (a) One adapter training step (forward, backward, AdamW over the adapter parameters; the text model frozen
in both) on a tiny config: a batch of B=8 rows of 32 tokens, one `<|image|>` each, images of 2 tiles. (b) Greedy
generation of 32 new tokens after a prompt with one 4-tile image, at a small config with real-shaped tiles (560 px,
14-px patches: 1601 tokens per tile) but a narrow, shallow encoder and text model. Our model is built first
(`hf_compat=True`: transformers' numerics), written with `save_pretrained` in the hub layout and read back by
transformers, so both hold the same weights; the losses / greedy tokens are compared before timing. Ours and
transformers run interleaved, round by round (who goes first alternates), inside one process; the table gives the
median time of each, the median-over-median ratio and the median of same-round ratios (> 1: ours faster). Not a test.

Frozen in both: every text-model tensor, the embedding table included. transformers keeps the 8 learnable rows
(`<|image|>` ...) inside `embed_tokens`, so they cannot be trained without training the whole table; ours keeps them
in `learnable_embedding`, which this benchmark freezes too, so both train exactly the same tensors: the image
encoder, the projector and the cross-attention blocks (transformers: its `cross_attention_layers` of the merged
stack).

    .venv/bin/python bench/bench_adapter.py [--quick] [--rounds 7] [--steps 3] [--only train|generate] [--threads 2]

On a machine whose cores are busy with other work, 2-thread timings are dominated by OpenMP waiting for a descheduled
thread (every parallel op then costs about a scheduler time slice: a 17k-element LayerNorm was seen taking 12 ms at 2
threads and 0.04 ms at 1), which favours whichever side launches fewer ops; `--threads 1` gives steadier numbers there.
"""
import argparse, copy, gc, sys, tempfile, time

import torch
import torch.nn.functional as F
import transformers
from transformers.models.mllama.processing_mllama import (convert_sparse_cross_attention_mask_to_dense,
                                                          get_cross_attention_token_mask)

from llama32_nb.adapter import Mllama, MllamaConfig, fusion_schedule, hf_cross_layers
from llama32_nb.core import cpu_model
from llama32_nb.decoder import LlamaConfig
from llama32_nb.vision import VisionConfig, collate_images

torch.set_num_threads(2)


@torch.no_grad()
def build_pair(cfg: MllamaConfig, tmp: str, seed=0):
    """Our model with cheap random weights (every gate 0.5, so the cross-attention blocks and the encoder's gated
    layers all contribute), and transformers' model read from our `save_pretrained` directory (its own tensors)."""
    with torch.device("meta"): ours = Mllama(cfg, init=False, hf_compat=True)
    ours = ours.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    for n, p in ours.named_parameters():
        if p.numel() == 1 and "gate" in n: p.fill_(0.5)
        elif p.dim() == 1: p.fill_(1.0 if n.endswith("weight") else 0.0)      # norm weights 1, biases 0
        else: p.normal_(0.0, 0.02, generator=g)
    ours.save_pretrained(tmp, dtype=torch.float32)
    hf = transformers.MllamaForConditionalGeneration.from_pretrained(tmp, dtype=torch.float32)
    return ours.eval(), hf.eval()


def hf_inputs(tokens: torch.Tensor, imgs: dict, image_id: int, max_tiles: int) -> dict:
    "transformers' image inputs for `tokens [B, T]`: its processor's `cross_attention_mask` from the token positions."
    sparse = [get_cross_attention_token_mask(row, image_id) for row in tokens.tolist()]
    cam = convert_sparse_cross_attention_mask_to_dense(sparse, imgs["num_tiles"], max_tiles, tokens.shape[1])
    return dict(pixel_values=imgs["pixel_values"], aspect_ratio_ids=imgs["aspect_ratio_ids"],
                aspect_ratio_mask=imgs["aspect_ratio_mask"], cross_attention_mask=torch.from_numpy(cam))


def median(xs):
    xs = sorted(xs); n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def interleaved(fns: dict, rounds: int) -> dict:
    "Seconds per call of each function, `rounds` times, interleaved; the order rotates each round."
    t, names = {k: [] for k in fns}, list(fns)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter(); fns[name](); t[name].append(time.perf_counter() - t0)
    return t


def row(name, t_ours, t_hf, note=""):
    q = [h / o for o, h in zip(t_ours, t_hf)]
    return dict(name=name, ours=median(t_ours), hf=median(t_hf), ratio=median(t_hf) / median(t_ours),
                median_ratio=median(q), spread=(min(q), max(q)), note=note)


def train_case(rounds: int, steps: int, B=8, T=32, tiles=(1, 2)):
    text = LlamaConfig(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=1024, ffn_dim=384, max_seq_len=256,
                       tie_embeddings=False)
    cfg = MllamaConfig(text, VisionConfig.tiny(), fusion_schedule(4, 2))              # blocks before layers 1 and 3
    with tempfile.TemporaryDirectory() as tmp: ours, hf = build_pair(cfg, tmp)
    V, S, nt = text.vocab_size, cfg.vision.image_size, tiles[0] * tiles[1]
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (B, T + 1), generator=g)
    for b in range(B): x[b, 1 + b % 4] = cfg.image_token_id                          # <|image|> at positions 1..4
    tokens, targets = x[:, :-1], x[:, 1:].masked_fill(x[:, 1:] >= V, -100)
    imgs = collate_images([[(torch.randn(nt, 3, S, S, generator=g), tiles)] for _ in range(B)], cfg.vision.max_tiles)
    px, ar = imgs["pixel_values"], imgs["aspect_ratios"]
    hin = hf_inputs(tokens, imgs, cfg.image_token_id, cfg.vision.max_tiles)

    ours.freeze_text_model().learnable_embedding.weight.requires_grad_(False)        # = transformers' frozen table
    trainable_hf = tuple(f"model.language_model.layers.{i}." for i in hf_cross_layers(cfg.schedule)) + \
        ("model.vision_model.", "model.multi_modal_projector.")
    for n, p in hf.named_parameters(): p.requires_grad_(n.startswith(trainable_hf))
    p_ours = [p for p in ours.adapter_parameters() if p.requires_grad]
    p_hf = [p for p in hf.parameters() if p.requires_grad]
    # the same tensors; transformers stores the three tile tables per aspect-ratio id (9 rows at 4 tiles), not per
    # tile position, so it holds a few more elements
    assert len(p_ours) == len(p_hf), (len(p_ours), len(p_hf))
    n_ours, n_hf = sum(p.numel() for p in p_ours), sum(p.numel() for p in p_hf)
    ours.train(); hf.train()

    # three independent copies of the same start, stepped in lockstep: ours with model.loss (the fused chunked loss
    # train_adapter uses), ours through full logits + F.cross_entropy (what transformers computes), and transformers
    ours_ce = copy.deepcopy(ours)
    losses = {"ours": lambda: ours.loss(tokens, targets, px, ar),
              "ours_ce": lambda: F.cross_entropy(ours_ce(tokens, px, ar).flatten(0, 1), targets.flatten()),
              "hf": lambda: F.cross_entropy(hf(input_ids=tokens, **hin).logits.flatten(0, 1).float(),
                                            targets.flatten())}
    with torch.no_grad(): l0 = {k: f().item() for k, f in losses.items()}
    d0 = max(abs(l0["ours"] - l0["hf"]), abs(l0["ours_ce"] - l0["hf"]))
    print(f"(a) loss on the same batch before training: ours {l0['ours']:.6f} (model.loss), "
          f"{l0['ours_ce']:.6f} (logits + F.cross_entropy), transformers {l0['hf']:.6f}; max|diff| {d0:.2e}")
    assert d0 < 1e-4, l0

    def make_step(params, loss_fn):
        opt = torch.optim.AdamW(params, lr=1e-3)
        def step():
            loss = loss_fn()
            opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        return step
    steps_fn = {"ours": make_step(p_ours, losses["ours"]), "hf": make_step(p_hf, losses["hf"]),
                "ours_ce": make_step([p for p in ours_ce.adapter_parameters() if p.requires_grad], losses["ours_ce"])}
    for f in steps_fn.values(): f()                                                  # step 1 (also the warm-up)
    with torch.no_grad(): l1 = {k: losses[k]().item() for k in ("ours", "hf")}
    # Not ~1e-6 like the first loss, by design: transformers' per-aspect-ratio-id tile tables also hold the padding
    # tile slots, which the text rows before <|image|> see through its unmasked cross-attention (hf_compat), so they
    # get gradients and move; ours (Meta's per-tile-position tables) has no such parameters. With <|image|> first in
    # every row (no row without an image) the two agree to ~2e-6 after the step.
    print(f"    after one AdamW step on it: ours {l1['ours']:.6f}, transformers {l1['hf']:.6f}; "
          f"max|diff| {abs(l1['ours'] - l1['hf']):.2e} (transformers also trains its padding-tile table slots, "
          f"seen by the rows before <|image|>; ours has none)")
    print(f"    trainable: {len(p_ours)} tensors in each, {n_ours:,} elements in ours, {n_hf:,} in transformers' "
          f"(its tile tables are per aspect-ratio id)")
    assert abs(l1["ours"] - l1["hf"]) < 1e-3, l1

    t = interleaved({k: (lambda f=f: [f() for _ in range(steps)]) for k, f in steps_fn.items()}, rounds)
    t = {k: [s / steps for s in v] for k, v in t.items()}
    shape = f"text dim 128 x 4 layers + 2 xattn, tiny encoder (28-px tiles); B={B}, T={T}, {nt} tiles/image"
    out = [row("train step, model.loss (s)", t["ours"], t["hf"], shape),
           row("train step, logits + CE (s)", t["ours_ce"], t["hf"], "ours through full logits, like transformers")]
    del ours, ours_ce, hf, steps_fn; gc.collect()
    return out


def generate_case(rounds: int, n_new=32, prompt_len=16):
    text = LlamaConfig(dim=512, n_layers=4, n_heads=8, n_kv_heads=2, vocab_size=32768, ffn_dim=1536,
                       max_seq_len=512, tie_embeddings=False)
    vision = VisionConfig(width=128, n_layers=2, n_global_layers=1, n_heads=2, mlp_dim=512, image_size=560,
                          patch_size=14, max_tiles=4, intermediate_layers=(0, 1))
    cfg = MllamaConfig(text, vision, fusion_schedule(4, 2))
    with tempfile.TemporaryDirectory() as tmp: ours, hf = build_pair(cfg, tmp)
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, text.vocab_size, (1, prompt_len), generator=g)
    prompt[0, 1] = cfg.image_token_id
    imgs = collate_images([[(torch.randn(4, 3, 560, 560, generator=g), (2, 2))]], 4)
    px, ar = imgs["pixel_values"], imgs["aspect_ratios"]
    hin = hf_inputs(prompt, imgs, cfg.image_token_id, 4)

    def ours_gen(n): return ours.generate(prompt[0], n, pixel_values=px, aspect_ratios=ar, stop_tokens=())
    @torch.inference_mode()
    def hf_gen(n):
        return hf.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **hin, max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)[0, prompt_len:].tolist()
    with torch.inference_mode():
        lo = ours(prompt, px, ar)[0, -1]
        lh = hf(input_ids=prompt, **hin).logits[0, -1].float()
    a, b = ours_gen(n_new), hf_gen(n_new)                                            # also the warm-up
    agree = next((i for i, (u, v) in enumerate(zip(a, b)) if u != v), min(len(a), len(b)))
    print(f"(b) prompt's last logits: max|diff| {(lo - lh).abs().max().item():.2e} (max|logit| "
          f"{lh.abs().max().item():.2f}); greedy tokens equal for {agree}/{n_new}: "
          f"{'same tokens' if a == b else 'DIFFERENT'}")
    print(f"    ours {a}\n    HF   {b}")
    t = interleaved({"ours": lambda: ours_gen(n_new), "hf": lambda: hf_gen(n_new)}, rounds)
    out = [row(f"generate {n_new} tokens, 4-tile image (s)", t["ours"], t["hf"],
               f"text dim 512 x 4 layers + 2 xattn, V={text.vocab_size}; encoder 560-px tiles / 14-px patches, "
               f"width 128, 2 local + 1 global layers; prompt {prompt_len} tokens")]
    del ours, hf; gc.collect()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 rounds of 1 step (smoke run)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 7; --quick: 2)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per round (default 3; --quick: 1)")
    ap.add_argument("--only", choices=("train", "generate"), default=None)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2, the benchmark machine's cores)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (2 if args.quick else 7)
    steps = args.steps or (1 if args.quick else 3)
    print(f"CPU: {cpu_model()}; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"threads {torch.get_num_threads()}, {rounds} interleaved rounds\n")
    rows = []
    if args.only != "generate": rows += train_case(rounds, steps)
    if args.only != "train": rows += generate_case(rounds)
    print(f"\n{'benchmark':38}{'ours s':>9}{'HF s':>9}{'HF/ours':>9}{'median':>8}{'spread':>13}  notes")
    print(f"{'':38}{'':>9}{'':>9}{'':>9}{'ratio':>8}")
    for r in rows:
        print(f"{r['name']:38}{r['ours']:9.3f}{r['hf']:9.3f}{r['ratio']:8.2f}x{r['median_ratio']:7.2f}x"
              f"{r['spread'][0]:7.2f}-{r['spread'][1]:.2f}x  {r['note']}")
    print("(seconds: median over rounds; HF/ours: transformers' median time over ours, > 1 means ours faster; "
          "median ratio: median of the same-round ratios, spread: their min-max)")


if __name__ == "__main__":
    sys.exit(main())
