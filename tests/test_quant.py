"8da4w quantizers vs torchao (test-only reference), QAT == PTQ, QAT + LoRA, and Meta's quantized checkpoint format."
import copy, json, warnings
import pytest
import torch
import torch.nn as nn
from llama32_nb.checkpoint import CheckpointError
from llama32_nb.decoder import Llama, LlamaConfig
from llama32_nb.quant import (Int8Embedding, Linear8da4w, QATLinear, QuantizationError, add_lora, dequantize_groupwise,
                              fake_quant_per_token, load_meta_quantized, model_bytes, prepare_qat, quantize_8da4w,
                              quantize_eo8, quantize_groupwise, save_meta_quantized, hadamard, hadamard_factors,
                              random_hadamard, fwht, HadamardInput, rotate, layer_errors)


@pytest.fixture(scope="module")
def torchao():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("torchao")


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return Llama(LlamaConfig.toy(**kw)).eval()


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("shape", [(64, 96), (160, 128)])
def test_8da4w_linear_matches_torchao(torchao, seed, shape):
    from torchao.quantization.linear_quant_modules import Int8DynActInt4WeightQuantizer
    from torchao.quantization import quantize_, Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.granularity import PerGroup
    torch.manual_seed(seed)
    in_f, out_f = shape
    lin = nn.Linear(in_f, out_f, bias=False)
    x = torch.randn(3, 7, in_f) * torch.linspace(0.1, 4, in_f)                       # uneven channel scales
    x[0, 0, 5] = 40.0                                                                 # an outlier token
    ours = Linear8da4w.from_linear(lin, 32)(x)
    ref1 = Int8DynActInt4WeightQuantizer(groupsize=32).quantize(nn.Sequential(copy.deepcopy(lin)))(x)
    m2 = nn.Sequential(copy.deepcopy(lin))
    quantize_(m2, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32)))
    ref2 = m2(x)
    torch.testing.assert_close(ours, ref1, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours, ref2, rtol=0, atol=1e-6)


def test_weight_values_match_torchao(torchao):
    from torchao.quantization.linear_quant_modules import Int8DynActInt4WeightQuantizer
    torch.manual_seed(3)
    lin = nn.Linear(128, 48, bias=False)
    ref = Int8DynActInt4WeightQuantizer(groupsize=32).quantize(nn.Sequential(copy.deepcopy(lin)))[0]
    q, s = quantize_groupwise(lin.weight, 4, 32)
    assert torch.equal(q, ref.weight) and torch.equal(s, ref.scales.float())


def test_per_token_activation_matches_torchao(torchao):
    from torchao.quantization.utils import per_token_dynamic_quant
    torch.manual_seed(4)
    x = torch.cat([torch.randn(50, 64) * 3 + 1, torch.rand(20, 64), -torch.rand(10, 64), torch.zeros(1, 64)])
    ref = per_token_dynamic_quant(x, torch.float32, torch.float32, eps=torch.finfo(torch.float32).eps)
    assert torch.equal(fake_quant_per_token(x), ref)


def test_qat_forward_equals_ptq_and_has_gradients():
    m = _model()
    ids = torch.randint(0, 256, (2, 12))
    qat = prepare_qat(copy.deepcopy(m))
    assert all(isinstance(l, QATLinear) for l in qat.layers[0].mlp.children())
    ptq = quantize_8da4w(copy.deepcopy(m))
    with torch.no_grad(): assert torch.equal(qat(ids), ptq(ids))
    qat.train()
    loss = qat.loss(ids[:, :-1], ids[:, 1:]); loss.backward()
    g = qat.layers[0].self_attn.q_proj.weight.grad
    assert g is not None and g.abs().sum() > 0
    converted = quantize_8da4w(qat).eval()                    # QAT -> int4, same forward
    with torch.no_grad(): assert torch.equal(converted(ids), ptq(ids))


def test_quantized_model_cached_decode_and_lora():
    m = quantize_eo8(quantize_8da4w(_model(1)))
    assert m.lm_head.weight is m.embed_tokens.weight and isinstance(m.embed_tokens, Int8Embedding)
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        full = m(ids)
        cache = m.new_cache(1, 16)
        a = m(ids[:, :5], cache=cache); b = m(ids[:, 5:], start_pos=5, cache=cache)
    torch.testing.assert_close(torch.cat([a, b], 1), full, rtol=1e-4, atol=1e-4)
    params = add_lora(m, 4, 2.0)
    assert all(p.requires_grad for p in params) and not m.embed_tokens.weight.requires_grad
    with torch.no_grad(): assert torch.equal(m(ids), full)                  # B starts at zero
    m.train(); m.loss(ids[:, :-1], ids[:, 1:]).backward()
    assert all(p.grad is not None for p in params)
    assert params[0].grad.abs().sum() == 0 and params[1].grad.abs().sum() > 0   # A gets grad once B moves
    assert model_bytes(m) < model_bytes(_model(1))


