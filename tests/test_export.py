"""GGUF export: Q8_0/Q4_0 bytes vs gguf.quants, round trip, damaged files, and parity with llama.cpp
(llama-cpp-python). ExecuTorch export: the .pte run by the ExecuTorch runtime vs our eager model (fp32 and 8da4w),
damaged files, bad calls."""
import copy, hashlib
import pytest
import torch
from llama32_nb.decoder import Llama, LlamaConfig, llama3_scaling
from llama32_nb.export import (GGUFError, PTE_TRAILER_BYTES, PTE_TRAILER_MAGIC, PTEError, ExportLinear8da4w,
                               ExportLlama, StaticKVCache, dequantize_blocks, export_executorch, export_form,
                               export_gguf, load_executorch, load_gguf, pte_vs_eager, quantize_q4_0, quantize_q8_0,
                               read_gguf)
from llama32_nb.generation import KVCache
from llama32_nb.quant import Linear8da4w, QuantizationError, prepare_qat, quantize_8da4w
from llama32_nb.pretraining import artifacts_dir, load_artifacts

gguf = pytest.importorskip("gguf")
TEXTS = ["ROMEO: But soft, what light through yonder window breaks?", "Hello, world! 12345", "   spaces\n\nand\tTABS",
         "KING HENRY V:\nOnce more unto the breach, dear friends, once more;"]


@pytest.fixture(scope="module")
def tiny():
    if not (artifacts_dir() / "tiny-llama" / "config.json").is_file(): pytest.skip("no artifacts/tiny-llama")
    return load_artifacts(device="cpu")


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    return {qt: export_gguf(tiny[0], tiny[1], d / f"tiny-{qt}.gguf", qt) for qt in ("F32", "F16", "Q8_0", "Q4_0")}


@pytest.mark.parametrize("seed", [0, 1])
def test_blocks_byte_identical_to_gguf(seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 256, generator=g) * torch.logspace(-3, 1, 48)[:, None]
    w[0] = 0; w[1, :32] = 0; w[2, 5] = 1e4; w[3] = -w[3].abs()          # zero blocks, an outlier, one sign
    w[4, :32] = torch.arange(32) - 15.5                                  # ties at .5 after scaling
    for ours, qt in ((quantize_q8_0, gguf.GGMLQuantizationType.Q8_0), (quantize_q4_0, gguf.GGMLQuantizationType.Q4_0)):
        ref = gguf.quants.quantize(w.numpy(), qt)
        assert ours(w).numpy().tobytes() == ref.tobytes(), qt
        back = gguf.quants.dequantize(ref, qt)
        assert torch.equal(dequantize_blocks(ours(w), qt.name, 256), torch.from_numpy(back))


def test_round_trip(tiny, files):
    model, tok = tiny
    ids = torch.tensor([tok.encode(TEXTS[0])])
    with torch.no_grad():
        ref = model(ids)
        for qt, tol in (("F32", 0.0), ("F16", 5e-2), ("Q8_0", 0.3), ("Q4_0", 3.0)):
            back, tok2 = load_gguf(files[qt])
            assert tok2.fingerprint == tok.fingerprint and back.cfg == model.cfg
            assert (back(ids) - ref).abs().max().item() <= tol, qt


def test_rope_scaling_untied_round_trip(tmp_path, tiny):
    tok = tiny[1]
    torch.manual_seed(0)
    cfg = LlamaConfig.toy(vocab_size=tok.n_words, rope_scaling=llama3_scaling(32, 64), tie_embeddings=False)
    m = Llama(cfg).eval()
    p = export_gguf(m, tok, tmp_path / "m.gguf", "F32")
    meta, tensors = read_gguf(p)
    assert "rope_freqs.weight" in tensors and "output.weight" in tensors
    back, _ = load_gguf(p)
    ids = torch.randint(0, cfg.vocab_size, (1, 20))
    with torch.no_grad(): assert torch.equal(back(ids), m(ids))


