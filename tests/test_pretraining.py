"Tests for llama32_nb.pretraining: data packing/splitting, schedule, config validation, training and exact resume."
import math
import pytest
import torch
from llama32_nb.core import set_seed
from llama32_nb.decoder import Llama, LlamaConfig
from llama32_nb.pretraining import (split_text, tokenize_texts, pack_blocks, split_blocks, BlockLoader, lm_loss,
                                    batch_loss, evaluate, make_optimizer, lr_at, TrainConfig, Trainer,
                                    tiny_llama_config, tiny_train_config)

torch.set_num_threads(2)
V = 64


class ByteTok:
    "A stand-in tokenizer: one id per UTF-8 byte."
    vocab_size = 256
    def encode(self, s, bos=False, eos=False): return list(s.encode("utf-8"))
    def decode(self, ids): return bytes(ids).decode("utf-8", errors="replace")


def model_cfg(**kw): return LlamaConfig.toy(**{**dict(vocab_size=V, max_seq_len=32), **kw})


@pytest.fixture(scope="module")
def blocks():
    "A learnable synthetic corpus: a noisy cycle over the vocabulary, packed into 16+1-token rows."
    g = torch.Generator().manual_seed(0)
    ids = (torch.arange(20_000) * 7 % V + (torch.rand(20_000, generator=g) < 0.1).long()) % V
    return split_blocks(pack_blocks(ids, 16), 0.1)


# --- data ------------------------------------------------------------------------------------------
def test_split_text_roundtrip_and_bounds():
    text = "".join(f"SPEAKER {i}:\nline one of speech {i}\nline two\n\n" for i in range(200))
    pieces = split_text(text, 300)
    assert "".join(pieces) == text and max(map(len, pieces)) <= 300
    assert all(p.endswith("\n\n") for p in pieces[:-1])        # cut at blank lines when there is one
    assert split_text("abcdef", 4) == ["abcd", "ef"]             # no separator at all: a hard cut
    with pytest.raises(ValueError): split_text("", 10)
    with pytest.raises(ValueError): split_text("abc", 0)


def test_tokenize_texts_uses_datasets_map():
    ds = tokenize_texts(["hello", "wörld", "a"], ByteTok(), batch_size=2)
    assert ds.column_names == ["ids", "n_tokens"] and len(ds) == 3
    assert ds["n_tokens"][:] == [5, 6, 1] and ByteTok().decode(ds["ids"][1]) == "wörld"
    with pytest.raises(ValueError): tokenize_texts([], ByteTok())
    with pytest.raises(ValueError): tokenize_texts(["ok", 3], ByteTok())


def test_pack_blocks_contents():
    b = pack_blocks([[1, 2, 3], [4, 5, 6, 7]], block_size=2, sep_id=0)
    assert b.dtype == torch.long and b.tolist() == [[1, 2, 3], [0, 4, 5], [6, 7, 0]]
    b = pack_blocks(list(range(10)), block_size=3)              # a flat sequence; the tail (8, 9) is dropped
    assert b.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    b = pack_blocks(torch.arange(100), 9)
    assert b.shape == (10, 10) and torch.equal(b.flatten(), torch.arange(100))


def test_pack_blocks_errors():
    with pytest.raises(ValueError, match="fewer than one block"): pack_blocks([[1, 2, 3]], block_size=8)
    with pytest.raises(ValueError, match="fewer than one block"): pack_blocks([], block_size=8)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="block_size"): pack_blocks([list(range(100))], block_size=bad)


def test_split_blocks_deterministic_and_disjoint():
    b = torch.arange(100 * 5).view(100, 5)
    tr, va = split_blocks(b, 0.1)
    assert len(tr) == 90 and len(va) == 10 and torch.equal(torch.cat([tr, va]), b)
    assert torch.equal(split_blocks(b, 0.1)[1], va)
    assert len(split_blocks(b[:3], 0.01)[1]) == 1                # at least one validation block
    with pytest.raises(ValueError, match="cannot be split"): split_blocks(b[:1], 0.5)
    for bad in (0, 1, -0.1, 1.5, "0.1"):
        with pytest.raises(ValueError, match="val_frac"): split_blocks(b, bad)


