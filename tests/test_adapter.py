"""llama32_nb.adapter (Llama 3.2 Vision, `Mllama`) against the references, at tiny random shapes: Meta's llama_models
`CrossAttentionTransformer` (a Meta-layout checkpoint, prefill and cached greedy decoding, fp32 and bf16), transformers'
`MllamaForConditionalGeneration` (`hf_compat=True`, the documented differences of the default, checkpoints both ways),
bit-exactness with the text `Llama` while the gates are 0, clear errors for bad inputs and wrong checkpoints, and the
design rules (plain modules that hooks and swaps reach; cross-attention K/V computed once per image set)."""
import importlib
import json
import re
import shutil
import socket
import sys
import types

import pytest
import torch
import torch.nn as nn

from llama32_nb.adapter import Mllama, MllamaConfig, SCENE_VISION, fusion_schedule, hf_cross_layers
from llama32_nb.checkpoint import CheckpointError
from llama32_nb.decoder import Llama, LlamaConfig, meta_name
from llama32_nb.pretraining import load_artifacts
from llama32_nb.vision import VisionConfig, VisionEncoder, tile_layouts, to_hf_vision

torch.set_num_threads(2)

V = I = 256                             # text vocabulary of the random models; <|image|> is the first id past it
VC = VisionConfig.tiny()                # 28-px tiles of 7-px patches (17 tokens), up to 4 tiles, width 32
SCHED = tuple(fusion_schedule(4, 2))    # (1, 3): blocks in front of self-attention layers 1 and 3
MAX_LEN = 32
META_PARAMS = dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=V, multiple_of=32, use_scaled_rope=True,
                   max_seq_len=MAX_LEN, vision_chunk_size=VC.image_size, vision_max_num_chunks=VC.max_tiles,
                   vision_num_cross_attention_layers=len(SCHED))

# (tokens, (rows, cols) of each image) per sample, all 12 tokens long
TWO_APART = ([1, 5, I, 7, 8, 9, I, 10, 11, 12, 13, 14], [(1, 2), (2, 2)])
TWO_IN_A_ROW = ([1, I, I, 20, 21, 22, 23, 24, 25, 26, 27, 28], [(1, 1), (4, 1)])
ONE_AFTER_TEXT = ([1, 30, 31, I, 32, 33, 34, 35, 36, 37, 38, 39], [(2, 1)])
TEXT_ONLY = ([1] + list(range(40, 51)), [])
MIXED = [TWO_APART, TWO_IN_A_ROW, ONE_AFTER_TEXT, TEXT_ONLY]      # padding images, an image-less sample
FULL = [TWO_APART, TWO_IN_A_ROW, ([1, 30, 31, I, 32, 33, I, 35, 36, 37, 38, 39], [(2, 1), (1, 3)])]  # no padding
IMAGE_FIRST = [([I, 1, 7, 8, 9, 10], [(1, 2)]), ([I, 2, 3, 4, 5, 6], [(3, 1)])]       # every row sees an image


