"""Tests for llama32_nb.longctx: chunked prefill vs the unchunked forward, RoPE scaling methods vs transformers, the
retrieval harness (oracle), the staged-extension plumbing."""
import math, random
from dataclasses import replace
import pytest
import torch
import torch.nn as nn
from llama32_nb.core import set_seed
from llama32_nb.decoder import Llama, LlamaConfig, llama3_scaling
from llama32_nb.generation import kv_cache_bytes
from llama32_nb.pretraining import load_artifacts
from llama32_nb.longctx import (ROPE_METHODS, LongContextConfig, LongLlama, check_rope_method, rope_scaling,
                                scaled_rope, long_context, merge_attention, attention_lse, chunk_attention_plain,
                                chunk_attention_fast, prefill, kv_cache_int8_bytes, prefill_memory, passkey_item,
                                niah_item, passkey_items, oracle_answerer, model_answerer, score, niah_grid,
                                heldout_ids, long_rows, loss_by_position, extension_blocks, ExtensionConfig,
                                extend_context, PASSKEY_INTRO, PASSKEY_NEEDLE, answer_nll, answer_scores, compare_extension,
                                extension_summary)

torch.set_num_threads(2)


def small_cfg(**kw):
    "A tiny GQA model (4 query / 2 kv heads) with llama3 scaling and an 8K window: fast enough for 8,192 tokens."
    return LlamaConfig(**{**dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, ffn_dim=64,
                                 max_seq_len=8192, rope_scaling=llama3_scaling(8, 1024)), **kw})


@pytest.fixture(scope="module")
def model():
    set_seed(0)
    return Llama(small_cfg(), fast=False).eval()


@pytest.fixture(scope="module")
def long_tokens():
    return torch.randint(0, 64, (1, 8193), generator=torch.Generator().manual_seed(1))


def reference(model, tokens):
    "Last logits and the KV cache of the decoder's own unchunked forward."
    T = tokens.shape[1]
    cache = model.new_cache(1, T)
    with torch.no_grad(): logits = model(tokens, 0, cache)[:, -1]
    return logits, cache


def check_equal(model, tokens, chunk, fast, ref=None):
    logits, cache = ref or reference(model, tokens)
    got, c = prefill(model, tokens, chunk_size=chunk, fast=fast)
    T = tokens.shape[1]
    assert got.shape == (1, model.cfg.vocab_size) and c.max_len == T
    assert (got - logits).abs().max() <= 1e-5, (T, chunk, fast)
    assert (c.k - cache.k).abs().max() <= 1e-5 and (c.v - cache.v).abs().max() <= 1e-5


# ---- chunked prefill ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [1, 7, 300, 1025])
@pytest.mark.parametrize("chunk", [1, 64, 500, 4096])
@pytest.mark.parametrize("fast", [True, False])
def test_prefill_equals_forward(model, long_tokens, T, chunk, fast):
    if chunk == 1 and T > 7: pytest.skip("one token at a time: covered at short lengths")
    check_equal(model, long_tokens[:, :T], chunk, fast)


def test_prefill_8192(model, long_tokens):
    "The longest case once per attention kernel, sharing the reference forward."
    ref = reference(model, long_tokens[:, :8192])
    check_equal(model, long_tokens[:, :8192], 1000, True, ref)
    check_equal(model, long_tokens[:, :8192], 2048, False, ref)


def test_prefill_gqa_variants_and_fast_kernels(long_tokens):
    "Multi-query (1 kv head), plain multi-head without scaling, 8 heads on 2, and the model's own speed layer on."
    for kw in [dict(n_kv_heads=1), dict(n_kv_heads=4, rope_scaling=None), dict(n_heads=8, n_kv_heads=2, dim=64)]:
        set_seed(0)
        m = Llama(small_cfg(**kw), fast=False).eval()
        check_equal(m, long_tokens[:, :400], 96, None)
    set_seed(0)
    m = Llama(small_cfg()).eval()                                 # FastLinear / FastSDPA swapped in
    assert m.fast
    logits, _ = reference(m, long_tokens[:, :300])
    got, _ = prefill(m, long_tokens[:, :300], 128)
    assert (got - logits).abs().max() <= 1e-4


