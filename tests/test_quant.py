"8da4w quantizers vs torchao (test-only reference), QAT == PTQ, QAT + LoRA, and Meta's quantized checkpoint format."
import copy, json, math, warnings
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


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_weight_values_match_torchao(torchao, scale_dtype):
    "Weights and scales bit for bit, fp32 scales or bf16 ones (torchao's scales_precision), and so the outputs."
    from torchao.quantization.linear_quant_modules import Int8DynActInt4WeightQuantizer
    torch.manual_seed(3)
    lin = nn.Linear(128, 48, bias=False)
    ref = Int8DynActInt4WeightQuantizer(groupsize=32, scales_precision=scale_dtype).quantize(
        nn.Sequential(copy.deepcopy(lin)))[0]
    q, s = quantize_groupwise(lin.weight, 4, 32, scale_dtype)
    assert ref.scales.dtype == scale_dtype and s.dtype == torch.float32
    assert torch.equal(q, ref.weight) and torch.equal(s, ref.scales.float())
    x = torch.randn(3, 7, 128)
    torch.testing.assert_close(Linear8da4w.from_linear(lin, 32, scale_dtype=scale_dtype)(x), ref(x), rtol=0, atol=1e-6)


def test_bad_scale_dtype_is_named():
    with pytest.raises(QuantizationError, match="scale_dtype"):
        quantize_8da4w(Llama(LlamaConfig.toy(vocab_size=64)), 32, scale_dtype=torch.float16)


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


# --- packed integer kernels (use_packed_kernels) ---------------------------------------------------------------------
from llama32_nb.quant import (PackedLinear8da4w, PackedLinear8da8w, Int8Linear, decode_speed, kernel_candidates,
                              pack_int4, pack_int8, packed_kernels, per_token_qparams, quant_report, quantize_linears,
                              unpack_int4, use_packed_kernels, val_loss)


@pytest.fixture(scope="module")
def ops():
    try: return packed_kernels()
    except QuantizationError as e: pytest.skip(str(e))


def _rows(seed=0, K=96):
    "Rows of every kind: mixed signs, all positive, all negative, far from zero, all zero, tiny, huge."
    g = torch.Generator().manual_seed(seed)
    rows = []
    for e in range(-8, 5):
        x = torch.randn(4, K, generator=g) * 10.0 ** e
        rows += [x, x.abs(), -x.abs(), x + 50 * x.abs().max()]
    return torch.cat(rows + [torch.zeros(2, K), torch.full((1, K), 3e-39)])


def test_token_codes_are_the_reference_bit_for_bit(ops):
    x = _rows()
    codes, scale, zp = ops.token_codes(x)
    s_ref, zp_ref = per_token_qparams(x)
    assert torch.equal(scale, s_ref[:, 0]) and torch.equal(zp, zp_ref[:, 0])
    assert codes.dtype == torch.int8 and torch.equal((codes.float() - zp[:, None]) * scale[:, None],
                                                     fake_quant_per_token(x))


def test_packing_layouts_are_exact():
    g = torch.Generator().manual_seed(3)
    q4, s4 = torch.randint(-8, 8, (24, 128), dtype=torch.int8, generator=g), torch.rand(24, 2, generator=g)
    packed, corr = pack_int4(q4, s4)                                        # groups of 64: 2 blocks + 8 fp32 scales
    assert packed.dtype == torch.uint8 and packed.shape == (3, 2, 2 * 128 + 32)
    for r, g_, b, v, row, j in [(0, 0, 0, 0, 0, 0), (2, 1, 1, 3, 7, 3), (1, 0, 1, 2, 5, 1)]:
        k = 64 * g_ + 32 * b + 4 * v + j                                    # byte 4 row + j of vector v of block b
        byte = packed[r, g_, 128 * b + 32 * v + 4 * row + j].item()
        assert byte == (q4[8 * r + row, k].item() + 8) | ((q4[8 * r + row, k + 16].item() + 8) << 4)
    assert torch.equal(packed[1, 1, 256:].view(torch.float32), s4[8:16, 1])    # then the group's 8 scales
    assert torch.equal(corr, (q4.double().reshape(24, 2, 64).sum(-1) * s4.double()).sum(-1).float())
    q, s = unpack_int4(packed, 64)
    assert torch.equal(q, q4) and torch.equal(s, s4)
    pb, _ = pack_int4(q4, s4.bfloat16().float())                            # bf16 numbers: stored in 2 bytes
    assert pb.shape == (3, 2, 256 + 16) and torch.equal(unpack_int4(pb, 64)[1], s4.bfloat16().float())
    with pytest.raises(QuantizationError, match="not all bf16"): pack_int4(q4, s4, torch.bfloat16)
    with pytest.raises(QuantizationError, match="float32 or torch.bfloat16"): pack_int4(q4, s4, torch.float16)
    q8 = torch.randint(-128, 128, (16, 40), dtype=torch.int8)
    p8, wsum = pack_int8(q8)
    assert torch.equal(p8.transpose(1, 2).reshape(16, 40), q8) and torch.equal(wsum, q8.int().sum(1))


