"""llama32_nb.vision against the references: preprocessing vs transformers' MllamaImageProcessorPil, the encoder vs
Meta's llama_models VisionEncoder and transformers' MllamaVisionModel, checkpoint loading, and bad images."""
import importlib
import io
import json
import socket
import struct
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from llama32_nb.checkpoint import CheckpointError
from llama32_nb.kernels import SDPA
from llama32_nb.vision import (CLIP_MEAN, CLIP_STD, META_PREFIX, ImageError, ImageTransform, SplitMaskSDPA,
                               VisionConfig, VisionEncoder, collate_images, load_image, meta_vision_name, plan_tiles,
                               synthetic_image, tile_layouts, to_hf_vision, use_split_attention)
import llama32_nb.vision as vision
from llama32_nb.vision import VISION_KERNEL_CHOICES, matmul_attention, unmasked_attention

transformers = pytest.importorskip("transformers")
torch.set_num_threads(2)

LAYOUTS = tile_layouts(4)                            # (1,1) (1,2) (1,3) (1,4) (2,1) (2,2) (3,1) (4,1)
# two tiny shapes: 28-px tiles of 7-px patches (17 tokens + 7 pads), and 42-px tiles of 14-px patches (10 + 6),
# the second with layer 0 among the intermediate layers (its Meta input is layernorm_pre's output)
TINY = {"w32": VisionConfig.tiny(),
        "w48": VisionConfig(width=48, n_layers=4, n_global_layers=1, n_heads=3, mlp_dim=192, image_size=42,
                            patch_size=14, intermediate_layers=(0, 2))}


# ---------------------------------------------------------------------------------------------------- preprocessing
SIZES = [(1, 1), (1, 20000), (7, 3), (300, 200), (200, 300), (560, 560), (561, 560), (560, 561), (559, 1121),
         (640, 480), (1000, 500), (500, 1000), (1000, 1000), (1920, 1080), (1080, 1920), (4000, 3000), (2000, 300),
         (300, 2000), (2241, 100), (100, 2241), (1500, 20), (20, 1500), (1, 900), (900, 1), (1119, 1121), (1680, 561),
         (2240, 560), (560, 2240), (123, 4567), (3333, 1111), (800, 1200), (33, 47)]


def hf_processor():
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil
    return MllamaImageProcessorPil(size={"height": 560, "width": 560}, image_mean=list(CLIP_MEAN),
                                   image_std=list(CLIP_STD), max_image_tiles=4)


def test_preprocessing_matches_transformers_pil_backend():
    assert len(SIZES) >= 30
    proc, tf = hf_processor(), ImageTransform(560, 4)
    for i, (w, h) in enumerate(SIZES):
        im = synthetic_image(w, h, seed=i)
        hf = proc([[im]], return_tensors="pt")
        tiles, (r, c) = tf(im)
        ours = collate_images([[(tiles, (r, c))]])
        n = r * c
        assert hf["num_tiles"] == [[n]] and ours["aspect_ratio_ids"].tolist() == hf["aspect_ratio_ids"].tolist()
        assert ours["aspect_ratio_mask"].tolist() == hf["aspect_ratio_mask"].tolist()
        d = (ours["pixel_values"] - hf["pixel_values"]).abs().max().item()
        # one 8-bit level is 1/255/std >= 0.0142 after normalisation: 1e-5 means every pixel is the same
        assert d <= 1e-5, ((w, h), d)


def test_fact_sheet_examples():
    ex = {(300, 200): ((1, 1), (373, 560)), (1000, 1000): ((2, 2), (1000, 1000)), (1000, 500): ((1, 2), (500, 1000)),
          (640, 480): ((1, 2), (480, 640)), (1920, 1080): ((2, 2), (630, 1120)), (4000, 3000): ((2, 2), (840, 1120)),
          (2000, 300): ((1, 4), (300, 2000)), (560, 560): ((1, 1), (560, 560)), (561, 560): ((1, 2), (560, 561))}
    for (w, h), (layout, (rh, rw)) in ex.items():
        p = plan_tiles(w, h)
        assert p.layout == layout and p.resized == (rw, rh)