def test_prefill_continues_generation(model, long_tokens):
    T = 2000
    got, cache = prefill(model, long_tokens[:, :T], 256, max_len=T + 1)
    with torch.no_grad():
        nxt = model(long_tokens[:, T:T + 1], T, cache, last_only=True)[:, -1]
        full = model(long_tokens[:, :T + 1])[:, -1]
    assert (nxt - full).abs().max() <= 1e-5
    ans = model_answerer(model, 512)(long_tokens[0, :300].tolist(), 3)
    ids = long_tokens[0, :300].tolist()
    assert ans == model.generate(ids, max_new_tokens=3)


def test_prefill_uses_modules(model, long_tokens):
    "Hooks fire on every chunk, and a swapped-in module takes effect (the same way as in the decoder's forward)."
    calls = []
    h = model.layers[1].mlp.down_proj.register_forward_hook(lambda *a: calls.append(1))
    prefill(model, long_tokens[:, :100], 25)
    h.remove()
    assert len(calls) == 4

    class Doubled(nn.Linear):
        def forward(self, x): return 2 * super().forward(x)
    set_seed(0)
    m = Llama(small_cfg(), fast=False).eval()
    before, _ = prefill(m, long_tokens[:, :200], 64)
    old = m.layers[0].self_attn.o_proj
    new = Doubled(old.in_features, old.out_features, bias=False); new.weight = old.weight
    m.layers[0].self_attn.o_proj = new
    after, _ = prefill(m, long_tokens[:, :200], 64)
    ref, _ = reference(m, long_tokens[:, :200])
    assert (after - before).abs().max() > 1e-3 and (after - ref).abs().max() <= 1e-5


def test_prefill_bad_input(model):
    with pytest.raises(ValueError, match="max_seq_len"): prefill(model, torch.zeros(1, 8193, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size"): prefill(model, torch.zeros(1, 10, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="too small"):
        prefill(model, torch.zeros(1, 10, dtype=torch.long), cache=model.new_cache(1, 5))
    with pytest.raises(ValueError, match="vocab"): prefill(model, torch.full((1, 4), 64))
    with pytest.raises(TypeError): prefill(model, torch.zeros(1, 4))


def test_attention_pieces():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 6, 9, 8, generator=g), torch.randn(2, 3, 9, 8, generator=g),
               torch.randn(2, 3, 9, 8, generator=g))
    o, lse = attention_lse(q, k, v, causal=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.allclose(o, ref, atol=1e-6)
    kp, vp = torch.randn(2, 3, 50, 8, generator=g), torch.randn(2, 3, 50, 8, generator=g)
    full_k, full_v = torch.cat([kp, k], 2), torch.cat([vp, v], 2)
    mask = torch.arange(59)[None] <= (50 + torch.arange(9))[:, None]
    ref = torch.nn.functional.scaled_dot_product_attention(q, full_k, full_v, attn_mask=mask, enable_gqa=True)
    assert torch.allclose(chunk_attention_plain(q, kp, vp, k, v, block=16), ref, atol=1e-6)
    assert torch.allclose(chunk_attention_fast(q, kp, vp, k, v), ref, atol=1e-5)
    a, la = attention_lse(q, kp[:, :, :20], vp[:, :, :20])
    b, lb = attention_lse(q, kp[:, :, 20:], vp[:, :, 20:])
    m, lm = merge_attention(a, la, b, lb)
    assert torch.allclose(m, attention_lse(q, kp, vp)[0], atol=1e-6)


def test_memory_accounting(model):
    cache = model.new_cache(1, 3000)
    assert cache.k.nbytes + cache.v.nbytes == kv_cache_bytes(model.cfg, 3000, torch.float32)
    assert kv_cache_bytes(LlamaConfig.llama32_1b(), 131072) == 4 * 2 ** 30
    assert kv_cache_bytes(LlamaConfig.llama32_3b(), 131072) == 14 * 2 ** 30
    assert kv_cache_int8_bytes(LlamaConfig.llama32_1b(), 131072) == 2 * 16 * 8 * 68 * 131072
    m = prefill_memory(model.cfg, 131072, 1024)
    assert m["kv_cache"] == kv_cache_bytes(model.cfg, 131072, torch.float32)
    assert m["weights"] == model.num_params() * 4 and m["total"] == sum(v for k, v in m.items() if k != "total")
    assert prefill_memory(model.cfg, 262144, 1024)["activations"] == m["activations"]   # O(T): only the cache grows


# ---- RoPE scaling methods ------------------------------------------------------------------------------------------
def hf_inv_freq(rs, head_dim=32, theta=5e5, max_pos=4096):
    from transformers import LlamaConfig as HFConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    c = HFConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim, max_position_embeddings=max_pos,
                 rope_parameters={"rope_theta": theta, **rs})
    return ROPE_INIT_FUNCTIONS[rs["rope_type"]](c, "cpu")