# ---------------------------------------------------------------------------------------------------- helpers
def randomize(model, seed):
    """Random weights with non-trivial norms and clearly non-zero scalar gates (a zero gate would hide its path).
    Gates are the one-element parameters (names alone would also catch `gate_proj` and `gated_positional_embedding`)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.numel() == 1:
                sign = 1 if torch.rand(1, generator=g) < .5 else -1
                p.fill_(sign * (0.4 + 0.5 * torch.rand(1, generator=g).item()))
            elif p.dim() == 1 and ("ln" in name or "norm" in name) and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.1) / max(1, p.shape[-1]) ** .25)
    return model


def batch(samples, cfg=VC, seed=0):
    """`(tokens [B, T], pixel_values, aspect_ratios)` in our (= Meta's) convention: pixels random on real tiles and zero
    elsewhere, `(1, 1)` for padding images; all-text batches get a single all-zero padding image per sample."""
    g = torch.Generator().manual_seed(seed)
    B, N = len(samples), max(1, max(len(lay) for _, lay in samples))
    px = torch.zeros(B, N, cfg.max_tiles, 3, cfg.image_size, cfg.image_size)
    ar = torch.ones(B, N, 2, dtype=torch.long)
    for b, (_, lay) in enumerate(samples):
        for j, (r, c) in enumerate(lay):
            px[b, j, :r * c] = torch.randn(r * c, 3, cfg.image_size, cfg.image_size, generator=g)
            ar[b, j] = torch.tensor([r, c])
    return torch.tensor([t for t, _ in samples]), px, ar


def hf_inputs(samples, px):
    "transformers' inputs for the same batch: aspect-ratio ids (0 = padding image) and mask, its cross_attention_mask."
    from transformers.models.mllama.processing_mllama import (convert_sparse_cross_attention_mask_to_dense,
                                                              get_cross_attention_token_mask)
    ids = {rc: i + 1 for i, rc in enumerate(tile_layouts(VC.max_tiles))}
    B, N = px.shape[:2]
    aid = torch.zeros(B, N, dtype=torch.long)
    amask = torch.zeros(B, N, VC.max_tiles, dtype=torch.long)
    amask[..., 0] = 1                                              # transformers: tile 0 set even for padding images
    for b, (_, lay) in enumerate(samples):
        for j, (r, c) in enumerate(lay): aid[b, j], amask[b, j, :r * c] = ids[(r, c)], 1
    toks = [t for t, _ in samples]
    xmask = convert_sparse_cross_attention_mask_to_dense([get_cross_attention_token_mask(t, I) for t in toks],
                                                         [[r * c for r, c in lay] for _, lay in samples],
                                                         VC.max_tiles, len(toks[0]))
    return dict(input_ids=torch.tensor(toks), pixel_values=px, aspect_ratio_ids=aid, aspect_ratio_mask=amask,
                cross_attention_mask=torch.from_numpy(xmask))


def toy_mllama(seed=0, fast=True):
    "A random Mllama (text dim 64, 4 layers, blocks before layers 1 and 3, the tiny encoder), all gates non-zero."
    cfg = MllamaConfig(LlamaConfig.toy(n_layers=4, tie_embeddings=False, max_seq_len=64), VC, SCHED)
    return randomize(Mllama(cfg, fast=fast), seed).eval()


def cached_steps(model, tokens, n, feed=None, **images):
    """Decoding through the model's own KV cache, greedy or fed the tokens `feed [B, >= n-1]` (a reference's choices):
    the prefill logits and each step's last-row logits `[B, n, V]`."""
    B, T = tokens.shape
    cache = model.new_cache(B, T + n)
    with torch.no_grad():
        pre = model(tokens, cache=cache, **images)
        steps = [pre[:, -1]]
        for s in range(n - 1):
            nxt = steps[-1].argmax(-1, keepdim=True) if feed is None else feed[:, s:s + 1]
            steps.append(model(nxt, start_pos=T + s, cache=cache)[:, -1])
    return pre, torch.stack(steps, 1)



# ---------------------------------------------------------------------------------------------------- Meta reference
@pytest.fixture(scope="module")
def meta_mod():
    """Meta's llama_models multimodal module on CPU (as in test_vision): fairscale with a single-process gloo group and
    model parallel size 1; torchvision (only the PIL image transform uses it) stubbed while the module is imported."""
    pytest.importorskip("fairscale")
    import torch.distributed as dist
    from fairscale.nn.model_parallel import initialize as fs_init
    added = []
    try: importlib.import_module("torchvision.transforms.functional")
    except Exception:
        for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]: del sys.modules[k]
        tv, tvt, tvf = (types.ModuleType(n) for n in ("torchvision", "torchvision.transforms",
                                                      "torchvision.transforms.functional"))
        tv.transforms, tvt.functional = tvt, tvf
        for m in (tv, tvt, tvf): sys.modules[m.__name__] = m; added.append(m.__name__)
    try: mod = importlib.import_module("llama_models.llama3.multimodal.model")
    finally:
        for k in added: sys.modules.pop(k, None)
    if not dist.is_initialized():
        with socket.socket() as s: s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    if not fs_init.model_parallel_is_initialized(): fs_init.initialize_model_parallel(1)
    return mod


def meta_model(mod, seed=1):
    """Meta's `CrossAttentionTransformer` at a tiny shape. Its `CrossAttentionTransformerVision` hard-codes the
    1280-wide 32+8-layer encoder, so that part is assembled from the same classes with the tiny encoder's shape (the
    text side, masks, embedding and forward are Meta's unchanged)."""
    from fairscale.nn.model_parallel.layers import ColumnParallelLinear
    args = mod.ModelArgs(**META_PARAMS)
    vis = mod.CrossAttentionTransformerVision.__new__(mod.CrossAttentionTransformerVision)
    nn.Module.__init__(vis)
    assert VC.mlp_dim == 4 * VC.width                              # Meta's mlp_ratio
    vis.vision_encoder = mod.VisionEncoder(max_num_tiles=VC.max_tiles, image_size=VC.image_size,
                                           patch_size=VC.patch_size, width=VC.width, layers=VC.n_layers,
                                           heads=VC.n_heads, n_global_layers=VC.n_global_layers, global_model=True,
                                           return_intermediate=list(VC.intermediate_layers))
    vis.vision_projection = ColumnParallelLinear(VC.out_dim, args.dim, bias=True, init_method=lambda x: x)
    vis.image_res, vis.patch_size, vis.max_num_chunks, vis.vision_input_dim = (VC.image_size, VC.patch_size,
                                                                              VC.max_tiles, VC.out_dim)
    full = mod.CrossAttentionTransformer.__new__(mod.CrossAttentionTransformer)
    nn.Module.__init__(full)
    full.params, full.model_dim, full.image_res, full.max_num_chunks = args, args.dim, VC.image_size, VC.max_tiles
    full.vision_model, full.text_model = vis, mod.CrossAttentionTransformerText(args)
    assert full.text_model.fusion_schedule == list(SCHED)
    return randomize(full, seed).eval()


