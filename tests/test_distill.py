"""Tests for llama32_nb.distill: kd_loss against F.kl_div and torchtune's ForwardKLLoss (values and gradients, with
ignored positions), the CE + KD mix, top-K caching, the Distiller through the Trainer (teacher frozen, exact resume),
and the experiment's bookkeeping."""
import importlib.util
import math
from pathlib import Path
import pytest
import torch
import torch.nn.functional as F
from llama32_nb.core import set_seed
from llama32_nb.decoder import Llama, LlamaConfig
from llama32_nb.pretraining import TrainConfig, Trainer, pack_blocks, split_blocks
from llama32_nb.distill import (kd_loss, kd_ce_loss, topk_logits, kd_loss_topk, Distiller, log_steps,
                                tokens_to_reach, headline, summarize, train_student, distill_experiment,
                                plot_experiment, width_depth_pair, width_vs_depth)

torch.set_num_threads(2)
V = 61


def forward_kl_loss_class():
    """torchtune's `ForwardKLLoss`, loaded from its source file: `import torchtune` pulls in torchao's NF4 tensor,
    which the torchao installed here (0.18) no longer has; the loss file itself needs only torch."""
    spec = importlib.util.find_spec("torchtune")
    if spec is None or not spec.submodule_search_locations: pytest.skip("torchtune is not installed")
    path = Path(spec.submodule_search_locations[0]) / "modules" / "loss" / "kd_losses.py"
    s = importlib.util.spec_from_file_location("torchtune_kd_losses", path)
    mod = importlib.util.module_from_spec(s); s.loader.exec_module(mod)
    return mod.ForwardKLLoss


def logits(seed=0, shape=(3, 7, V), scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g)


@pytest.fixture
def batch():
    s, t = logits(0), logits(1, scale=3.0)
    y = torch.randint(0, V, (3, 7), generator=torch.Generator().manual_seed(2))
    y[0, :3] = -100; y[2, -1] = -100
    return s, t, y


def test_kd_equals_kl_div_over_valid_positions(batch):
    s, t, y = batch
    ref = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(kd_loss(s, t, targets=y), ref[y != -100].mean())
    torch.testing.assert_close(kd_loss(s, t), ref.mean())
    y2 = y.masked_fill(y == -100, 5).masked_fill(y == 3, 7)              # another ignore_index
    torch.testing.assert_close(kd_loss(s, t, ignore_index=7, targets=y2), ref[y2 != 7].mean())


def test_kd_temperature(batch):
    s, t, y = batch
    for tau in (0.5, 2.0, 4.0):
        ref = F.kl_div(F.log_softmax(s / tau, -1), F.log_softmax(t / tau, -1), log_target=True,
                       reduction="none").sum(-1)[y != -100].mean()
        torch.testing.assert_close(kd_loss(s, t, tau, targets=y), ref)
    assert kd_loss(t, t, 3.0) < 1e-6


def test_kd_gradient_equals_torchtune_forward_kl(batch):
    ForwardKLLoss = forward_kl_loss_class()
    s, t, y = batch
    a = s.clone().requires_grad_(); b = s.clone().requires_grad_()
    ours = kd_loss(a, t, targets=y)
    theirs = ForwardKLLoss(ignore_index=-100)(b.view(-1, V), t.view(-1, V), y.view(-1))
    ours.backward(); theirs.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
    assert a.grad[0, :3].abs().max() == 0 and a.grad[2, -1].abs().max() == 0      # ignored positions get none
    # torchtune's value is cross-entropy to the soft targets: ours plus the teacher's entropy
    lt = F.log_softmax(t, -1)
    entropy = -(lt.exp() * lt).sum(-1)[y != -100].mean()
    torch.testing.assert_close(theirs.detach(), ours.detach() + entropy, rtol=1e-5, atol=1e-6)


def test_kd_handles_bf16_masked_logits_and_no_valid_positions(batch):
    s, t, y = batch
    torch.testing.assert_close(kd_loss(s.bfloat16(), t.bfloat16(), targets=y),
                               kd_loss(s.bfloat16().float(), t.bfloat16().float(), targets=y))
    t2 = t.clone(); t2[..., :5] = float("-inf")                     # teacher gives some tokens zero probability
    assert torch.isfinite(kd_loss(s, t2, targets=y))
    z = kd_loss(s.requires_grad_(), t, targets=torch.full((3, 7), -100))
    assert z.item() == 0.0 and z.requires_grad