def test_batch_conventions():
    tf = ImageTransform(560, 4)
    b = tf.batch([[synthetic_image(300, 200), synthetic_image(2000, 300)], [synthetic_image(1000, 1000)]])
    assert b["pixel_values"].shape == (2, 2, 4, 3, 560, 560)
    assert b["aspect_ratios"].tolist() == [[[1, 1], [1, 4]], [[2, 2], [1, 1]]]     # Meta: (1, 1) for padding
    assert b["aspect_ratio_ids"].tolist() == [[1, 4], [6, 0]]                        # HF: 0 for padding
    assert b["aspect_ratio_mask"].tolist() == [[[1, 0, 0, 0], [1, 1, 1, 1]], [[1, 1, 1, 1], [1, 0, 0, 0]]]
    assert b["num_tiles"] == [[1, 4], [4]]
    assert torch.all(b["pixel_values"][0, 0, 1:] == 0) and torch.all(b["pixel_values"][1, 1] == 0)
    proc = hf_processor()
    hf = proc([[synthetic_image(300, 200), synthetic_image(2000, 300)], [synthetic_image(1000, 1000)]],
              return_tensors="pt")
    for k in ("aspect_ratio_ids", "aspect_ratio_mask"): assert b[k].tolist() == hf[k].tolist()
    assert (b["pixel_values"] - hf["pixel_values"]).abs().max() <= 1e-5


# ---------------------------------------------------------------------------------------------------- bad images
def encode(im, fmt, **kw):
    buf = io.BytesIO(); im.save(buf, fmt, **kw); return buf.getvalue()


def bmp_header(w, h):
    return b"BM" + struct.pack("<IHHI", 54, 0, 0, 54) + struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, 0, 0, 0, 0, 0)


def png_header(w, h):
    import zlib
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("name,data,match", [
    ("empty", b"", "0 bytes"),
    ("text", b"this is not an image at all", "not a recognised image format"),
    ("bmp bomb", bmp_header(30000, 30000), "decompression-bomb"),
    ("png bomb", png_header(30000, 30000), "decompression-bomb"),
    ("png bomb under PIL's own limit", png_header(9000, 9000), "decompression-bomb"),
])
def test_refused_bytes(name, data, match):
    with pytest.raises(ImageError, match=match): load_image(data)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated(fmt):
    data = encode(synthetic_image(300, 200), fmt)
    with pytest.raises(ImageError, match="truncated or corrupt"): load_image(data[: len(data) // 2])


def test_bomb_guard_on_an_opened_image():
    im = Image.open(io.BytesIO(bmp_header(9000, 8000)))            # PIL only read the header
    with pytest.raises(ImageError, match="decompression-bomb"): ImageTransform()(im)


def test_modes_follow_meta():
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8), "RGB")
    alpha = Image.fromarray(rng.integers(0, 256, (40, 50), dtype=np.uint8), "L")
    rgba = rgb.copy(); rgba.putalpha(alpha)
    la = rgb.convert("L"); la.putalpha(alpha)
    p = rgb.convert("P"); p.info["transparency"] = 0
    cases = {"RGBA": rgba, "LA": la, "P+transparency": p, "CMYK": rgb.convert("CMYK"), "L": rgb.convert("L"),
             "1": rgb.convert("1")}
    tf = ImageTransform()
    for name, im in cases.items():
        for src in (im, encode(im, "PNG" if name != "CMYK" else "JPEG")):
            got = load_image(src)
            assert got.mode == "RGB" and got.size == (50, 40), name
        ref = im.convert("RGB")                                 # Meta: convert("RGB") drops alpha, expands palette
        assert np.array_equal(np.asarray(load_image(im)), np.asarray(ref)), name
        tiles, layout = tf(im)
        assert tiles.shape == (1, 3, 560, 560) and torch.isfinite(tiles).all() and layout == (1, 1)