def test_model_bytes_counts_what_a_deployed_file_stores():
    for tie in (True, False):
        m = _model(0, tie_embeddings=tie)
        c = m.cfg
        fp32 = model_bytes(m)
        assert fp32 == 4 * sum(p.numel() for p in m.parameters())             # shared tensors once
        q = quantize_eo8(quantize_8da4w(m))
        heads = 1 if tie else 2                                                # int8 values + fp32 row scales
        block = sum(l.weight.numel() // 2 + l.scales.numel() * 4 for l in q.modules() if isinstance(l, Linear8da4w))
        norms = 4 * c.dim * (2 * c.n_layers + 1)
        assert model_bytes(q) == heads * c.vocab_size * (c.dim + 4) + block + norms


def test_group_size_must_divide():
    m = _model()
    with pytest.raises(QuantizationError, match="does not divide"):
        quantize_8da4w(m, group_size=48)
    assert all(type(l) is not Linear8da4w for l in m.modules())             # nothing half-swapped
    with pytest.raises(QuantizationError, match="positive int"): quantize_8da4w(m, group_size=0)


@pytest.mark.parametrize("lora", [False, True])
def test_meta_format_round_trip(tmp_path, lora):
    m = quantize_eo8(quantize_8da4w(_model(2)))
    if lora:
        for p in add_lora(m, 4, 2.0): nn.init.normal_(p, std=0.05)
    save_meta_quantized(m, tmp_path)
    params = json.loads((tmp_path / "params.json").read_text())
    assert params["quantization_args"] == {"scheme": "int4_weight_int8_dynamic_activation", "group_size": 32,
                                           "spinquant": False}
    assert ("lora_args" in params) == lora
    sd = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    assert sd["layers.0.attention.wq.weight"].dtype == torch.int8 and "tok_embeddings.scales" in sd
    back = load_meta_quantized(tmp_path)
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad(): assert torch.equal(back(ids), m(ids))


def _write(tmp_path, sd=None, **params):
    m = quantize_eo8(quantize_8da4w(_model(3)))
    save_meta_quantized(m, tmp_path)
    p = json.loads((tmp_path / "params.json").read_text())
    p.update(params)
    (tmp_path / "params.json").write_text(json.dumps(p))
    if sd is not None:
        d = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
        sd(d); torch.save(d, tmp_path / "consolidated.00.pth")


@pytest.mark.parametrize("qa, msg", [
    ({"scheme": "int8", "group_size": 32}, "scheme must be"),
    ({"scheme": "int4_weight_int8_dynamic_activation"}, "group_size must be a positive int"),
    ({"scheme": "int4_weight_int8_dynamic_activation", "group_size": 48}, "does not divide"),
    ({"scheme": "int4_weight_int8_dynamic_activation", "group_size": 32, "spinquant": True}, "Hadamard"),
    ({"scheme": "int4_weight_int8_dynamic_activation", "group_size": 32, "bits": 3}, "unknown keys"),
])
def test_meta_format_bad_quantization_args(tmp_path, qa, msg):
    _write(tmp_path, quantization_args=qa)
    with pytest.raises(QuantizationError, match=msg): load_meta_quantized(tmp_path)


def test_meta_format_bad_tensors(tmp_path):
    def damage(d):
        d["layers.0.attention.wq.weight"] = d["layers.0.attention.wq.weight"].float()
        d["layers.1.feed_forward.w2.weight"][0, 0] = 9
        del d["layers.0.attention.wk.scales"]
        d["layers.1.attention.wv.scales"] = d["layers.1.attention.wv.scales"][:, :1]
        d["junk"] = torch.zeros(1)
    _write(tmp_path, damage)
    with pytest.raises(CheckpointError) as e: load_meta_quantized(tmp_path)
    msg = str(e.value)
    for s in ("5 problem(s)", "wq.weight' has dtype", "outside the int4 range", "missing tensor 'layers.0.attention.wk",
              "misshaped tensor 'layers.1.attention.wv.scales'", "unexpected tensor 'junk'"):
        assert s in msg, msg
    _write(tmp_path, lora_args={"rank": 0, "scale": 2.0})
    with pytest.raises(QuantizationError, match="rank"): load_meta_quantized(tmp_path)


def test_meta_format_truncated_file(tmp_path):
    _write(tmp_path)
    f = tmp_path / "consolidated.00.pth"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="unreadable"): load_meta_quantized(tmp_path)