@torch.no_grad()
def meta_generate(mod, full, samples, px, ar, n_new, dtype=torch.float32):
    """Meta's `compute_vision_tokens_masks` (from pixel tensors instead of PIL images) and its decoding loop
    (`generation.py`): returns the prefill logits, each step's last-row logits and the greedy tokens."""
    from llama_models.llama3.chat_format import create_vision_mask
    prompts = [t for t, _ in samples]
    B, T = len(prompts), len(prompts[0])
    total = T + n_new
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)                                 # as Meta's generator does for bf16
    try:
        if any(lay for _, lay in samples): vt = full.vision_model(px, ar)
        else: vt = torch.zeros(B, 0, VC.max_tiles, VC.n_tokens, full.model_dim)     # Meta's skip_vision_encoder
        nb, nimg, nchunk, ntok, dim = vt.shape
        caches = torch.stack([blk.compute_xattn_kv_cache(vt.view(nb, -1, dim))
                              for blk in full.text_model.cross_attention_layers])
        masks = [create_vision_mask(p, I) for p in prompts]
        padded = mod._pad_masks(masks, [[r * c for r, c in lay] for _, lay in samples], total, VC.max_tiles)
        xmask, rows = full.text_model._get_xattn_mask(total, "cpu", dtype, vt, padded)
        full.setup_cache(B, "cpu", dtype)
        text_only = all(not lay for _, lay in samples)
        tokens = torch.zeros(B, total, dtype=torch.long)
        tokens[:, :T] = torch.tensor(prompts)
        prev_pos, steps = 0, []
        for cur in range(T, total):
            logits = full(torch.arange(prev_pos, cur), tokens, xmask, rows, caches, text_only)
            if prev_pos == 0: prefill = logits
            steps.append(logits[:, -1])
            tokens[:, cur] = logits[:, -1].argmax(-1)
            prev_pos = cur
    finally: torch.set_default_dtype(prev)
    return prefill, torch.stack(steps, 1), tokens[:, T:]


@pytest.fixture(scope="module")
def meta_ckpt(meta_mod, tmp_path_factory):
    "A random Meta model and its checkpoint directory (`consolidated.00.pth` + `params.json`)."
    full = meta_model(meta_mod)
    d = tmp_path_factory.mktemp("meta_mllama")
    torch.save(full.state_dict(), d / "consolidated.00.pth")
    (d / "params.json").write_text(json.dumps(META_PARAMS))
    return full, d


def test_meta_parity_prefill_and_decoding(meta_mod, meta_ckpt):
    "Two images apart, two in a row, one after text, none (padding images): prefill, 4 cached steps, greedy tokens."
    full, d = meta_ckpt
    ours = Mllama.from_pretrained(d, vision_config=VC)
    assert ours.cfg.schedule == SCHED and ours.cfg.text.rope_scaling["factor"] == 8 and ours.cfg.image_token_id == I
    tok, px, ar = batch(MIXED)
    ref, ref_steps, ref_tokens = meta_generate(meta_mod, full, MIXED, px, ar, 4)
    got, got_steps = cached_steps(ours, tok, 4, ref_tokens, pixel_values=px, aspect_ratios=ar)
    assert got.shape == ref.shape == (4, 12, V)
    assert (got - ref).abs().max() <= 1e-4 and (got_steps - ref_steps).abs().max() <= 1e-4
    assert ours.generate_batch([t for t, _ in MIXED], 4, pixel_values=px, aspect_ratios=ar) == ref_tokens.tolist()
    # the images matter (rows from each sample's first <|image|> on), the rows before them and the text-only
    # sample are the text model's
    with torch.no_grad(): text = ours.text_model(tok.masked_fill(tok == I, 0))
    img_rows = torch.tensor([[t >= first for t in range(12)] for first in (2, 1, 3, 99)])
    assert ((ref - text).abs().amax(-1)[img_rows] > 1e-2).all()
    assert (ref - text).abs().amax(-1)[~img_rows].max() <= 1e-4
    # a batch of text only skips every block (Meta's text_only_inference)
    tok1, px1, ar1 = batch([TEXT_ONLY])
    ref1, _, _ = meta_generate(meta_mod, full, [TEXT_ONLY], px1, ar1, 1)
    with torch.no_grad(): assert (ours(tok1) - ref1).abs().max() <= 1e-4


