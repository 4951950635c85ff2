"Robustness of llama32_nb.decoder: clear errors for bad configs, checkpoints and inputs; all-or-nothing loading."
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from llama32_nb.checkpoint import CheckpointError
from llama32_nb.decoder import Llama, LlamaConfig
from llama32_nb.generation import KVCache, sample_next

torch.set_num_threads(2)
PARAMS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32)
SC = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)


@pytest.mark.parametrize("kw,field", [
    (dict(dim=0), "dim"), (dict(dim=-64), "dim"), (dict(n_layers=0), "n_layers"), (dict(n_heads=0), "n_heads"),
    (dict(n_kv_heads=3), "n_kv_heads"), (dict(vocab_size=0), "vocab_size"), (dict(ffn_dim=-1), "ffn_dim"),
    (dict(head_dim=15), "head_dim"), (dict(dim=66), "n_heads"), (dict(max_seq_len=0), "max_seq_len"),
    (dict(norm_eps=0.0), "norm_eps"), (dict(rope_theta=-1.0), "rope_theta"), (dict(dim=64.0), "dim"),
    (dict(tie_embeddings="yes"), "tie_embeddings"), (dict(rope_scaling=dict(factor=8.0)), "rope_scaling"),
    (dict(rope_scaling={**SC, "foo": 1}), "foo"), (dict(rope_scaling={**SC, "factor": 0}), "factor"),
    (dict(rope_scaling={**SC, "rope_type": "yarn"}), "rope_type"),
    (dict(rope_scaling={**SC, "high_freq_factor": 0.5}), "high_freq_factor"),
    (dict(rope_scaling="llama3"), "rope_scaling"),
])
def test_bad_config_names_field(kw, field):
    with pytest.raises(ValueError, match=field): LlamaConfig.toy(**kw)


def test_presets_valid_and_hf_roundtrip():
    for c in (LlamaConfig.llama32_1b(), LlamaConfig.llama32_3b(), LlamaConfig.llama32_11b_text(),
              LlamaConfig.llama32_90b_text(), LlamaConfig.toy()):
        assert LlamaConfig.from_hf_dict(json.loads(json.dumps(c.to_hf_dict()))) == c
    assert LlamaConfig.llama32_11b_text().rope_scaling["factor"] == 8.0
    assert LlamaConfig.llama32_3b().rope_scaling["factor"] == 32.0
    with pytest.raises(ValueError, match="hidden_size"): LlamaConfig.from_hf_dict({"num_hidden_layers": 2})


@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    m = Llama(LlamaConfig.toy(tie_embeddings=False, rope_scaling=SC))
    return m, m.save_pretrained(tmp_path / "ck")


def expect_error(path, *words):
    with pytest.raises(CheckpointError) as e: Llama.from_pretrained(path)
    for w in words: assert w in str(e.value), (w, str(e.value))
    return str(e.value)


def test_missing_extra_misshaped_in_one_error(ckpt):
    m, d = ckpt
    sd = load_file(d / "model.safetensors")
    sd.pop("model.norm.weight"); sd.pop("lm_head.weight")
    sd["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(7, 64)
    sd["model.layers.9.mlp.up_proj.weight"] = torch.zeros(1)
    sd["model.layers.0.input_layernorm.weight"] = torch.zeros(64, dtype=torch.int32)
    save_file(sd, d / "model.safetensors")
    msg = expect_error(d, "missing tensor 'model.norm.weight'", "missing tensor 'lm_head.weight'",
                       "misshaped tensor 'model.layers.1.self_attn.k_proj.weight'",
                       "unexpected tensor 'model.layers.9.mlp.up_proj.weight'", "non-float")
    assert "5 problem(s)" in msg


def test_truncated_safetensors(ckpt):
    m, d = ckpt
    b = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(b[: len(b) - 1000])
    expect_error(d, "model.safetensors", "unreadable")


def test_truncated_shard_and_missing_shard(tmp_path):
    torch.manual_seed(0)
    m = Llama(LlamaConfig.toy())
    d = m.save_pretrained(tmp_path / "sh", max_shard_size=60_000)
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) >= 3
    b = shards[0].read_bytes(); shards[0].write_bytes(b[:100])
    shards[1].unlink()
    msg = expect_error(d, shards[0].name, shards[1].name, "missing tensor")
    assert msg.count("\n  - ") >= 3


def test_missing_config_and_dir(tmp_path, ckpt):
    m, d = ckpt
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"): Llama.from_pretrained(d)
    with pytest.raises(FileNotFoundError, match="does not exist"): Llama.from_pretrained(tmp_path / "nope")
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"): Llama.from_pretrained(d)


def test_bad_config_json_field(ckpt):
    m, d = ckpt
    c = json.loads((d / "config.json").read_text()); c["num_key_value_heads"] = 3
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(ValueError, match="n_kv_heads"): Llama.from_pretrained(d)


def test_config_shapes_disagree_with_weights(ckpt):
    m, d = ckpt
    c = json.loads((d / "config.json").read_text()); c["intermediate_size"] = 128
    (d / "config.json").write_text(json.dumps(c))
    msg = expect_error(d, "mlp.gate_proj.weight", "expected [128, 64]")
    assert msg.count("misshaped") == 6  # gate/up/down in both layers