def test_bad_files(tmp_path, files):
    data = files["Q8_0"].read_bytes()
    cases = {"truncated": data[: len(data) // 2], "header only": data[:100], "empty": b"",
             "magic": b"GGUX" + data[4:], "version": data[:4] + (7).to_bytes(4, "little") + data[8:]}
    msgs = {"truncated": "truncated", "header only": "truncated", "empty": "truncated", "magic": "bad magic",
            "version": "version 7"}
    for name, blob in cases.items():
        f = tmp_path / f"{name}.gguf"; f.write_bytes(blob)
        with pytest.raises(GGUFError, match=msgs[name]): load_gguf(f)
    _, tensors = read_gguf(files["F32"])                           # NaNs in a tensor
    raw = tensors["blk.0.attn_q.weight"][2]
    blob = bytearray(files["F32"].read_bytes())
    i = bytes(blob).find(raw[:64].tobytes())                          # where that tensor's data starts
    assert i > 0
    blob[i:i + 4] = bytes.fromhex("0000c07f")                         # a float32 NaN
    f = tmp_path / "nan.gguf"; f.write_bytes(bytes(blob))
    with pytest.raises(GGUFError, match="non-finite"): load_gguf(f)


def test_export_refuses_bad_models(tmp_path, tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="qtype"): export_gguf(model, tok, tmp_path / "x.gguf", "Q5_K")
    small = Llama(LlamaConfig.toy()).eval()
    with pytest.raises(ValueError, match="vocab_size"): export_gguf(small, tok, tmp_path / "x.gguf")
    odd = Llama(LlamaConfig.toy(vocab_size=tok.n_words, dim=48, n_heads=4, n_kv_heads=2, ffn_dim=96)).eval()
    with pytest.raises(ValueError, match="divisible by 32"): export_gguf(odd, tok, tmp_path / "x.gguf", "Q4_0")
    from llama32_nb.quant import quantize_8da4w
    with pytest.raises(ValueError, match="dequantize"):
        export_gguf(quantize_8da4w(Llama(LlamaConfig.toy(vocab_size=tok.n_words))), tok, tmp_path / "x.gguf")


# ---- llama.cpp itself --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp")


def _llama(llama_cpp, path, n_ctx=128):
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=2, logits_all=True, verbose=False, type_k=0, type_v=0,
                           n_batch=n_ctx)


def test_llama_cpp_tokenizer(llama_cpp, tiny, files):
    tok = tiny[1]
    lm = _llama(llama_cpp, files["F32"])
    for s in TEXTS:
        assert lm.tokenize(s.encode(), add_bos=False, special=False) == tok.encode(s), s
    assert lm.tokenize(b"<|begin_of_text|>hi", add_bos=False, special=True) == tok.encode(
        "<|begin_of_text|>hi", allowed_special="all")


def test_llama_cpp_f32_logits_and_greedy(llama_cpp, tiny, files):
    model, tok = tiny
    ids = tok.encode(TEXTS[3], bos=True)
    lm = _llama(llama_cpp, files["F32"])
    lm.eval(ids)
    theirs = torch.tensor(lm.scores[len(ids) - 1])
    with torch.no_grad(): ours = model(torch.tensor([ids]))[0, -1]
    assert (theirs - ours).abs().max().item() < 1e-4
    lm.reset()
    gen = []
    for t in lm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        gen.append(t)
        if len(gen) == 32: break
    with torch.no_grad(): ours_gen = model.generate(ids, max_new_tokens=32, temperature=0.0, stop_tokens=[])
    assert gen == ours_gen


@pytest.mark.parametrize("qt, tol", [("Q8_0", 0.05), ("Q4_0", 0.05)])
def test_llama_cpp_quantized_vs_dequantized(llama_cpp, tiny, files, qt, tol):
    tok = tiny[1]
    deq, _ = load_gguf(files[qt])                                        # our model with the file's weights
    ids = tok.encode(TEXTS[0], bos=True)
    lm = _llama(llama_cpp, files[qt])
    lm.eval(ids)
    theirs = torch.tensor(lm.scores[:len(ids)])
    with torch.no_grad(): ours = deq(torch.tensor([ids]))[0]
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.9
    assert theirs[-1].argmax() == ours[-1].argmax()
    rel = ((theirs - ours).abs().max() / ours.abs().max()).item()
    assert rel < tol, rel


# ---- ExecuTorch (.pte): the program run by the ExecuTorch runtime --------------------------------------------------
# 8da4w: XNNPACK keeps each int4 group's scale in bfloat16 and computes the per-token int8 parameters and rounding
# with its own float arithmetic, so the .pte's logits differ from our eager 8da4w model's (fp32 scales) by more than
# fp32 rounding: up to 0.073 measured on the shipped tiny model (logits ~10; 12 prompts, 9 steps each), where
# quantization itself changes them by ~0.25. Tolerance: 0.15; the .pte must also be nearer our 8da4w model than our
# fp32 one (its weights really are int4) and give the same greedy tokens.
TOL_8DA4W = 0.15
LONG = ("ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun. Arise, "
        "fair sun, and kill the envious moon")