def test_block_loader_order_is_a_function_of_the_step():
    tr = torch.arange(1000 * 17).view(1000, 17)                          # every row distinct
    dl = BlockLoader(tr, 8, seed=3)
    x, y = dl[5]
    assert x.shape == (8, 16) and torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(BlockLoader(tr, 8, seed=3)[5][0], x)              # fresh loader, same batch
    assert not torch.equal(BlockLoader(tr, 8, seed=4)[5][0], x)          # another seed, another order
    epoch = torch.cat([dl[i][0] for i in range(len(dl))])
    assert len(dl) == 125 and len({tuple(r.tolist()) for r in epoch}) == len(epoch) == 1000  # each block once per epoch
    assert not torch.equal(dl[0][0], dl[len(dl)][0])                     # each epoch reshuffles
    with pytest.raises(ValueError, match="larger than"): BlockLoader(tr[:4], 8)


# --- loss, schedule, config ----------------------------------------------------------------------
def test_lm_loss_uniform_is_log_vocab():
    assert math.isclose(lm_loss(torch.zeros(2, 3, V), torch.randint(0, V, (2, 3))).item(), math.log(V), rel_tol=1e-6)
    with pytest.raises(ValueError): lm_loss(torch.zeros(2, 3, V), torch.zeros(2, 4, dtype=torch.long))


def test_batch_loss_uses_the_model_loss_when_there_is_one():
    set_seed(0)
    m = Llama(model_cfg())
    x, y = torch.randint(0, V, (3, 16)), torch.randint(0, V, (3, 16))
    ref = lm_loss(m(x), y)
    calls = []
    m.loss = lambda a, b: calls.append(1) or Llama.loss(m, a, b)          # Llama's fused loss, counted
    assert torch.allclose(batch_loss(m, x, y), ref, atol=1e-6) and calls == [1]

    class Plain(torch.nn.Module):                                         # any model without .loss: logits + lm_loss
        def __init__(self): super().__init__(); self.inner = m
        def forward(self, t): return self.inner(t)
    assert torch.allclose(batch_loss(Plain(), x, y), ref, atol=1e-6) and calls == [1]


def test_lr_schedule_values():
    f = lambda s: lr_at(s, 1e-3, 10, 110, 1e-4)
    assert math.isclose(f(0), 1e-4) and math.isclose(f(4), 5e-4) and f(9) == 1e-3 and f(10) == 1e-3
    assert math.isclose(f(60), 0.5 * (1e-3 + 1e-4))                     # half way through the cosine
    assert math.isclose(f(110), 1e-4) and f(10_000) == 1e-4
    assert all(f(s) >= f(s + 1) for s in range(10, 120))                 # monotone after warmup
    assert lr_at(0, 1e-3, 0, 10) == 1e-3                                  # no warmup
    with pytest.raises(ValueError): lr_at(0, 1e-3, 10, 10)
    with pytest.raises(ValueError): lr_at(0, 1e-3, 1, 10, min_lr=1e-2)
    with pytest.raises(ValueError): lr_at(-1, 1e-3, 1, 10)


@pytest.mark.parametrize("bad", [dict(max_steps=0), dict(batch_size=2.5), dict(grad_accum=True), dict(lr=0),
                                 dict(lr=float("nan")), dict(min_lr=1.0), dict(warmup_steps=400),
                                 dict(beta2=1.0), dict(grad_clip=-1.0), dict(eval_batches=0), dict(bf16="yes"),
                                 dict(seed=-1), dict(weight_decay="0.1")])
def test_train_config_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="TrainConfig"): TrainConfig(**bad)


def test_optimizer_groups_and_tiny_shapes():
    m = Llama(model_cfg(tie_embeddings=True))
    o = make_optimizer(m, 1e-3, weight_decay=0.1)
    decay, no_decay = o.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert sum(p.numel() for g in o.param_groups for p in g["params"]) == m.num_params()
    c = tiny_llama_config(2048)
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.max_seq_len, c.tie_embeddings) == (256, 4, 8, 2, 256, True)
    assert tiny_train_config().warmup_steps < tiny_train_config().max_steps