def test_meta_parity_bf16(meta_mod, meta_ckpt):
    full, d = meta_ckpt
    meta = meta_model(meta_mod).to(torch.bfloat16)                 # the same weights (same seed), in bf16
    ours = Mllama.from_pretrained(d, vision_config=VC, dtype=torch.bfloat16)
    assert ours.dtype == torch.bfloat16
    tok, px, ar = batch(MIXED)
    ref, ref_steps, ref_tokens = meta_generate(meta_mod, meta, MIXED, px, ar, 3, dtype=torch.bfloat16)
    got, got_steps = cached_steps(ours, tok, 3, ref_tokens, pixel_values=px, aspect_ratios=ar)
    ref32, _, _ = meta_generate(meta_mod, full, MIXED, px, ar, 1)
    scale = ref32.abs().max()
    assert (got - ref).abs().max() <= 0.05 * scale and (got_steps - ref_steps).abs().max() <= 0.05 * scale
    assert (got - ref32).abs().max() <= 0.05 * scale                # bf16, not something else


def test_meta_checkpoint_refused_all_or_nothing(meta_ckpt, tmp_path):
    full, d = meta_ckpt
    sd = dict(full.state_dict())
    del sd["text_model.cross_attention_layers.1.attention.k_norm.weight"]
    sd["text_model.cross_attention_layers.0.gate_ffwd"] = torch.zeros(3)
    sd["text_model.extra.weight"] = torch.zeros(2)
    torch.save(sd, tmp_path / "consolidated.00.pth")
    shutil.copy(d / "params.json", tmp_path / "params.json")
    with pytest.raises(CheckpointError) as e: Mllama.from_pretrained(tmp_path, vision_config=VC)
    for name in ("cross_attention_layers.1.attention.k_norm.weight", "cross_attention_layers.0.gate_ffwd",
                 "text_model.extra.weight"): assert name in str(e.value)


# ---------------------------------------------------------------------------------------------------- transformers
def hf_text_config(**kw):
    return dict(hidden_size=64, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2,
                num_hidden_layers=4 + len(SCHED), cross_attention_layers=hf_cross_layers(SCHED), vocab_size=V,
                max_position_embeddings=MAX_LEN, rms_norm_eps=1e-5,
                rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                     high_freq_factor=4.0, original_max_position_embeddings=8192),
                pad_token_id=V - 1, bos_token_id=1, eos_token_id=2, **kw)


def hf_vision_config(**kw):
    return {**{k: v for k, v in VC.to_hf_dict().items() if k != "model_type"}, **kw}


