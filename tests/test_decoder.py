"Parity of llama32_nb.decoder with transformers' LlamaForCausalLM (and Meta's format) on tiny random checkpoints."
import json

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
from llama32_nb.decoder import Llama, LlamaConfig, checkpoint_state_dict, ffn_size, fuse_state_dict, meta_name, rope_bands, unpermute_qk

torch.set_num_threads(2)
SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)

# name: (hidden, heads, kv_heads, head_dim, ffn, tied, max_shard_size)
CASES = {
    "tied-gqa4-hd64":       (256, 4, 1, 64, ffn_size(256, 32), True, None),
    "untied-gqa3-hd128":    (192, 6, 2, 128, 320, False, None),
    "tied-mha-hd64-sharded": (256, 4, 4, 64, ffn_size(256, 32), True, "200KB"),
    "untied-gqa4-hd128-sharded": (512, 4, 1, 128, ffn_size(512, 32), False, "2MB"),
}


def hf_config(hidden, heads, kv, hd, ffn, tied, vocab=320, layers=2, scaling=SCALING):
    return transformers.LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                                    head_dim=hd, intermediate_size=ffn, vocab_size=vocab, max_position_embeddings=256,
                                    rope_theta=10000.0, rope_scaling=dict(scaling) if scaling else None, rms_norm_eps=1e-5,
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
    toks = torch.randint(0, 320, (2, 128), generator=torch.Generator().manual_seed(1))  # positions beyond original_max_position_embeddings=64
    with torch.no_grad(): ref = hf(toks).logits
    out = ours(toks)                                   # gradients enabled: F.linear everywhere
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert (out - ref).abs().max().item() < 1e-4
    with torch.inference_mode(): fast = ours(toks)     # inference: the CPU fast kernels of `linear`
    assert (fast - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("fused_loss", [True, False])
def test_training_gradients_match_transformers(pair, fused_loss):
    """One training step's loss and every parameter gradient equal transformers' (fp32): the oneDNN training kernels
    (`_OneDNNLinear`, `_SwiGLU`) and `model.loss` (`linear_cross_entropy`) or the plain logits + F.cross_entropy."""
    case, hf, d, ours = pair
    toks = torch.randint(0, 320, (2, 97), generator=torch.Generator().manual_seed(3))
    x, y = toks[:, :-1], toks[:, 1:].clone()
    y[0, :9] = -100                                                   # ignored positions (as SFT masks prompts)
    ref = F.cross_entropy(hf(x).logits.flatten(0, 1).float(), y.flatten())
    ref.backward()
    g_ref = fuse_state_dict({k.removeprefix("model."): p.grad for k, p in hf.named_parameters()}, ours.cfg.n_layers)
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
        ref = hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
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
    for k, v in checkpoint_state_dict(ours).items():
        if "q_proj" in k: v = unpermute_qk(v, c.n_heads)
        elif "k_proj" in k: v = unpermute_qk(v, c.n_kv_heads)
        sd[meta_name(k)] = v.clone()
    if tie_output and c.tie_embeddings: sd["output.weight"] = sd["tok_embeddings.weight"].clone()  # Meta always stores it
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
    p = dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, ffn_dim_multiplier=1.5, multiple_of=256,
             norm_eps=1e-05, rope_theta=500000.0, use_scaled_rope=True)
    c = LlamaConfig.from_meta_params(**p, max_seq_len=131072, tie_embeddings=True)
    assert c == LlamaConfig.llama32_1b()
    h = c.to_hf_dict()
    assert h["intermediate_size"] == 8192 and h["rope_scaling"]["factor"] == 32.0 and h["tie_word_embeddings"] is True
    hc = transformers.LlamaConfig(**{k: v for k, v in h.items() if k not in ("architectures", "torch_dtype")})
    assert LlamaConfig.from_hf_dict(hc.to_dict()) == c  # transformers 5's rope_parameters form


