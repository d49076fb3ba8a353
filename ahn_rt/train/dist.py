"""Training on several processes: torchrun detection, the process group, and how the model is spread over
the ranks (docs/training.md, "Multi-GPU training").

``setup`` reads what torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR / MASTER_PORT), opens the
process group (NCCL with rank r on GPU LOCAL_RANK, gloo on the CPU; NVLink multicast stays off:
NCCL_NVLS_ENABLE=0 unless the caller set it) and returns a ``Dist``; without torchrun (or with one
process) it opens nothing and everything below is a no-op. ``make_parallel`` then returns the strategy a
``Trainer`` runs through:

* ``Single``: one process (or ranks with no process group: each takes its slice, nothing is summed).
* ``Replicated`` (``--ddp``, the default under torchrun): every rank holds the whole model; each rank
  accumulates the gradients of its own micro-batches, and the AHN gradients are summed over the ranks
  once per optimizer step, in flat buckets (one all-reduce per bucket), before clipping and AdamW. This
  is data parallelism with DDP's arithmetic (tests/test_train_dist.py checks it against
  ``torch.nn.parallel.DistributedDataParallel``); why it does not use the DDP wrapper's overlapped
  all-reduce is in docs/training.md.
* ``Sharded`` (``--fsdp``): FSDP2 (``torch.distributed.fsdp.fully_shard``): every decoder layer of the
  frozen base and every AHN module is its own FSDP unit, sharded on dim 0 over the ranks (all-gathered
  around its use, freed after it, again for the recompute and backward); the embedding, the final norm
  and the LM head stay whole on every rank (the loss reads the LM head outside any forward). Only the AHN
  parameters are trainable, so only their shards carry gradients and AdamW state; their gradients are
  reduce-scattered as sums (divide factor 1, SUM reduction, which gloo also has) on the last micro-batch
  of a step only.

Every strategy makes the same step: the loss of the step is the mean over every loss position of the
global batch, so one process with the same global batch computes the same function (summed in another
order). The resume state holds whole tensors (``full``), never shards, so it resumes on any world size.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings

import torch

from ..devices import parse_device
from ..errors import AhnError

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
BUCKET_ELEMENTS = 1 << 26          # 256 MB of float32 gradients per all-reduce at most


# ----------------------------------------------------------------------------------------------
# The process group
# ----------------------------------------------------------------------------------------------
def torchrun_ranks(environ=None) -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when this process was started by torchrun (or any launcher that
    sets RANK, WORLD_SIZE and LOCAL_RANK), else None."""
    env = os.environ if environ is None else environ
    if not all(k in env for k in TORCHRUN_ENV):
        return None
    try:
        rank, world, local = (int(env[k]) for k in TORCHRUN_ENV)
    except ValueError:
        raise AhnError(f"RANK / WORLD_SIZE / LOCAL_RANK are not integers "
                       f"({', '.join(f'{k}={env[k]!r}' for k in TORCHRUN_ENV)})") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise AhnError(f"RANK {rank} / WORLD_SIZE {world} / LOCAL_RANK {local} do not describe a process group")
    return rank, world, local


def env_rank() -> int:
    """This process's rank according to the environment (0 without torchrun); needs no process group."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


@dataclasses.dataclass(frozen=True)
class Dist:
    """Where this process stands: its rank, the world size, its device, and the backend of its process
    group (None: no process group, one process); ``owned``: ``setup`` opened the group (``teardown``
    closes only such a one)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    owned: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.backend is not None


def _device(name: str | None, ranks) -> torch.device:
    """The device of this rank: cpu, or cuda (GPU LOCAL_RANK under torchrun with several processes)."""
    multi = ranks is not None and ranks[1] > 1
    dev = parse_device(name)            # a device this machine has (AhnError otherwise)
    if multi and dev.type == "cuda" and dev.index is not None:
        raise AhnError(f"--device {name}: under torchrun each rank uses GPU LOCAL_RANK; give --device cuda "
                       "(choose the GPUs with CUDA_VISIBLE_DEVICES)")
    if not multi or dev.type == "cpu":
        return dev
    local = ranks[2]
    if local >= torch.cuda.device_count():
        raise AhnError(f"LOCAL_RANK {local} but this machine shows {torch.cuda.device_count()} GPU(s); start "
                       "torchrun with --nproc_per_node at most the number of GPUs")
    return torch.device("cuda", local)