@pytest.mark.parametrize("rs", [rope_scaling("linear", 4.0), rope_scaling("llama3", 16.0, 256),
                                rope_scaling("llama3", 32.0, 8192), rope_scaling("yarn", 16.0, 256),
                                rope_scaling("yarn", 8.0, 1024, beta_fast=16.0, beta_slow=2.0)])
@pytest.mark.parametrize("head_dim", [32, 64])
def test_frequencies_match_transformers(rs, head_dim):
    ours, t = scaled_rope(head_dim, 5e5, rs)
    theirs, t_hf = hf_inv_freq(rs, head_dim)
    assert torch.allclose(ours, theirs.float(), rtol=1e-6, atol=0) and math.isclose(t, t_hf, rel_tol=1e-9)


def test_ntk_keeps_fast_end_and_divides_slow_end():
    plain, _ = scaled_rope(32, 5e5, None)
    ntk, _ = scaled_rope(32, 5e5, rope_scaling("ntk", 16.0))
    assert ntk[0] == plain[0] and torch.isclose(ntk[-1], plain[-1] / 16, rtol=1e-5)
    assert (ntk <= plain).all() and (ntk >= plain / 16 * (1 - 1e-5)).all()


@pytest.mark.parametrize("method", ["linear", "yarn", "llama3", "ntk"])
def test_long_llama_matches_transformers(tmp_path, method):
    "Past the original length, our scaled model and transformers' (reading our config.json) give the same logits."
    from transformers import LlamaForCausalLM
    set_seed(0)
    m = long_context(Llama(small_cfg(rope_scaling=None, max_seq_len=128), fast=False),
                     rope_scaling(method, 4.0, 128), 512).eval()
    m.save_pretrained(tmp_path, dtype=torch.float32)
    hf = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    x = torch.randint(0, 64, (1, 500), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(): ours, theirs = m(x), hf(x).logits
    assert (ours - theirs).abs().max() <= 1e-4


@pytest.mark.parametrize("bad, msg", [
    (dict(rope_type="linear", factor=0.5), "factor.*>= 1"),
    (dict(rope_type="llama3", factor=0.9, low_freq_factor=1.0, high_freq_factor=4.0,
          original_max_position_embeddings=256), "factor.*>= 1"),
    (dict(rope_type="llama3", factor=8.0, low_freq_factor=4.0, high_freq_factor=4.0,
          original_max_position_embeddings=256), "high_freq_factor"),
    (dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0), "missing.*high_freq_factor"),
    (dict(rope_type="yarn", factor=8.0), "missing.*original_max_position_embeddings"),
    (dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=256, beta_fast=1.0, beta_slow=2.0),
     "beta_fast"),
    (dict(rope_type="linear", factor=2.0, low_freq_factor=1.0), "unexpected.*low_freq_factor"),
    (dict(factor=2.0), "rope_type"), (dict(rope_type="dynamic", factor=2.0), "unknown rope_type"),
    (dict(rope_type="yarn", factor=2.0, original_max_position_embeddings=256.5), "integer"),
    (dict(rope_type="linear", factor=float("nan")), "factor"), ("llama3", "dict"),
])
def test_bad_scaling_configs(bad, msg):
    with pytest.raises(ValueError, match=msg): check_rope_method(bad)
    with pytest.raises(ValueError, match=msg): LongContextConfig.toy(rope_scaling=bad)
    with pytest.raises(ValueError, match=msg): long_context(Llama(LlamaConfig.toy(), fast=False), bad)


