"""The training loop: self-distillation of the AHN memory on a frozen base (docs/semantics.md §10).

``Trainer`` owns one optimizer step at a time (``train_step``) and the loop around it (``fit``): logging,
progress and resume states happen only where ``is_main``; nothing here is global, so a launcher (torchrun)
builds one Trainer per rank. How the ranks share the work is a strategy of ``ahn_rt.train.dist``
(``parallel``): every rank reads the same global order of sequences and takes its own slice of each step;
the loss-position counts and the loss are summed over the ranks, and the AHN gradients either summed once
per step (``Replicated``, --ddp) or reduce-scattered by FSDP2 (``Sharded``, --fsdp). The resume state holds
whole tensors only, so it does not depend on the world size.

One optimizer step: the next ``batch * grad_accum * world_size`` sequences (the global batch) in the
(seeded) data order, a (W, S) drawn per sequence in that order, micro-batches of ``batch`` right-padded
sequences (micro-batch k of rank r holds the global batch's sequences (k * world_size + r) * batch onward,
so one process with grad_accum * world_size micro-batches sees the same ones); per micro-batch the teacher
(full attention, no grad) and the student (sinks + window + memory) hidden states and ``distill_loss``;
every micro-batch's loss is weighted by its share of the step's loss positions, so the step minimizes the
mean KL over all of them (exactly KL(full || student) averaged over positions, whatever the batching).
Then gradient clipping, the learning rate of the schedule, AdamW.

Schedule: linear warmup over ceil(warmup_ratio * steps) steps (step k < warmup uses lr * (k + 1) / warmup,
so the first step already moves), then cosine decay from lr towards 0 at ``steps``. Weight decay is
applied to the projection matrices only (a_proj, b_proj, g_proj, o_proj), not to A_log, dt_bias, D or the
output norm weight: decaying a log-decay rate, a bias or a norm gain towards 0 changes what the memory
does rather than regularizing it (the usual no-decay rule for biases, norms and SSM decay parameters).
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

from ..errors import AhnError
from ..weights import ahn_key, atomic_write_text
from . import checkpoint as ckpt_io
from . import dist as dist_mod
from .data import BudgetSpec, Cursor, Dataset, MicroBatch, collate


class Diverged(AhnError):
    """The loss, the gradient norm or an AHN weight became NaN or infinite: training stops before the step's
    update is applied or the weights are saved (one line). A runtime failure, not a usage error: the
    command line exits 1. The values checked are the same on every rank (summed over the ranks, or whole)."""
    exit_code = 1
    same_on_every_rank = True


@dataclasses.dataclass
class TrainSettings:
    steps: int | None = None            # None: one epoch
    batch: int = 1                      # sequences per micro-batch (per rank)
    grad_accum: int = 1                 # micro-batches per optimizer step
    lr: float = 1e-4
    warmup_ratio: float = 0.1
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0          # 0: no clipping
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    ce_weight: float = 0.0
    seed: int = 0
    budget: BudgetSpec = dataclasses.field(default_factory=BudgetSpec)
    autocast_bf16: bool = False         # bf16 autocast around the forward passes (fp32 master weights)
    activation_checkpointing: bool | str = "layer"   # model.CHECKPOINT_MODES (True: "layer", False: "none")
    log_every: int = 10                 # a progress line every N steps when stderr is not a terminal
    save_every: int = 100               # a resume state every N steps (and at the end); 0: only at the end
    stop_after: int | None = None       # stop (with a resume state) after this many steps
    train_layers: tuple[int, ...] | None = None   # the layers whose memory trains (None: every layer); the
                                                  # others keep their starting weights and get no gradient


def lr_at(step: int, base_lr: float, total: int, warmup: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def ahn_named_parameters(model, layers=None) -> list[tuple[str, torch.nn.Parameter]]:
    """(official key, parameter) for every AHN parameter of ``model`` (of ``layers`` only, if given), in
    layer order."""
    out = []
    for n, layer in enumerate(model.ahn):
        if layers is None or n in layers:
            for name, p in layer.named_parameters():
                out.append((ahn_key(n, name), p))
    return out


def no_decay_parameters(model) -> list[torch.nn.Parameter]:
    """The AHN parameters that weight decay leaves alone: the names each memory module declares
    (``NO_DECAY``: its gates' biases and log-rates, its norm weights)."""
    return [p for layer in model.ahn for name, p in layer.named_parameters() if name in type(layer).NO_DECAY]


def _rng_state_tensors() -> dict[str, torch.Tensor]:
    t = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            t[f"rng.cuda.{i}"] = s
    return t


def _py_state_to_json(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _py_state_from_json(obj) -> tuple:
    version, internal, gauss = obj
    return (int(version), tuple(int(x) for x in internal), gauss)


class Progress:
    """A plain-text progress bar on a terminal (redrawn in place), else one line every ``every`` steps."""

    def __init__(self, total: int, start: int = 0, *, every: int = 10, stream=None, world_size: int = 1):
        self.stream = stream if stream is not None else sys.stderr
        self.world_size = max(1, world_size)
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.total, self.start, self.every = total, start, max(1, every)
        self.t0 = time.perf_counter()
        self.tokens = 0
        self._last_draw = 0.0
        self._open = False

    @staticmethod
    def _hms(s: float) -> str:
        s = int(max(0, s))
        return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"

    def update(self, rec: dict):
        done = rec["step"] + 1
        self.tokens += rec["tokens"]
        el = time.perf_counter() - self.t0
        rate = (done - self.start) / el if el > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else 0.0
        tps = self.tokens / el if el > 0 else 0.0
        loss = "-" if rec["loss"] is None else f"{rec['loss']:.4f}"
        per_gpu = f" ({tps / self.world_size:,.0f}/rank)" if self.world_size > 1 else ""
        text = (f"step {done}/{self.total} loss {loss} lr {rec['lr']:.2e} {tps:,.0f} tok/s{per_gpu} "
                f"elapsed {self._hms(el)} ETA {self._hms(eta)}")
        if self.tty:
            now = time.perf_counter()
            if now - self._last_draw < 0.1 and done < self.total:
                return
            self._last_draw = now
            width = 24
            fill = int(width * done / max(1, self.total))
            self.stream.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {text}\033[K")
            self._open = True
        elif done % self.every == 0 or done == self.start + 1 or done >= self.total:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self):
        """End the bar's line (a terminal only)."""
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False


def _default_parallel(rank: int, world_size: int, device) -> dist_mod.Single:
    """The strategy of a Trainer built with only ``rank`` / ``world_size``: summed over the ranks when a
    process group is open (--ddp), else each rank on its own."""
    td = torch.distributed
    if world_size > 1 and td.is_available() and td.is_initialized():
        d = dist_mod.Dist(rank, world_size, 0, torch.device(device), td.get_backend())
        return dist_mod.Replicated(d)
    return dist_mod.Single(rank=rank, world_size=world_size)


class Trainer:
    """Trains ``model.ahn`` (a ``TrainModel``) on ``data``. ``device``: where the micro-batches go (the
    model must already be there, or be sharded there by ``parallel``). ``parallel``: a strategy of
    ``ahn_rt.train.dist`` (it gives rank and world size); without it, ``rank`` / ``world_size`` (summed
    over the ranks when a process group is open)."""

    def __init__(self, model, data: Dataset, settings: TrainSettings, *, device="cpu", rank: int = 0,
                 world_size: int = 1, parallel: dist_mod.Single | None = None):
        from .loss import distill_loss
        self._distill_loss = distill_loss
        self.model = model
        self.data = data
        self.s = settings
        self.device = torch.device(device)
        self.parallel = parallel if parallel is not None else _default_parallel(rank, world_size, device)
        self.rank, self.world_size = self.parallel.rank, self.parallel.world_size
        self.named = ahn_named_parameters(model)         # every AHN tensor: what is saved
        if not self.named:
            raise AhnError("the model has no AHN parameters to train")
        layers = settings.train_layers
        if layers is not None:
            bad = [n for n in layers if not 0 <= n < len(model.ahn)]
            if bad or not layers:
                raise AhnError(f"train_layers {list(layers)}: the model has layers 0..{len(model.ahn) - 1}")
        self.trained = ahn_named_parameters(model, layers)   # what the optimizer moves
        ahn_ids = {id(p) for _, p in self.named}
        for name, p in model.named_parameters():
            if p.requires_grad and id(p) not in ahn_ids:
                raise AhnError(f"internal: base parameter {name} is trainable; the base must stay frozen")
        trained = {id(p) for _, p in self.trained}
        for _, p in self.named:
            p.requires_grad_(id(p) in trained)
        exempt = {id(p) for p in no_decay_parameters(model)}
        decay = [p for _, p in self.trained if id(p) not in exempt]
        no_decay = [p for _, p in self.trained if id(p) in exempt]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=settings.lr, betas=settings.betas, eps=settings.eps)
        self.rng = random.Random(settings.seed)
        self.cursor = Cursor()
        self.step = 0
        self.tokens_seen = 0
        per_step = settings.batch * settings.grad_accum * self.world_size     # the global batch
        self.total_steps = settings.steps if settings.steps else max(1, math.ceil(len(data) / per_step))
        self.warmup_steps = math.ceil(settings.warmup_ratio * self.total_steps)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- one step ------------------------------------------------------------------------------
    def lr(self, step: int | None = None) -> float:
        return lr_at(self.step if step is None else step, self.s.lr, self.total_steps, self.warmup_steps)

    def next_batches(self) -> list[MicroBatch]:
        """This rank's micro-batches of the next optimizer step (advances the data position and draws the
        budgets of the whole global step, in order, so every rank's RNG stays in step)."""
        B, K, R = self.s.batch, self.s.grad_accum, self.world_size
        idx = self.cursor.take(len(self.data), B * K * R, self.s.seed)
        seqs = [self.data.seq(i) for i in idx]
        weights = [self.data.seq_weights(i) for i in idx]
        budgets = [self.s.budget.sample(ids.numel(), self.rng) for ids, _ in seqs]
        out = []
        for k in range(K):
            a = (k * R + self.rank) * B
            out.append(collate(seqs[a:a + B], budgets[a:a + B], weights[a:a + B]))
        return out

    def forward_loss(self, mb: MicroBatch, return_kl: bool = False):
        """(mean loss over the micro-batch's loss positions, their mass: the count, or the sum of their
        weights) for one micro-batch; with ``return_kl`` also the loss's KL part (no gradient)."""
        model, par = self.model, self.parallel
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.s.autocast_bf16):
            h_t = par.teacher(model, mb.ids)
            h_s = par.student(model, mb.ids, mb.window, mb.sinks, checkpoint=self.s.activation_checkpointing)
        return self._distill_loss(model, h_t, h_s, mb.valid, ce_weight=self.s.ce_weight, labels=mb.labels,
                                  weight=mb.weight, return_kl=return_kl)

    def train_step(self) -> dict:
        """One optimizer step; returns its log record (loss measured before the update)."""
        t0 = time.perf_counter()
        step = self.step
        batches = [mb.to(self.device) for mb in self.next_batches()]
        par = self.parallel
        counts = par.all_sum(torch.tensor([sum(mb.n_valid for mb in batches), sum(mb.tokens for mb in batches),
                                           sum(mb.loss_mass for mb in batches)], dtype=torch.float64))
        n_total, tokens, mass_total = int(counts[0]), int(counts[1]), float(counts[2])
        lr = self.lr(step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros(2, dtype=torch.float64)    # the objective and its KL part, times the mass
        if n_total > 0:
            # a micro-batch without loss positions adds nothing; it is skipped unless the strategy needs
            # every rank to run the same passes (FSDP's all-gathers), then it runs with weight 0
            run = [mb for mb in batches if mb.n_valid > 0 or not par.skips_empty]
            for j, mb in enumerate(run):
                with par.micro_batch(last=j == len(run) - 1):
                    loss, n, kl = self.forward_loss(mb, return_kl=True)   # n: the micro-batch's loss mass
                    (loss * (n / mass_total)).backward()
                loss_sum += torch.stack([loss.detach(), kl]).double().cpu() * n
        loss_sum = par.all_sum(loss_sum)
        mean_loss, mean_kl = (float(v) for v in loss_sum / mass_total) if n_total else (None, None)
        grad_norm = None
        if n_total > 0:
            params = [p for _, p in self.trained]
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            par.reduce_grads(params)
            max_norm = self.s.max_grad_norm if self.s.max_grad_norm > 0 else float("inf")
            grad_norm = float(par.full(torch.nn.utils.clip_grad_norm_(params, max_norm)))
            self._require_finite(step, loss=mean_loss, grad_norm=grad_norm)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += tokens
        dt = time.perf_counter() - t0
        extra = {"objective": mean_loss} if self.s.ce_weight else {}    # with --ce-weight: KL + w x CE
        return {"step": step, "loss": mean_kl, "lr": lr,
                "tokens": tokens, "tokens_per_s": round(tokens / dt, 1) if dt > 0 else None,
                "valid": n_total, "grad_norm": grad_norm, "epoch": self.cursor.epoch,
                "tokens_seen": self.tokens_seen, "world_size": self.world_size, **extra}

    def _require_finite(self, step: int, *, loss: float | None = None, grad_norm: float | None = None,
                        weights: dict[str, torch.Tensor] | None = None):
        """Raise Diverged when optimizer step ``step`` (0-based) has a non-finite loss or gradient norm (checked
        before its update), or left non-finite AHN ``weights`` (checked before they are saved)."""
        if loss is not None and grad_norm is not None and not (math.isfinite(loss) and math.isfinite(grad_norm)):
            what = f"loss {loss:.4g}, gradient norm {grad_norm:.4g}"
        elif weights is not None and (bad := [k for k, v in weights.items() if not bool(torch.isfinite(v).all())]):
            what = f"its update left {bad[0]}" + (f" and {len(bad) - 1} more" if len(bad) > 1 else "") + " non-finite"
        else:
            return
        raise Diverged(f"training diverged at step {step + 1} of {self.total_steps} ({what}; lr {self.lr(step):.3g}); "
                       "stopped without saving non-finite weights; lower --lr (or raise --warmup-ratio) and check "
                       "the data")

    # ---- resume state --------------------------------------------------------------------------
    def ahn_weights(self) -> dict[str, torch.Tensor]:
        """{official key: whole float32 AHN tensor} (collective under --fsdp: call it on every rank)."""
        return {k: self.parallel.full(p.detach()) for k, p in self.named}

    def state(self) -> tuple[dict, dict, dict]:
        """(AHN weights, state tensors, JSON state) -- everything a resume needs besides the run settings.
        Whole tensors only, whatever the strategy (collective under --fsdp: call it on every rank)."""
        full = self.parallel.full
        ahn = self.ahn_weights()
        index = {id(p): k for k, p in self.named}
        sd = self.optimizer.state_dict()
        params_by_idx = [p for g in self.optimizer.param_groups for p in g["params"]]
        tensors = {}
        for i, st in sd["state"].items():
            key = index[id(params_by_idx[i])]
            for name, v in st.items():
                tensors[f"optim.{key}.{name}"] = full(v) if torch.is_tensor(v) else torch.tensor(v)
        tensors.update(_rng_state_tensors())
        groups = []
        for g in sd["param_groups"]:
            gg = {k: v for k, v in g.items() if k != "params"}
            gg["betas"] = list(gg.get("betas", ()))
            gg["params"] = [index[id(params_by_idx[i])] for i in g["params"]]
            groups.append(gg)
        state = {"step": self.step, "epoch": self.cursor.epoch, "pos": self.cursor.pos,
                 "tokens_seen": self.tokens_seen, "python_rng": _py_state_to_json(self.rng.getstate()),
                 "schedule": {"lr": self.s.lr, "total_steps": self.total_steps,
                              "warmup_steps": self.warmup_steps, "kind": "linear warmup + cosine"},
                 "optimizer": {"param_groups": groups}}
        return ahn, tensors, state

    def load_state(self, state: dict, tensors: dict):
        """Restore the optimizer, schedule position, data position and RNG states (the AHN weights were
        given to the model when it was built)."""
        keys = [k for k, _ in self.trained]
        params_by_idx = [p for g in self.optimizer.param_groups for p in g["params"]]
        index = {id(p): i for i, p in enumerate(params_by_idx)}
        by_key = dict(self.trained)
        groups = []
        for g in state["optimizer"]["param_groups"]:
            gg = dict(g)
            gg["betas"] = tuple(gg["betas"])
            missing = [k for k in gg["params"] if k not in by_key]
            if missing:
                raise AhnError(f"the resume state has optimizer entries for unknown parameters: {missing[:3]}")
            gg["params"] = [index[id(by_key[k])] for k in gg["params"]]
            groups.append(gg)
        opt_state = {}
        for k in keys:
            entry = {name.rsplit(".", 1)[1]: v for name, v in tensors.items()
                     if name.startswith(f"optim.{k}.") and "." not in name[len(f"optim.{k}."):]}
            if entry:
                p = by_key[k]      # moments are stored whole: this rank's part of them (--fsdp)
                entry = {name: self.parallel.local(v, p) if name != "step" and tuple(v.shape) == tuple(p.shape) else v
                         for name, v in entry.items()}
                opt_state[index[id(p)]] = entry
        try:
            self.optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
        except (ValueError, KeyError) as e:
            raise AhnError(f"the resume state's optimizer does not match this model ({e})") from None
        self.step = int(state["step"])
        self.cursor = Cursor(int(state["epoch"]), int(state["pos"]))
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.rng.setstate(_py_state_from_json(state["python_rng"]))
        sched = state["schedule"]
        self.total_steps, self.warmup_steps = int(sched["total_steps"]), int(sched["warmup_steps"])
        if "rng.torch" in tensors:
            torch.set_rng_state(tensors["rng.torch"])
        cuda = [tensors[f"rng.cuda.{i}"] for i in range(64) if f"rng.cuda.{i}" in tensors]
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)

    def save(self, out: Path, run: dict, config: dict, identity: dict | None = None):
        """Write OUT/resume (main rank only; atomic, see checkpoint.py). ``run``: the settings that
        define the run (checked on resume); ``config``: the model config embedded in ahn.safetensors;
        ``identity``: what else a resume checks (the base config, the data fingerprint). Call it on every
        rank: --fsdp gathers the shards, --ddp checks that the ranks agree."""
        ahn, tensors, state = self.state()
        self._require_finite(self.step - 1, weights=ahn)    # whole tensors: the same on every rank
        self.parallel.check_in_sync(self.named, self.step)
        if not self.is_main:
            return
        state.update(identity or {})
        state["run"] = run
        ckpt_io.save_resume(out, ahn=ahn, tensors=tensors, state=state, config=config)

    # ---- the loop ------------------------------------------------------------------------------
    def fit(self, out: Path | None, *, run: dict | None = None, config: dict | None = None,
            identity: dict | None = None, progress: Progress | None = None) -> list[dict]:
        """Train until ``steps`` (or ``stop_after``); append one record per step to OUT/log.jsonl and
        save resume states (the main rank writes; call it on every rank with the same ``out``). Returns the
        records of this call. In one process, a Ctrl-C (or SIGTERM) lets the step it interrupts finish, writes
        a resume state of that step, then raises KeyboardInterrupt; a second one stops at once."""
        last = self.total_steps if self.s.stop_after is None else min(self.total_steps, self.s.stop_after)
        records = []
        log = Path(out) / "log.jsonl" if out is not None and self.is_main else None
        with ckpt_io.stop_between_steps(self.world_size == 1) as stopping:
            while self.step < last:
                rec = self.train_step()
                records.append(rec)
                if log is not None:
                    with open(log, "a", encoding="utf-8") as f:
                        f.write(json.dumps(rec) + "\n")
                if progress is not None and self.is_main:
                    progress.update(rec)
                stop = stopping()
                if out is not None and (stop or self.step == last
                                        or (self.s.save_every and self.step % self.s.save_every == 0)):
                    with ckpt_io.deferred_interrupt():
                        self.save(out, run or {}, config or {}, identity)
                if stop:
                    raise KeyboardInterrupt
        return records


def read_log(out: Path) -> list[dict]:
    path = Path(out) / "log.jsonl"
    if not path.exists():
        return []
    recs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:
            break          # a line cut by a kill: everything after it is discarded
    return recs


def truncate_log(out: Path, step: int):
    """Keep the log records of steps < ``step`` (a resumed run rewrites the steps after its state)."""
    path = Path(out) / "log.jsonl"
    if not path.exists():
        return
    keep = [r for r in read_log(out) if isinstance(r, dict) and r.get("step", step) < step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))