def test_dequantize_is_inverse_on_grid():
    torch.manual_seed(5)
    q = torch.randint(-8, 8, (6, 64), dtype=torch.int8)
    s = torch.rand(6, 2) + 0.1
    q2, s2 = quantize_groupwise(dequantize_groupwise(q, s) , 4, 32)
    torch.testing.assert_close(dequantize_groupwise(q2, s2), dequantize_groupwise(q, s), rtol=0.07, atol=0.2)


@pytest.mark.parametrize("n", [1, 2, 64, 12, 24, 20, 320, 768])
def test_hadamard_matrices(n):
    H = hadamard(n)
    assert H.shape == (n, n) and set(H.abs().unique().tolist()) == {1.0}
    assert torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.float64))
    Q = random_hadamard(n, 3)
    torch.testing.assert_close(Q @ Q.T, torch.eye(n, dtype=torch.float64))
    assert torch.equal(random_hadamard(n, 3), Q)                               # deterministic in the seed
    x = torch.randn(2, n, dtype=torch.float64)
    torch.testing.assert_close(HadamardInput(nn.Linear(n, 3, bias=False).double()).transform(x), x @ H / n ** 0.5)


def test_hadamard_bad_orders():
    for n in (7, 28, 36 * 4, 0):
        with pytest.raises((QuantizationError, ValueError)): hadamard(n)
    with pytest.raises(QuantizationError, match="power-of-2"): fwht(torch.randn(3, 12))
    assert hadamard_factors(768) == (12, 64)


def _rot_model(seed=0, dim=64, ffn=96):
    torch.manual_seed(seed)
    m = Llama(LlamaConfig.toy(dim=dim, ffn_dim=ffn)).eval()
    with torch.no_grad():                                    # non-trivial norm scales, so the folding is exercised
        for n, p in m.named_parameters():
            if n.endswith("layernorm.weight") or n == "norm.weight": p.uniform_(0.5, 1.5)
    return m


@pytest.mark.parametrize("online", [False, True])
def test_rotate_keeps_the_function_and_the_source(online):
    m = _rot_model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    r = rotate(m, seed=1, online=online)
    ids = torch.randint(0, m.cfg.vocab_size, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(r(ids), m(ids), rtol=1e-4, atol=1e-4)
        cache = r.new_cache(2, 16)                                               # cached decode path too
        a = r(ids[:, :6], cache=cache); b = r(ids[:, 6:], start_pos=6, cache=cache)
        torch.testing.assert_close(torch.cat([a, b], 1), m(ids), rtol=1e-4, atol=1e-4)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())   # the source is untouched
    assert m.lm_head.weight is m.embed_tokens.weight and r.lm_head.weight is not r.embed_tokens.weight
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in r.named_parameters() if n.endswith("norm.weight"))
    assert sum(isinstance(x, HadamardInput) for x in r.modules()) == (m.cfg.n_layers if online else 0)
    if online:
        with pytest.raises(QuantizationError, match="already rotated"): rotate(r)


def test_rotated_model_quantizes_through_the_swaps():
    m = _rot_model()
    r = rotate(m, seed=0)
    q = quantize_8da4w(copy.deepcopy(r))
    assert all(isinstance(b.mlp.down_proj.linear, Linear8da4w) for b in q.layers)        # the wrapped linear is swapped
    seen = []
    h = q.layers[0].mlp.down_proj.linear.register_forward_hook(lambda mod, i, o: seen.append(i[0]))
    ids = torch.randint(0, m.cfg.vocab_size, (1, 7))
    with torch.no_grad(): q(ids)
    h.remove()
    assert seen and seen[0].shape[-1] == m.cfg.ffn_dim                                   # it sees the rotated input
    errs = layer_errors(r, 32, ids)
    assert "0.mlp.down_proj.linear" in errs and all(0 <= e < 1 for e in errs.values())
    with pytest.raises(QuantizationError, match="Hadamard"): rotate(_model(0, dim=56, ffn_dim=64))
