"""The tiny Llama's pretraining (notebook 08) as one program for any number of processes:

    python scripts/pretrain.py --steps 40                                   # one process
    torchrun --standalone --nproc_per_node 2 scripts/pretrain.py --steps 40 # two (gloo on CPU, nccl on GPUs)
    LLAMA32_PARALLEL=fsdp torchrun ...   (or --parallel fsdp)               # FSDP2 instead of DDP

Every rank runs this file; rank 0 alone prints and writes `<out>/checkpoint` (resumed if present, on any number of
processes) and `<out>/tiny-llama`. The tokenizer is the shipped one (`artifacts/tiny-llama/tokenizer.model`)."""
import argparse, json
from pathlib import Path
from torch.distributed.elastic.multiprocessing.errors import record


@record  # torchrun's failure summary then shows the failing rank's traceback
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/pretrain"), help="run folder (default runs/pretrain)")
    ap.add_argument("--steps", type=int, default=400, help="optimizer steps (default 400, as make recipe)")
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per micro-batch, all ranks together")
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--parallel", choices=["ddp", "fsdp"], default=None, help="default $LLAMA32_PARALLEL, else ddp")
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast (GPUs)")
    ap.add_argument("--ckpt-every", type=int, default=100)
    args = ap.parse_args(argv)
    import torch.distributed as dist
    from llama32_nb.core import set_threads, cpu_model
    from llama32_nb.pretraining import (init_distributed, pretrain_tiny_llama, tiny_train_config, artifacts_dir)
    from llama32_nb.tokenizer import Tokenizer
    rank, world_size = init_distributed()
    if world_size == 1: set_threads()                    # under torchrun: OMP_NUM_THREADS per rank
    cfg = tiny_train_config(max_steps=args.steps, warmup_steps=min(30, args.steps // 4), batch_size=args.batch_size,
                            grad_accum=args.grad_accum, bf16=args.bf16, eval_every=max(1, min(50, args.steps // 2)))
    tok = Tokenizer.load(artifacts_dir() / "tiny-llama" / "tokenizer.model")
    tr = pretrain_tiny_llama(tok, args.out, train_cfg=cfg, progress=True, ckpt_every=args.ckpt_every,
                             parallel=args.parallel)
    if rank == 0:
        f = {k: v for k, v in tr.facts.items() if k != "train_config"}
        print(json.dumps({**f, "cpu": cpu_model()}, indent=1))
    if dist.is_initialized(): dist.destroy_process_group()


if __name__ == "__main__":
    main()
