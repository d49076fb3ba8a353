"""Training on several processes (ahn_rt/train/dist.py): two gloo ranks on the CPU compute what one process
computes with the same global batch (--batch x --grad-accum x ranks).

A tiny random Qwen2 (2 layers, d = 32, V = 271, float32, written with ahn_rt.init_weights +
write_checkpoint) and pre-tokenized data with the recipe's random (W, S) per sequence. Three launches of
``python -m torch.distributed.run --standalone --nproc_per_node 2`` (torchrun picks a free port):

* the real entry point, ``-m ahn_rt.train``, data parallel (the default) and --fsdp, against one process
  (``main`` in this process) with --grad-accum 2: the logged losses and gradient norms of 3 steps and the
  written model; only rank 0 writes OUT; the --fsdp run stops after step 2 and its resume state (whole
  tensors) resumes on one process to the uninterrupted run's step-2 loss and final weights; a resume with
  another global batch is refused in one line unless --allow-global-batch-change;
* this file as the worker script (``--worker``): the whole AHN gradients of the first two optimizer steps
  (grad-accum 2 per rank, from an AHN whose o_proj is not zero, so that every parameter has a gradient)
  and their losses under --ddp, --fsdp and torch's own DistributedDataParallel (the equivalence that lets --ddp
  keep its explicit all-reduce), the FSDP2 sharding plan (base layers and AHN sharded on dim 0, embedding
  whole, the optimizer holding AHN shards only), and a negative control: ranks that both read rank 0's
  slice instead of their own differ from one process by far more than the tolerance.

Tolerance table (float32):

  DIST_RTOL  1e-6  relative (to the largest magnitude of the compared tensor, or to the loss), one process
                   vs two ranks: the first step's gradients (seen 1.3e-7) and every logged loss and
                   gradient norm: the same sums in another order (rank 0's micro-batches 0 and 2 plus rank
                   1's 1 and 3, against 0 + 1 + 2 + 3, or exactly a + b in the end-to-end runs, where the
                   three runs agree bit for bit).
  ADAM_RTOL  1e-5  the same, for the second step's gradients (seen 1.3e-6): the first AdamW step divides
                   every gradient element by its own magnitude, so the ~1e-7 differences of the small
                   elements become weight differences of that relative size, and the second step's
                   gradients are computed at (very slightly) different weights.
  APART      1e-2  the smallest relative difference the negative control must show (seen: ~2).
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":                  # run as a torchrun worker: import ahn_rt from this checkout
    sys.path.insert(0, str(ROOT))

from ahn_rt.config import parse_config  # noqa: E402
from ahn_rt.errors import AhnError  # noqa: E402
from ahn_rt.init_weights import random_state_dict  # noqa: E402
from ahn_rt.train import dist  # noqa: E402
from ahn_rt.train.data import BudgetSpec, load_dataset  # noqa: E402
from ahn_rt.train.model import TrainModel  # noqa: E402
from ahn_rt.train.trainer import Trainer, TrainSettings, read_log  # noqa: E402
from ahn_rt.weights import ahn_shapes, write_checkpoint  # noqa: E402

DIST_RTOL = 1e-6
ADAM_RTOL = 1e-5
APART = 1e-2

V = 271
CFG = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=32, intermediate_size=64,
           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=V,
           tie_word_embeddings=True, rope_theta=10000.0, max_position_embeddings=4096, hidden_act="silu",
           rms_norm_eps=1e-6, torch_dtype="float32", eos_token_id=258)
WORKER_MODES = ("ddp", "fsdp", "torch-ddp", "same-data")


def base_state_dict():
    return random_state_dict(CFG, ahn=False, dtype=torch.float32, std=0.2, seed=2)


def make_inputs(root: Path):
    """root/base (the tiny model) and root/ids.jsonl (12 sequences of 40-80 tokens)."""
    write_checkpoint(root / "base" / "model.safetensors", base_state_dict(), CFG, config_json=True)
    rng = random.Random(0)
    with open(root / "ids.jsonl", "w", encoding="utf-8") as f:
        for _ in range(12):
            f.write(json.dumps({"input_ids": [rng.randrange(V) for _ in range(rng.randrange(40, 80))]}) + "\n")


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b| (0 when both are all zeros)."""
    scale = float(b.abs().max())
    d = float((a - b).abs().max())
    return d / scale if scale > 0 else d