def test_sixteen_bit():
    a = (np.linspace(0, 65535, 40 * 50).reshape(40, 50)).astype(np.uint16)
    im16 = Image.fromarray(a)                                   # mode I;16
    got = np.asarray(load_image(im16))
    assert got.shape == (40, 50, 3) and np.array_equal(got[..., 0], np.round(a / 257).astype(np.uint8))
    png = encode(im16, "PNG")                                   # a 16-bit grey PNG (PIL opens it as I;16 or I)
    assert np.array_equal(np.asarray(load_image(png))[..., 1], np.round(a / 257).astype(np.uint8))
    with pytest.raises(ImageError, match="floating-point"): load_image(Image.fromarray(a.astype(np.float32)))


def test_animated_gif_first_frame_and_tiny_images():
    frames = [Image.new("RGB", (30, 20), col) for col in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    buf = io.BytesIO(); frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50)
    got = np.asarray(load_image(buf.getvalue()))
    assert got.shape == (20, 30, 3) and got[..., 0].min() > 200 and got[..., 1].max() < 50
    tf = ImageTransform()
    for w, h in [(1, 1), (1, 20000), (20000, 1)]:
        tiles, (r, c) = tf(synthetic_image(w, h))
        assert tiles.shape == (r * c, 3, 560, 560) and torch.isfinite(tiles).all()
    assert tf(synthetic_image(1, 20000))[1] == (4, 1)


def test_transform_rejects_non_images():
    with pytest.raises(TypeError): ImageTransform()(np.zeros((10, 10, 3)))
    with pytest.raises(ValueError): collate_images([])


# ---------------------------------------------------------------------------------------------------- the encoder
def randomize(model, seed):
    "Random weights with non-trivial LayerNorms and gates (zero gates would hide the tile and global paths)."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name: p.copy_(torch.rand(p.shape, generator=g) * 1.4 - 0.5)
            elif p.dim() == 1 and ("ln" in name or "norm" in name) and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.1) / max(1, p.shape[-1]) ** .25)
    return model


def inputs(cfg, seed=0, B=2, N=4):
    "Every layout once (B*N = 8 images), pixels random on real tiles, zeros on padding slots."
    g = torch.Generator().manual_seed(seed)
    ar = torch.tensor(LAYOUTS[: B * N]).view(B, N, 2)
    px = torch.zeros(B, N, cfg.max_tiles, 3, cfg.image_size, cfg.image_size)
    for i, (r, c) in enumerate(LAYOUTS[: B * N]):
        px.view(B * N, *px.shape[2:])[i, : r * c] = torch.randn(r * c, 3, cfg.image_size, cfg.image_size, generator=g)
    return px, ar


@pytest.fixture(scope="module")
def meta_model_module():
    """Meta's llama_models multimodal module on CPU: fairscale with a single-process gloo group and model parallel
    size 1; torchvision (only its image transform uses it, and the PyPI build does not load beside this torch) is
    stubbed while the module is imported, then removed from sys.modules again."""
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


def meta_encoder(mod, cfg):
    assert cfg.mlp_dim == 4 * cfg.width                         # Meta's mlp_ratio is 4
    m = mod.VisionEncoder(max_num_tiles=cfg.max_tiles, image_size=cfg.image_size, patch_size=cfg.patch_size,
                          width=cfg.width, layers=cfg.n_layers, heads=cfg.n_heads, n_global_layers=cfg.n_global_layers,
                          global_model=True, return_intermediate=list(cfg.intermediate_layers))
    return m.eval()


def ours_from_meta(meta, cfg, hf_compat=False, fast=True):
    ours = VisionEncoder(cfg, hf_compat=hf_compat, fast=fast).eval()
    msd = meta.state_dict()
    ours.load_state_dict({k: msd[meta_vision_name(k)].reshape(v.shape) for k, v in ours.state_dict().items()})
    return ours