@pytest.fixture(scope="module")
def hf_ckpt(tmp_path_factory):
    """A random transformers Mllama (gates non-zero) saved with `save_pretrained`. Its encoder weights come from a
    random `VisionEncoder`: transformers' own init gives every aspect-ratio id an unrelated tile table, which no Meta
    encoder can produce and the loader refuses (test_vision)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MllamaConfig(vision_config=hf_vision_config(), text_config=hf_text_config(),
                                    image_token_index=I)
    torch.manual_seed(0)
    hf = transformers.MllamaForConditionalGeneration(cfg).eval()
    for part, seed in ((hf.model.language_model, 2), (hf.model.multi_modal_projector, 3), (hf.lm_head, 4)):
        randomize(part, seed)
    hf.model.vision_model.load_state_dict(to_hf_vision(randomize(VisionEncoder(VC), 5).state_dict(), VC))
    gates = [p.item() for n, p in hf.named_parameters() if "cross_attn_" in n and "gate" in n]
    assert len(gates) == 4 and min(abs(g) for g in gates) >= 0.4
    d = tmp_path_factory.mktemp("hf_mllama")
    hf.save_pretrained(d)
    return hf, d


def test_hf_parity_hf_compat(hf_ckpt):
    "Prefill of two batches and transformers' own greedy `generate` (its logits per step) vs ours with hf_compat=True."
    hf, d = hf_ckpt
    ours = Mllama.from_pretrained(d, hf_compat=True)
    assert ours.cfg.schedule == SCHED and ours.cfg.image_token_id == I and ours.hf_compat
    for samples in (FULL, IMAGE_FIRST):
        tok, px, ar = batch(samples, seed=1)
        with torch.no_grad(): ref, got = hf(**hf_inputs(samples, px)).logits.float(), ours(tok, px, ar)
        assert (got - ref).abs().max() <= 1e-4, samples
    tok, px, ar = batch(FULL, seed=2)
    with torch.no_grad():
        out = hf.generate(**hf_inputs(FULL, px), max_new_tokens=5, do_sample=False, return_dict_in_generate=True,
                          output_logits=True, eos_token_id=None, pad_token_id=V - 1)
    new = out.sequences[:, tok.shape[1]:]
    _, steps = cached_steps(ours, tok, 5, pixel_values=px, aspect_ratios=ar)
    # generated rows: transformers repeats the prompt's last mask row (the samples with two images keep seeing the
    # last one; Meta's spans end at the prompt)
    assert (steps - torch.stack(out.logits, 1).float()).abs().max() <= 1e-4
    assert ours.generate_batch([t for t, _ in FULL], 5, pixel_values=px, aspect_ratios=ar) == new.tolist()


def test_hf_default_differs_and_why(hf_ckpt):
    """The default (Meta) numerics differ from transformers 5.23 in two documented ways, shown one at a time:
    (1) the encoder's intermediate features are the *inputs* of the listed layers (transformers: their outputs);
    (2) text rows that see no image are left alone (transformers adds their uniform cross-attention output)."""
    import transformers
    hf, d = hf_ckpt
    default = Mllama.from_pretrained(d)
    assert not default.hf_compat and not default.vision_model.hf_compat
    # (1) every row sees an image, so only the features differ
    tok, px, ar = batch(IMAGE_FIRST, seed=3)
    inputs = hf_inputs(IMAGE_FIRST, px)
    with torch.no_grad():
        ref, got = hf(**inputs).logits.float(), default(tok, px, ar)
        assert (got - ref).abs().max() > 1e-2
        default.vision_model.hf_compat = True                     # transformers' features, Meta's row masking
        assert (default(tok, px, ar) - ref).abs().max() <= 1e-4
        default.vision_model.hf_compat = False
        shifted = transformers.MllamaForConditionalGeneration(transformers.MllamaConfig(
            vision_config=hf_vision_config(intermediate_layers_indices=[i - 1 for i in VC.intermediate_layers]),
            text_config=hf_text_config(), image_token_index=I)).eval()
        shifted.load_state_dict(hf.state_dict())                  # Meta's input of layer i = the output of layer i-1
        assert (shifted(**inputs).logits.float() - got).abs().max() <= 1e-4
    # (2) rows before the first <|image|> (BOS, and more in sample 0): with transformers' features but Meta's rows,
    # they are exactly the text model's; transformers' differ; hf_compat's masking restores them
    tok, px, ar = batch(FULL, seed=4)
    with torch.no_grad():
        ref = hf(**hf_inputs(FULL, px)).logits.float()
        default.vision_model.hf_compat = True
        meta_rows = default(tok, px, ar)
        text = default.text_model(tok.masked_fill(tok == I, 0))
        before = torch.tensor([[t < first for t in range(12)] for first in (2, 1, 3)])
        assert (meta_rows - text).abs().amax(-1)[before].max() <= 1e-5
        assert ((ref - text).abs().amax(-1)[before] > 1e-2).all()
        default.hf_compat = True                                   # what hf_compat=True sets, besides the encoder
        assert (default(tok, px, ar) - ref).abs().max() <= 1e-4


def test_hf_parity_hf_compat_with_padding_images(hf_ckpt):
    """A batch whose samples hold different numbers of images (and one without): transformers pads with id-0 images
    (no per-tile terms) and its rows that see no image attend to them; hf_compat encodes them the same way. The
    default (Meta) masks them from every row, so there they cannot matter."""
    hf, d = hf_ckpt
    ours = Mllama.from_pretrained(d, hf_compat=True)
    tok, px, ar = batch(MIXED, seed=5)
    with torch.no_grad():
        ref, got = hf(**hf_inputs(MIXED, px)).logits.float(), ours(tok, px, ar)
        assert (got - ref).abs().max() <= 1e-4
        ours.hf_compat = False                      # Meta's masking: padding images are invisible to every row
        meta = ours(tok, px, ar)
        pad = ar.clone(); pad[2, 1] = pad[3, 0] = pad[3, 1] = torch.tensor([2, 2])   # the padding images' layouts
        assert torch.equal(ours(tok, px, pad), meta)
        ours.hf_compat = True                       # hf_compat reads the padding images from the tokens, not ar
        assert (ours(tok, px, pad) - ref).abs().max() <= 1e-4


def test_save_pretrained_loads_in_transformers(hf_ckpt, tmp_path):
    "Ours -> `save_pretrained` -> transformers' `from_pretrained`: every tensor and the logits as the original's."
    import transformers
    from safetensors.torch import load_file, save_file
    hf, d = hf_ckpt
    ours = Mllama.from_pretrained(d, hf_compat=True)
    ours.save_pretrained(tmp_path / "ours")
    back = transformers.MllamaForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    mine, theirs = back.state_dict(), hf.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in theirs)
    tok, px, ar = batch(FULL, seed=6)
    with torch.no_grad():
        ref = hf(**hf_inputs(FULL, px)).logits.float()
        assert (back(**hf_inputs(FULL, px)).logits.float() - ref).abs().max() <= 1e-5
        assert (ours(tok, px, ar) - ref).abs().max() <= 1e-4
    # transformers-5 tensor names (model.language_model.*, lm_head.*) load too
    sd = load_file(str(tmp_path / "ours" / "model.safetensors"))
    ren = {k.removeprefix("language_model.") if k.startswith("language_model.lm_head.") else
           "model." + k.replace("language_model.model.", "language_model."): v for k, v in sd.items()}
    assert "model.language_model.layers.1.cross_attn.k_proj.weight" in ren and "lm_head.weight" in ren
    save_file(ren, str(tmp_path / "ours" / "model.safetensors"))
    renamed = Mllama.from_pretrained(tmp_path / "ours", hf_compat=True)
    with torch.no_grad(): assert (renamed(tok, px, ar) - ref).abs().max() <= 1e-4


def test_hf_checkpoint_refused_all_or_nothing(hf_ckpt, tmp_path):
    from safetensors.torch import load_file, save_file
    hf, d = hf_ckpt
    shutil.copytree(d, tmp_path / "bad")
    sd = load_file(str(tmp_path / "bad" / "model.safetensors"))
    del sd["language_model.model.layers.4.cross_attn.k_norm.weight"]
    sd["language_model.model.layers.1.cross_attn_mlp_gate"] = torch.zeros(2)
    sd["language_model.model.layers.9.mlp.up_proj.weight"] = torch.zeros(3)
    save_file(sd, str(tmp_path / "bad" / "model.safetensors"))
    with pytest.raises(CheckpointError) as e: Mllama.from_pretrained(tmp_path / "bad")
    for name in ("layers.4.cross_attn.k_norm.weight", "layers.1.cross_attn_mlp_gate", "layers.9.mlp.up_proj.weight"):
        assert name in str(e.value)


# ---------------------------------------------------------------------------------------------------- gates at 0
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_text_only_exact_while_gates_are_zero(dtype):
    """The shipped tiny Llama inside `from_text_model`: bit for bit its logits and its cached greedy generation,
    (a) without images and (b) with images while every gate is 0, the `<|image|>` row set to a text id's embedding and
    the Llama given that id in its place."""
    llama, tok = load_artifacts(dtype=dtype)
    model = Mllama.from_text_model(llama, SCENE_VISION, schedule=(1, 3)).eval()
    assert model.text_model is llama and model.dtype == dtype and model.cfg.image_token_id == llama.cfg.vocab_size
    assert all(b.cross_attn_attn_gate.item() == 0 == b.cross_attn_mlp_gate.item() for b in model.cross_attention_layers)
    bos, img, X = tok.special_tokens["<|begin_of_text|>"], model.cfg.image_token_id, 1000
    a = tok.encode("To be, or not to be: that is")
    b = tok.encode("Now is the winter of our discontent made glorious summer")
    text = torch.tensor([[bos] + a[:8], [bos] + b[:8]])
    with torch.no_grad():
        assert torch.equal(model(text), llama(text))                                           # (a)
        model.learnable_embedding.weight[0] = llama.embed_tokens.weight[X]
    rows = [[bos, img] + a[:6], [bos] + b[:3] + [img, img] + b[3:5]]
    tokens = torch.tensor(rows)
    subst = tokens.masked_fill(tokens == img, X)
    _, px, ar = batch([(r, lay) for r, lay in zip(rows, [[(1, 2)], [(2, 1), (1, 1)]])], cfg=SCENE_VISION)
    with torch.no_grad():
        got, want = model(tokens, px, ar), llama(subst)
    assert torch.equal(got, want)                                                               # (b)
    assert model.generate(text[0].tolist(), 6) == llama.generate(text[0].tolist(), 6)
    pxs, ars = px[1:], ar[1:]
    assert model.generate(rows[1], 6, pixel_values=pxs, aspect_ratios=ars) == llama.generate(subst[1].tolist(), 6)
    for m_out, l_out in zip(cached_steps(model, tokens, 4, pixel_values=px, aspect_ratios=ar),
                            cached_steps(llama, subst, 4)):
        assert torch.equal(m_out, l_out)
    with torch.no_grad():                                       # the same check fails as soon as a gate opens
        model.cross_attention_layers[0].cross_attn_attn_gate.fill_(0.5)
        assert not torch.equal(model(tokens, px, ar), want)
        assert torch.equal(model(text), llama(text))            # ... but not without images


# ---------------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors():
    model = toy_mllama()
    tok, px, ar = batch([TWO_APART, TWO_IN_A_ROW])                 # two images each
    with torch.no_grad(): model(tok, px, ar)                      # fine as given
    with pytest.raises(ValueError, match="more <\\|image\\|> tokens than images"): model(tok)
    with pytest.raises(ValueError, match="more <\\|image\\|> tokens than images"): model.generate(tok[0].tolist(), 2)
    with pytest.raises(ValueError, match="2 <\\|image\\|> tokens but pixel_values holds 1 images"):
        model(tok, px[:, :1], ar[:, :1])
    text = torch.tensor([TEXT_ONLY[0], TEXT_ONLY[0]])
    with pytest.raises(ValueError, match="has no <\\|image\\|> token"): model(text, px, ar)
    one = tok.clone(); one[0, 6] = 9                               # sample 0 keeps one token for its two images
    with pytest.raises(ValueError, match="sample 0: image 1 has no <\\|image\\|> token"): model(one, px, ar)
    big = torch.zeros(2, 2, VC.max_tiles + 1, 3, VC.image_size, VC.image_size)
    with pytest.raises(ValueError, match="at most 4 \\(max_tiles\\)"): model(tok, big, ar)
    with pytest.raises(ValueError, match="batch sizes differ"): model(tok, px[:1], ar[:1])
    with pytest.raises(ValueError, match="batch sizes differ"): model(tok[:1], px, ar)
    with pytest.raises(ValueError, match="aspect_ratios"): model(tok, px, ar[:1])
    with pytest.raises(ValueError, match="aspect_ratios"): model(tok, px)
    ctx = model.vision_context(tok.tolist(), px, ar)
    with pytest.raises(ValueError, match="batch sizes differ"): model(torch.cat([tok, tok, tok]), vision=ctx)
    with pytest.raises(ValueError, match="token ids must be in \\[0, 264\\)"): model(tok + 20)


def test_more_image_tokens_than_the_samples_images():
    "Sample 1 has two <|image|> tokens but one image (its second slot is the batch's all-zero padding)."
    model = toy_mllama()
    samples = [TWO_APART, (TWO_APART[0], [(2, 2)])]
    tok, px, ar = batch(samples)
    assert (px[1, 1] == 0).all()
    with pytest.raises(ValueError, match="all-zero padding: more <\\|image\\|> tokens than images"):
        model(tok, px, ar)


def test_wrong_kind_of_checkpoint(tmp_path):
    tc = LlamaConfig.toy(n_layers=4, tie_embeddings=False)
    llama = Llama(tc)
    llama.save_pretrained(tmp_path / "text_hf")
    with pytest.raises(CheckpointError, match="not a Llama 3.2 Vision \\(Mllama\\) config.*Llama.from_pretrained"):
        Mllama.from_pretrained(tmp_path / "text_hf")
    (tmp_path / "text_meta").mkdir()
    torch.save({meta_name(k): v for k, v in llama.state_dict().items()}, tmp_path / "text_meta" / "consolidated.00.pth")
    (tmp_path / "text_meta" / "params.json").write_text(json.dumps({**{k: META_PARAMS[k] for k in (
        "dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of")}, "max_seq_len": tc.max_seq_len}))
    assert Llama.from_pretrained(tmp_path / "text_meta").cfg == tc
    with pytest.raises(CheckpointError, match="text-only model.*Llama.from_pretrained"):
        Mllama.from_pretrained(tmp_path / "text_meta")
    toy_mllama().save_pretrained(tmp_path / "mm_hf")
    with pytest.raises(ValueError, match="mllama|Mllama"): Llama.from_pretrained(tmp_path / "mm_hf")
    with pytest.raises(ValueError, match="mllama|Mllama"):
        LlamaConfig.from_hf_dict(json.loads((tmp_path / "mm_hf" / "config.json").read_text()))
    with pytest.raises(FileNotFoundError): Mllama.from_pretrained(tmp_path / "nowhere")


def test_meta_vision_checkpoint_to_llama(tmp_path):
    "A Meta vision checkpoint loads as an Mllama; `Llama.from_pretrained` refuses it, naming what it is."
    from llama32_nb.adapter import mllama_meta_name
    model = toy_mllama()
    torch.save({mllama_meta_name(k): v for k, v in model.state_dict().items()}, tmp_path / "consolidated.00.pth")
    (tmp_path / "params.json").write_text(json.dumps({**META_PARAMS, "max_seq_len": 64, "use_scaled_rope": False}))
    assert Mllama.from_pretrained(tmp_path, vision_config=VC).cfg == model.cfg
    with pytest.raises(CheckpointError) as e: Llama.from_pretrained(tmp_path)
    assert re.search("mllama|Mllama", str(e.value).replace(str(tmp_path), "<dir>"))    # not the dir's name


# ---------------------------------------------------------------------------------------------------- design rules
class Scaled(nn.Module):
    "A wrapper that scales its module's output: what a user's swap (LoRA, quantised Linear, ...) looks like."
    def __init__(self, inner, s): super().__init__(); self.inner, self.s = inner, s
    def forward(self, x): return self.inner(x) * self.s


def count_calls(modules):
    calls = {name: 0 for name in modules}
    def hook(name): return lambda *a: calls.__setitem__(name, calls[name] + 1)
    handles = [m.register_forward_hook(hook(name)) for name, m in modules.items()]
    return calls, handles


@pytest.mark.parametrize("fast", [True, False])
def test_hooks_fire_in_forward_generation_and_training(fast):
    model = toy_mllama(fast=fast)
    xa = model.cross_attention_layers[0].cross_attn
    mods = {p: getattr(xa, p + "_proj") for p in "qkvo"} | {"text_mlp": model.text_model.layers[2].mlp.down_proj}
    calls, handles = count_calls(mods)
    tok, px, ar = batch([ONE_AFTER_TEXT])
    with torch.no_grad(): model(tok, px, ar)
    assert calls == dict(q=1, k=1, v=1, o=1, text_mlp=1)
    for k in calls: calls[k] = 0
    out = model.generate(tok[0].tolist(), 5, pixel_values=px, aspect_ratios=ar)
    assert len(out) == 5 and calls == dict(q=5, k=1, v=1, o=5, text_mlp=5)       # prefill + 4 steps; K/V once
    for k in calls: calls[k] = 0
    model.freeze_text_model().train()
    targets = torch.cat([tok[:, 1:], torch.full((1, 1), -100)], 1)
    targets[targets >= V] = -100                                    # <|image|> is never a target
    model.loss(tok, targets, px, ar).backward()
    assert calls == dict(q=1, k=1, v=1, o=1, text_mlp=1)
    assert xa.o_proj.weight.grad.abs().sum() > 0 and xa.k_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.text_model.parameters())
    for h in handles: h.remove()


def test_swapping_an_adapter_linear_changes_the_logits():
    model = toy_mllama()
    tok, px, ar = batch([ONE_AFTER_TEXT, TWO_APART])
    with torch.no_grad(): before = model(tok, px, ar)
    xa = model.cross_attention_layers[0].cross_attn
    xa.o_proj = Scaled(xa.o_proj, 2.0)
    with torch.no_grad(): after = model(tok, px, ar)
    d = (after - before).abs().amax(-1)
    assert (d[0, 3:] > 1e-3).all() and (d[1, 2:] > 1e-3).all()       # rows that see an image
    assert (d[0, :3] == 0).all() and (d[1, :2] == 0).all()            # rows before the first <|image|>: untouched
    xa.o_proj = xa.o_proj.inner
    with torch.no_grad(): assert torch.equal(model(tok, px, ar), before)
    xa.v_proj = Scaled(xa.v_proj, 3.0)           # the K/V path goes through the modules too (a scaled k_proj would
                                                 # be undone by k_norm)
    with torch.no_grad(): assert (model(tok, px, ar) - before).abs().max() > 1e-3


def test_cross_attention_kv_once_per_image_set():
    model = toy_mllama()
    mods = {f"{p}{j}": getattr(b.cross_attn, p + "_proj") for j, b in enumerate(model.cross_attention_layers)
            for p in "kvq"}
    calls, handles = count_calls(mods)
    tok, px, ar = batch([TWO_APART, ONE_AFTER_TEXT])
    n = 7
    out = model.generate(tok[0].tolist(), n, pixel_values=px[:1], aspect_ratios=ar[:1])
    assert len(out) == n
    assert sum(calls[f"k{j}"] for j in range(len(SCHED))) == len(SCHED)      # one call per block, not per token
    assert all(calls[f"{p}{j}"] == 1 for p in "kv" for j in range(len(SCHED)))
    assert all(calls[f"q{j}"] == n for j in range(len(SCHED)))
    for k in calls: calls[k] = 0
    outs = model.generate_batch(tok.tolist(), n, pixel_values=px, aspect_ratios=ar)
    assert outs[0] == out and all(calls[f"{p}{j}"] == 1 for p in "kv" for j in range(len(SCHED)))
    for k in calls: calls[k] = 0
    assert model.generate(tok[0].tolist(), n, pixel_values=px[:1], aspect_ratios=ar[:1], use_cache=False) == out
    assert all(calls[f"{p}{j}"] == 1 for p in "kv" for j in range(len(SCHED)))
    for h in handles: h.remove()