def test_rope_scaling_helper():
    assert rope_scaling("none") is None
    assert rope_scaling("llama3", 32, 8192) == {"rope_type": "llama3", **llama3_scaling(32)}
    with pytest.raises(ValueError, match="original_len"): rope_scaling("yarn", 4)
    assert set(ROPE_METHODS) == {"none", "linear", "ntk", "llama3", "yarn"}


def test_changing_scaling_takes_effect():
    set_seed(0)
    base = Llama(small_cfg(rope_scaling=None, max_seq_len=256), fast=False).eval()
    x = torch.randint(0, 64, (1, 600), generator=torch.Generator().manual_seed(0))
    a = long_context(base, rope_scaling("llama3", 4.0, 256), 1024)
    with torch.no_grad(): la = a(x)
    b = long_context(a, rope_scaling("yarn", 4.0, 256), 1024)              # rescale the already-scaled model
    with torch.no_grad(): lb = b(x)
    fresh = LongLlama(b.cfg, fast=False).eval(); fresh.load_state_dict(base.state_dict())
    with torch.no_grad(): lf = fresh(x)
    assert (la - lb).abs().max() > 1e-4 and torch.allclose(lb, lf, atol=1e-6)
    assert a.embed_tokens is base.embed_tokens and base.cfg.max_seq_len == 256   # same weights, original untouched
    b.cfg.rope_scaling = rope_scaling("linear", 4.0)                            # in place on the config
    with torch.no_grad(): lc = b(x)
    assert (lc - lb).abs().max() > 1e-4
    with pytest.raises(ValueError, match="max_seq_len"): a(torch.zeros(1, 1025, dtype=torch.long))
    with torch.no_grad(): assert torch.allclose(long_context(base, None)(x[:, :256]), base(x[:, :256]), atol=1e-6)
    with pytest.raises(TypeError): long_context(nn.Linear(2, 2))


# ---- retrieval harness ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    return load_artifacts(device="cpu")[1]


def test_passkey_items(tok):
    items = passkey_items(tok, 1024, 30, seed=3)
    assert items == passkey_items(tok, 1024, 30, seed=3)                     # reproducible
    assert len({it.key for it in items}) > 25 and all(10000 <= it.key <= 99999 for it in items)
    for it in items:
        assert 1024 - 40 < len(it.prompt) <= 1024
        text = tok.decode(it.prompt)
        assert PASSKEY_NEEDLE.format(key=it.key) in text and text.endswith("The pass key is")
        assert tok.decode(it.answer) == f" {it.key}"
    a, b = passkey_item(tok, 1000, 0.0, 12345), passkey_item(tok, 1000, 1.0, 12345)
    assert a.needle_at == len(tok.encode(PASSKEY_INTRO)) and b.needle_at > 900
    with pytest.raises(ValueError, match="too short"): passkey_item(tok, 50, 0.5, 12345)
    with pytest.raises(ValueError, match="depth"): passkey_item(tok, 500, 1.5, 12345)


def test_oracle_scores_100_and_scorer_can_fail(tok):
    hay = heldout_ids(tok)
    oracle = oracle_answerer(tok)
    items = passkey_items(tok, 4096, 50)
    assert score(oracle, items) == 1.0
    wrong = [items[(i + 1) % 50].__class__(it.prompt, items[(i + 1) % 50].answer, it.needle_at, it.key)
             for i, it in enumerate(items)]
    assert score(oracle, wrong) == 0.0
    assert score(lambda p, n: [0] * n, items) == 0.0
    g = niah_grid(oracle, tok, hay, [128, 1000, 4096], [0, .1, .5, .9, 1], trials=2)
    assert g.shape == (3, 5) and g.min() == 1.0