@pytest.mark.parametrize("name", list(TINY))
def test_meta_parity_every_layout(meta_model_module, name):
    cfg = TINY[name]
    meta = randomize(meta_encoder(meta_model_module, cfg), seed=1)
    assert sum(p.numel() for p in meta.parameters()) == VisionEncoder(cfg).num_params()
    ours = ours_from_meta(meta, cfg)
    px, ar = inputs(cfg)
    with torch.no_grad(): ref, got = meta(px, ar), ours(px, ar)
    assert got.shape == ref.shape == (2, 4, cfg.max_tiles, cfg.n_tokens, cfg.out_dim)
    d = (got - ref).abs().max().item()
    assert d <= 1e-4, d
    assert ref.abs().mean() > 0.1                                   # not a trivially small output
    with torch.no_grad(): plain = ours_from_meta(meta, cfg, fast=False)(px, ar)   # the plain masked attention
    assert (plain - ref).abs().max() <= 1e-4
    for i, (r, c) in enumerate(LAYOUTS):                            # each layout alone, as one image
        with torch.no_grad():
            one, ref1 = ours(px.view(8, 1, *px.shape[2:])[i:i + 1], ar.view(8, 1, 2)[i:i + 1]), \
                meta(px.view(8, 1, *px.shape[2:])[i:i + 1], ar.view(8, 1, 2)[i:i + 1])
        assert (one - ref1).abs().max() <= 1e-4, (r, c)


def test_meta_parity_bf16(meta_model_module):
    cfg = TINY["w32"]
    meta = randomize(meta_encoder(meta_model_module, cfg), seed=2)
    ours = ours_from_meta(meta, cfg).to(torch.bfloat16)
    meta = meta.to(torch.bfloat16)
    px, ar = inputs(cfg, seed=3)
    with torch.no_grad(): ref, got = meta(px.to(torch.bfloat16), ar).float(), ours(px, ar).float()
    assert (got - ref).abs().max() <= 0.05 * ref.abs().max()


def test_meta_checkpoint_dir(meta_model_module, tmp_path):
    cfg = TINY["w32"]
    meta = randomize(meta_encoder(meta_model_module, cfg), seed=4)
    sd = {META_PREFIX + k: v for k, v in meta.state_dict().items()}
    sd["text_model.tok_embeddings.weight"] = torch.zeros(3, 4)     # not the vision tower: ignored
    torch.save(sd, tmp_path / "consolidated.00.pth")
    (tmp_path / "params.json").write_text(json.dumps({"dim": 4, "vision_chunk_size": 28, "vision_max_num_chunks": 4}))
    ours = VisionEncoder.from_pretrained(tmp_path, config=cfg)
    px, ar = inputs(cfg, seed=5)
    with torch.no_grad(): assert (ours(px, ar) - meta(px, ar)).abs().max() <= 1e-4
    del sd[META_PREFIX + "transformer.resblocks.2.attn.wk.weight"]
    sd[META_PREFIX + "ln_post.weight"] = torch.zeros(5)
    torch.save(sd, tmp_path / "consolidated.00.pth")
    with pytest.raises(CheckpointError) as e: VisionEncoder.from_pretrained(tmp_path, config=cfg)
    assert "transformer.resblocks.2.attn.wk.weight" in str(e.value) and "ln_post.weight" in str(e.value)
    with pytest.raises(CheckpointError, match="misshaped"): VisionEncoder.from_pretrained(tmp_path, config=cfg)


# ---------------------------------------------------------------------------------------------------- transformers
def hf_vision_config(cfg, **kw):
    d = {k: v for k, v in cfg.to_hf_dict().items() if k != "model_type"}
    return transformers.MllamaVisionConfig(**{**d, **kw})