def setup(device: str | None = None) -> Dist:
    """The ``Dist`` of this process; under torchrun with more than one process, opens the process group
    (NCCL on CUDA, gloo on the CPU). ``device``: the --device option (None: cuda when available)."""
    ranks = torchrun_ranks()
    dev = _device(device, ranks)
    if ranks is None or ranks[1] == 1:
        return Dist(device=dev)
    rank, world, local = ranks
    import torch.distributed as td
    if not td.is_available():
        raise AhnError("this torch build has no torch.distributed; run one process")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if td.is_initialized():                      # opened by the caller: use it as it is
        if td.get_world_size() != world or td.get_rank() != rank:
            raise AhnError("the open process group does not match RANK / WORLD_SIZE")
        return Dist(rank, world, local, dev, td.get_backend(), owned=False)
    try:
        if backend == "nccl":
            os.environ.setdefault("NCCL_NVLS_ENABLE", "0")       # NVLink multicast off
            torch.cuda.set_device(dev)
            td.init_process_group("nccl", device_id=dev)
        else:
            td.init_process_group("gloo")
    except (RuntimeError, ValueError) as e:                      # DistNetworkError, DistStoreError, ...
        raise AhnError(f"cannot open the {backend} process group of {world} ranks: "
                       f"{(str(e).strip().splitlines() or [type(e).__name__])[0][:200]}") from None
    return Dist(rank, world, local, dev, backend, owned=True)


def teardown(d: Dist, finished: bool = False):
    """Close the process group ``setup`` opened (a no-op otherwise). DDP / FSDP objects caught in reference
    cycles still hold the group until a collection: collect them first, or the interpreter's exit tears
    the group down under them ("terminate called without an active exception" on a rank). ``finished``:
    every rank ended its run normally, so all meet at a barrier (no rank still inside a collective) first."""
    import gc

    import torch.distributed as td
    if d.owned and td.is_available() and td.is_initialized():
        gc.collect()
        if finished and d.world_size > 1:
            td.barrier()
        td.destroy_process_group()


def _comm_device(d: Dist) -> torch.device:
    return d.device if d.backend == "nccl" else torch.device("cpu")


