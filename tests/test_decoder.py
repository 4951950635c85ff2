"Parity of llama32_nb.decoder with transformers' LlamaForCausalLM (and Meta's format) on tiny random checkpoints."
import json

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
from llama32_nb.decoder import Llama, LlamaConfig, ffn_size, hf_name, meta_name, rope_bands, unpermute_qk

torch.set_num_threads(2)
SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
               original_max_position_embeddings=64)

# name: (hidden, heads, kv_heads, head_dim, ffn, tied, max_shard_size)
CASES = {
    "tied-gqa4-hd64":       (256, 4, 1, 64, ffn_size(256, 32), True, None),
    "untied-gqa3-hd128":    (192, 6, 2, 128, 320, False, None),
    "tied-mha-hd64-sharded": (256, 4, 4, 64, ffn_size(256, 32), True, "200KB"),
    "untied-gqa4-hd128-sharded": (512, 4, 1, 128, ffn_size(512, 32), False, "2MB"),
}


def hf_config(hidden, heads, kv, hd, ffn, tied, vocab=320, layers=2, scaling=SCALING):
    return transformers.LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                    num_key_value_heads=kv, head_dim=hd, intermediate_size=ffn, vocab_size=vocab,
                                    max_position_embeddings=256, rope_theta=10000.0,
                                    rope_scaling=dict(scaling) if scaling else None, rms_norm_eps=1e-5,
                                    tie_word_embeddings=tied, initializer_range=0.1)