def test_bf16_scales_pack_losslessly(ops):
    "bf16-valued scales are stored in bf16 (half the bytes) and give bit-identical outputs; other scales stay fp32."
    torch.manual_seed(7)
    lin, x = nn.Linear(256, 64, bias=False), torch.randn(2, 5, 256)
    ref = Linear8da4w.from_linear(lin, 32, scale_dtype=torch.bfloat16)
    pk, corr = pack_int4(ref.weight, ref.scales)
    pf, _ = pack_int4(ref.weight, ref.scales, torch.float32)
    assert pk.shape[-1] == 128 + 16 and pf.shape[-1] == 128 + 32 and torch.equal(unpack_int4(pk, 32)[1], ref.scales)
    packed = PackedLinear8da4w(ref)
    assert packed.scale_dtype == torch.bfloat16 and "bfloat16 scales" in repr(packed)
    assert torch.equal(packed(x).reshape(-1, 64), ops.linear_8da4w(x.reshape(-1, 256), pf, corr, 32))
    assert model_bytes(packed) < model_bytes(PackedLinear8da4w(Linear8da4w.from_linear(lin, 32)))
    assert PackedLinear8da4w(Linear8da4w.from_linear(lin, 32)).scale_dtype == torch.float32
    w_hat = ref.dequantized_weight()
    bound = per_token_qparams(x)[0] * 255 * w_hat.abs().sum(1).max()
    assert ((packed(x) - ref(x)).abs() / bound).max() < 1e-6


def test_kernels_sum_integers_exactly(ops):
    "Rows spanning exactly -128..127 have scale 1 and zero point 0, so with unit weight scales y is an exact integer sum."
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-128, 128, (3, 256), generator=g).float()
    x[:, 0], x[:, 1] = -128, 127
    assert torch.equal(ops.token_codes(x)[1], torch.ones(3)) and torch.equal(ops.token_codes(x)[2], torch.zeros(3))
    q4 = torch.randint(-8, 8, (64, 256), dtype=torch.int8, generator=g)
    y4 = ops.linear_8da4w(x, *pack_int4(q4, torch.ones(64, 4)), 64)
    assert torch.equal(y4.double(), (x.long() @ q4.long().T).double())
    q8 = torch.randint(-128, 128, (64, 256), dtype=torch.int8, generator=g)
    y8 = ops.linear_8da8w(x, *pack_int8(q8), torch.ones(64))
    assert torch.equal(y8.double(), (x.long() @ q8.long().T).double())


@pytest.mark.parametrize("n, k, gs", [(64, 96, 32), (48, 256, 64), (160, 512, 128), (32, 768, 256), (8, 64, 64)])
def test_packed_linears_match_the_reference(ops, n, k, gs):
    torch.manual_seed(n + k)
    lin = nn.Linear(k, n, bias=False)
    x = torch.cat([_rows(k, k)[:20], torch.randn(5, k) * torch.linspace(0.1, 4, k)]).reshape(5, 5, k)
    for ref, packed in ((q := Linear8da4w.from_linear(lin, gs), PackedLinear8da4w(q)),
                        (q8 := Linear8da4w.from_linear(lin, k, bits=8), PackedLinear8da8w.from_reference(q8))):
        y, yp = ref(x), packed(x)
        # per token, relative to the largest output its int8 range allows: s_x * 255 * max_n sum_k |w_hat[n, k]|
        w_hat = ref.dequantized_weight()
        bound = per_token_qparams(x)[0] * 255 * w_hat.abs().sum(1).max()
        assert yp.shape == y.shape and ((yp - y).abs() / bound).max() < 1e-6
        assert torch.equal(packed(x[1:2, 2:3]), packed(x)[1:2, 2:3])       # one token == that token in a batch