def test_kd_errors(batch):
    s, t, y = batch
    with pytest.raises(ValueError, match="vocabulary mismatch"): kd_loss(s, t[..., :-1])
    with pytest.raises(ValueError, match="same shape"): kd_loss(s, t[:2])
    with pytest.raises(ValueError, match="targets must have shape"): kd_loss(s, t, targets=y[:, :3])
    with pytest.raises(ValueError, match="temperature"): kd_loss(s, t, 0.0)
    with pytest.raises(ValueError, match="alpha"): kd_ce_loss(s, t, y, alpha=1.5)


def test_kd_ce_mix(batch):
    s, t, y = batch
    ce = F.cross_entropy(s.view(-1, V), y.view(-1))
    for a in (0.0, 0.25, 1.0):
        torch.testing.assert_close(kd_ce_loss(s, t, y, a), (1 - a) * ce + a * kd_loss(s, t, targets=y))


def test_topk_cache(batch):
    s, t, y = batch
    v, i = topk_logits(t, V)
    torch.testing.assert_close(kd_loss_topk(s, v, i, targets=y), kd_loss(s, t, targets=y))
    v1, i1 = topk_logits(t, 1)
    want = -F.log_softmax(s, -1).gather(-1, i1).squeeze(-1)             # K = 1: CE against the teacher's argmax
    torch.testing.assert_close(kd_loss_topk(s, v1, i1), want.mean())
    with pytest.raises(ValueError, match="between 1 and the vocabulary"): topk_logits(t, 0)
    with pytest.raises(ValueError, match="do not match"): kd_loss_topk(s[:1], v, i)


def tiny(dim=32, layers=2, ffn=48, **kw):
    return LlamaConfig(**{**dict(dim=dim, n_layers=layers, n_heads=4, n_kv_heads=2, vocab_size=V, ffn_dim=ffn,
                                 max_seq_len=16, tie_embeddings=True, head_dim=8), **kw})


@pytest.fixture(scope="module")
def blocks():
    g = torch.Generator().manual_seed(0)
    ids = (torch.arange(6000) * 5 % V + (torch.rand(6000, generator=g) < 0.1).long()) % V
    return split_blocks(pack_blocks(ids, 16), 0.1)


def test_distiller_step_teacher_frozen(blocks):
    train, val = blocks
    set_seed(0); teacher = Llama(tiny(layers=3), fast=False); student = Llama(tiny(dim=16, ffn=24), fast=False)
    frozen = [p.clone() for p in teacher.parameters()]
    d = Distiller(student, teacher, alpha=1.0)
    x, y = train[:4, :-1], train[:4, 1:]
    d.train()
    assert not d.teacher.training and d.student.training
    loss = d.loss(x, y)
    with torch.no_grad(): want = kd_loss(student(x), teacher(x), targets=y)
    torch.testing.assert_close(loss.detach(), want)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters()) and all(p.grad is not None for p in student.parameters())
    d.eval(); torch.testing.assert_close(d.loss(x, y), student.loss(x, y))       # eval mode: the student's CE
    tr = Trainer(d, TrainConfig(max_steps=3, batch_size=4, warmup_steps=1, eval_every=3), train, val)
    tr.fit(progress=False)
    assert all(torch.equal(a, b) for a, b in zip(frozen, teacher.parameters()))
    with pytest.raises(ValueError, match="vocabulary mismatch"): Distiller(student, Llama(tiny(vocab_size=V + 1)))


def test_distillation_resumes_exactly(blocks, tmp_path):
    train, val = blocks
    cfg = TrainConfig(max_steps=6, batch_size=4, warmup_steps=1, eval_every=3, lr=3e-3)
    def make():
        set_seed(0); t = Llama(tiny(layers=3), fast=False); set_seed(1)
        return Distiller(Llama(tiny(dim=16, ffn=24), fast=False), t, alpha=0.5)
    a = Trainer(make(), cfg, train, val); a.fit(progress=False)
    b = Trainer(make(), cfg, train, val); b.fit(until=3, progress=False, ckpt_dir=tmp_path / "ck")
    c = Trainer.resume(tmp_path / "ck", make(), train, val); c.fit(progress=False)
    for p, q in zip(a.model.student.parameters(), c.model.student.parameters()): assert torch.equal(p, q)
    assert a.history["loss"] == c.history["loss"] and a.history["val_loss"] == c.history["val_loss"]