def test_niah_item(tok):
    hay = heldout_ids(tok)
    for d in (0, .3, .77, 1):
        it = niah_item(tok, hay, 2000, d, 4242)
        assert len(it.prompt) == 2000 and "The special magic number is 4242." in tok.decode(it.prompt)
        before = tok.decode(it.prompt[:it.needle_at])
        assert it.needle_at == 0 or before.rstrip(" ").endswith((".", "!", "?", "\n"))
        assert abs(it.needle_at - d * 2000) < 300
    with pytest.raises(ValueError, match="haystack"): niah_item(tok, hay[:100], 2000, .5, 1)


# ---- loss by position, staged extension ----------------------------------------------------------------------------
def test_loss_by_position(tok):
    set_seed(0)
    m = Llama(LlamaConfig.toy(vocab_size=2048, max_seq_len=64), fast=False).eval()
    rows = long_rows(heldout_ids(tok), 64, 3)
    assert rows.shape == (3, 65) and torch.equal(rows[1, :5], torch.tensor(heldout_ids(tok)[65:70]))
    per = loss_by_position(m, rows)
    with torch.no_grad():
        ref = torch.stack([torch.nn.functional.cross_entropy(m(r[None, :-1])[0], r[1:], reduction="none")
                           for r in rows]).mean(0)
    assert per.shape == (64,) and torch.allclose(per, ref, atol=1e-5)
    with pytest.raises(ValueError, match="rows"): long_rows([1, 2, 3], 64, 1)


def test_extension_blocks_and_extend_context(tok):
    ids = heldout_ids(tok)
    b, train = extension_blocks(tok, ids, 192, 10, retrieval_frac=0.5, seed=0)
    assert b.shape == train.shape == (10, 193) and train.dtype == torch.bool
    docs = [(r, t) for r, t in zip(b.tolist(), train.tolist()) if "What is the pass key? The pass key is" in tok.decode(r)]
    assert len(docs) == 5
    for r, t in docs:                                            # each retrieval row ends with its own key
        key = tok.decode(r[-6:]).strip()
        assert PASSKEY_NEEDLE.format(key=key) in tok.decode(r)
        it = passkey_item(tok, 193 - 6, 0.0, int(key))           # the prompt's length does not depend on the depth
        n_pre = 193 - len(it.prompt) - len(it.answer)
        assert t == [True] * n_pre + [False] * len(it.prompt) + [True] * len(it.answer)   # corpus + answer only
    assert sum(all(t) for _, t in zip(b.tolist(), train.tolist())) == 5                   # corpus rows: every token
    b2, t2 = extension_blocks(tok, ids, 192, 10, retrieval_frac=0.5, seed=0)
    assert torch.equal(b, b2) and torch.equal(train, t2)
    set_seed(0)
    m = Llama(LlamaConfig.toy(vocab_size=2048, max_seq_len=128), fast=False)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    val = long_rows(ids, 128, 2)
    ext, rows = extend_context(m, tok, ids, ExtensionConfig(stages=(160, 192), steps=2, batch_size=2), val,
                               eval_fn=lambda mm, L: {"len": mm.cfg.max_seq_len})
    assert [r["stage"] for r in rows] == [128, 160, 192] and all(r["len"] == 192 for r in rows)
    assert ext.cfg.rope_scaling["rope_type"] == "llama3" and ext.cfg.rope_scaling["factor"] == 1.5
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())   # the original is untouched
    assert any(not torch.equal(v, ext.state_dict()[k]) for k, v in before.items())
    ext2, _ = extend_context(m, tok, ids, ExtensionConfig(stages=(192,), steps=2, batch_size=2, method="none"), val)
    assert ext2.cfg.rope_scaling is None and ext2.cfg.max_seq_len == 192


def test_answer_nll_is_the_teacher_forced_loss_per_digit(tok):
    tiny = load_artifacts(device="cpu")[0]
    items = passkey_items(tok, 300, 3, seed=2) + passkey_items(tok, 200, 2, seed=3, digits=3)
    total = 0.0
    with torch.no_grad():
        for it in items:                                         # one full forward over prompt + answer
            ids = torch.tensor([it.prompt + it.answer])
            logp = long_context(tiny, None, 512)(ids[:, :-1])[0].float().log_softmax(-1)[-len(it.answer):]
            total -= logp[torch.arange(len(it.answer)), torch.tensor(it.answer)].sum().item()
    want = total / sum(len(str(it.key)) for it in items)
    assert abs(answer_nll(tiny, items, chunk_size=64) - want) < 1e-4 * want


