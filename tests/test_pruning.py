"""Tests for llama32_nb.pruning: hook-based importance against a direct computation, slicing identities (FFN
neurons, query heads, blocks), transformers round-trip of pruned checkpoints, and named errors for bad targets."""
import math
import pytest
import torch
import torch.nn.functional as F
from llama32_nb.core import set_seed
from llama32_nb.decoder import Llama, LlamaConfig, attention_weights, causal_mask
from llama32_nb.pruning import (AGGREGATIONS, Accumulator, activation_importance, magnitude_importance,
                                random_importance, drop_loss_importance, importance, prune, select, slice_model,
                                zero_pruned, full_keep, check_keep, Keep, PruneError, rank_corr, fraction_targets)
from llama32_nb.pretraining import evaluate

torch.set_num_threads(2)


def cfg(**kw):
    return LlamaConfig(**{**dict(dim=48, n_layers=3, n_heads=6, n_kv_heads=2, vocab_size=97, ffn_dim=80,
                                 max_seq_len=32, tie_embeddings=True, head_dim=8), **kw})


@pytest.fixture(scope="module")
def model():
    set_seed(0)
    m = Llama(cfg()).eval()
    with torch.no_grad():                         # non-unit norm gains, so the channel scores are not trivial
        for p in m.parameters():
            if p.dim() == 1: p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
    return m


@pytest.fixture(scope="module")
def calib():
    return torch.randint(0, 97, (10, 12), generator=torch.Generator().manual_seed(1))


def agg(per_token: torch.Tensor) -> dict:
    "The three aggregations of per-token scores [B, T, C], written out from the formulas."
    return dict(l2_mean=per_token.mean(1).pow(2).sum(0).sqrt(), mean_mean=per_token.mean(1).mean(0),
                l2_l2=per_token.pow(2).sum((0, 1)).sqrt())


@torch.no_grad()
def direct_importance(m: Llama, x: torch.Tensor) -> dict:
    "The same scores, computed by re-doing the forward pass by hand (no hooks)."
    c = m.cfg
    h = m.embed_tokens(x)
    cos, sin = m.rope(torch.arange(x.shape[1]))
    mask = causal_mask(x.shape[1])
    heads, neurons, chans, blocks = [], [], [], []
    for layer in m.layers:
        a, f = layer.self_attn, layer.mlp
        n1 = layer.input_layernorm(h)
        q, k, v = a.qkv(n1, cos, sin)
        o = attention_weights(q, k, mask) @ v.repeat_interleave(c.n_rep, dim=1)     # [B, H, T, hd]
        heads.append(agg(o.norm(dim=-1).transpose(1, 2)))
        h2 = h + a.o_proj(o.transpose(1, 2).flatten(2))
        n2 = layer.post_attention_layernorm(h2)
        act = F.silu(f.gate_proj(n2)) * f.up_proj(n2)
        neurons.append(agg(act.abs()))
        out = h2 + f.down_proj(act)
        chans += [agg(n1.abs()), agg(n2.abs())]
        blocks.append(1 - torch.cosine_similarity(h, out, dim=-1).mean())
        h = out
    chans.append(agg(m.norm(h).abs()))
    return dict(heads={k: torch.stack([d[k] for d in heads]) for k in AGGREGATIONS},
                neurons={k: torch.stack([d[k] for d in neurons]) for k in AGGREGATIONS},
                channels={k: sum(d[k] for d in chans) for k in AGGREGATIONS}, blocks=torch.stack(blocks))


@pytest.mark.parametrize("fast", [True, False])
def test_hook_importance_equals_direct_computation(model, calib, fast):
    from llama32_nb.kernels import use_fast_kernels
    m = use_fast_kernels(slice_model(model, full_keep(model)), fast)
    got, want = activation_importance(m, calib, batch_size=3), direct_importance(m, calib)
    for unit in ("heads", "neurons", "channels"):
        for a in AGGREGATIONS:
            torch.testing.assert_close(got[unit][a], want[unit][a], rtol=1e-4, atol=1e-5, msg=f"{unit} {a}")
    torch.testing.assert_close(got["blocks"], want["blocks"], rtol=1e-4, atol=1e-5)
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in m.modules())   # hooks removed