# ----------------------------------------------------------------------------------------------
# Two optimizer steps through the Trainer, capturing the summed AHN gradients before each AdamW step
# ----------------------------------------------------------------------------------------------
class TorchDDP(dist.Replicated):
    """The student through torch.nn.parallel.DistributedDataParallel (bucketed all-reduce overlapped with
    backward, no_sync on all but the last micro-batch). DDP averages over the ranks; the trainer weights
    each micro-batch by its share of the global loss positions, which needs the sum: x world size."""
    name = "torch-ddp"

    def __init__(self, d, model):
        super().__init__(d)
        self.ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)

    def student(self, model, ids, window, sinks, *, checkpoint):
        return self.ddp(ids, window, sinks, checkpoint=checkpoint)

    def micro_batch(self, last):
        return contextlib.nullcontext() if last else self.ddp.no_sync()

    def reduce_grads(self, params):
        for p in params:
            p.grad.mul_(self.world_size)


def start_ahn(config) -> dict:
    """The official initial AHN values but o_proj drawn at random (std 0.05): every AHN parameter (but D,
    which the memory does not use) has a gradient from the first step on."""
    ahn = TrainModel(config, base_state_dict(), None, base_dtype=torch.float32, seed=0).ahn_state_dict()
    g = torch.Generator().manual_seed(7)
    return {k: (torch.randn(v.shape, generator=g) * 0.05 if k.endswith("o_proj.weight") else v.clone())
            for k, v in ahn.items()}


def two_steps(root: Path, make_parallel, grad_accum: int):
    """(gradients of steps 0 and 1 as whole tensors, logged losses, trainer)."""
    config = parse_config(CFG, "test")
    data = load_dataset(root / "ids.jsonl", vocab_size=V, seq_len=4096, budget=BudgetSpec())
    model = TrainModel(config, base_state_dict(), start_ahn(config), base_dtype=torch.float32, seed=0)
    par = make_parallel(model)
    settings = TrainSettings(steps=2, batch=1, grad_accum=grad_accum, lr=1e-2, max_grad_norm=0.0, seed=3)
    tr = Trainer(model, data, settings, parallel=par)
    grads, step = [], tr.optimizer.step

    def capture(*args, **kwargs):
        grads.append({k: par.full(p.grad).detach().clone() for k, p in tr.named})
        return step(*args, **kwargs)
    tr.optimizer.step = capture
    losses = [tr.train_step()["loss"] for _ in range(2)]
    return grads, losses, tr


def fsdp_plan(tr) -> dict:
    """What --fsdp sharded, as this rank sees it."""
    from torch.distributed.tensor import DTensor, Shard
    model = tr.model
    opt_params = [p for g in tr.optimizer.param_groups for p in g["params"]]
    state = [v for st in tr.optimizer.state.values() for v in st.values() if torch.is_tensor(v) and v.dim() > 0]
    return {
        "base_sharded": all(isinstance(p, DTensor) and p.placements == (Shard(0),) and not p.requires_grad
                            for layer in model.layers for p in layer.parameters()),
        "base_local": sum(p.to_local().numel() for layer in model.layers for p in layer.parameters()),
        "base_global": sum(p.numel() for layer in model.layers for p in layer.parameters()),
        "whole": [n for n, p in model.named_parameters(recurse=False) if not isinstance(p, DTensor)],
        "ahn_sharded": all(isinstance(p, DTensor) and p.placements == (Shard(0),) for _, p in tr.named),
        "optimizer_is_ahn": sorted(map(id, opt_params)) == sorted(id(p) for _, p in tr.named),
        "optimizer_local": sum(v.to_local().numel() for v in state if isinstance(v, DTensor)),
        "optimizer_plain": sum(v.numel() for v in state if not isinstance(v, DTensor)),
        "ahn_local": sum(p.to_local().numel() for _, p in tr.named),
        "ahn_global": sum(p.numel() for _, p in tr.named),
    }


