"""Benchmark: one distillation step — teacher forward without gradients, student forward and backward through the
KD loss — with llama32_nb's models and `kd_loss` vs transformers' `LlamaForCausalLM` models with torchtune's
`ForwardKLLoss`, on the same weights (the miniature's teacher, `pruning.teacher_config`, and student, `distill.student_config`), 2 threads.

Ours runs the step the way `Distiller.loss` does (the teacher under `torch.inference_mode()`), with the speed layer
on (the package default) and off (plain modules). Rounds are interleaved ours/theirs; the table gives tokens/s of the
best round and the median of the same-round ratios (>1: ours faster). Not a test: prints the CPU model; timings on a
loaded machine are noisy, the ratios less so.

    .venv/bin/python bench/bench_distill.py [--batch 8] [--rounds 7]
"""
import argparse, importlib.util, statistics, time
from pathlib import Path

import torch
import transformers

from llama32_nb.core import cpu_model, set_seed
from llama32_nb.decoder import Llama, LlamaConfig, hf_name
from llama32_nb.distill import Distiller, student_config
from llama32_nb.pruning import teacher_config
from llama32_nb.kernels import use_fast_kernels

torch.set_num_threads(2)


def forward_kl_loss():
    "torchtune's ForwardKLLoss from its source file (`import torchtune` needs a torchao NF4 tensor torchao 0.18 lacks)."
    spec = importlib.util.find_spec("torchtune")
    if spec is None: raise SystemExit("pip install --no-deps torchtune==0.6.1 (test/bench-only reference)")
    path = Path(spec.submodule_search_locations[0]) / "modules" / "loss" / "kd_losses.py"
    s = importlib.util.spec_from_file_location("torchtune_kd_losses", path)
    mod = importlib.util.module_from_spec(s); s.loader.exec_module(mod)
    return mod.ForwardKLLoss()


def hf_twin(ours: Llama) -> transformers.LlamaForCausalLM:
    "A transformers model holding a copy of `ours`'s weights."
    d = ours.cfg.to_hf_dict("float32")
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{k: v for k, v in d.items()
                                                                  if k not in ("architectures", "torch_dtype")}))
    sd = {hf_name(k): v.detach().clone() for k, v in ours.state_dict().items()
          if not (ours.cfg.tie_embeddings and k == "lm_head.weight")}
    hf.load_state_dict(sd, strict=False)
    if ours.cfg.tie_embeddings: hf.tie_weights()
    return hf


def main():
    ap = argparse.ArgumentParser(); ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=7); args = ap.parse_args()
    set_seed(0)
    teacher, student = Llama(teacher_config()).eval(), Llama(student_config())
    plain_t = use_fast_kernels(Llama(teacher_config()), False)
    plain_s = use_fast_kernels(Llama(student_config()), False)
    plain_t.load_state_dict(teacher.state_dict()); plain_s.load_state_dict(student.state_dict())
    hf_t, hf_s = hf_twin(teacher).eval(), hf_twin(student).train()
    tt_loss = forward_kl_loss()
    T = teacher.cfg.max_seq_len
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(0, teacher.cfg.vocab_size, (args.batch, T + 1), generator=g)
    x, y = rows[:, :-1], rows[:, 1:]
    V = teacher.cfg.vocab_size

    def ours_step(d):
        def step():
            d.loss(x, y).backward()
            for p in d.student.parameters(): p.grad = None
        return step
    def hf_step():
        with torch.no_grad(): t = hf_t(x).logits
        s = hf_s(x).logits
        tt_loss(s.view(-1, V), t.view(-1, V), y.reshape(-1)).backward()
        for p in hf_s.parameters(): p.grad = None
    steps = {"ours": ours_step(Distiller(student, teacher).train()),
             "ours, speed layer off": ours_step(Distiller(plain_s, plain_t).train()), "transformers": hf_step}

    # the same numbers first: loss values (torchtune's = ours + teacher entropy) and student gradients
    d = Distiller(student, teacher).train()
    ours_l = d.loss(x, y); ours_l.backward()
    g_ours = student.layers[0].mlp.down_proj.weight.grad.clone()
    for p in student.parameters(): p.grad = None
    with torch.no_grad(): t = hf_t(x).logits
    s = hf_s(x).logits; l_tt = tt_loss(s.view(-1, V), t.view(-1, V), y.reshape(-1)); l_tt.backward()
    g_hf = hf_s.model.layers[0].mlp.down_proj.weight.grad.clone()
    for p in hf_s.parameters(): p.grad = None
    lt = torch.log_softmax(t, -1); ent = -(lt.exp() * lt).sum(-1).mean()
    print(f"KD loss ours {ours_l.item():.5f}; torchtune − teacher entropy {(l_tt - ent).item():.5f}; "
          f"max |Δ grad| {(g_ours - g_hf).abs().max().item():.2e}")

    for fn in steps.values(): fn()                                   # warm-up (kernel choices, allocations)
    times = {k: [] for k in steps}
    for _ in range(args.rounds):
        for k, fn in steps.items():
            t0 = time.perf_counter(); fn(); times[k].append(time.perf_counter() - t0)
    tokens = args.batch * T
    print(f"\nCPU: {cpu_model()}; {torch.get_num_threads()} threads; torch {torch.__version__}, transformers "
          f"{transformers.__version__}")
    print(f"one distillation step: teacher {teacher.num_params():,} params (forward), student {student.num_params():,} "
          f"(forward + backward), batch {args.batch} x {T} tokens, {args.rounds} interleaved rounds\n")
    print(f"| {'step':24s} | {'tokens/s (best)':>15s} | {'vs transformers (median same-round)':>36s} |")
    print("|" + "-" * 26 + "|" + "-" * 17 + "|" + "-" * 38 + "|")
    for k, ts in times.items():
        r = statistics.median(h / o for o, h in zip(ts, times["transformers"]))
        print(f"| {k:24s} | {tokens / min(ts):15,.0f} | {r:35.2f}x |")


if __name__ == "__main__":
    main()