def make_hf(case, tmp_path, seed=0):
    hidden, heads, kv, hd, ffn, tied, shard = CASES[case]
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(hf_config(hidden, heads, kv, hd, ffn, tied)).eval()
    d = tmp_path / "hf"
    hf.save_pretrained(d, **({"max_shard_size": shard} if shard else {}))
    return hf, d


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    hf, d = make_hf(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, hf, d, Llama.from_pretrained(d)


def test_scaling_bands_are_hit():
    for hd in (64, 128):
        b = rope_bands(hd, 10000.0, {k: v for k, v in SCALING.items() if k != "rope_type"})
        assert {"high", "mid", "low"} <= set(b), (hd, b)


def test_logits_match_transformers(pair):
    case, hf, d, ours = pair
    if CASES[case][6]: assert (d / "model.safetensors.index.json").is_file()
    assert ours.cfg.tie_embeddings == CASES[case][5] and ours.dtype == torch.float32
    assert (ours.lm_head.weight is ours.embed_tokens.weight) == CASES[case][5]
    # positions beyond original_max_position_embeddings=64
    toks = torch.randint(0, 320, (2, 128), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(): ref = hf(toks).logits
    out = ours(toks)                                   # gradients enabled: the training kernels
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert (out - ref).abs().max().item() < 1e-4
    with torch.inference_mode(): fast = ours(toks)     # inference: the measured inference kernels
    assert (fast - ref).abs().max().item() < 1e-4
    plain = Llama.from_pretrained(d, fast=False)       # the plain reference: nn.Linear everywhere
    assert not plain.fast and all(type(m) is torch.nn.Linear for m in plain.modules() if isinstance(m, torch.nn.Linear))
    with torch.no_grad(): assert (plain(toks) - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("fused_loss", [True, False])
@pytest.mark.parametrize("fast", [True, False])
def test_training_gradients_match_transformers(pair, fused_loss, fast):
    """One training step's loss and every parameter gradient equal transformers' (fp32), with the speed layer (measured
    training kernels, chunked loss) and without it, through `model.loss` or the plain logits + F.cross_entropy."""
    case, hf, d, ours = pair
    if not fast: ours = Llama.from_pretrained(d, fast=False)
    toks = torch.randint(0, 320, (2, 97), generator=torch.Generator().manual_seed(3))
    x, y = toks[:, :-1], toks[:, 1:].clone()
    y[0, :9] = -100                                                   # ignored positions (as SFT masks prompts)
    ref = F.cross_entropy(hf(x).logits.flatten(0, 1).float(), y.flatten())
    ref.backward()
    g_ref = {k.removeprefix("model."): p.grad for k, p in hf.named_parameters()}
    loss = ours.loss(x, y) if fused_loss else F.cross_entropy(ours(x).flatten(0, 1), y.flatten())
    loss.backward()
    try:
        assert abs(loss.item() - ref.item()) < 1e-5
        for n, p in ours.named_parameters():
            err = ((p.grad - g_ref[n]).abs().max() / g_ref[n].abs().max()).item()
            assert err < 1e-4, (n, err)
    finally:
        hf.zero_grad(set_to_none=True); ours.zero_grad(set_to_none=True)


def test_cached_forward_and_generation(pair):
    case, hf, d, ours = pair
    prompt = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(2))
    n = 24
    with_cache = ours.generate(prompt[0], n, stop_tokens=())
    assert with_cache == ours.generate(prompt[0].tolist(), n, stop_tokens=(), use_cache=False)
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    assert with_cache == ref[0, 12:].tolist()
    assert list(ours.stream(prompt[0], n, stop_tokens=())) == with_cache


def test_save_pretrained_loads_in_transformers(pair, tmp_path):
    case, hf, d, ours = pair
    ours.save_pretrained(tmp_path / "ours", max_shard_size=CASES[case][6])
    cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert cfg["rope_scaling"]["rope_type"] == "llama3" and "rope_theta" in cfg and cfg["torch_dtype"] == "float32"
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    toks = torch.randint(0, 320, (1, 100))
    with torch.no_grad(): assert (back(toks).logits - ours(toks)).abs().max().item() < 1e-4
    assert Llama.from_pretrained(tmp_path / "ours").cfg == ours.cfg


def write_meta(ours: Llama, d, multiple_of, tie_output=True):
    "A Meta-format checkpoint (interleaved q/k rows, Meta names, explicit output.weight) from our HF-layout weights."
    c = ours.cfg
    sd = {}
    for k, v in ours.state_dict().items():
        if k == "lm_head.weight" and c.tie_embeddings: continue
        if "q_proj" in k: v = unpermute_qk(v, c.n_heads)
        elif "k_proj" in k: v = unpermute_qk(v, c.n_kv_heads)
        sd[meta_name(k)] = v.clone()
    if tie_output and c.tie_embeddings:  # Meta always stores it
        sd["output.weight"] = sd["tok_embeddings.weight"].clone()
    d.mkdir(parents=True)
    torch.save(sd, d / "consolidated.00.pth")
    params = dict(dim=c.dim, n_layers=c.n_layers, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads, vocab_size=c.vocab_size,
                  multiple_of=multiple_of, ffn_dim_multiplier=None, norm_eps=c.norm_eps, rope_theta=c.rope_theta,
                  use_scaled_rope=True, rope_scaling=c.rope_scaling, max_seq_len=c.max_seq_len)
    (d / "params.json").write_text(json.dumps(params))
    return d


@pytest.mark.parametrize("case", ["tied-gqa4-hd64", "untied-gqa4-hd128-sharded"])
def test_meta_format_equals_hf(case, tmp_path):
    hf, d = make_hf(case, tmp_path)
    ours = Llama.from_pretrained(d)
    assert ours.cfg.ffn_dim == ffn_size(ours.cfg.dim, 32)
    meta = Llama.from_pretrained(write_meta(ours, tmp_path / "meta", 32))
    assert meta.cfg == ours.cfg  # tying detected from output.weight == tok_embeddings.weight
    for k, v in ours.state_dict().items(): assert torch.equal(v, meta.state_dict()[k]), k
    toks = torch.randint(0, 320, (2, 128))
    assert (meta(toks) - ours(toks)).abs().max().item() == 0


def test_bf16_close_to_transformers(tmp_path):
    hf, d = make_hf("tied-gqa4-hd64", tmp_path)
    ours = Llama.from_pretrained(d, dtype=torch.bfloat16)
    assert ours.dtype == torch.bfloat16
    hf = hf.to(torch.bfloat16)
    toks = torch.randint(0, 320, (1, 64))
    with torch.no_grad(): ref = hf(toks).logits.float()
    out = ours(toks)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max().item() < 0.05 * ref.abs().max().item()
    assert ours.generate(toks[0, :8], 8, stop_tokens=()) is not None


def test_meta_real_shapes_config():
    # the 1B params.json as Meta ships it
    p = dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, ffn_dim_multiplier=1.5,
             multiple_of=256, norm_eps=1e-05, rope_theta=500000.0, use_scaled_rope=True)
    c = LlamaConfig.from_meta_params(**p, max_seq_len=131072, tie_embeddings=True)
    assert c == LlamaConfig.llama32_1b()
    h = c.to_hf_dict()
    assert h["intermediate_size"] == 8192 and h["rope_scaling"]["factor"] == 32.0 and h["tie_word_embeddings"] is True
    hc = transformers.LlamaConfig(**{k: v for k, v in h.items() if k not in ("architectures", "torch_dtype")})
    assert LlamaConfig.from_hf_dict(hc.to_dict()) == c  # transformers 5's rope_parameters form


def test_training_step_reduces_loss():
    torch.manual_seed(0)
    m = Llama(LlamaConfig.toy())
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    x = torch.randint(0, 256, (4, 33))
    losses = []
    for _ in range(10):
        loss = torch.nn.functional.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(); loss.backward(); opt.step(); losses.append(loss.item())
    assert losses[-1] < losses[0] - 1


def test_state_dict_names_are_hf_names():
    "Our parameter names are transformers' minus `model.`: separate q/k/v and gate/up projections, as in Meta's model."
    m = Llama(LlamaConfig.toy(n_layers=1, tie_embeddings=False))
    hf = transformers.LlamaForCausalLM(hf_config(64, 4, 2, 16, m.cfg.ffn_dim, False, vocab=256, layers=1))
    assert {hf_name(k) for k in m.state_dict()} == set(hf.state_dict())
    assert {"layers.0.self_attn.q_proj.weight", "layers.0.mlp.gate_proj.weight",
            "layers.0.mlp.up_proj.weight"} <= set(m.state_dict())