def hf_inputs(cfg, px, ar):
    ids = {rc: i + 1 for i, rc in enumerate(LAYOUTS)}
    flat = ar.view(-1, 2).tolist()
    aid = torch.tensor([ids[tuple(x)] for x in flat]).view(ar.shape[:2])
    amask = (torch.arange(cfg.max_tiles) < ar.prod(-1, keepdim=True)).long()
    return dict(pixel_values=px, aspect_ratio_ids=aid, aspect_ratio_mask=amask)


@pytest.mark.parametrize("name", list(TINY))
def test_transformers_parity_hf_compat_and_the_documented_difference(name, tmp_path):
    cfg = TINY[name]
    torch.manual_seed(0)
    ours = randomize(VisionEncoder(cfg), seed=6)
    ours.save_pretrained(tmp_path / "ours")                          # a bare MllamaVisionModel directory
    hf = transformers.MllamaVisionModel.from_pretrained(tmp_path / "ours").eval()
    compat = VisionEncoder.from_pretrained(tmp_path / "ours", hf_compat=True)
    px, ar = inputs(cfg, seed=7)
    with torch.no_grad():
        ref = hf(**hf_inputs(cfg, px, ar)).last_hidden_state
        got, default = compat(px, ar), ours(px, ar)
    assert (got - ref).abs().max() <= 1e-4
    D = cfg.width
    assert (default[..., :D] - ref[..., :D]).abs().max() <= 1e-4      # the global output agrees ...
    assert (default[..., D:] - ref[..., D:]).abs().max() > 1e-2       # ... the intermediate features do not:
    if 0 not in cfg.intermediate_layers:                              # Meta's input of layer i = HF's output of i-1
        hf_prev = transformers.MllamaVisionModel(hf_vision_config(
            cfg, intermediate_layers_indices=[i - 1 for i in cfg.intermediate_layers])).eval()
        hf_prev.load_state_dict(hf.state_dict())
        with torch.no_grad(): prev = hf_prev(**hf_inputs(cfg, px, ar)).last_hidden_state
        assert (default - prev).abs().max() <= 1e-4
    else:                                                             # layer 0's input: layernorm_pre's output
        k = cfg.intermediate_layers.index(0)
        n = len(cfg.intermediate_layers)
        with torch.no_grad():
            emb = ours.embed(px, ar.view(-1, 2)).view(*default.shape[:-1], D)
        assert (default[..., D + k::n][..., :D] - emb).abs().max() <= 1e-5


def test_transformers_padding_image_is_layout_0_0(tmp_path):
    "A padding image (all-zero pixels): transformers' aspect-ratio id 0 (no per-tile terms, tile 0 unmasked) = `(0, 0)`."
    cfg = TINY["w32"]
    ours = randomize(VisionEncoder(cfg), seed=9)
    ours.save_pretrained(tmp_path / "ours")
    hf = transformers.MllamaVisionModel.from_pretrained(tmp_path / "ours").eval()
    compat = VisionEncoder.from_pretrained(tmp_path / "ours", hf_compat=True)
    px, ar = inputs(cfg, seed=10)
    px[:, -1] = 0                                                     # the last image of each sample: padding
    h = hf_inputs(cfg, px, ar)
    h["aspect_ratio_ids"][:, -1] = 0
    h["aspect_ratio_mask"][:, -1] = torch.tensor([1] + [0] * (cfg.max_tiles - 1))
    pad = ar.clone(); pad[:, -1] = 0
    with torch.no_grad():
        ref = hf(**h).last_hidden_state
        assert (compat(px, pad) - ref).abs().max() <= 1e-4
        as_one = ar.clone(); as_one[:, -1] = 1                        # Meta's (1, 1) gets the tile terms: differs
        assert (compat(px, as_one)[:, -1] - ref[:, -1]).abs().max() > 1e-3
        assert torch.equal(compat(px, as_one)[:, :-1], compat(px, pad)[:, :-1])   # images are encoded independently


