"""Two gloo processes on the CPU (torchrun): DDP and FSDP2 reproduce the one-process run at the same global batch,
resume 2 -> 2 and 2 -> 1 continues the same losses, only rank 0 writes, a crashed or stalled rank fails the launch."""
import json, math, os, signal, subprocess, sys, time
from pathlib import Path
import pytest
import torch
from safetensors.torch import load_file
from llama32_nb.core import set_seed
from llama32_nb.decoder import Llama
from llama32_nb.pretraining import Trainer, full_state_dict
from llama32_nb.distributed import (holdings, shard_rows, memory_per_rank, held_spans, plot_who_holds, plot_memory,
                                    torchrun_command, slurm_script)

sys.path.insert(0, str(Path(__file__).parent))
from dist_worker import corpus, configs  # noqa: E402

WORKER = Path(__file__).parent / "dist_worker.py"
TOL = 1e-5


class Launch:
    "`torchrun --nproc_per_node 2 dist_worker.py ARGS` in the background; `.wait()`: (exit code, output, seconds)."
    def __init__(self, *args, timeout: float, env: dict | None = None):
        root = Path(__file__).parent.parent
        env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", **(env or {})}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
               *args]
        self.timeout, self.t0 = timeout, time.time()
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=root,
                                  start_new_session=True)

    def wait(self) -> tuple[int, str, float]:
        try: out, _ = self.p.communicate(timeout=max(1.0, self.timeout - (time.time() - self.t0)))
        except subprocess.TimeoutExpired:                           # kill torchrun and both ranks
            os.killpg(self.p.pid, signal.SIGKILL); out, _ = self.p.communicate()
            pytest.fail(f"the 2-process launch hung for {self.timeout} s:\n{out[-3000:]}")
        return self.p.returncode, out, time.time() - self.t0


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    "The three 2-process launches, started together (the failure ones mostly wait): the run, a crash, a stall."
    out = tmp_path_factory.mktemp("dist")
    fail = {f: Launch("--out", str(tmp_path_factory.mktemp(f)), "--fail", f, timeout=150,
                      env={"LLAMA32_DIST_TIMEOUT": "5"}) for f in ("crash", "stall")}
    main = Launch("--out", str(out), timeout=240)
    yield dict(out=out, main=main, **fail)
    for l in (main, *fail.values()):
        if l.p.poll() is None: os.killpg(l.p.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def run(launches):
    "The 2-process run: full runs, checkpoint at step 3 and resume, for DDP and FSDP2 (see dist_worker.py)."
    rc, log, secs = launches["main"].wait()
    assert rc == 0, log[-4000:]
    print(f"2-process launch: {secs:.0f} s")
    out = launches["out"]
    return out, json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def single():
    "The same run in this one process, with the whole global batch."
    tr, va = corpus(); mcfg, tcfg = configs()
    set_seed(0); t = Trainer(Llama(mcfg), tcfg, tr, va, device="cpu"); t.fit(progress=False)
    return t


def close(a, b, tol=TOL):
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=0, abs_tol=tol) for x, y in zip(a, b))


@pytest.mark.parametrize("par", ["ddp", "fsdp"])
def test_two_processes_match_one(run, single, par):
    out, res = run
    r = res[par]
    assert r["world_size"] == 2 and r["parallel"] == par
    h, ref = r["full"], single.history
    assert h["step"] == ref["step"] and close(h["loss"], ref["loss"]), (h["loss"], ref["loss"])
    assert close(h["val_loss"], ref["val_loss"]) and close(h["grad_norm"], ref["grad_norm"], 1e-4)
    w, ref_w = load_file(str(out / f"{par}_weights.safetensors")), full_state_dict(single.model)
    assert w.keys() == ref_w.keys()
    diff = max((w[k] - ref_w[k]).abs().max().item() for k in w)
    print(f"{par}: max |loss diff| {max(abs(x - y) for x, y in zip(h['loss'], ref['loss'])):.1e}, "
          f"max |weight diff| {diff:.1e}")
    assert diff <= TOL


@pytest.mark.parametrize("par", ["ddp", "fsdp"])
def test_resume_two_to_two_and_two_to_one(run, par, tmp_path):
    out, res = run
    full, resumed = res[par]["full"], res[par]["resumed"]
    assert resumed["step"] == full["step"]
    assert close(resumed["loss"], full["loss"]) and close(resumed["val_loss"], full["val_loss"])    # 2 -> 2
    tr, va = corpus(); _, tcfg = configs()
    set_seed(5)
    one = Trainer.resume(out / f"ckpt_{par}", Llama(configs()[0]), tr, va, device="cpu")             # 2 -> 1
    assert one.step == res[par]["resumed_from"] and one.world_size == 1 and one.parallel is None
    one.fit(progress=False)
    assert close(one.history["loss"], full["loss"]) and close(one.history["val_loss"], full["val_loss"])
    w = load_file(str(out / f"{par}_weights.safetensors"))
    assert all(torch.allclose(v, w[k], atol=TOL, rtol=0) for k, v in full_state_dict(one.model).items())