def test_accumulator_streaming_equals_one_batch():
    a = torch.rand(7, 4, 5)
    one, two = Accumulator(), Accumulator()
    one.add(a); two.add(a[:3]); two.add(a[3:])
    for k in AGGREGATIONS: torch.testing.assert_close(one.result()[k], two.result()[k])
    with pytest.raises(ValueError, match="no activations"): Accumulator().result()


def test_identity_slice(model, calib):
    torch.testing.assert_close(slice_model(model, full_keep(model))(calib), model(calib), rtol=0, atol=0)


@pytest.mark.parametrize("keep_kw", [
    dict(neurons=lambda m: [[i for i in range(80) if i % 3] for _ in range(3)]),                 # FFN neurons
    dict(heads=lambda m: [[0, 2, 3, 5]] * 3),                                                    # 2 of 3 per group
    dict(heads=lambda m: [[1, 4], [0, 3], [2, 5]], neurons=lambda m: [list(range(0, 80, 2))] * 3),  # both
])
def test_pruned_logits_equal_zeroed_original(model, calib, keep_kw):
    k = full_keep(model)
    for name, f in keep_kw.items(): setattr(k, name, f(model))
    small, zeroed = slice_model(model, k), zero_pruned(model, k)
    assert small.num_params() < model.num_params()
    torch.testing.assert_close(small(calib), zeroed(calib), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(small(calib), model(calib), atol=1e-3)      # the pruning did change the function


def test_depth_pruning_equals_identity_block(model, calib):
    k = full_keep(model); k.layers = [0, 2]; k.heads = k.heads[:2]; k.neurons = k.neurons[:2]
    torch.testing.assert_close(slice_model(model, k)(calib), zero_pruned(model, k)(calib), rtol=1e-5, atol=1e-5)


def test_prune_keeps_top_units_within_groups(model, calib):
    s = activation_importance(model, calib)
    small = prune(model, calib, n_heads=2, ffn_dim=20, dim=32, n_layers=2, scores=s)
    c = small.cfg
    assert (c.n_heads, c.n_kv_heads, c.ffn_dim, c.dim, c.n_layers, c.head_dim) == (2, 2, 20, 32, 2, 8)
    k = select(model, s, n_heads=2, ffn_dim=20, dim=32, n_layers=2)
    for li, hs in zip(k.layers, k.heads):
        for g in range(2):                                       # one head per group: the group's best
            grp = s["heads"]["l2_mean"][li][g * 3:(g + 1) * 3]
            assert [h for h in hs if h // 3 == g] == [g * 3 + int(grp.argmax())]
    top = s["channels"]["l2_mean"].argsort(descending=True)[:32].sort().values.tolist()
    assert k.channels == top
    assert k.layers == sorted(s["blocks"].argsort(descending=True)[:2].tolist())


@pytest.mark.parametrize("method", ["activation", "magnitude", "random"])
def test_prune_methods_and_dtype_preserved(model, calib, method):
    small = prune(model.to(torch.bfloat16), calib, ffn_dim=40, n_heads=4, method=method)
    model.float()
    assert small.dtype == torch.bfloat16 and small.cfg.ffn_dim == 40 and small(calib).shape == (10, 12, 97)


def test_drop_loss_depth(model, calib):
    d = drop_loss_importance(model, calib)
    base = evaluate(model, calib)
    for i in range(3):
        k = full_keep(model); del k.layers[i], k.heads[i], k.neurons[i]
        assert math.isclose(d[i].item(), evaluate(slice_model(model, k), calib) - base, rel_tol=1e-5, abs_tol=1e-6)
    small = prune(model, calib, n_layers=2, depth="drop_loss")
    assert small.cfg.n_layers == 2


def test_pruned_checkpoint_round_trips_through_transformers(model, calib, tmp_path):
    transformers = pytest.importorskip("transformers")
    small = prune(model, calib, n_heads=4, ffn_dim=40, dim=40, n_layers=2)
    small.save_pretrained(tmp_path, dtype=torch.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad(): ref = hf(calib).logits
    torch.testing.assert_close(small(calib), ref, rtol=0, atol=1e-4)
    back = Llama.from_pretrained(tmp_path)
    assert back.cfg == small.cfg and torch.equal(back(calib), small(calib))


@pytest.mark.parametrize("kw, match", [
    (dict(n_heads=5), "multiple of n_kv_heads"), (dict(n_heads=8), "between 1 and"), (dict(ffn_dim=0), "between 1"),
    (dict(ffn_dim=81), "between 1 and the source's 80"), (dict(dim=0), "dim=0"), (dict(dim=49), "dim=49"),
    (dict(n_layers=4), "n_layers=4"), (dict(n_layers=1.5), "int or None"), (dict(n_heads=True), "int or None"),
    (dict(method="taylor"), "unknown importance method"), (dict(agg="max", ffn_dim=10), "unknown aggregation"),
    (dict(depth="nope", n_layers=2), "unknown depth"),
])
def test_bad_targets_raise_named_errors(model, calib, kw, match):
    with pytest.raises(PruneError, match=match): prune(model, calib, **kw)


def test_bad_calibration_and_keep(model, calib):
    with pytest.raises(ValueError, match="vocab"): prune(model, torch.full((2, 4), 97), ffn_dim=10)
    with pytest.raises(ValueError, match="max_seq_len"): prune(model, torch.zeros(1, 33, dtype=torch.long), ffn_dim=9)
    with pytest.raises(ValueError, match="calib_tokens"): activation_importance(model, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="needs calib_tokens"): importance(model, None, "activation")
    with pytest.raises(PruneError, match="same number of query heads"):
        check_keep(model, Keep([0], [[0, 1]], [list(range(80))], list(range(48))))
    with pytest.raises(PruneError, match="sorted, distinct"):
        check_keep(model, Keep([1, 0], [[0, 3]] * 2, [list(range(80))] * 2, list(range(48))))
    k = full_keep(model); k.channels = k.channels[:-1]
    with pytest.raises(PruneError, match="RMSNorm"): zero_pruned(model, k)
    with pytest.raises(TypeError): prune(torch.nn.Linear(2, 2), calib)


def test_baselines_shapes_and_rank_corr(model):
    m, r = magnitude_importance(model), random_importance(model, 3)
    for s in (m, r):
        assert s["heads"]["l2_mean"].shape == (3, 6) and s["neurons"]["l2_l2"].shape == (3, 80)
        assert s["channels"]["mean_mean"].shape == (48,) and s["blocks"].shape == (3,)
    assert torch.equal(random_importance(model, 3)["neurons"]["l2_mean"], r["neurons"]["l2_mean"])
    w = model.layers[1].mlp
    want = (w.gate_proj.weight[7].pow(2).sum() + w.up_proj.weight[7].pow(2).sum()
            + w.down_proj.weight[:, 7].pow(2).sum()).sqrt()
    torch.testing.assert_close(m["neurons"]["l2_mean"][1, 7], want.detach())
    assert rank_corr(torch.tensor([1., 2, 3]), torch.tensor([3., 2, 1])) == pytest.approx(-1.0)
    assert fraction_targets(model, ffn=0.5, heads=0.5, hidden=0.5, depth=0.34) == dict(ffn_dim=40, n_heads=4, dim=24,
                                                                                        n_layers=1)


def test_shipped_teacher_is_the_teacher_config_and_beats_the_student(tmp_path):
    "The shipped teacher loads as `teacher_config`, stays within the artifact budget, and its recorded from-scratch "
    "baseline (the student's shape on the teacher's budget) is worse by at least 0.15 nats on every seed."
    import json
    from llama32_nb.pruning import teacher_config, load_teacher
    from llama32_nb.distill import student_config
    from llama32_nb.pretraining import artifacts_dir
    d = artifacts_dir() / "teacher-llama"
    teacher, tok = load_teacher()
    assert teacher.cfg == teacher_config(tok.vocab_size)
    assert teacher.cfg.dim > 256 and teacher.cfg.n_layers > 4 and teacher.num_params() > 5_000_000
    assert (d / "model.safetensors").stat().st_size <= 12 * 2**20
    facts = json.loads((d / "training.json").read_text())
    assert facts["params"] == teacher.num_params()
    base = facts["student_from_scratch"]["seeds"]
    assert len(base) >= 2 and all(r["params"] == Llama(student_config(tok.vocab_size)).num_params()
                                  for r in base.values())
    assert all(r["final_val_loss"] - facts["final_val_loss"] >= 0.15 for r in base.values())
    with pytest.raises(FileNotFoundError, match="teacher"):
        load_teacher(tmp_path / "nowhere")
