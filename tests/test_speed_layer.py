"""The speed layer keeps PyTorch's module semantics: every weight is used through its module on every path (hooks fire,
swapped modules take effect), the fast model equals the plain reference, kernels are chosen by measurement and never
slower than F.linear, and derived state follows the config."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from llama32_nb.decoder import Llama, LlamaConfig, RMSNorm, llama3_scaling
import llama32_nb.kernels as kernels
from llama32_nb.kernels import (ATTENTION_KERNELS, KERNELS, KERNEL_CHOICES, SDPA, FastLinear, FastSDPA, _Linear,
                                blocked_attention, chunked_cross_entropy, fast_attention, fast_linear, kernel_report,
                                pick, time_kernels, use_fast_kernels)

torch.set_num_threads(2)
CFG = LlamaConfig.toy(vocab_size=300, max_seq_len=64, rope_scaling=llama3_scaling(4, 16))


def pair(seed=0, **kw):
    "The default (fast) model and the plain reference, with the same weights."
    torch.manual_seed(seed)
    cfg = LlamaConfig.toy(**{**dict(vocab_size=300, max_seq_len=64, rope_scaling=llama3_scaling(4, 16)), **kw})
    fast = Llama(cfg)
    plain = Llama(cfg, fast=False); plain.load_state_dict(fast.state_dict())
    return fast, plain


def watched(model):
    return [m for m in model.modules() if isinstance(m, (nn.Linear, RMSNorm, nn.Embedding))]


PATHS = {
    "inference": lambda m, x, y: m(x),
    "cached decode": lambda m, x, y: ([m(x[:, :5], 0, c := m.new_cache(2, 12))]
                                      + [m(x[:, t:t + 1], t, c) for t in range(5, 12)]),
    "training": lambda m, x, y: F.cross_entropy(m(x).flatten(0, 1), y.flatten()).backward(),
    "model.loss": lambda m, x, y: m.loss(x, y).backward(),
    "generate": lambda m, x, y: m.generate(x[0, :4].tolist(), 6, temperature=1.0, seed=0),
}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("fast", [True, False])
def test_every_hook_fires_on_every_path(path, fast):
    "A forward hook and a forward pre-hook on every projection, norm, the embedding and lm_head fire on each path."
    model = pair()[0 if fast else 1]
    x, y = torch.randint(0, 300, (2, 12)), torch.randint(0, 300, (2, 12))
    fired, pre = set(), set()
    mods = watched(model)
    assert sum(isinstance(m, nn.Linear) for m in mods) == 7 * CFG.n_layers + 1 and model.lm_head in mods
    hooks = [m.register_forward_hook(lambda m, i, o: fired.add(m)) for m in mods]
    hooks += [m.register_forward_pre_hook(lambda m, i: pre.add(m)) for m in mods]
    try: PATHS[path](model, x, y)
    finally:
        for h in hooks: h.remove()
    assert fired == pre == set(mods), [n for n, m in model.named_modules() if m in set(mods) - fired]


class Scaled(nn.Module):
    "Any module with a projection's call signature (a LoRA wrapper, a fake-quantized linear): here, 3 x the projection."
    def __init__(self, base): super().__init__(); self.base, self.calls = base, 0
    def forward(self, x): self.calls += 1; return 3.0 * self.base(x)


@pytest.mark.parametrize("name", ["layers.0.self_attn.q_proj", "layers.1.self_attn.v_proj", "layers.0.mlp.gate_proj",
                                  "layers.1.mlp.down_proj", "lm_head"])
def test_a_swapped_projection_takes_effect_on_every_path(name):
    fast, plain = pair()
    parent, attr = fast.get_submodule(name.rsplit(".", 1)[0]) if "." in name else fast, name.rsplit(".", 1)[-1]
    swapped = Scaled(getattr(parent, attr)); setattr(parent, attr, swapped)
    if name == "lm_head": plain.lm_head.weight = nn.Parameter(plain.lm_head.weight.detach().clone())  # untie the copy
    with torch.no_grad(): plain.get_submodule(name).weight.mul_(3.0)   # what the swap should amount to
    x, y = torch.randint(0, 300, (2, 12)), torch.randint(0, 300, (2, 12))
    for path, run in PATHS.items():
        n = swapped.calls
        run(fast, x, y)
        assert swapped.calls > n, path
    fast.zero_grad(); plain.zero_grad()
    torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.loss(x, y), plain.loss(x, y), rtol=1e-5, atol=1e-5)
    assert fast.generate(x[0, :4].tolist(), 8) == plain.generate(x[0, :4].tolist(), 8)


def test_fast_equals_plain_within_1e5():
    "Logits, cached decode, loss and every gradient of the default model equal the plain reference (fp32)."
    fast, plain = pair(1)
    x, y = torch.randint(0, 300, (3, 40)), torch.randint(0, 300, (3, 40))
    y[0, :7] = -100
    with torch.inference_mode(): torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)
    lf, lp = fast.loss(x, y), plain.loss(x, y)
    assert abs(lf.item() - lp.item()) < 1e-5
    lf.backward(); lp.backward()
    for (n, a), b in zip(fast.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=n)
    assert fast.generate([1, 2, 3], 20) == plain.generate([1, 2, 3], 20)


@pytest.mark.parametrize("shape", [(1, 256), (1, 1, 256), (5, 256), (2, 7, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_candidate_kernel_equals_f_linear(shape, dtype):
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(512, 256, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)
    x2, ref = x.reshape(-1, 256), F.linear(x, w).reshape(-1, 512)
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    checked = 0
    with torch.inference_mode():
        for name, k in KERNELS.items():
            if not k.fits(x2, w): continue
            try: y = k(x2, w)
            except RuntimeError: continue                            # this build / CPU has no such kernel
            torch.testing.assert_close(y.float(), ref.float(), **tol, msg=name); checked += 1
        torch.testing.assert_close(fast_linear(x, w).float(), F.linear(x, w).float(), **tol)
    one_row = x2.shape[0] == 1
    assert checked >= (4 if one_row else 2 if dtype == torch.bfloat16 else 1)   # bf16 rows: + fp32 blocks


@pytest.mark.parametrize("rows", [1, 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_bias_goes_with_every_kernel(rows, dtype, monkeypatch):
    "Without gradients `fast_linear(x, w, b)` equals `F.linear(x, w, b)` whichever kernel is chosen; with, it is it."
    g = torch.Generator().manual_seed(3)
    w, b, x = (torch.randn(*s, generator=g).to(dtype) for s in ((512, 256), (512,), (rows, 256)))
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=3e-2)
    ref, ran = F.linear(x, w, b), []
    with torch.inference_mode():
        for name, k in KERNELS.items():
            if not k.fits(x, w): continue
            try: k(x, w)
            except RuntimeError: continue
            monkeypatch.setattr(kernels, "inference_kernel", lambda x2, w, name=name: name)
            torch.testing.assert_close(fast_linear(x, w, b).float(), ref.float(), **tol, msg=name); ran.append(name)
    assert "F.linear" in ran and len(ran) >= 2
    monkeypatch.undo()
    bg = b.clone().requires_grad_()                                     # a bias that learns: F.linear's autograd
    fast_linear(x, w, bg).sum().backward()
    assert torch.equal(bg.grad, torch.full_like(b, rows))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_blocks_cover_every_output_row(dtype):
    "A weight of 4,100 rows x 256 is converted in blocks of 4,096 rows: the last block is a partial one."
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(4100, 256, generator=g).to(dtype), torch.randn(3, 256, generator=g).to(dtype)
    exact, ran = F.linear(x.float(), w.float()), 0
    for name in ("fp32 blocks", "fp32 blocks onednn"):
        try: y = KERNELS[name](x, w)
        except RuntimeError: continue
        ran += 1
        assert y.dtype == dtype and y.shape == (3, 4100)
        eps = torch.finfo(dtype).eps                                  # the fp32 result, rounded once: within one step
        assert ((y.float() - exact).abs() <= exact.abs() * eps + 1e-3).all(), name
    assert ran >= 1                                                   # the F.linear variant runs everywhere


@pytest.mark.parametrize("fwd,bwd", [("F.linear", "onednn"), ("onednn", "F.linear"), ("onednn", "onednn")])
def test_training_kernel_pairs_give_autograd_gradients(fwd, bwd):
    x = torch.randn(64, 96, requires_grad=True); w = torch.randn(80, 96, requires_grad=True)
    try: torch.ops.mkldnn._linear_pointwise(x.detach(), w.detach(), None, "none", [], "")
    except RuntimeError: pytest.skip("no oneDNN linear in this build")
    g = torch.randn(64, 80)
    gx, gw = torch.autograd.grad(_Linear.apply(x, w, fwd, bwd), (x, w), g)
    rx, rw = torch.autograd.grad(F.linear(x, w), (x, w), g)
    torch.testing.assert_close(gx, rx, rtol=1e-4, atol=1e-4); torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-4)
    (gx2,) = torch.autograd.grad(_Linear.apply(x, w.detach(), fwd, bwd), (x,), g)   # frozen weight: input grad only
    torch.testing.assert_close(gx2, rx, rtol=1e-4, atol=1e-4)


def test_pick_is_never_slower_than_the_reference():
    assert pick({"F.linear": 1.0, "a": 0.99, "b": 0.96}) == "F.linear"          # within the 5% margin: keep F.linear
    assert pick({"F.linear": 1.0, "a": 0.5, "b": 0.9}) == "a"
    assert pick({"F.linear": 0.5, "a": 0.9}) == "F.linear"
    ticks = iter(range(10_000))
    calls = {"slow": 0, "fast": 0}
    def slow(): calls["slow"] += 1; next(ticks); next(ticks)        # each call costs two ticks of the fake clock
    def fast(): calls["fast"] += 1
    t = time_kernels({"F.linear": slow, "fast": fast}, budget=4, timer=lambda: next(ticks))
    assert t == {"F.linear": 3, "fast": 1} and calls["slow"] == calls["fast"] >= 3   # interleaved, same number of calls
    assert pick(t) == "fast"


def test_choices_are_measured_per_kind_and_reported():
    KERNEL_CHOICES.clear()
    lin = FastLinear(128, 384, bias=False)
    with torch.inference_mode():
        lin(torch.randn(1, 128)); lin(torch.randn(1, 128)); lin(torch.randn(33, 128))
    lin(torch.randn(20, 128, requires_grad=True)).sum().backward()
    kinds = {(k[0], k[-2]) for k in KERNEL_CHOICES}
    assert kinds == {("inference", 1), ("inference", 64), ("training", 32)}
    rows = kernel_report()
    assert len(rows) == 3 and all(r["choice"] for r in rows) and all(r["weight"] == "384x128" for r in rows)
    one_row = next(r for r in rows if r["kind"] == "inference" and r["rows"] == 1)
    assert {"F.linear", "mv"} <= set(one_row["ms"]) and one_row["choice"] in KERNELS


def test_use_fast_kernels_swaps_and_keeps_state():
    fast, plain = pair()
    assert all(type(m) is FastLinear for m in fast.modules() if isinstance(m, nn.Linear))
    assert fast.lm_head.weight is fast.embed_tokens.weight                    # tied weights stay tied
    q = plain.layers[0].self_attn.q_proj
    seen = []
    q.register_forward_hook(lambda m, i, o: seen.append(1))
    weight = q.weight
    use_fast_kernels(plain)
    assert plain.fast and type(plain.layers[0].self_attn.q_proj) is FastLinear
    assert plain.layers[0].self_attn.q_proj.weight is weight and plain.lm_head.weight is plain.embed_tokens.weight
    plain(torch.zeros(1, 3, dtype=torch.long)); assert seen == [1]           # the hook moved with the module
    custom = Scaled(nn.Linear(4, 4)); plain.layers[0].mlp.up_proj = custom
    use_fast_kernels(plain, False)
    assert not plain.fast and plain.layers[0].mlp.up_proj is custom and type(custom.base) is nn.Linear
    assert all(not isinstance(m, FastLinear) for m in plain.modules())


def test_rope_frequencies_follow_the_config():
    "Changing the RoPE fields of a built model's config recomputes the frequencies (what the 128K notebook does)."
    fast, _ = pair(rope_scaling=None)
    x = torch.randint(0, 300, (1, 60))
    before = fast(x)
    f0 = fast.inv_freq("cpu").clone()
    fast.cfg.rope_scaling = {"rope_type": "llama3", **llama3_scaling(8, 16)}
    assert not torch.equal(fast.inv_freq("cpu"), f0)
    after = fast(x)
    ref = Llama(LlamaConfig.toy(vocab_size=300, max_seq_len=64, rope_scaling=llama3_scaling(8, 16)), fast=False)
    ref.load_state_dict(fast.state_dict())
    torch.testing.assert_close(after, ref(x), rtol=1e-5, atol=1e-5)
    fast.cfg.rope_theta = 1234.0
    assert not torch.allclose(fast(x), after)
    fast.cfg.rope_theta, fast.cfg.rope_scaling = 500000.0, None
    torch.testing.assert_close(fast(x), before)
    fast.cfg.rope_scaling = {"factor": 8.0}
    with pytest.raises(ValueError, match="rope_scaling"): fast(x)


def test_chunked_cross_entropy_edges():
    h, head = torch.randn(10, 8, requires_grad=True), nn.Linear(8, 50, bias=False)
    t = torch.randint(0, 50, (10,))
    for bad_t, what in [(t[:5], "shape"), (t.float(), "integer"), (torch.full((10,), 50), "targets must be in"),
                        (torch.full((10,), -2), "targets must be in")]:
        with pytest.raises((ValueError, TypeError), match=what): chunked_cross_entropy(head, h, bad_t, 50)
    with pytest.raises(ValueError, match="rows"): chunked_cross_entropy(head, h, t, 50, rows=0)
    assert torch.isnan(chunked_cross_entropy(head, h, torch.full((10,), -100), 50))
    with torch.no_grad():
        assert math.isclose(chunked_cross_entropy(head, h, t, 50, rows=3).item(),
                            F.cross_entropy(head(h), t).item(), rel_tol=1e-6)
    m = Llama(LlamaConfig.toy(vocab_size=50))
    with pytest.raises(ValueError, match="targets"):
        m.loss(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="vocab_size"):
        m.loss(torch.full((1, 4), 50), torch.zeros(1, 4, dtype=torch.long))


def _masks(T, S):
    g = torch.Generator().manual_seed(3)
    return {"causal": torch.ones(T, S, dtype=torch.bool).tril(S - T),      # a chunk read after S - T cached positions
            "random": torch.rand(T, S, generator=g) < 0.4}


@pytest.mark.parametrize("T,S", [(128, 128), (200, 200), (150, 410)])
@pytest.mark.parametrize("mask", ["causal", "random"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_attention_kernel_equals_sdpa(T, S, mask, dtype):
    "Every attention candidate gives SDPA's output and gradients, for causal and arbitrary masks and ragged blocks."
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, T, 16, generator=g).to(dtype).requires_grad_()
    k, v = (torch.randn(2, 2, S, 16, generator=g).to(dtype).requires_grad_() for _ in "kv")
    m = _masks(T, S)[mask]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)
    gref = torch.autograd.grad(ref.float().square().sum(), (q, k, v))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for name, kernel in ATTENTION_KERNELS.items():
        out = kernel(q, k, v, m)
        torch.testing.assert_close(out.float(), ref.float(), **tol, msg=name)
        for a, b in zip(torch.autograd.grad(out.float().square().sum(), (q, k, v)), gref):
            torch.testing.assert_close(a.float(), b.float(), **(tol if dtype == torch.float32 else
                                                                 dict(rtol=5e-2, atol=5e-2)), msg=name)
    torch.testing.assert_close(fast_attention(q, k, v, m).float(), ref.float(), **tol)


def test_blocks_read_only_the_keys_their_mask_allows(monkeypatch):
    seen = []
    q, k, v = torch.randn(1, 2, 256, 8), torch.randn(1, 1, 300, 8), torch.randn(1, 1, 300, 8)
    real = F.scaled_dot_product_attention
    def spy(q, k, v, attn_mask=None, enable_gqa=False):
        seen.append((q.shape[2], k.shape[2], tuple(attn_mask.shape)))
        return real(q, k, v, attn_mask=attn_mask, enable_gqa=enable_gqa)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)          # a test spy on the kernel calls
    blocked_attention(q, k, v, _masks(256, 300)["causal"], block=64)
    assert seen == [(64, 108, (64, 108)), (64, 172, (64, 172)), (64, 236, (64, 236)), (64, 300, (64, 300))]


def test_fast_attention_measures_per_kind_and_falls_back():
    KERNEL_CHOICES.clear()
    q, k, v = torch.randn(1, 2, 160, 8), torch.randn(1, 2, 160, 8), torch.randn(1, 2, 160, 8)
    m = _masks(160, 160)["causal"]
    for skip in [dict(mask=None), dict(mask=m.float()), dict(mask=m[:100, :100], q=q[:, :, :100], k=k[:, :, :100])]:
        qq, kk, mm = skip.get("q", q), skip.get("k", k), skip["mask"]
        torch.testing.assert_close(fast_attention(qq, kk, kk, mm),
                                   F.scaled_dot_product_attention(qq, kk, kk, attn_mask=mm, enable_gqa=True))
    assert not KERNEL_CHOICES                                           # none of those is measured
    fast_attention(q, k, v, m)
    qg = q.clone().requires_grad_(); fast_attention(qg, k, v, m).sum().backward()
    assert {key[:2] for key in KERNEL_CHOICES} == {("attention", False), ("attention", True)}
    rows = [r for r in kernel_report() if r["kind"] in ("attention", "attn train")]
    assert len(rows) == 2 and all(r["choice"] in ATTENTION_KERNELS and "whole" in r["ms"] for r in rows)


def test_sdpa_is_swapped_like_the_projections():
    fast, plain = pair()
    assert all(type(l.self_attn.sdpa) is FastSDPA for l in fast.layers)
    assert all(type(l.self_attn.sdpa) is SDPA for l in plain.layers)
    class Weights(SDPA):                                                # a module of someone's own: left alone
        def forward(self, q, k, v, mask=None): return super().forward(q, k, v, mask)
    plain.layers[1].self_attn.sdpa = own = Weights()
    use_fast_kernels(plain)
    assert type(plain.layers[0].self_attn.sdpa) is FastSDPA and plain.layers[1].self_attn.sdpa is own
    use_fast_kernels(plain, False)
    assert not any(isinstance(m, (FastSDPA, FastLinear)) for m in plain.modules())


@pytest.mark.parametrize("kernel", [k for k in ATTENTION_KERNELS if k != "whole"])
def test_long_sequences_on_blocked_attention_equal_plain(kernel, monkeypatch):
    "With blocks forced, a model on 160-token sequences equals the plain reference on every path, hooks included."
    monkeypatch.setattr(kernels, "attention_kernel", lambda *a: kernel)
    fast, plain = pair(2, max_seq_len=256)
    x, y = torch.randint(0, 300, (2, 160)), torch.randint(0, 300, (2, 160))
    calls = []
    fast.layers[0].self_attn.sdpa.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[2]))
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)
        cf, cp = fast.new_cache(2, 256), plain.new_cache(2, 256)
        for a, b in [(0, 130), (130, 160)]:                             # a prompt read in two chunks
            torch.testing.assert_close(fast(x[:, a:b], a, cf), plain(x[:, a:b], a, cp), rtol=1e-5, atol=1e-5)
    lf, lp = fast.loss(x, y), plain.loss(x, y)
    lf.backward(); lp.backward()
    assert abs(lf.item() - lp.item()) < 1e-5
    for (n, a), b in zip(fast.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=n)
    assert calls == [160, 130, 30, 160]