def test_only_rank_zero_writes(run):
    out, _ = run
    w0 = json.loads((out / "writes.rank0.json").read_text())
    w1 = json.loads((out / "writes.rank1.json").read_text())
    assert w1 == []                                                  # rank 1 wrote nothing at all
    assert any(p.endswith("trainer.json") for _, p in w0) and any(e == "os.rename" for e, _ in w0)
    assert sorted(p.name for p in (out / "ckpt_fsdp").iterdir()) == ["model.safetensors", "trainer.json",
                                                                      "trainer.safetensors"]


@pytest.mark.parametrize("fail", ["crash", "stall"])
def test_failed_rank_fails_the_launch(launches, fail):
    rc, log, secs = launches[fail].wait()
    assert rc != 0, log[-3000:]
    if fail == "crash": assert "injected failure on rank 1 at step 2" in log, log[-3000:]
    else:                                                            # rank 0's collective timed out, and says why
        assert "rank 0 of 2 failed during training" in log and "another rank crashed or stalled" in log, log[-3000:]
    print(f"{fail}: the launch failed after {secs:.0f} s")


def test_ranks_read_disjoint_slices_of_each_batch():
    from llama32_nb.pretraining import BlockLoader
    tr, _ = corpus()
    one = BlockLoader(tr, 8, seed=3)
    for w in (2, 4):
        parts = [BlockLoader(tr, 8, seed=3, rank=r, world_size=w) for r in range(w)]
        for i in (0, 7, len(one) + 2):                                  # also in the second epoch
            xs = [p[i][0] for p in parts]
            assert all(len(x) == 8 // w for x in xs) and torch.equal(torch.cat(xs), one[i][0])
    with pytest.raises(ValueError, match="split evenly"): BlockLoader(tr, 8, rank=0, world_size=3)
    with pytest.raises(ValueError, match="split evenly"): BlockLoader(tr, 8, rank=2, world_size=2)


# --- the figure and launch functions of notebook 18 ---------------------------------------------------------------
def test_holdings_match_the_shards_fsdp2_builds(run):
    _, res = run
    model = Llama(configs()[0])
    for par in ("ddp", "fsdp"):
        pred = holdings(model, 2, par)
        assert res[par]["held"] == [{k: v[r] for k, v in pred.items()} for r in range(2)], par


def test_shard_rows_memory_and_figures():
    for n, w in [(7, 3), (5, 4), (64, 2), (1, 2), (0, 3)]:
        sizes = [len(c) for c in torch.arange(n).chunk(w)] if n else []
        assert [b - a for a, b in shard_rows(n, w)] == sizes + [0] * (w - len(sizes))
    model = Llama(configs()[0])
    n = sum(p.numel() for p in model.parameters())
    ddp, fsdp = memory_per_rank(model, 2, "ddp"), memory_per_rank(model, 2, "fsdp")
    assert sum(ddp.values()) == 16 * n and fsdp["parameters"] == 2 * n and fsdp["gathered"] > 0
    spans, units = held_spans(model, 2, "fsdp")
    assert sum(k for sp in spans for _, k in sp) == n and units[0][0] == "root" and units[1][0] == "layers.0"
    import matplotlib; matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    for fig in (plot_who_holds(model, 2), plot_memory(model, (1, 2))): assert fig.axes; plt.close(fig)
    with pytest.raises(ValueError): holdings(model, 2, "zero3")


def test_launch_commands(tmp_path):
    assert torchrun_command("s.py", "--steps", 4) == ["torchrun", "--nproc_per_node=2", "--standalone", "s.py",
                                                      "--steps", "4"]
    multi = torchrun_command("s.py", nproc_per_node=8, nnodes=2, rdzv_endpoint="n1:29500")
    assert "--nnodes=2" in multi and "--rdzv-endpoint=n1:29500" in multi and "--standalone" not in multi
    with pytest.raises(ValueError, match="rdzv_endpoint"): torchrun_command("s.py", nnodes=2)
    job = tmp_path / "job.sh"; job.write_text(slurm_script("scripts/pretrain.py", "--parallel", "fsdp", nodes=3))
    assert subprocess.run(["bash", "-n", str(job)]).returncode == 0
    text = job.read_text()
    assert "#SBATCH --nodes=3" in text and "srun torchrun --nproc_per_node=8 --nnodes=3" in text
