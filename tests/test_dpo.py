"""Tests for llama32_nb.dpo: the loss and TRL's metrics equal TRL's DPOTrainer (same weights, same batch), the NLL
term equals TRL's "sft" loss, Llama 3's masks, summed log-probs."""
import copy
import pytest
import torch
import torch.nn.functional as F
from llama32_nb.core import set_seed
from llama32_nb.decoder import Llama, LlamaConfig
from llama32_nb.dpo import dpo_loss, dpo_mask, sequence_logps, preference_batch, reference_logps, dpo_step
from llama32_nb.posttrain import gold_episode, make_tasks
from llama32_nb.pretraining import load_artifacts
from llama32_nb.tokenizer import ChatFormat

torch.set_num_threads(2)
V = 64


def test_dpo_loss_formula():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(5, generator=g) * 10 for _ in range(4))
    losses, cr, rjr = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert torch.allclose(losses, -F.logsigmoid(0.1 * ((pc - rc) - (pr - rr))))
    assert torch.allclose(cr, 0.1 * (pc - rc)) and torch.allclose(rjr, 0.1 * (pr - rr))
    assert torch.allclose(dpo_loss(pc, pr, pc, pr)[0], torch.full((5,), 0.69314718))
    with pytest.raises(ValueError): dpo_loss(pc, pr, rc, rr, beta=0)


def test_sequence_logps_sums_masked_tokens():
    set_seed(0)
    m = Llama(LlamaConfig.toy(vocab_size=V, max_seq_len=32))
    tokens = torch.randint(0, V, (2, 9)); mask = torch.zeros(2, 9, dtype=torch.long); mask[:, 5:] = 1; mask[1, 8] = 0
    s, per = sequence_logps(m, tokens, mask)
    lp = torch.log_softmax(m(tokens), -1)
    want = [sum(lp[b, t - 1, tokens[b, t]] for t in range(1, 9) if mask[b, t]) for b in range(2)]
    assert torch.allclose(s, torch.stack(want), atol=1e-5)


def test_llama3_mask_drops_terminators():
    _, tok = load_artifacts()
    fmt = ChatFormat(tok)
    t = [x for x in make_tasks(20, seed=1) if x.kind == "calc"][0]
    e = gold_episode(fmt, t)
    m = dpo_mask(e, tok)
    kept = [x for x, k in zip(e.tokens, m) if k]
    assert tok.eot_id not in kept and tok.eom_id not in kept and tok.python_tag_id in kept
    assert sum(m) == sum(e.train) - 2                                      # the eom of the call, the final eot
    assert dpo_mask(e, tok, mask_terminators=False) == e.train
    assert not any(k for k, x in zip(m, e.tokens) if x == tok.special_tokens["<|start_header_id|>"])


def trl_setup(tmp_path, loss_type="sigmoid", loss_weights=None):
    trl = pytest.importorskip("trl")
    transformers = pytest.importorskip("transformers")
    from datasets import Dataset
    from tokenizers import Tokenizer as HFTok, models
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    set_seed(0)
    ours = Llama(LlamaConfig.toy(vocab_size=V, max_seq_len=32), fast=False)
    with torch.no_grad():
        for p in ours.parameters(): p.add_(torch.randn_like(p) * 0.05)      # a model with opinions
    ref_ours = copy.deepcopy(ours)
    with torch.no_grad():
        for p in ref_ours.parameters(): p.add_(torch.randn_like(p) * 0.02)  # a reference that differs
    hf = transformers.LlamaForCausalLM.from_pretrained(str(ours.save_pretrained(tmp_path / "p", torch.float32)),
                                                       torch_dtype=torch.float32)
    hf_ref = transformers.LlamaForCausalLM.from_pretrained(
        str(ref_ours.save_pretrained(tmp_path / "r", torch.float32)), torch_dtype=torch.float32)
    from tokenizers import pre_tokenizers
    wl = HFTok(models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t1"))
    wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    htok = transformers.PreTrainedTokenizerFast(tokenizer_object=wl, pad_token="t0", eos_token="t2")
    g = torch.Generator().manual_seed(3)
    rnd = lambda n: torch.randint(3, V, (n,), generator=g).tolist()
    rows = [dict(prompt_ids=rnd(a), chosen_ids=rnd(b), rejected_ids=rnd(c)) for a, b, c in [(5, 4, 6), (3, 7, 2),
                                                                                          (6, 3, 3)]]
    kw = dict(loss_type=[loss_type] if isinstance(loss_type, str) else loss_type)
    if loss_weights: kw["loss_weights"] = loss_weights
    args = DPOConfig(output_dir=str(tmp_path / "o"), use_cpu=True, bf16=False, report_to="none", beta=0.1,
                     gradient_checkpointing=False, per_device_train_batch_size=3, **kw)
    trainer = DPOTrainer(model=hf, ref_model=hf_ref, args=args, train_dataset=Dataset.from_list(
        [dict(prompt="t3 t4", chosen="t5", rejected="t6")] * 3),
                         processing_class=htok)
    batch = DataCollatorForPreference(pad_token_id=0)(rows)     # the batch both sides score
    return ours, ref_ours, hf, trainer, batch


def test_dpo_loss_and_metrics_match_trl(tmp_path):
    ours, ref_ours, hf, trainer, batch = trl_setup(tmp_path)
    hf.train()
    ref_loss = trainer.compute_loss(hf, dict(batch)).item()
    trl_m = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    b = dict(tokens=batch["input_ids"], mask=batch["completion_mask"])
    loss, m = dpo_step(ours, b, reference_logps(ref_ours, b), beta=0.1)
    assert abs(loss.item() - ref_loss) < 1e-5, (loss.item(), ref_loss)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
              "logps/rejected"):
        assert abs(m[k] - trl_m[k]) < 1e-5, (k, m[k], trl_m[k])