def test_full_mllama_dir_written_by_transformers(tmp_path):
    cfg = TINY["w32"]
    ours = randomize(VisionEncoder(cfg), seed=8)
    tc = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
              cross_attention_layers=[1], vocab_size=64, pad_token_id=63, bos_token_id=1, eos_token_id=2)
    full = transformers.MllamaForConditionalGeneration(transformers.MllamaConfig(
        vision_config=hf_vision_config(cfg).to_dict(), text_config=tc)).eval()
    raw = full.model.vision_model
    # transformers' random init gives every aspect-ratio id its own tile table: not a Meta encoder -> refused
    full.save_pretrained(tmp_path / "random")
    with pytest.raises(CheckpointError, match="tile_embedding.weight.*disagrees|padding slot"):
        VisionEncoder.from_pretrained(tmp_path / "random")
    raw.load_state_dict(to_hf_vision(ours.state_dict(), cfg))
    full.save_pretrained(tmp_path / "full")
    keys = json.loads((tmp_path / "full" / "config.json").read_text())
    assert "vision_config" in keys
    loaded = VisionEncoder.from_pretrained(tmp_path / "full", hf_compat=True)
    px, ar = inputs(cfg, seed=9)
    with torch.no_grad():
        ref = raw(**hf_inputs(cfg, px, ar)).last_hidden_state
        assert (loaded(px, ar) - ref).abs().max() <= 1e-4
    mine, back = to_hf_vision(ours.state_dict(), cfg), to_hf_vision(loaded.state_dict(), cfg)
    for k, v in mine.items(): assert torch.equal(back[k], v), k          # every used value, exactly


def test_hf_loader_names_bad_tensors(tmp_path):
    from safetensors.torch import load_file, save_file
    cfg = TINY["w32"]
    ours = randomize(VisionEncoder(cfg), seed=10)
    d = ours.save_pretrained(tmp_path / "x")
    sd = load_file(d / "model.safetensors")
    del sd["transformer.layers.3.mlp.fc1.bias"]
    sd["global_transformer.layers.0.gate_attn"] = torch.zeros(2)
    sd["transformer.layers.9.mlp.fc1.bias"] = torch.zeros(3)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError) as e: VisionEncoder.from_pretrained(d)
    msg = str(e.value)
    for k in ("transformer.layers.3.mlp.fc1.bias", "global_transformer.layers.0.gate_attn",
              "transformer.layers.9.mlp.fc1.bias"): assert k in msg
    with pytest.raises(FileNotFoundError): VisionEncoder.from_pretrained(tmp_path / "nope")


def test_input_errors():
    cfg = TINY["w32"]
    enc = VisionEncoder(cfg).eval()
    px, ar = inputs(cfg, B=1, N=2)
    with pytest.raises(ValueError, match="pixel_values"): enc(px[0], ar)
    with pytest.raises(ValueError, match="aspect_ratios"): enc(px, ar.float())
    with pytest.raises(ValueError, match="rows\\*cols"): enc(px, torch.tensor([[[2, 3], [1, 1]]]))
    with pytest.raises(ValueError, match="rows and cols"): enc(px, torch.tensor([[[0, 1], [1, 1]]]))


def test_real_encoder_shape_on_meta_device():
    cfg = VisionConfig.llama32_vision()
    ar = torch.tensor([[[2, 2]]])
    with torch.device("meta"):
        enc = VisionEncoder(cfg)
        out = enc(torch.zeros(1, 1, 4, 3, 560, 560), ar)
    assert enc.num_params() == 822_530_579 and out.shape == (1, 1, 4, 1601, 7680)


