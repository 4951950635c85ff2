#!/usr/bin/env python
"""Post-training speed, ours vs the references, interleaved in one process (ratios; CPU named):
(1) one DPO step (loss + backward) on the tiny Llama, ours vs TRL's DPOTrainer.compute_loss, same weights and batch;
(2) batched sampling of 16 completions x 64 new tokens, our generate_batch vs transformers generate.

    python bench/bench_posttrain.py [--rounds 5]
"""
import argparse, copy, statistics, tempfile, time
import torch
import transformers
from datasets import Dataset
from tokenizers import Tokenizer as HFTok, models, pre_tokenizers
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference
from llama32_nb.core import cpu_model, set_seed
from llama32_nb.dpo import dpo_step, reference_logps
from llama32_nb.pretraining import load_artifacts
from llama32_nb.posttrain import make_tasks, prompt_ids, gold_episode
from llama32_nb.tokenizer import ChatFormat


def timed(f):
    t = time.perf_counter(); f(); return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(); ap.add_argument("--rounds", type=int, default=5); args = ap.parse_args()
    set_seed(0); torch.set_num_threads(2)
    ours, tok = load_artifacts(); fmt = ChatFormat(tok)
    tmp = tempfile.mkdtemp()
    hf = transformers.LlamaForCausalLM.from_pretrained(str(ours.save_pretrained(f"{tmp}/m", torch.float32)),
                                                       torch_dtype=torch.float32)
    ref_ours, hf_ref = copy.deepcopy(ours), copy.deepcopy(hf)
    tasks = make_tasks(8, seed=3)
    rows = []
    for t in tasks:                                     # gold vs a truncated answer: a realistic pair
        g = gold_episode(fmt, t)
        rows.append(dict(prompt_ids=g.prompt, chosen_ids=g.ids, rejected_ids=g.ids[:max(2, len(g.ids) // 2)]))
    batch = DataCollatorForPreference(pad_token_id=tok.pad_id)(rows)
    wl = HFTok(models.WordLevel({f"t{i}": i for i in range(tok.vocab_size)}, unk_token="t1"))
    wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    htok = transformers.PreTrainedTokenizerFast(tokenizer_object=wl, pad_token="t0", eos_token="t2")
    cfg = DPOConfig(output_dir=f"{tmp}/o", use_cpu=True, bf16=False, report_to="none", beta=0.1,
                    per_device_train_batch_size=8)
    trainer = DPOTrainer(model=hf, ref_model=hf_ref, args=cfg, processing_class=htok,
                         train_dataset=Dataset.from_list([dict(prompt="t3", chosen="t4", rejected="t5")] * 8))
    b = dict(tokens=batch["input_ids"], mask=batch["completion_mask"])
    ref = reference_logps(ref_ours, b)
    ours.train(); hf.train()

    def ours_dpo():
        loss, _ = dpo_step(ours, b, ref); loss.backward(); ours.zero_grad(set_to_none=True)
    def trl_dpo():
        loss = trainer.compute_loss(hf, dict(batch)); loss.backward(); hf.zero_grad(set_to_none=True)

    prompts = [prompt_ids(fmt, t) for t in make_tasks(1, seed=5)]
    ours.eval(); hf.eval()
    ids = torch.tensor(prompts)
    def ours_gen(): ours.generate_batch(prompts, 64, temperature=1.0, num_samples=16, seed=0, stop_tokens=())
    def hf_gen():
        hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=64, min_new_tokens=64,
                    num_return_sequences=16, top_k=0, top_p=1.0, pad_token_id=tok.pad_id)

    for f in (ours_dpo, trl_dpo, ours_gen, hf_gen): f()               # warm-up (kernel choices, caches)
    res = {k: [] for k in ("ours_dpo", "trl_dpo", "ours_gen", "hf_gen")}
    for r in range(args.rounds):
        order = [("ours_dpo", ours_dpo), ("trl_dpo", trl_dpo), ("ours_gen", ours_gen), ("hf_gen", hf_gen)]
        if r % 2: order = order[::-1]
        for name, f in order:
            if "dpo" in name: ours.train(); hf.train()
            else: ours.eval(); hf.eval()
            res[name].append(timed(f))
    med = {k: statistics.median(v) for k, v in res.items()}
    print(f"CPU: {cpu_model()}, torch threads {torch.get_num_threads()}, {args.rounds} interleaved rounds (medians)")
    print(f"DPO step (8 pairs, loss + backward): ours {med['ours_dpo'] * 1e3:.0f} ms, TRL {med['trl_dpo'] * 1e3:.0f} ms"
          f" -> ours {med['trl_dpo'] / med['ours_dpo']:.2f}x as fast")
    print(f"sampling 16 x 64 tokens: ours {med['ours_gen'] * 1e3:.0f} ms, transformers {med['hf_gen'] * 1e3:.0f} ms"
          f" -> ours {med['hf_gen'] / med['ours_gen']:.2f}x as fast")


if __name__ == "__main__":
    main()