def test_packed_8da8w_matches_torchao(ops, torchao):
    from torchao.quantization import quantize_, Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.granularity import PerAxis
    torch.manual_seed(5)
    lin = nn.Linear(128, 48, bias=False)
    x = torch.randn(3, 7, 128) * torch.linspace(0.1, 4, 128)
    m = nn.Sequential(copy.deepcopy(lin))
    quantize_(m, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0)))
    ref, ours = m(x), PackedLinear8da8w.from_reference(Linear8da4w.from_linear(lin, 128, bits=8))(x)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5 * ref.abs().max().item())


def test_use_packed_kernels_on_a_model(ops):
    m = quantize_eo8(quantize_8da4w(_model(2)))
    ids = torch.randint(0, 256, (2, 12))
    blocks = use_packed_kernels(copy.deepcopy(m), head=False)
    full = use_packed_kernels(copy.deepcopy(m))
    assert all(isinstance(b.mlp.down_proj, PackedLinear8da4w) for b in full.layers)
    assert isinstance(full.lm_head, PackedLinear8da8w) and not isinstance(blocks.lm_head, PackedLinear8da8w)
    with torch.no_grad(): ref, lb, lf = m(ids), blocks(ids), full(ids)
    assert (lb - ref).abs().max() < 1e-3 * ref.abs().max() and (lf - ref).abs().max() < 5e-2 * ref.abs().max()
    assert (lf.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    with torch.no_grad():                                                   # cached decoding == one pass
        cache = full.new_cache(2, 16)
        a = full(ids[:, :7], cache=cache); b = full(ids[:, 7:], start_pos=7, cache=cache)
    torch.testing.assert_close(torch.cat([a, b], 1), lf, rtol=1e-4, atol=1e-4)
    assert blocks.generate(ids[0, :5], 10, stop_tokens=()) == m.generate(ids[0, :5], 10, stop_tokens=())
    seen = []                                                               # hooks fire on the packed modules
    h = full.layers[1].self_attn.q_proj.register_forward_hook(lambda mod, i, o: seen.append(o.shape))
    full.generate(ids[0, :5], 3, stop_tokens=())
    h.remove()
    assert len(seen) == 3
    with torch.no_grad(): assert abs(val_loss(blocks, ids) - val_loss(m, ids)) < 1e-4


def test_packed_kernels_carry_lora_rotation_and_8da8w(ops):
    m = quantize_8da4w(_rot_model())
    for p in add_lora(m, 4, 2.0): nn.init.normal_(p, std=0.1)
    r = quantize_8da4w(rotate(_rot_model(), seed=1))
    e = quantize_linears(_model(3), 8, None)
    assert all(l.bits == 8 and l.group_size == l.in_features for l in e.modules() if isinstance(l, Linear8da4w))
    ids = torch.randint(0, 256, (1, 9))
    for ref in (m, r, e):
        p = use_packed_kernels(copy.deepcopy(ref))
        assert not any(isinstance(l, Linear8da4w) for l in p.modules())
        with torch.no_grad(): a, b = ref(ids), p(ids)
        assert (a - b).abs().max() < 1e-3 * a.abs().max()
    p = use_packed_kernels(copy.deepcopy(m))
    assert p.layers[0].self_attn.q_proj.adaptor is not None


def test_use_packed_kernels_refuses_all_or_nothing(ops):
    m = quantize_8da4w(_model(0), group_size=16)
    before = [type(l) for l in m.modules()]
    with pytest.raises(QuantizationError, match="multiple of 32"): use_packed_kernels(m)
    assert [type(l) for l in m.modules()] == before
    with pytest.raises(QuantizationError, match="one scale per output row"):
        use_packed_kernels(quantize_linears(_model(0), 8, 32))
    with pytest.raises(QuantizationError, match="nothing to pack"): use_packed_kernels(_model(0))
    with pytest.raises(QuantizationError, match="4- and 8-bit"): use_packed_kernels(quantize_linears(_model(0), 6, 32))
    with pytest.raises(QuantizationError, match="out_features % 8"):
        PackedLinear8da8w(torch.zeros(12, 64, dtype=torch.int8), torch.ones(12))
    with pytest.raises(QuantizationError): quantize_linears(_model(0), 9, 32)
    with pytest.raises(QuantizationError, match="does not divide"): quantize_linears(_model(0), 4, 48)


def test_quant_report_and_decode_speed(ops):
    m = _model(4)
    val, ids = torch.randint(0, 256, (3, 33)), torch.randint(0, 256, (1, 16))
    r4, r8 = quant_report(m, val, ids, 4, 32), quant_report(m, val, ids, 8, None)
    rr = quant_report(_rot_model(), val, ids, 4, 32, rotation=True)
    assert set(r4) == {"errors", "bytes", "fp32_bytes", "loss", "ppl", "base_loss"} and len(r4["errors"]) == 14
    assert sum(r8["errors"].values()) < sum(r4["errors"].values()) and r4["bytes"] < r8["bytes"] < r4["fp32_bytes"]
    assert abs(r4["ppl"] - math.exp(r4["loss"])) < 1e-9 and r4["base_loss"] == r8["base_loss"]
    assert "0.mlp.down_proj.linear" in rr["errors"]
    assert decode_speed(use_packed_kernels(quantize_8da4w(m)), [1, 2, 3], 4) > 0
    t = kernel_candidates(64, 256, min_bytes=1e5, budget=0.01)
    assert len(t) == 7 and all(v["seconds"] > 0 for v in t.values())


def test_int4_kernel_checks_its_layout(ops):
    "The kernel reads group sizes and scale widths from the packed tensor's shape, and refuses ones that disagree."
    q4, x = torch.randint(-8, 8, (16, 128), dtype=torch.int8), torch.randn(2, 128)
    pk, corr = pack_int4(q4, torch.rand(16, 2))                             # groups of 64
    assert ops.linear_8da4w(x, pk, corr, 64).shape == (2, 16)
    with pytest.raises(RuntimeError, match="groups of"): ops.linear_8da4w(x, pk, corr, 32)
    with pytest.raises(RuntimeError, match="groups of"): ops.linear_8da4w(torch.randn(2, 96), pk, corr, 64)
    with pytest.raises(RuntimeError, match="group bytes"): ops.linear_8da4w(x, pk[..., :-8].contiguous(), corr, 64)
    with pytest.raises(RuntimeError, match="corr"): ops.linear_8da4w(x, pk, corr[:8], 64)


def test_quantize_output_8da4w(ops, tmp_path):
    "The output layer as 8da4w (a Q4_0 file's layout): its own int4 copy of a tied table, packed by the swap."
    from llama32_nb.quant import quantize_output_8da4w
    m = quantize_8da4w(_model(3), 32, torch.bfloat16)
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad(): ref = m(ids)
    table = m.embed_tokens.weight.detach().clone()
    q = quantize_eo8(quantize_output_8da4w(copy.deepcopy(m), 32, torch.bfloat16))
    assert isinstance(q.lm_head, Linear8da4w) and q.lm_head.scales.dtype == torch.float32
    assert torch.equal(q.lm_head.scales.bfloat16().float(), q.lm_head.scales)           # bf16 numbers
    assert isinstance(q.embed_tokens, Int8Embedding) and q.lm_head.weight is not q.embed_tokens.weight
    w_hat = q.lm_head.dequantized_weight()
    assert ((w_hat - table).abs() <= q.lm_head.scales.repeat_interleave(32, 1)).all()          # within one step
    with torch.no_grad(): lq = q(ids)
    assert (lq - ref).abs().max() < 0.1 * ref.abs().max() and (lq.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8
    p = use_packed_kernels(copy.deepcopy(q))
    assert isinstance(p.lm_head, PackedLinear8da4w) and p.lm_head.scale_dtype == torch.bfloat16
    with torch.no_grad(): lp = p(ids)
    assert (lp - lq).abs().max() < 1e-3 * lq.abs().max()
    with pytest.raises(QuantizationError, match="already 8da4w"): quantize_output_8da4w(q)
    with pytest.raises(QuantizationError, match="does not divide|divide"): quantize_output_8da4w(copy.deepcopy(m), 48)
    with pytest.raises(QuantizationError, match="EO8"): save_meta_quantized(q, tmp_path / "meta")
    assert not (tmp_path / "meta").exists()                                 # refused before writing anything