def worker(out: Path, root: Path):
    """One rank of ``python -m torch.distributed.run --nproc_per_node 2 tests/test_train_dist.py --worker
    OUT ROOT``: every mode in WORKER_MODES; rank 0 writes OUT/<mode>.safetensors and OUT/results.json."""
    torch.set_num_threads(1)
    d = dist.setup("cpu")
    assert d.active and d.backend == "gloo" and d.world_size == 2
    results = {}
    for mode in WORKER_MODES:
        def make(model, mode=mode):
            if mode == "torch-ddp":
                return TorchDDP(d, model)
            par = dist.make_parallel("fsdp" if mode == "fsdp" else "ddp", d, model)
            if mode == "same-data":
                par.rank = 0           # both ranks read rank 0's slice of every step
            return par
        grads, losses, tr = two_steps(root, make, grad_accum=2)
        res = {"losses": losses}
        if mode == "fsdp":
            res["plan"] = fsdp_plan(tr)
        if d.rank == 0:
            save_file({f"{s}.{k}": g.contiguous() for s, gs in enumerate(grads) for k, g in gs.items()},
                      str(out / f"{mode}.safetensors"))
        results[mode] = res
        # torch's DDP keeps a reference to the process group: free it now, not at interpreter exit after
        # the group is gone (gloo's threads torn down during exit abort the rank)
        del grads, tr
        gc.collect()
    if d.rank == 0:
        (out / "results.json").write_text(json.dumps(results))
    import torch.distributed as td
    td.barrier()          # no rank closes the group while the other still uses it
    dist.teardown(d)


# ----------------------------------------------------------------------------------------------
# Fixtures and launchers
# ----------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one intra-op thread is fastest (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_dist")
    make_inputs(root)
    return root


def torchrun(*args, timeout=180) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc_per_node 2 ARGS`` from the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *[str(a) for a in args]]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=str(ROOT))


def train_args(root: Path, out: Path, *extra):
    return ["--base", root / "base", "--data", root / "ids.jsonl", "--out", out, "--steps", 3, "--lr", "1e-2",
            "--seed", 3, "--log-every", 1, "--save-dtype", "float32", *extra]


def main_here(capsys, *args):
    """python -m ahn_rt.train in this process (one rank) -> (exit code, stderr)."""
    from ahn_rt.train.__main__ import main
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


@pytest.fixture(scope="module")
def one_process(tiny, tmp_path_factory):
    """The reference: one process, --batch 1 --grad-accum 2 (global batch 2), 3 steps."""
    from ahn_rt.train.__main__ import main
    out = tmp_path_factory.mktemp("one") / "out"
    assert main([str(a) for a in train_args(tiny, out, "--grad-accum", 2)]) == 0
    return out