def test_training_step_reduces_loss():
    torch.manual_seed(0)
    m = Llama(LlamaConfig.tiny())
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    x = torch.randint(0, 256, (4, 33))
    losses = []
    for _ in range(10):
        loss = torch.nn.functional.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(); loss.backward(); opt.step(); losses.append(loss.item())
    assert losses[-1] < losses[0] - 1


@pytest.mark.parametrize("onednn", [True, False])
def test_linear_inference_kernels(monkeypatch, onednn):
    """`linear` without gradients: fp32 on oneDNN's linear (or, without it, one row through the bmm split), one bf16 row
    as a two-row view; each equal to F.linear within rounding. With gradients, bias or odd weights: plain F.linear."""
    import llama32_nb.decoder as D
    from llama32_nb.decoder import Linear, linear
    if onednn and not D.onednn_linear_available(): pytest.skip("this PyTorch build has no oneDNN linear")
    monkeypatch.setattr(D, "onednn_linear_available", lambda: onednn)
    calls = {"bmm": 0, "dnn": 0}
    bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a, **k: calls.__setitem__("bmm", calls["bmm"] + 1) or bmm(*a, **k))
    if onednn:
        dnn = torch.ops.mkldnn._linear_pointwise
        monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.__setitem__("dnn", calls["dnn"] + 1) or dnn(*a))
    kernel = "dnn" if onednn else "bmm"
    g = torch.Generator().manual_seed(0)
    for o, i in [(3072, 2048), (1000, 64), (128256 // 16, 256)]:
        W, x = torch.randn(o, i, generator=g) * 0.02, torch.randn(i, generator=g)
        ref = F.linear(x, W)
        with torch.inference_mode():
            for shape in [(i,), (1, i), (1, 1, i)]:
                n = calls[kernel]
                y = linear(x.view(shape), W)
                assert calls[kernel] == n + 1 and y.shape == shape[:-1] + (o,)
                torch.testing.assert_close(y.view(-1), ref, rtol=1e-5, atol=1e-5)
            xs = torch.randn(2, 5, i, generator=g)
            n = calls["dnn"]
            torch.testing.assert_close(linear(xs, W), F.linear(xs, W), rtol=1e-5, atol=1e-5)                # many rows
            torch.testing.assert_close(linear(xs[:, -1:], W), F.linear(xs[:, -1:], W), rtol=1e-5, atol=1e-5)  # strided view
            assert calls["dnn"] == n + 2 * onednn
            xb, Wb = x.bfloat16(), W.bfloat16()
            yb = linear(xb.view(1, 1, i), Wb)
            assert yb.dtype == torch.bfloat16 and yb.shape == (1, 1, o)
            torch.testing.assert_close(yb.view(-1).float(), F.linear(xb, Wb).float(), rtol=2e-2, atol=2e-3)  # bf16 rounding
    n = dict(calls)
    W, x = torch.randn(1002, 64, generator=g), torch.randn(1, 64, generator=g)
    b = torch.randn(1002, generator=g)
    with torch.inference_mode():
        assert torch.equal(linear(x, W, b), F.linear(x, W, b))                                  # bias
        Wn = W[:1000].t().contiguous().t()
        assert not Wn.is_contiguous() and torch.equal(linear(x, Wn), F.linear(x, Wn))          # non-contiguous weight
        xs16 = torch.randn(5, 64, generator=g).bfloat16()
        assert torch.equal(linear(xs16, W.bfloat16()), F.linear(xs16, W.bfloat16()))          # bf16, many rows
    lin = Linear(64, 1000, bias=False)
    y = lin(x); y.sum().backward()                                  # training: _OneDNNLinear (one oneDNN call) or F.linear
    assert lin.weight.grad is not None and y.requires_grad
    assert calls == {"bmm": n["bmm"], "dnn": n["dnn"] + onednn}
    with pytest.raises(RuntimeError):                                                       # wrong inner size: F.linear's error
        with torch.inference_mode(): linear(torch.randn(1, 63), W)
    assert isinstance(lin, torch.nn.Linear) and list(lin.state_dict()) == ["weight"]


def test_training_kernels_match_plain_autograd(monkeypatch):
    """The CPU training kernels give the gradients of plain autograd over F.linear / F.silu / F.cross_entropy, also with
    frozen weights (only the input needs a gradient, as for adapters on a frozen model); they are first-order only."""
    import llama32_nb.decoder as D
    if not D.onednn_linear_available(): pytest.skip("this PyTorch build has no oneDNN linear")
    torch.manual_seed(0)
    m = Llama(LlamaConfig.tiny(vocab_size=300, n_layers=2)).train()
    x, y = torch.randint(0, 300, (2, 33)), torch.randint(0, 300, (2, 33))
    def grads(frozen: bool):
        for p in m.parameters(): p.requires_grad_(not frozen)
        h0 = m.embed_tokens(x).detach().requires_grad_()
        cos, sin = D.rope_cos_sin(m.inv_freq("cpu"), torch.arange(33))
        h = h0
        for layer in m.layers: h = layer(h, cos, sin)
        loss = D.linear_cross_entropy(m.norm(h).flatten(0, 1), m.lm_head.weight, y.flatten(), rows=20)
        ps = [h0] + ([] if frozen else list(m.parameters()))
        return loss, torch.autograd.grad(loss, ps)
    for frozen in (False, True):
        fast = grads(frozen)
        with monkeypatch.context() as mp:
            mp.setattr(D, "onednn_linear_available", lambda: False)
            mp.setattr(D, "linear_cross_entropy", lambda h, w, t, rows=None: F.cross_entropy(F.linear(h, w), t))
            plain = grads(frozen)
        assert abs(fast[0].item() - plain[0].item()) < 1e-5
        for a, b in zip(fast[1], plain[1]): torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for p in m.parameters(): p.requires_grad_(True)
    xg = torch.randn(4, m.cfg.dim, requires_grad=True)
    out = m.layers[0].mlp(xg).sum()
    (g,) = torch.autograd.grad(out, xg, create_graph=True)
    with pytest.raises(RuntimeError):                               # no silent wrong second derivatives
        g.sum().backward()


def test_linear_cross_entropy_errors_and_edges():
    from llama32_nb.decoder import linear_cross_entropy
    h, w = torch.randn(10, 8, requires_grad=True), torch.randn(50, 8)
    t = torch.randint(0, 50, (10,))
    for bad_h, bad_w, bad_t, what in [(h[:, :4], w, t, "weight"), (h, w, t[:5], "targets"), (h, w, t.float(), "targets"),
                                      (h, w, torch.full((10,), 50), "targets must be in"), (h, w, torch.full((10,), -2), "targets must be in")]:
        with pytest.raises(ValueError, match=what): linear_cross_entropy(bad_h, bad_w, bad_t)
    with pytest.raises(ValueError, match="rows"): linear_cross_entropy(h, w, t, rows=0)
    assert torch.isnan(linear_cross_entropy(h, w, torch.full((10,), -100)))          # nothing to average: NaN, like PyTorch
    assert torch.isnan(F.cross_entropy(F.linear(h, w), torch.full((10,), -100)))
    m = Llama(LlamaConfig.tiny(vocab_size=50))
    with pytest.raises(ValueError, match="targets must be an integer tensor shaped like tokens"): m.loss(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="vocab_size"): m.loss(torch.full((1, 4), 50), torch.zeros(1, 4, dtype=torch.long))


def test_state_dict_names_unchanged():
    m = Llama(LlamaConfig.tiny(n_layers=1))
    names = set(m.state_dict())
    assert {"layers.0.self_attn.qkv_proj.weight", "layers.0.self_attn.o_proj.weight", "layers.0.mlp.gate_up_proj.weight",
            "layers.0.mlp.down_proj.weight", "lm_head.weight", "embed_tokens.weight"} <= names
    assert all(type(mod).__name__ == "Linear" for n, mod in m.named_modules() if n.endswith(("_proj", "lm_head")))