def test_nll_term_matches_trl_sft_loss(tmp_path):
    ours, ref_ours, hf, trainer, batch = trl_setup(tmp_path, ["sigmoid", "sft"], [1.0, 0.2])
    hf.train()
    ref_loss = trainer.compute_loss(hf, dict(batch)).item()
    b = dict(tokens=batch["input_ids"], mask=batch["completion_mask"])
    loss, _ = dpo_step(ours, b, reference_logps(ref_ours, b), beta=0.1, nll_weight=0.2)
    assert abs(loss.item() - ref_loss) < 1e-5, (loss.item(), ref_loss)


def test_preference_batch_layout():
    b = preference_batch([([1, 2, 3], [0, 1, 1], [1, 4], [0, 1]), ([5, 6], [0, 1], [5, 7, 8, 9], [0, 1, 1, 1])], 0)
    assert b["tokens"].tolist() == [[1, 2, 3, 0], [5, 6, 0, 0], [1, 4, 0, 0], [5, 7, 8, 9]]
    assert b["mask"].tolist() == [[0, 1, 1, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 1, 1, 1]]
    with pytest.raises(ValueError, match="mask"): preference_batch([([1, 2], [0], [1], [0])], 0)


# --- the NLL mask, pairs, rounds, summaries ------------------------------------------------------------------
def test_nll_mask_counts_terminators():
    set_seed(0)
    m = Llama(LlamaConfig.toy(vocab_size=V, max_seq_len=32))
    tokens = torch.randint(0, V, (2, 8)); mask = torch.zeros(2, 8, dtype=torch.long); mask[:, 4:7] = 1
    nll_mask = mask.clone(); nll_mask[:, 7] = 1; nll_mask[1] = 0                # chosen row: one more token (eot)
    b = dict(tokens=tokens, mask=mask)
    ref = reference_logps(m, b)
    lp = torch.log_softmax(m(tokens[:, :-1]), -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    _, with_mask = dpo_step(m, dict(b, nll_mask=nll_mask), ref, nll_weight=0.2)
    _, without = dpo_step(m, b, ref, nll_weight=0.2)
    assert with_mask["nll/chosen"] == pytest.approx(-lp[0, 3:7].mean().item(), abs=1e-5)
    assert without["nll/chosen"] == pytest.approx(-lp[0, 3:6].mean().item(), abs=1e-5)


def test_best_worst_pairs_drop_ties_and_duplicates():
    from llama32_nb.dpo import best_worst_pairs
    _, tok = load_artifacts()
    fmt = ChatFormat(tok)
    g = [gold_episode(fmt, t) for t in make_tasks(3, seed=1)]
    eps = [g[0], g[1], g[1], g[1], g[2], g[2]]                        # prompt-major, 2 per "prompt"
    pairs = best_worst_pairs(eps, [1.0, 0.0, 0.5, 0.5, 2.0, 1.0], 2)
    assert pairs == [(g[0], g[1])]                                   # a tie and two identical replies dropped


def _fake_run(seed, scores):
    stage = lambda r, name, s: dict(round=r, stage=name, score=s, pass1=0.0, ended=1.0, score_calc=s, score_string=s,
                                    answer_len=3.0, length_gap=0.5, repeat_first=7.0, repeat_second=7.0)
    names = [(0, "base"), (0, "SFT"), (1, "RS-SFT"), (1, "SFT on gold (control)"), (1, "DPO")]
    rm = dict(pair_accuracy=0.8, sample_accuracy=0.7, spearman=0.3, train_accuracy=0.9)
    return dict(seed=seed, stages=[stage(r, n, s) for (r, n), s in zip(names, scores)],
                rounds=[dict(round=1, rm=rm, bon=dict(RM=[0.1, 0.2], oracle=[0.1, 0.3], random=[0.1, 0.1]))])


def test_summarize_rounds_and_stage_gains():
    from llama32_nb.dpo import summarize_rounds, stage_gains, stage_order
    s = summarize_rounds([_fake_run(0, [0.0, 0.2, 0.3, 0.5, 0.25]), _fake_run(1, [0.0, 0.1, 0.2, 0.4, 0.3])])
    assert stage_order(s) == ["0:base", "0:SFT", "1:RS-SFT", "1:DPO"]
    assert s["stages"]["0:SFT"]["score"] == dict(mean=pytest.approx(0.15), spread=pytest.approx(0.1), seeds=[0.2, 0.1])
    g = stage_gains(s)
    assert g["0:SFT"]["helped"] and g["1:RS-SFT"]["helped"] and not g["1:DPO"]["helped"] and not g["1:DPO"]["hurt"]
    assert g["1:SFT on gold (control)"]["start"] == "0:SFT" and g["1:SFT on gold (control)"]["diffs"] == pytest.approx([0.3, 0.3])
    assert s["rounds"][0]["bon"]["oracle"] == [0.1, 0.3]
    with pytest.raises(ValueError, match="missing"):
        bad = _fake_run(1, [0.0] * 5); bad["stages"].pop()
        summarize_rounds([_fake_run(0, [0.0] * 5), bad])


def test_posttrain_rounds_tiny_and_stage_resume(tmp_path):
    """The whole loop on a budget far too small to learn: every stage and experiment runs, the result is JSON, and a
    stage rerun from its checkpoint folder gives the same weights."""
    import json
    from llama32_nb.dpo import RoundConfig, posttrain_rounds, rm_stage, rs_stage, dpo_stage
    cfg = RoundConfig(sft_steps=3, sft_tasks=16, rounds=2, prompts=4, samples=2, rm_steps=2, rs_steps=2, dpo_steps=2,
                      dpo_batch=2, eval_prompts=3, bon_prompts=2, bon_samples=3, batch_size=2, max_new_tokens=6)
    res = posttrain_rounds(cfg, 0)
    json.dumps(res)
    assert [(s["round"], s["stage"]) for s in res["stages"]] == [(0, "base"), (0, "SFT"), (1, "RS-SFT"),
                                                                 (1, "SFT on gold (control)"), (1, "DPO"),
                                                                 (2, "RS-SFT"), (2, "DPO")]
    r1 = res["rounds"][0]
    assert set(r1["dpo_variants"]) == {"NLL 0", "oracle labels", "lr x10", "lr x10, NLL 0"} and "hacking" in r1
    assert len(r1["hacking"]["proxy"]) == len(r1["bon"]["RM"]) == cfg.bon_samples
    assert res["rounds"][1]["pairs"] >= r1["pairs"]                  # the reward model keeps every earlier pair
    policy, tok = load_artifacts()
    fmt = ChatFormat(tok)
    rmo = rm_stage(policy, fmt, cfg, 0, 1, ckpt_root=tmp_path)
    again = rm_stage(policy, fmt, cfg, 0, 1, ckpt_root=tmp_path)      # loads the finished checkpoint
    assert all(torch.equal(a, b) for a, b in zip(rmo["rm"].state_dict().values(), again["rm"].state_dict().values()))
    d1 = dpo_stage(policy, rmo["rm"], fmt, cfg, 0, 1, ckpt_root=tmp_path)
    d2 = dpo_stage(policy, rmo["rm"], fmt, cfg, 0, 1, ckpt_root=tmp_path)
    assert d1["pairs"] and all(torch.equal(a, b) for a, b in zip(d1["model"].state_dict().values(),
                                                                 d2["model"].state_dict().values()))
    with pytest.raises(ValueError, match="rounds"): RoundConfig(rounds=0)


def test_shipped_posttrain_rounds_belong_to_the_code():
    """`artifacts/posttrain/rounds.json` (scripts/posttrain_rounds.py) is the experiment of `RoundConfig`'s defaults
    on >= 2 seeds, its summary follows from its per-seed results, and its base row is what the shipped tiny Llama
    scores now."""
    import json
    from dataclasses import asdict
    from llama32_nb.pretraining import artifacts_dir
    from llama32_nb.dpo import RoundConfig, summarize_rounds, eval_stage
    f = json.loads((artifacts_dir() / "posttrain" / "rounds.json").read_text())
    assert f["config"] == asdict(RoundConfig()) and len(f["runs"]) >= 2
    assert [r["seed"] for r in f["runs"]] == f["summary"]["seeds"]
    got = summarize_rounds(f["runs"])
    for k, v in got["stages"].items():
        for m, st in v.items(): assert st["mean"] == pytest.approx(f["summary"]["stages"][k][m]["mean"]), (k, m)
    assert all(sum(1 for s in r["stages"] if s["stage"] == "DPO") == f["config"]["rounds"] for r in f["runs"])
    model, tok = load_artifacts()
    base = eval_stage(model, ChatFormat(tok), make_tasks(f["config"]["eval_prompts"], seed=10_000))
    for k in ("score", "pass1", "ended", "answer_len"):
        assert base[k] == pytest.approx(f["runs"][0]["stages"][0][k], abs=1e-9), k
