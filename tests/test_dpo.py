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