# --- training --------------------------------------------------------------------------------------
def test_short_run_decreases_loss(blocks):
    tr, va = blocks
    set_seed(0)
    t = Trainer(Llama(model_cfg()), TrainConfig(max_steps=40, batch_size=8, lr=3e-3, warmup_steps=5, eval_every=20),
                tr, va, device="cpu")
    h = t.fit(progress=False)
    assert len(h["loss"]) == 40 and h["val_step"] == [0, 20, 40]
    assert h["val_loss"][0] > math.log(V) - 0.3 and h["val_loss"][-1] < h["val_loss"][0] - 1.0
    assert sum(h["loss"][-5:]) / 5 < h["loss"][0] - 1.0
    assert t.tokens_seen == 40 * 8 * 16 and t.tokens_per_second > 0
    assert h["lr"][4] == 3e-3 and all(g >= 0 for g in h["grad_norm"])


def test_grad_accumulation_matches_big_batch(blocks):
    tr, _ = blocks
    tr = tr[: len(tr) // 8 * 8]                                          # epochs of equal length for both loaders
    cfg = dict(max_steps=3, lr=1e-3, warmup_steps=1, grad_clip=0.0)
    set_seed(0); a = Trainer(Llama(model_cfg()), TrainConfig(batch_size=8, grad_accum=1, **cfg), tr, device="cpu")
    set_seed(0); b = Trainer(Llama(model_cfg()), TrainConfig(batch_size=4, grad_accum=2, **cfg), tr, device="cpu")
    a.fit(progress=False); b.fit(progress=False)
    assert all(math.isclose(x, y, rel_tol=1e-5) for x, y in zip(a.history["loss"], b.history["loss"]))
    assert all(torch.allclose(p, q, atol=1e-5) for p, q in zip(a.model.parameters(), b.model.parameters()))


def test_checkpoint_resume_reproduces_losses_exactly(blocks, tmp_path):
    tr, va = blocks
    cfg = TrainConfig(max_steps=12, batch_size=4, grad_accum=2, lr=2e-3, warmup_steps=3, eval_every=4, eval_batches=2)
    set_seed(7); ref = Trainer(Llama(model_cfg()), cfg, tr, va, device="cpu"); ref.fit(progress=False)
    set_seed(7); a = Trainer(Llama(model_cfg()), cfg, tr, va, device="cpu")
    a.fit(until=5, progress=False, ckpt_dir=tmp_path / "ckpt")              # "interrupted" after step 5
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["model.safetensors", "trainer.json",
                                                                      "trainer.safetensors"]
    set_seed(99)                                                            # a different process state
    b = Trainer.resume(tmp_path / "ckpt", Llama(model_cfg()), tr, va, device="cpu")
    assert b.step == 5 and b.cfg == cfg
    b.fit(progress=False)
    assert b.history["loss"] == ref.history["loss"]                         # bit-identical
    assert b.history["val_loss"] == ref.history["val_loss"] and b.history["lr"] == ref.history["lr"]
    assert all(torch.equal(p, q) for p, q in zip(ref.model.parameters(), b.model.parameters()))


def test_checkpoint_periodic_and_errors(blocks, tmp_path):
    tr, va = blocks
    cfg = TrainConfig(max_steps=6, batch_size=4, warmup_steps=1, eval_every=3, eval_batches=1)
    t = Trainer(Llama(model_cfg()), cfg, tr, va, device="cpu")
    t.fit(progress=False, ckpt_dir=tmp_path / "c", ckpt_every=2)
    assert not (tmp_path / "c.tmp").exists()
    with pytest.raises(ValueError, match="different TrainConfig"):
        Trainer(Llama(model_cfg()), TrainConfig(max_steps=7, batch_size=4, warmup_steps=1),
                tr, va).load_checkpoint(tmp_path / "c")
    with pytest.raises(FileNotFoundError): Trainer.resume(tmp_path / "nope", Llama(model_cfg()), tr, va)
    (tmp_path / "c" / "trainer.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        Trainer(Llama(model_cfg()), cfg, tr, va).load_checkpoint(tmp_path / "c")


def test_trainer_rejects_bad_inputs(blocks):
    tr, va = blocks
    with pytest.raises(ValueError, match="max_seq_len"): Trainer(Llama(model_cfg(max_seq_len=8)), TrainConfig(), tr, va)
    with pytest.raises(TypeError): Trainer(Llama(model_cfg()), dict(max_steps=3), tr, va)
    with pytest.raises(ValueError, match="larger than"):
        Trainer(Llama(model_cfg()), TrainConfig(batch_size=10_000), tr, va)
    with pytest.raises(ValueError, match="val_blocks"): Trainer(Llama(model_cfg()), TrainConfig(), tr, va[:, :5])


def test_bf16_autocast_step_and_evaluate(blocks):
    tr, va = blocks
    t = Trainer(Llama(model_cfg()), TrainConfig(max_steps=2, batch_size=4, warmup_steps=1, bf16=True, eval_batches=1),
                tr, va, device="cpu")
    t.fit(progress=False)
    assert all(math.isfinite(l) for l in t.history["loss"]) and next(t.model.parameters()).dtype == torch.float32
    v32, v16 = evaluate(t.model, va[:8], 4), evaluate(t.model, va[:8], 4, bf16=True)
    assert abs(v32 - v16) < 0.1 and math.isfinite(v16)


# --- artifacts -----------------------------------------------------------------------------------
needs_hf = pytest.mark.skipif(not hasattr(Llama, "save_pretrained"), reason="decoder has no save_pretrained yet")


@needs_hf
def test_save_and_load_artifacts_roundtrip(tmp_path):
    from llama32_nb.tokenizer import Tokenizer
    from llama32_nb.pretraining import save_artifacts, load_artifacts
    tok = Tokenizer.train(["to be or not to be, that is the question " * 20], 300)
    set_seed(0); m = Llama(model_cfg(vocab_size=tok.vocab_size))
    save_artifacts(m, tok, tmp_path / "a", extra=dict(note="test"))
    m2, tok2 = load_artifacts(tmp_path / "a", device="cpu")
    x = torch.tensor([tok.encode("to be or not")])
    assert torch.allclose(m(x), m2(x), atol=1e-5) and tok2.encode("question") == tok.encode("question")
    with pytest.raises(FileNotFoundError, match="make recipe"): load_artifacts(tmp_path / "missing")


SHIPPED = None
try:
    from llama32_nb.pretraining import artifacts_dir
    SHIPPED = artifacts_dir() / "tiny-llama"
except Exception: pass


@needs_hf
@pytest.mark.skipif(SHIPPED is None or not (SHIPPED / "config.json").is_file(),
                    reason="artifacts/tiny-llama not shipped")
def test_shipped_tiny_llama_is_small_and_trained():
    from llama32_nb.pretraining import load_artifacts, corpus_blocks
    assert sum(f.stat().st_size for f in SHIPPED.iterdir()) < 10_500_000
    model, tok = load_artifacts(SHIPPED, device="cpu")
    assert model.cfg == tiny_llama_config(tok.vocab_size) and tok.vocab_size == 2048
    _, val = corpus_blocks(tok, model.cfg.max_seq_len, progress=False)
    assert evaluate(model, val[:16], 8) < 5.5                       # far below ln(2048) = 7.6


@needs_hf
@pytest.mark.skipif(SHIPPED is None or not (SHIPPED / "config.json").is_file(),
                    reason="artifacts/tiny-llama not shipped")
def test_shipped_tiny_llama_loads_in_transformers():
    transformers = pytest.importorskip("transformers")
    from llama32_nb.pretraining import load_artifacts
    model, tok = load_artifacts(SHIPPED, device="cpu")
    hf = transformers.AutoModelForCausalLM.from_pretrained(SHIPPED, dtype=torch.float32).eval()
    x = torch.tensor([tok.encode("ROMEO:\nWhat light through yonder window breaks?")])
    with torch.no_grad(): assert torch.allclose(hf(x).logits, model(x), atol=1e-4)