def test_experiment_bookkeeping(blocks):
    train, val = blocks
    assert log_steps(5) == [0, 1, 2, 4, 5] and log_steps(8) == [0, 1, 2, 4, 8]
    t, exact = tokens_to_reach([0, 10, 100], [5.0, 4.0, 3.0], 3.5)
    assert exact and t == pytest.approx(math.sqrt(1000))
    assert tokens_to_reach([0, 10, 100], [5.0, 4.0, 3.9], 3.0) == (math.inf, True)
    set_seed(0); teacher = Llama(tiny(layers=3), fast=False)
    res = distill_experiment(teacher, train, val[:4], train[:8, :-1], steps=3, seeds=(0, 1), batch_size=4,
                             shape=dict(dim=16, ffn_dim=24))
    assert set(res["runs"]) == {"scratch CE", "scratch KD", "pruned CE", "pruned KD"}
    r = res["runs"]["pruned KD"][0]
    assert r["tokens"] == [0, 64, 128, 192] and len(r["val_loss"]) == 4
    assert res["runs"]["pruned CE"][0]["val_loss"][0] == res["runs"]["pruned KD"][1]["val_loss"][0]   # same pruned init
    s = summarize(res)
    assert s["scratch CE"]["seeds"] == 2 and s["scratch CE"]["spread"] >= 0
    h = headline(res)
    assert h["budget"] == 192 and h["ratio"] == pytest.approx(192 / h["tokens_needed"])
    fig = plot_experiment(res)                     # the recipe's figure, from the module alone (imports included)
    assert len(fig.axes[0].get_lines()) == 5       # four arms and the teacher


def test_width_depth_pair_equal_size_and_errors(blocks):
    train, val = blocks
    set_seed(0); teacher = Llama(tiny(dim=32, layers=4, ffn=64), fast=False)
    pair = width_depth_pair(teacher, 2)
    assert pair["depth"] == dict(n_layers=2) and set(pair["width"]) == {"ffn_dim"} and pair["width"]["ffn_dim"] % 8 == 0
    from llama32_nb.pruning import prune
    sizes = {k: prune(teacher, train[:4, :-1], **v).num_params() for k, v in pair.items()}
    per_step = 3 * teacher.cfg.dim * teacher.cfg.n_layers * 8          # what one step of 8 neurons changes
    assert abs(sizes["width"] - sizes["depth"]) <= per_step / 2
    for bad in (0, 4, 5, 2.0):
        with pytest.raises(ValueError, match="n_layers"): width_depth_pair(teacher, bad)
    res = width_vs_depth(teacher, train, val[:4], train[:8, :-1], steps=2, n_layers=2, seeds=(0, 1), batch_size=2)
    assert set(res["runs"]) == {"width", "depth"} and all(len(r) == 2 for r in res["runs"].values())
    assert res["shapes"]["depth"]["config"]["n_layers"] == 2 and res["shapes"]["width"]["params"] == sizes["width"]
    s = summarize(res)                             # the experiment's summary functions apply unchanged
    assert s["width"]["start"] == res["runs"]["width"][1]["val_loss"][0]   # both seeds start from the same pruned model


def test_shipped_distill_experiment_belongs_to_the_shipped_teacher():
    """`artifacts/teacher-llama/distill_experiment.json` (written by scripts/distill_experiment.py) is the experiment on
    the shipped teacher and student shape, on >= 2 seeds, and its summaries follow from its own raw curves."""
    import json
    from llama32_nb.pretraining import artifacts_dir, corpus_blocks, evaluate
    from llama32_nb.pruning import load_teacher
    from llama32_nb.distill import student_shape
    f = json.loads((artifacts_dir() / "teacher-llama" / "distill_experiment.json").read_text())
    res = f["experiment"]
    assert f["student_shape"] == student_shape() and len(res["seeds"]) >= 2
    assert set(res["runs"]) == {"scratch CE", "scratch KD", "pruned CE", "pruned KD"}
    budgets = {r["tokens"][-1] for runs in res["runs"].values() for r in runs}
    assert budgets == {res["steps"] * f["batch_size"] * f["block"]}                    # equal token budgets
    for got, want in ((summarize(res), f["summary"]), (summarize(f["width_vs_depth"]), f["width_vs_depth_summary"])):
        assert set(got) == set(want) and all(got[k] == pytest.approx(want[k]) for k in got)
    assert headline(res) == pytest.approx(f["headline"])
    teacher, tok = load_teacher()
    _, val = corpus_blocks(tok, teacher.cfg.max_seq_len, progress=False)
    assert evaluate(teacher, val[:f["val_blocks"]]) == pytest.approx(res["teacher_val"], abs=1e-4)