def test_meta_truncated_and_bad(tmp_path):
    d = tmp_path / "meta"; d.mkdir()
    (d / "params.json").write_text(json.dumps(PARAMS))
    with pytest.raises(CheckpointError, match="consolidated"): Llama.from_pretrained(d)
    torch.save({"tok_embeddings.weight": torch.zeros(256, 64)}, d / "consolidated.00.pth")
    b = (d / "consolidated.00.pth").read_bytes(); (d / "consolidated.00.pth").write_bytes(b[: len(b) // 2])
    expect_error(d, "unreadable consolidated.00.pth")
    torch.save({"tok_embeddings.weight": torch.zeros(256, 64), "bogus": torch.zeros(2)}, d / "consolidated.00.pth")
    expect_error(d, "unexpected tensor 'bogus'", "missing tensor 'layers.0.attention.wq.weight'",
                 "missing tensor 'norm.weight'")


class Evil:  # an arbitrary object: weights_only=True must refuse to unpickle it
    pass


def test_meta_refuses_pickled_objects(tmp_path):
    d = tmp_path / "meta"; d.mkdir()
    (d / "params.json").write_text(json.dumps(PARAMS))
    torch.save({"tok_embeddings.weight": torch.zeros(256, 64), "x": Evil()}, d / "consolidated.00.pth")
    expect_error(d, "unreadable")


def test_token_errors():
    m = Llama(LlamaConfig.toy(max_seq_len=32))
    ok = torch.zeros(1, 4, dtype=torch.long)
    m(ok)
    with pytest.raises(ValueError, match="vocab_size"): m(torch.full((1, 4), 256))
    with pytest.raises(ValueError, match="vocab_size"): m(torch.full((1, 4), -1))
    with pytest.raises(TypeError, match="integer"): m(ok.float())
    with pytest.raises(TypeError, match="Tensor"): m([[1, 2]])
    with pytest.raises(ValueError, match=r"\[B, T\]"): m(ok[0])
    with pytest.raises(ValueError, match=r"\[B, T\]"): m(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len=32"): m(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len=32"): m(ok, start_pos=30)
    cache = KVCache(m.cfg, 1, 8)
    with pytest.raises(ValueError, match="KV cache too small"): m(torch.zeros(1, 9, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="max_len"): KVCache(m.cfg, 1, 64)


def test_generate_errors_and_limits():
    torch.manual_seed(0)
    m = Llama(LlamaConfig.toy(max_seq_len=32))
    with pytest.raises(ValueError, match="empty"): m.generate([], 4)
    with pytest.raises(ValueError, match="out of range"): m.generate([1, 999], 4)
    with pytest.raises(ValueError, match="max_seq_len"): m.generate([1] * 33, 4)
    with pytest.raises(ValueError, match="max_new_tokens"): m.generate([1], -1)
    with pytest.raises(ValueError, match="top_p"): m.generate([1], 4, temperature=1.0, top_p=1.5)
    with pytest.raises(ValueError, match="top_k"): m.generate([1], 4, temperature=1.0, top_k=0)
    assert len(m.generate([1] * 30, 10, stop_tokens=())) == 3  # stops at the end of the context
    assert m.generate([1, 2], 0) == []


def test_sampling_rules():
    g = torch.Generator().manual_seed(0)
    lg = torch.tensor([[3.0, 2.9, -5.0, -5.0]])
    assert sample_next(lg).item() == 0
    assert {sample_next(lg, 1.0, top_k=1, generator=g).item() for _ in range(50)} == {0}
    assert {sample_next(lg, 1.0, top_p=0.5, generator=g).item() for _ in range(50)} == {0}
    assert {sample_next(lg, 1.0, top_p=0.6, generator=g).item() for _ in range(200)} == {0, 1}
    assert sample_next(torch.randn(3, 10), 0.0).shape == (3,)


def test_stop_tokens_default_and_disabled():
    torch.manual_seed(0)
    m = Llama(LlamaConfig.toy(vocab_size=128256, n_layers=1, max_seq_len=64))
    free = m.generate([128000, 5], 12, stop_tokens=())
    stopper = free[3]
    assert m.generate([128000, 5], 12, stop_tokens=[stopper]) == free[:free.index(stopper)]
    assert m.generate([128000, 5], 12, stop_tokens=None) == free      # no tokenizer, no stop_tokens: none


def test_stop_tokens_come_from_the_tokenizer_on_the_tiny_model():
    "The shipped 2,048-token model stops at its own tokenizer's ids; Llama 3's ids are refused, not silently ignored."
    from llama32_nb.pretraining import load_artifacts
    model, tok = load_artifacts(device="cpu")
    assert model.cfg.vocab_size == 2048 and max(tok.stop_tokens) < 2048
    assert model.stop_ids(tokenizer=tok) == frozenset(tok.stop_tokens)
    prompt = tok.encode("ROMEO:\n")
    free = model.generate(prompt, 40, temperature=1.0, seed=3)
    stop = free[5]
    assert model.generate(prompt, 40, temperature=1.0, seed=3, stop_tokens=[stop]) == free[:free.index(stop)]
    class EndsText(torch.nn.Module):                                  # a head that makes <|end_of_text|> likely
        def __init__(self, head): super().__init__(); self.head = head
        def forward(self, h):
            z = self.head(h); z[..., tok.eos_id] += 30.0; return z
    model.lm_head = EndsText(model.lm_head)
    out = model.generate(prompt, 40, tokenizer=tok)
    assert out == [] and model.generate(prompt, 40, stop_tokens=())[0] == tok.eos_id   # stopped, EOS not yielded
    assert len(model.generate(prompt, 40)) == 40                       # no tokenizer: no stop ids, runs to the end
    with pytest.raises(ValueError, match="not ids of this model"): model.generate(prompt, 4, stop_tokens=[128001])
    with pytest.raises(ValueError, match="tokenizer="): model.chat("hi")