def all_sum_(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum ``t`` over the ranks, in place (through the device NCCL needs); a no-op with one process."""
    if d.active:
        import torch.distributed as td
        x = t.to(_comm_device(d))
        td.all_reduce(x)
        if x is not t:
            t.copy_(x)
    return t


def first_failure(d: Dist, failed: bool) -> int | None:
    """Collective: the lowest rank that reports ``failed`` (None: no rank did). Every rank must call it at
    the same point."""
    if not d.active:
        return d.rank if failed else None
    import torch.distributed as td
    t = torch.tensor([d.rank if failed else d.world_size], dtype=torch.int64, device=_comm_device(d))
    td.all_reduce(t, op=td.ReduceOp.MIN)
    v = int(t.item())
    return None if v >= d.world_size else v


class PeerFailed(Exception):
    """This run stops with exit status ``code`` and nothing more to print: another rank failed and said
    why, or this rank already did (``agreed``)."""

    def __init__(self, rank: int, code: int = 2):
        super().__init__(f"rank {rank} failed")
        self.rank, self.code = rank, code


@contextlib.contextmanager
def agreed(d: Dist, report):
    """Run a block on every rank and agree on its outcome at its end. When some rank raised AhnError, the
    lowest such rank calls ``report(error)`` (prints it), then every rank leaves a barrier together and
    raises PeerFailed: the error is said once, and no rank is killed by the launcher (which stops all
    ranks as soon as one exits with an error) before it was said. Without a process group the error is
    raised as it is."""
    err = None
    try:
        yield
    except AhnError as e:
        if not d.active:
            raise
        err = e
    first = first_failure(d, err is not None)
    if first is None:
        return
    import torch.distributed as td
    if first == d.rank:
        report(err)
    td.barrier()
    raise PeerFailed(first)


# ----------------------------------------------------------------------------------------------
# Strategies
# ----------------------------------------------------------------------------------------------
class Single:
    """One process, or ranks without a process group (each rank computes its own slice; nothing is
    summed). The base class of the strategies: every hook is the identity."""
    name = "single"
    skips_empty = True           # a micro-batch without loss positions may be skipped (no collective in it)

    def __init__(self, d: Dist | None = None, *, rank: int | None = None, world_size: int | None = None):
        self.d = d or Dist()
        self.rank = self.d.rank if rank is None else rank
        self.world_size = self.d.world_size if world_size is None else world_size

    # forward passes
    def teacher(self, model, ids):
        return model.forward_teacher(ids)

    def student(self, model, ids, window, sinks, *, checkpoint: bool):
        return model.forward_student(ids, window, sinks, checkpoint=checkpoint)

    def micro_batch(self, last: bool):
        """Context around one micro-batch's forward and backward (``last``: the step's last one)."""
        return contextlib.nullcontext()

    # reductions
    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        return all_sum_(t, self.d)

    def reduce_grads(self, params: list[torch.nn.Parameter]):
        """Make every rank's ``p.grad`` the sum over the ranks (called once per optimizer step)."""

    # whole tensors for the resume state and the model file
    def full(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def local(self, full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """This rank's part of ``full``, laid out as ``like`` (a parameter or its optimizer state)."""
        return full

    def check_in_sync(self, named: list[tuple[str, torch.nn.Parameter]], step: int):
        """Raise AhnError when ranks that should hold the same AHN weights do not."""

    def describe(self) -> str:
        return "one process"


class Replicated(Single):
    """``--ddp``: the whole model on every rank, AHN gradients summed once per optimizer step."""
    name = "ddp"

    def reduce_grads(self, params):
        if not self.d.active:
            return
        import torch.distributed as td
        buckets, cur, n = [], [], 0
        for p in params:
            if cur and (n + p.grad.numel() > BUCKET_ELEMENTS or p.grad.dtype != cur[0].grad.dtype):
                buckets.append(cur)
                cur, n = [], 0
            cur.append(p)
            n += p.grad.numel()
        if cur:
            buckets.append(cur)
        dev = _comm_device(self.d)
        for bucket in buckets:
            flat = torch.cat([p.grad.reshape(-1) for p in bucket]).to(dev)
            td.all_reduce(flat)
            off = 0
            for p in bucket:
                k = p.grad.numel()
                p.grad.copy_(flat[off:off + k].view_as(p.grad))
                off += k

    def check_in_sync(self, named, step):
        if not self.d.active or not named:
            return
        import torch.distributed as td
        sums = torch.stack([p.detach().double().sum() for _, p in named]).to(_comm_device(self.d))
        lo, hi = sums.clone(), sums.clone()
        td.all_reduce(lo, op=td.ReduceOp.MIN)
        td.all_reduce(hi, op=td.ReduceOp.MAX)
        bad = (lo != hi).nonzero().flatten().tolist()
        if bad:
            raise AhnError(f"after step {step} the ranks hold different AHN weights ({named[bad[0]][0]} and "
                           f"{len(bad) - 1} more); this is a bug, please report it")

    def describe(self) -> str:
        return f"{self.world_size} ranks, data parallel (--ddp)"


class _Entry(torch.nn.Module):
    """The FSDP root: teacher and student both enter through its forward, so FSDP's root hooks (lazy
    init, stream waits, the end-of-backward callback) run for both."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, which: str, *args, **kwargs):
        if which == "teacher":
            return self.model.forward_teacher(*args, **kwargs)
        return self.model.forward_student(*args, **kwargs)


class Sharded(Single):
    """``--fsdp``: FSDP2 over the decoder layers of the frozen base and the AHN modules (see the module
    docstring). The model may sit on the CPU: each unit is moved to this rank's device as it is sharded,
    so one GPU never holds more than one whole layer at a time."""
    name = "fsdp"
    skips_empty = False          # every rank must run the same forwards and backwards (their all-gathers)

    def __init__(self, d: Dist, model):
        super().__init__(d)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        self.mesh = init_device_mesh(d.device.type, (d.world_size,))
        self.model = model
        self.calls = 0
        _route_layers_through_modules(model, self)
        for layer in model.layers:
            fully_shard(layer, mesh=self.mesh, reshard_after_forward=True)
        for mem in model.ahn:
            fully_shard(mem, mesh=self.mesh, reshard_after_forward=True)
            _sum_gradients(mem)
        whole = [p for n, p in model.named_parameters(recurse=False)]
        with torch.no_grad():
            for p in whole:
                p.data = p.data.to(d.device)
        self.entry = _Entry(model)
        fully_shard(self.entry, mesh=self.mesh, reshard_after_forward=True, ignored_params=set(whole))
        # The memory modules return views; TrainModel uses them out of place only (.to(dtype) and
        # scatter_add), which keeps FSDP's pre-backward hook (tests/test_train_dist.py compares the gradients)
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")

    def _through(self, which, *args, **kwargs):
        before = self.calls
        out = self.entry(which, *args, **kwargs)
        if self.calls - before < len(self.model.layers):
            raise AhnError("internal: TrainModel ran a decoder layer without calling TrainModel._layer, so FSDP "
                           "could not gather its weights (ahn_rt/train/dist.py _route_layers_through_modules)")
        return out

    def teacher(self, model, ids):
        return self._through("teacher", ids)

    def student(self, model, ids, window, sinks, *, checkpoint):
        # every AHN module must run on every rank (its all-gather is a collective): a micro-batch needs one
        # token past the window; the data loader guarantees it (t >= S + W + 1 for some loss position)
        if ids.shape[1] <= int((torch.as_tensor(window) + torch.as_tensor(sinks)).min()):
            raise AhnError("internal: a micro-batch with no token past the window under --fsdp")
        return self._through("student", ids, window, sinks, checkpoint=checkpoint)

    def micro_batch(self, last):
        self.entry.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def full(self, t):
        return t.full_tensor() if _is_dtensor(t) else t

    def local(self, full, like):
        if not _is_dtensor(like):
            return full
        from torch.distributed.tensor import distribute_tensor
        return distribute_tensor(full.to(like.dtype).to(self.d.device), like.device_mesh, like.placements,
                                 src_data_rank=None)

    def describe(self) -> str:
        return f"{self.world_size} ranks, FSDP2 over the base's decoder layers and the AHN modules (--fsdp)"


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:       # pragma: no cover
        return False
    return isinstance(t, DTensor)


def _sum_gradients(module):
    """Reduce-scatter AHN gradients as plain sums: the trainer weights each micro-batch by its share of the
    global loss positions, so no averaging over ranks may follow (and gloo has no PREMUL_SUM)."""
    if hasattr(module, "set_gradient_divide_factor"):
        module.set_gradient_divide_factor(1.0)
    else:                                                    # pragma: no cover (torch < 2.8)
        module.set_reduce_scatter_divide_factor(1.0)
    if hasattr(module, "set_force_sum_reduction_for_comms"):
        module.set_force_sum_reduction_for_comms(True)


def _route_layers_through_modules(model, counter):
    """TrainModel runs decoder layer i as ``self._layer(i, h, rope, student)``, reading the weights of
    ``self.layers[i]`` without calling that module; FSDP gathers a unit's weights in the hooks of its call.
    So each base layer's forward becomes TrainModel's layer function, and the model's ``_layer`` calls
    the layer module (checkpointing wraps the call, so the recompute in backward goes through it too)."""
    layer_fn = getattr(type(model), "_layer", None)
    if layer_fn is None:
        raise AhnError("internal: TrainModel has no _layer(i, h, rope, student); --fsdp cannot shard it")

    def forward(*args, **kwargs):
        counter.calls += 1
        return layer_fn(model, *args, **kwargs)

    for layer in model.layers:
        layer.forward = forward
    model._layer = lambda i, h, rope, student: model.layers[i](i, h, rope, student)


# ----------------------------------------------------------------------------------------------
def make_parallel(mode: str, d: Dist, model) -> Single:
    """The strategy for ``mode`` ("ddp" or "fsdp") on ``d``; with one process, ``Single``. ``--fsdp``
    shards ``model`` in place (build it on the CPU; units move to ``d.device``); the others expect the
    model on ``d.device`` already. Build the Trainer (and its optimizer) after this call: sharding
    replaces the parameters."""
    if mode not in ("ddp", "fsdp"):
        raise AhnError(f"unknown parallel mode {mode!r}")
    if not d.active:
        return Single(d)
    if mode == "fsdp":
        return Sharded(d, model)
    return Replicated(d)


def model_device(mode: str, d: Dist) -> torch.device:
    """Where to build the model before ``make_parallel``: the CPU for FSDP (it moves the shards), else
    this rank's device."""
    return torch.device("cpu") if (mode == "fsdp" and d.active) else d.device


__all__ = ["Dist", "PeerFailed", "Replicated", "Sharded", "Single", "agreed", "all_sum_", "env_rank",
           "first_failure", "make_parallel", "model_device", "setup", "teardown", "torchrun_ranks"]