def test_speed_layer_is_a_module_swap_with_hooks():
    cfg = TINY["w32"]
    enc = randomize(VisionEncoder(cfg, fast=False), seed=11)
    assert not any(isinstance(m, SplitMaskSDPA) for m in enc.modules())
    calls = []
    enc.layers[0].self_attn.attn.register_forward_hook(lambda *a: calls.append(1))
    px, ar = inputs(cfg, seed=12)
    with torch.no_grad():
        plain = enc(px, ar)
        use_split_attention(enc)
        assert isinstance(enc.layers[0].self_attn.attn, SplitMaskSDPA)
        fast = enc(px, ar)
    assert calls == [1, 1] and (fast - plain).abs().max() <= 1e-5
    use_split_attention(enc, enable=False)
    assert all(type(m) is not SplitMaskSDPA for m in enc.modules()) and isinstance(enc.layers[0].self_attn.attn, SDPA)
    x = torch.randn(1, 2, 8, 4, requires_grad=True)                   # differentiable like the masked call
    m = torch.zeros(1, 1, 8, 8); m[..., 6:, 6:] = torch.finfo(torch.float32).min
    SplitMaskSDPA()(x, x, x, m).sum().backward()
    g = x.grad.clone(); x.grad = None
    SDPA()(x, x, x, m).sum().backward()
    assert torch.allclose(g, x.grad, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_attention_equals_sdpa(dtype):
    "Two batches, query lengths not a multiple of the block, queries and keys of different lengths."
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(*s, generator=g).to(dtype) for s in ((2, 3, 1100, 16), (2, 3, 700, 16), (2, 3, 700, 16)))
    try: got = matmul_attention(q, k, v, block=512)
    except RuntimeError: pytest.skip("this torch build has no oneDNN matmul")
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    err = (got.float() - ref).abs().max().item()
    assert err <= (1e-5 if dtype == torch.float32 else 2e-2), err
    assert got.dtype == dtype and got.shape == q.shape


def test_unmasked_attention_measures_once_and_keeps_gradients(monkeypatch):
    VISION_KERNEL_CHOICES.clear()
    q, k, v = torch.randn(3, 1, 2, 300, 8).unbind(0)
    with torch.no_grad():
        torch.testing.assert_close(unmasked_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
        unmasked_attention(q, k, v)
    assert len(VISION_KERNEL_CHOICES) == 1 and next(iter(VISION_KERNEL_CHOICES.values()))["choice"] in ("F.sdpa",
                                                                                                      "matmul")
    q.requires_grad_()                                    # training: the fused kernel, nothing measured
    unmasked_attention(q, k, v).sum().backward()
    assert q.grad is not None and len(VISION_KERNEL_CHOICES) == 1
    short = torch.randn(1, 2, 100, 8)                     # short calls are not measured either
    with torch.no_grad(): unmasked_attention(short, short, short)
    assert len(VISION_KERNEL_CHOICES) == 1


def test_encoder_on_the_matmul_attention_equals_the_plain_one(monkeypatch):
    "112-px tiles: 4 x 72 = 288 tokens, long enough for the measured kernel; forced to the matmul one here."
    cfg = VisionConfig(width=32, n_layers=2, n_global_layers=1, n_heads=2, mlp_dim=64, image_size=112, patch_size=14,
                       intermediate_layers=(0,))
    try: matmul_attention(*torch.randn(3, 1, 1, 8, 4).unbind(0))
    except RuntimeError: pytest.skip("this torch build has no oneDNN matmul")
    monkeypatch.setattr(vision, "_choose_unmasked", lambda q, k, v: dict(choice="matmul", times={}))
    VISION_KERNEL_CHOICES.clear()
    calls = []
    monkeypatch.setattr(vision, "matmul_attention", lambda *a, f=matmul_attention: calls.append(1) or f(*a))
    plain = randomize(VisionEncoder(cfg, fast=False), seed=21)
    fast = VisionEncoder(cfg).eval(); fast.load_state_dict(plain.state_dict())
    px, ar = inputs(cfg, seed=22, B=1, N=4)
    with torch.no_grad(): a, b = plain.eval()(px, ar), fast(px, ar)
    assert calls and (a - b).abs().max() <= 1e-5
    VISION_KERNEL_CHOICES.clear()