@pytest.fixture(scope="module")
def executorch():
    return pytest.importorskip("executorch")


@pytest.fixture(scope="module")
def ptes(executorch, tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("pte")
    before = {k: v.clone() for k, v in tiny[0].state_dict().items()}
    out = {q: export_executorch(tiny[0], d / f"tiny-{q}.pte", qmode=q) for q in ("fp32", "8da4w")}
    after = tiny[0].state_dict()                                      # the model itself is left as it was
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    return out


def test_export_forms_equal_eager(tiny):
    model, tok = tiny
    ids = torch.tensor([tok.encode(TEXTS[0])])
    with torch.no_grad():
        assert (export_form(model)(ids) - model(ids)).abs().max() < 1e-4
        q = quantize_8da4w(copy.deepcopy(model))
        assert (export_form(q)(ids) - q(ids)).abs().max() < 1e-4
        prog, cache = ExportLlama(export_form(model), 64), model.new_cache(1, 64)
        assert (prog(ids, torch.tensor([0])) - model(ids, 0, cache)).abs().max() < 1e-4
        nxt = torch.tensor([[7]])
        assert (prog(nxt, torch.tensor([ids.shape[1]])) - model(nxt, ids.shape[1], cache)).abs().max() < 1e-4
    torch.manual_seed(0)
    lin = Linear8da4w.from_linear(torch.nn.Linear(128, 48, bias=False))
    lin.add_lora(4, 2.0); torch.nn.init.normal_(lin.adaptor.B.weight)
    x = torch.randn(5, 128) * 3
    with torch.no_grad(): assert torch.equal(ExportLinear8da4w(lin)(x), lin(x))


def test_static_kv_cache():
    cfg = LlamaConfig.toy()
    static, eager = StaticKVCache(cfg, 16), KVCache(cfg, 1, 16)
    k, v = torch.randn(2, 1, cfg.n_kv_heads, 5, cfg.head_dim).unbind(0)
    ek, ev = eager.update(1, k, v, 3)
    sk, sv = static.update(1, k, v, torch.tensor([3]))
    assert torch.equal(sk[:, :, :8], ek) and torch.equal(sv[:, :, :8], ev) and sk[:, :, 8:].eq(0).all()
    static.reset()
    assert all(b.eq(0).all() for b in static.buffers())
    with pytest.raises(ValueError, match="max_seq_len"): StaticKVCache(cfg, cfg.max_seq_len + 1)


def test_pte_fp32_matches_eager(tiny, ptes):
    model, tok = tiny
    r = load_executorch(ptes["fp32"])
    assert (r.qmode, r.max_seq_len, r.prefill_len, r.vocab_size) == ("fp32", 256, 32, model.cfg.vocab_size)
    for text in (TEXTS[0], LONG):                                     # one padded chunk; two chunks (> 32 tokens)
        ids = tok.encode(text, bos=True)
        assert max(pte_vs_eager(r, model, ids, steps=6)) <= 1e-4, text
        assert r.generate(ids, 24) == model.generate(ids, 24)


def test_pte_random_toy_model(executorch, tmp_path):
    torch.manual_seed(0)                   # llama3 RoPE scaling, untied head, GQA; a window that is not a multiple
    cfg = LlamaConfig.toy(rope_scaling=llama3_scaling(4, 32), tie_embeddings=False, max_seq_len=60, n_layers=1)
    model = Llama(cfg).eval()
    r = load_executorch(export_executorch(model, tmp_path / "toy.pte", prefill_len=8))
    ids = torch.randint(0, cfg.vocab_size, (58,)).tolist()           # chunks of 8, then 2 tokens through decode
    assert max(pte_vs_eager(r, model, ids, steps=2)) <= 1e-4
    assert max(pte_vs_eager(r, model, ids[:5], steps=4)) <= 1e-4     # a prompt shorter than one chunk
    assert r.generate(ids[:5], 60) == model.generate(ids[:5], 60)    # to the end of the cache (56 new tokens)


def test_pte_8da4w_matches_eager(tiny, ptes):
    model, tok = tiny
    r = load_executorch(ptes["8da4w"])
    assert r.qmode == "8da4w" and ptes["8da4w"].stat().st_size < ptes["fp32"].stat().st_size / 2
    q = quantize_8da4w(copy.deepcopy(model))
    for text in TEXTS + [LONG]:
        ids = tok.encode(text, bos=True)
        d = pte_vs_eager(r, q, ids, steps=6)
        assert max(d) <= TOL_8DA4W and d[0] < pte_vs_eager(r, model, ids, steps=0)[0], text
    for text in (TEXTS[0], LONG):
        ids = tok.encode(text, bos=True)
        assert r.generate(ids, 24) == q.generate(ids, 24), text


def test_pte_bad_files(tmp_path, ptes):
    data = ptes["8da4w"].read_bytes()
    prog = data[:-PTE_TRAILER_BYTES]
    seg_base = int.from_bytes(data[24:32], "little")

    def flip(i): return data[:i] + bytes([data[i] ^ 0x10]) + data[i + 1:]
    cases = {"truncated": (data[: len(data) // 2], "truncated"), "header only": (data[:64], "truncated"),
             "empty": (b"", "truncated"), "not a pte": (b"GGUF" + bytes(100), "not an ExecuTorch program"),
             "no trailer": (prog, "no llama32-nb trailer"), "trailer cut": (data[:-10], "bytes follow the program"),
             "program byte": (flip(300), "corrupted"), "weight byte": (flip(seg_base + 1000), "corrupted"),
             "last byte": (flip(len(data) - 1), "corrupted")}
    for name, (blob, msg) in cases.items():
        f = tmp_path / f"{name.replace(' ', '_')}.pte"; f.write_bytes(blob)
        with pytest.raises(PTEError, match=msg): load_executorch(f)
    bad = bytearray(prog); bad[200:260] = bytes(60)                 # damaged inside, with a matching checksum
    f = tmp_path / "damaged.pte"; f.write_bytes(bytes(bad) + PTE_TRAILER_MAGIC + hashlib.sha256(bad).digest())
    with pytest.raises(PTEError, match="refused"): load_executorch(f)
    with pytest.raises(FileNotFoundError): load_executorch(tmp_path / "missing.pte")


def test_pte_bad_calls(ptes):
    r = load_executorch(ptes["fp32"])
    with pytest.raises(ValueError, match="max_seq_len"): r([1, 2, 3], start_pos=254)
    with pytest.raises(ValueError, match="one sequence"): r(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="out of range"): r([r.vocab_size])
    with pytest.raises(ValueError, match="out of range"): r([-1])
    with pytest.raises(ValueError, match="cached"): r([5], start_pos=4)
    with pytest.raises(ValueError): r(torch.zeros(1, 3))                                   # floats
    with pytest.raises(ValueError): r([])
    with pytest.raises(ValueError): r([1], start_pos=-1)
    with pytest.raises(ValueError, match="exceeds max_seq_len"): r.generate([1] * 257, 4)
    with pytest.raises(ValueError, match="stop tokens"): r.generate([1], 4, stop_tokens=[10**6])
    r([1, 2, 3]); r([4], start_pos=3); r([9], start_pos=1)            # rewinding is allowed
    with pytest.raises(ValueError, match="cached"): r([5], start_pos=3)


def test_export_executorch_refuses(tiny, tmp_path):
    model = tiny[0]
    with pytest.raises(ValueError, match="qmode"): export_executorch(model, tmp_path / "x.pte", qmode="int8")
    with pytest.raises(ValueError, match="max_seq_len"): export_executorch(model, tmp_path / "x.pte", max_seq_len=257)
    with pytest.raises(ValueError, match="prefill_len"):
        export_executorch(model, tmp_path / "x.pte", max_seq_len=16, prefill_len=32)
    with pytest.raises(QuantizationError, match="multiple of 32"):
        export_executorch(model, tmp_path / "x.pte", qmode="8da4w", group_size=16)
    with pytest.raises(QuantizationError, match="QATLinear"):
        export_executorch(prepare_qat(copy.deepcopy(model)), tmp_path / "x.pte")
    with pytest.raises(TypeError): export_executorch(torch.nn.Linear(2, 2), tmp_path / "x.pte")
    assert not (tmp_path / "x.pte").exists()


def test_pte_runs_no_python_from_the_file(ptes, monkeypatch):
    import builtins, pickle
    def refuse(*a, **k): raise AssertionError("eval/exec/pickle called while loading or running a .pte")
    for mod, name in ((builtins, "eval"), (builtins, "exec"), (pickle, "loads"), (pickle, "load")):
        monkeypatch.setattr(mod, name, refuse)
    r = load_executorch(ptes["8da4w"])
    assert len(r.generate([1, 2, 3], 8)) == 8
