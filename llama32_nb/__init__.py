"""A notebook-first, from-scratch reference implementation of Meta's Llama 3.2 in PyTorch, built with nbdev

Modules:

- `llama32_nb.dpo`: DPO as Llama 3 ran it: the sigmoid loss on summed completion log-probs against a frozen reference (β = 0.1), header and terminator tokens masked out of both responses, an NLL term on the chosen response, the metrics under TRL's names — then rounds of reward model → rejection sampling → SFT → DPO on notebook 13's tool-use task, measured on two seeds, with the failure modes shown: likelihood decline without the NLL term, length bias, noisy labels.
- `llama32_nb.posttrain`: Llama 3's post-training loop in miniature on a synthetic tool-using chat task with an exact (oracle) score: the task family and its calculator tool, supervised fine-tuning on assistant tokens only, a reward model and how far to trust it, best-of-N curves, rejection sampling, reward hacking, what a tiny model cannot learn (copying), and a chat panel with the model after each stage."""

__version__ = "0.0.1"