def test_answer_scores_accuracy_is_greedy_exact_match(tok):
    """The accuracy from one teacher-forced pass equals greedy decoding's exact match, on items a model gets right
    and wrong: a toy 'model' that copies the key after the needle is faked by giving each item the model's own greedy
    continuation as its answer (all hits), and the true answers (misses)."""
    tiny = load_artifacts(device="cpu")[0]
    items = passkey_items(tok, 240, 4, seed=5)
    greedy = model_answerer(tiny)
    own = [replace(it, answer=greedy(it.prompt, len(it.answer))) for it in items]
    assert answer_scores(tiny, own)[0] == score(greedy, own) == 1.0
    mixed = own[:2] + items[2:]
    assert answer_scores(tiny, mixed)[0] == score(greedy, mixed) == 0.5


def test_compare_extension_rows_and_summary(tok):
    set_seed(0)
    m = Llama(LlamaConfig.toy(vocab_size=2048, max_seq_len=96), fast=False)
    ids = heldout_ids(tok)
    val, long_val = long_rows(ids, 96, 2), long_rows(ids, 4 * 160, 1)
    res = compare_extension(m, tok, ids, val, (160,), steps=1, batch_size=2, seeds=(0, 1), methods=("llama3", "none"),
                            trials=1, long_val=long_val)
    assert set(res) == {("llama3", 0), ("llama3", 1), ("none", 0), ("none", 1)}
    last = res["llama3", 0][1][-1]
    assert {"passkey@160", "passkey@640", "nll/digit@160", "nll/digit@640", "loss@0..160", "loss@160..640"} <= set(last)
    summ = extension_summary(res, 5.0)
    assert [r["method"] for r in summ] == ["llama3", "none"] and all(r["seeds"] == 2 for r in summ)
    d = [res["none", s][1][-1]["val_loss"] - 5.0 for s in (0, 1)]
    assert summ[1]["val_loss_delta"] == pytest.approx((sum(d) / 2, min(d), max(d)))


def test_shipped_extension_experiment_belongs_to_the_shipped_model(tok):
    """`artifacts/tiny-llama/extension_experiment.json` (scripts/longctx_experiment.py, read by notebook 15 and the
    README) was made on the shipped model, holds >= 2 seeds per method, and its summary follows from its own runs."""
    import json
    from llama32_nb.pretraining import artifacts_dir, evaluate
    full = json.loads((artifacts_dir() / "tiny-llama" / "extension_experiment.json").read_text())
    tiny = load_artifacts(device="cpu")[0]
    ids = heldout_ids(tok)
    assert abs(evaluate(tiny, long_rows(ids, 256, full["val_blocks"])) - full["original_val_loss"]) < 1e-4
    final = full["stages"][-1]
    with torch.no_grad():
        base = loss_by_position(long_context(tiny, None, 4 * final), long_rows(ids, 4 * final, full["long_rows"]))
    assert torch.allclose(base[:len(base) // 64 * 64].view(-1, 64).mean(1), torch.tensor(full["original_curve"]),
                          atol=1e-4)
    assert set(full["runs"]) == {"llama3", "linear", "none"} and all(len(r) >= 2 for r in full["runs"].values())
    res = {(m, int(s)): (None, r["rows"]) for m, runs in full["runs"].items() for s, r in runs.items()}
    for got, want in zip(extension_summary(res, full["original_val_loss"]), full["summary"]):
        assert got["method"] == want["method"]
        for k, v in got.items():
            if isinstance(v, tuple): assert v == pytest.approx(tuple(want[k]), abs=1e-9), k
    for runs in full["runs"].values():
        for r in runs.values():
            assert [row["stage"] for row in r["rows"]] == [256] + full["stages"]