def weights(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def assert_same_run(log_a, log_b, steps):
    assert [r["step"] for r in log_a] == steps and [r["step"] for r in log_b] == steps
    for a, b in zip(log_a, log_b):
        assert abs(a["loss"] - b["loss"]) <= DIST_RTOL * abs(b["loss"]), (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= DIST_RTOL * abs(b["grad_norm"]), (a, b)
        assert (a["tokens"], a["valid"], a["lr"]) == (b["tokens"], b["valid"], b["lr"])


# ----------------------------------------------------------------------------------------------
# The real entry point under torchrun
# ----------------------------------------------------------------------------------------------
def test_torchrun_two_ranks_equal_one_process(tiny, one_process, tmp_path):
    out = tmp_path / "ddp"
    p = torchrun("-m", "ahn_rt.train", *train_args(tiny, out))     # --batch 1 --grad-accum 1 x 2 ranks
    assert p.returncode == 0, p.stderr[-3000:]
    one, two = read_log(one_process), read_log(out)
    assert_same_run(two, one, [0, 1, 2])
    assert len({r["loss"] for r in one}) == 3 and all(r["world_size"] == 2 for r in two)
    a, b = weights(out / "model.safetensors"), weights(one_process / "model.safetensors")
    assert set(a) == set(b) and max(rel_diff(a[k], b[k]) for k in b) <= DIST_RTOL
    # only rank 0 wrote OUT and printed
    assert sorted(x.name for x in out.iterdir()) == sorted(x.name for x in one_process.iterdir())
    assert len((out / "log.jsonl").read_text().splitlines()) == 3
    assert p.stderr.count("[ahn_rt.train] wrote") == 1 and p.stderr.count("step 3/3") == 1
    assert "2 ranks, data parallel (--ddp)" in p.stderr and "rank 1" not in p.stderr
    run = json.loads((out / "run.json").read_text())
    assert (run["world_size"], run["parallel"], run["run"]["global_batch"]) == (2, "ddp", 2)


def test_fsdp_two_ranks_stop_and_resume_on_one_process(tiny, one_process, tmp_path, capsys):
    out = tmp_path / "fsdp"
    p = torchrun("-m", "ahn_rt.train", *train_args(tiny, out, "--fsdp", "--stop-after", 1))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "(--fsdp)" in p.stderr and "stopped after step 1 of 3" in p.stderr
    # resumed under --fsdp: the whole tensors of the state are cut into this rank's shards; this step recomputes
    # each layer's (sharded) memory module in backward instead of the layer: the same numbers
    p = torchrun("-m", "ahn_rt.train", "--base", tiny / "base", "--data", tiny / "ids.jsonl", "--out", out,
                 "--resume", "--fsdp", "--stop-after", 2, "--activation-checkpointing", "memory")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed at step 1" in p.stderr and "stopped after step 2 of 3" in p.stderr
    assert_same_run(read_log(out), read_log(one_process)[:2], [0, 1])
    # the resume state holds whole tensors: the AHN weights and AdamW moments at their full shapes
    ahn = weights(out / "resume" / "ahn.safetensors")
    shapes = ahn_shapes(parse_config(CFG, "test"), "GatedDeltaNet")
    assert {k: tuple(v.shape) for k, v in ahn.items()} == shapes
    st = weights(out / "resume" / "state.safetensors")
    assert all(tuple(st[f"optim.{k}.exp_avg"].shape) == s for k, s in shapes.items() if f"optim.{k}.exp_avg" in st)
    # another global batch is refused in one line, unless asked for (on a copy)
    rc, err = main_here(capsys, "--base", tiny / "base", "--data", tiny / "ids.jsonl", "--out", out, "--resume",
                        "--grad-accum", 1)
    assert rc == 2 and err.count("\n") == 1 and "differs from the resumed run's 2" in err, err
    other = tmp_path / "other"
    shutil.copytree(out, other)
    rc, err = main_here(capsys, "--base", tiny / "base", "--data", tiny / "ids.jsonl", "--out", other, "--resume",
                        "--grad-accum", 1, "--allow-global-batch-change")
    assert rc == 0, err
    assert read_log(other)[-1]["tokens"] != read_log(one_process)[2]["tokens"]     # one sequence, not two
    # one process resumes the 2-rank state (grad-accum 2 = global batch 2 / 1 rank) to the same step 2
    rc, err = main_here(capsys, "--base", tiny / "base", "--data", tiny / "ids.jsonl", "--out", out, "--resume",
                        "--save-dtype", "float32")
    assert rc == 0, err
    assert_same_run(read_log(out), read_log(one_process), [0, 1, 2])
    a, b = weights(out / "model.safetensors"), weights(one_process / "model.safetensors")
    assert max(rel_diff(a[k], b[k]) for k in b) <= DIST_RTOL


@pytest.mark.parametrize("mode", ["--ddp", "--fsdp"])
def test_train_layers_on_two_ranks_equal_one_process(tiny, tmp_path, capsys, mode):
    """--train-layers 1 under both strategies: the same losses and weights as one process, layer 0's memory
    untouched (FSDP2 shards it like any unit; it just gets no gradient)."""
    one = tmp_path / "one"
    rc, err = main_here(capsys, *train_args(tiny, one, "--grad-accum", 2, "--train-layers", 1))
    assert rc == 0, err
    out = tmp_path / mode.strip("-")
    p = torchrun("-m", "ahn_rt.train", *train_args(tiny, out, mode, "--train-layers", 1))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "training layers 1 only" in p.stderr
    assert_same_run(read_log(out), read_log(one), [0, 1, 2])
    a, b = weights(out / "model.safetensors"), weights(one / "model.safetensors")
    assert set(a) == set(b) and max(rel_diff(a[k], b[k]) for k in b) <= DIST_RTOL
    fresh = TrainModel(parse_config(CFG, "test"), base_state_dict(), None, base_dtype=torch.float32,
                       seed=3).ahn_state_dict()
    for k in a:           # (GatedDeltaNet does not use D: it never moves)
        if k.startswith("model.layers.0.") or k.endswith(".D"):
            assert torch.equal(a[k], fresh[k]), k
        else:
            assert not torch.equal(a[k], fresh[k]), k


def test_torchrun_mistake_is_one_line_from_one_rank(tiny, one_process):
    p = torchrun("-m", "ahn_rt.train", *train_args(tiny, one_process))    # OUT already holds a run
    assert p.returncode != 0
    lines = [x for x in p.stderr.splitlines() if x.startswith("error")]
    assert lines == [f"error: {one_process} already holds a training run; pass --resume to continue it, "
                     "--overwrite to start over, or choose another --out"], p.stderr[-3000:]


def test_torchrun_divergence_is_one_line_and_no_traceback(tiny, tmp_path):
    """Every rank finds the non-finite loss of the same step; rank 0 says it, the other rank waits quietly
    until torchrun stops it (no KeyboardInterrupt traceback), and no model is written."""
    out = tmp_path / "diverged"
    p = torchrun("-m", "ahn_rt.train", *train_args(tiny, out, "--steps", 4, "--lr", "1e30", "--warmup-ratio", 0))
    assert p.returncode != 0
    lines = [x for x in p.stderr.splitlines() if x.startswith("error")]
    assert len(lines) == 1 and lines[0].startswith("error: training diverged at step "), p.stderr[-3000:]
    assert "KeyboardInterrupt" not in p.stderr and "Diverged" not in p.stderr, p.stderr[-3000:]
    assert not (out / "model.safetensors").exists()


# ----------------------------------------------------------------------------------------------
# Gradients, the FSDP2 plan, torch DDP, and the negative control (this file as the worker)
# ----------------------------------------------------------------------------------------------
def test_gradients_of_two_ranks_equal_one_process(tiny, tmp_path):
    out = tmp_path / "worker"
    out.mkdir()
    p = torchrun(Path(__file__).resolve(), "--worker", out, tiny)
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    ref_grads, ref_losses, _ = two_steps(tiny, lambda model: dist.Single(), grad_accum=4)
    assert all(float(g.abs().max()) > 0 for k, g in ref_grads[0].items() if not k.endswith(".D"))
    first, second, loss = {}, {}, {}
    for mode in WORKER_MODES:
        got = load_file(str(out / f"{mode}.safetensors"))
        first[mode] = max(rel_diff(got[f"0.{k}"], g) for k, g in ref_grads[0].items())
        second[mode] = max(rel_diff(got[f"1.{k}"], g) for k, g in ref_grads[1].items())
        loss[mode] = max(abs(a - b) / abs(b) for a, b in zip(results[mode]["losses"], ref_losses))
    print(f"relative differences to one process: first step {first}, second step {second}, losses {loss}")
    for mode in ("ddp", "fsdp", "torch-ddp"):
        assert first[mode] <= DIST_RTOL and loss[mode] <= DIST_RTOL and second[mode] <= ADAM_RTOL, mode
    assert first["same-data"] > APART and loss["same-data"] > APART      # the comparison can fail
    plan = results["fsdp"]["plan"]
    assert plan["base_sharded"] and plan["ahn_sharded"] and plan["optimizer_is_ahn"]
    assert plan["whole"] == ["embed", "norm"]             # tied LM head: the embedding
    assert plan["base_local"] < 0.6 * plan["base_global"]
    # AdamW holds two moments of this rank's AHN shards, nothing whole
    assert plan["ahn_local"] < 0.6 * plan["ahn_global"]
    assert plan["optimizer_plain"] == 0 and plan["optimizer_local"] == 2 * plan["ahn_local"]


def test_setup_without_torchrun_is_one_process(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    d = dist.setup("cpu")
    assert (d.rank, d.world_size, d.active, d.device.type) == (0, 1, False, "cpu")
    assert isinstance(dist.make_parallel("fsdp", d, None), dist.Single)
    assert dist.torchrun_ranks({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == (1, 2, 1)
    with pytest.raises(AhnError, match="do not describe"):
        dist.torchrun_ranks({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    worker(Path(sys.argv[2]), Path(sys.argv[3]))
