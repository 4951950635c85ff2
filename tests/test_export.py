"GGUF export: Q8_0/Q4_0 bytes vs gguf.quants, round trip, damaged files, and parity with llama.cpp (llama-cpp-python)."
import pytest
import torch
from llama32_nb.decoder import Llama, LlamaConfig, llama3_scaling
from llama32_nb.export import (GGUFError, dequantize_blocks, export_gguf, load_gguf, quantize_q4_0, quantize_q8_0,
                               read_gguf)
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
