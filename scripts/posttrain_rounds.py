"""One post-training round of the tiny Llama on notebook 13's tool-using chat task, end to end, for one seed:
SFT on gold transcripts -> 8 sampled episodes per prompt on 96 fresh prompts, scored by the oracle -> a reward model
(Bradley-Terry on gold > best > worst pairs; accuracy on held-out pairs) -> best-of-N curves on the 48 held-out
prompts (ranked by the reward model vs by the oracle) -> rejection-sampled SFT on the reward model's picks -> DPO on
(reward-model best, worst) pairs. Prints the held-out oracle score after each stage and the CPU. An experiment
script (minutes per seed on 2 cores), not a test; the settings are first guesses, not tuned.

    .venv/bin/python scripts/posttrain_rounds.py SEED
"""
import copy, sys, time, random
import numpy as np
from llama32_nb.core import set_seed, set_threads, cpu_model
from llama32_nb.pretraining import load_artifacts, TrainConfig
from llama32_nb.tokenizer import ChatFormat
from llama32_nb.posttrain import (make_tasks, sft_examples, sft_config, run_sft, evaluate_policy, rollout, oracle_score,
    preference_pairs, train_reward_model, pair_accuracy, rm_scores, best_of_n_curve, rejection_sample, episode_example)
from llama32_nb.dpo import run_dpo
set_threads(2)
seed = int(sys.argv[1]) if len(sys.argv) > 1 else 0; K = 8
print(f"CPU: {cpu_model()}; seed {seed}", flush=True)
t0 = time.time()
model, tok = load_artifacts(); fmt = ChatFormat(tok)
held = make_tasks(48, seed=10_000)
keep = lambda ev: {k: round(ev[k], 3) for k in ("score", "pass1", "ended")}
set_seed(seed)
train_tasks = make_tasks(2000, seed=1 + seed)
run_sft(model, fmt, sft_examples(fmt, train_tasks), sft_config(max_steps=60, seed=seed))
print("sft", keep(evaluate_policy(model, fmt, held)), round(time.time() - t0), flush=True)
# sample K per prompt on fresh training prompts
rl_tasks = make_tasks(96, seed=50_000 + seed)
eps = rollout(model, fmt, rl_tasks, num_samples=K, temperature=0.8, seed=seed)
sc = [oracle_score(e, tok) for e in eps]
print("samples", len(eps), "mean oracle", round(sum(sc) / len(sc), 3), round(time.time() - t0), flush=True)
pairs = preference_pairs(fmt, eps, sc, K)
random.Random(seed).shuffle(pairs)
ntest = len(pairs) // 5
rm, rtr = train_reward_model(copy.deepcopy(model), fmt, pairs[ntest:], TrainConfig(max_steps=40, batch_size=16, lr=3e-4,
        min_lr=3e-5, warmup_steps=4, weight_decay=0.0, eval_every=10**9, eval_batches=None, seed=seed))
acc = pair_accuracy(rm, pairs[:ntest], tok.pad_id)
print("pairs", len(pairs), "rm acc held-out pairs", round(acc, 3), round(time.time() - t0), flush=True)
# best of n on held-out prompts
heps = rollout(model, fmt, held, num_samples=K, temperature=0.8, seed=seed + 7)
hs = [oracle_score(e, tok) for e in heps]; hr = rm_scores(rm, [e.tokens for e in heps], tok.pad_id)
bon_rm = np.mean([best_of_n_curve(hs[i:i+K], hr[i:i+K]) for i in range(0, len(heps), K)], 0)
bon_or = np.mean([best_of_n_curve(hs[i:i+K], hs[i:i+K]) for i in range(0, len(heps), K)], 0)
print("best-of-n rm", bon_rm.round(3).tolist(), "oracle", bon_or.round(3).tolist())
# RS
picked = rejection_sample(rm, fmt, eps, K)
print("RS picked oracle", round(np.mean([oracle_score(e, tok) for e in picked]), 3))
rs_ex = [episode_example(e) for e in picked] + sft_examples(fmt, make_tasks(len(picked), seed=70_000 + seed))
rs = copy.deepcopy(model)
run_sft(rs, fmt, rs_ex, sft_config(max_steps=30, seed=seed, lr=3e-4, min_lr=3e-5))
print("rs-sft", keep(evaluate_policy(rs, fmt, held)), round(time.time() - t0), flush=True)
# DPO: chosen = RM best, rejected = RM worst among each prompt's samples (policy = RS-SFT)
r = rm_scores(rm, [e.tokens for e in eps], tok.pad_id)
dp = []
for i in range(0, len(eps), K):
    idx = sorted(range(i, i + K), key=r.__getitem__)
    if r[idx[-1]] - r[idx[0]] > 0 and eps[idx[-1]].tokens != eps[idx[0]].tokens: dp.append((eps[idx[-1]], eps[idx[0]]))
tr = run_dpo(rs, tok, dp, TrainConfig(max_steps=30, batch_size=8, lr=1e-4, min_lr=1e-5, warmup_steps=3,
                                      weight_decay=0.0, eval_every=10**9, eval_batches=None, seed=seed))
print("dpo pairs", len(dp), "margins", [round(x, 2) for x in tr.history["rewards/margins"][::6]])
print("dpo", keep(evaluate_policy(rs, fmt, held)), round(time.time() - t0), flush=True)
