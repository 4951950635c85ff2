"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2` (gloo, CPU): trains the toy Llama with DDP
and FSDP2, checkpoints half-way, resumes in fresh Trainers; rank 0 writes the results. `--fail crash|stall` makes
rank 1 raise, or hang, at step 2 instead (the launch must then fail, not hang)."""
import argparse, json, os, sys, time
from pathlib import Path
import torch
from torch.distributed.elastic.multiprocessing.errors import record


def corpus(V: int = 64):
    "The synthetic corpus of tests/test_pretraining.py: a noisy cycle over the vocabulary, 16+1-token blocks."
    from llama32_nb.pretraining import pack_blocks, split_blocks
    g = torch.Generator().manual_seed(0)
    ids = (torch.arange(6_000) * 7 % V + (torch.rand(6_000, generator=g) < 0.1).long()) % V
    return split_blocks(pack_blocks(ids, 16), 0.1)


def configs():
    from llama32_nb.decoder import LlamaConfig
    from llama32_nb.pretraining import TrainConfig
    return (LlamaConfig.toy(vocab_size=64, max_seq_len=32),
            TrainConfig(max_steps=6, batch_size=8, grad_accum=2, lr=2e-3, warmup_steps=2, eval_every=3, eval_batches=2))


def audit_writes(root: Path) -> list:
    "Record every file-system write this process makes under `root` (Python's audit hooks)."
    log, root = [], str(root.resolve())
    def hook(event, args):
        if event == "open" and isinstance(args[0], (str, Path)):
            mode, flags = args[1], args[2]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                      (isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if writing and str(Path(args[0]).resolve()).startswith(root): log.append(["open", str(args[0])])
        elif event in ("os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "shutil.rmtree") and \
                str(Path(str(args[0])).resolve()).startswith(root):
            log.append([event, str(args[0])])
    sys.addaudithook(hook)
    return log


@record
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--fail", choices=["crash", "stall"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    from llama32_nb.core import set_seed
    from llama32_nb.decoder import Llama
    from llama32_nb.pretraining import Trainer, full_state_dict
    from safetensors.torch import save_file
    tr, va = corpus()
    mcfg, tcfg = configs()

    if args.fail:
        class Flaky(Trainer):
            def train_step(self):
                if self.rank == 1 and self.step == 2:
                    if args.fail == "crash": raise ValueError("injected failure on rank 1 at step 2")
                    time.sleep(600)
                return super().train_step()
        Flaky(Llama(mcfg), tcfg, tr, va, device="cpu").fit(progress=False)
        return

    rank = int(os.environ["RANK"])
    log = audit_writes(args.out)
    results = {}
    for par in ("ddp", "fsdp"):
        set_seed(0); t = Trainer(Llama(mcfg), tcfg, tr, va, device="cpu", parallel=par); t.fit(progress=False)
        weights = full_state_dict(t.model)                                  # a collective: every rank gathers
        if rank == 0: save_file(weights, str(args.out / f"{par}_weights.safetensors"))
        set_seed(0); a = Trainer(Llama(mcfg), tcfg, tr, va, device="cpu", parallel=par)
        a.fit(until=3, progress=False, ckpt_dir=args.out / f"ckpt_{par}")   # "interrupted" after step 3
        del a
        set_seed(123)                                                       # fresh model and trainer, from files
        b = Trainer.resume(args.out / f"ckpt_{par}", Llama(mcfg), tr, va, device="cpu", parallel=par)
        b.fit(progress=False)
        results[par] = dict(full=t.history, resumed=b.history, resumed_from=3, world_size=t.world_size,
                            parallel=t.parallel)
        held = [None] * t.world_size                                        # elements of each parameter per rank
        torch.distributed.all_gather_object(held, {n: (p.to_local() if hasattr(p, "to_local") else p).numel()
                                                   for n, p in t.model.named_parameters()})
        results[par]["held"] = held
    if rank == 0: (args.out / "results.json").write_text(json.dumps(results))
    (args.out / f"writes.rank{rank}.json").write_text(json.dumps(log[:]))  # the log before this last write
    # Leave the group explicitly: a gloo group still alive at interpreter exit can abort the process
    # ("terminate called without an active exception") and fail a launch that did all its work.
    torch.distributed.barrier(); torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
