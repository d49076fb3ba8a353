"""ahn_rt.train loop: the optimizer step, the resume state, the window budget and the data reader.

CPU, float32, a tiny random Qwen2 (2 layers, d = 32, V = 61). The base weights come from
``ahn_rt.init_weights.random_state_dict`` with std 0.2, so that full and windowed attention differ by a
KL of order 0.1 and one step of training moves it measurably.

Tolerance table (everything not listed here is compared bit for bit: the base weights after training,
the training forward after save -> load, and the losses of a resumed run against the uninterrupted one):

  KL_RTOL   1e-4  relative, the trainer's step-0 loss (TrainModel float32, SDPA attention, fused chunked
                  loss) vs KL(full || swa) computed from ahn_rt's float32 inference logits: two float32
                  computations of the same function in different op orders; logits agree to ~1e-6
                  (tests/test_train_core.py MODEL), so the KL (~0.1) agrees to ~1e-5.
  DECREASE  1e-3  the smallest relative drop of the loss on a fixed batch after one AdamW step with lr
                  1e-3 (seen: ~3%); float32 noise in the loss is ~1e-7 relative.
  UNIFORM   6.0   sample_budget's draws: |count - expected| / sqrt(expected) per choice (6 sigma).
"""
from __future__ import annotations

import json
import math
import random
from collections import Counter

import pytest
import torch
from safetensors import safe_open

from ahn_rt import AhnError
from ahn_rt.config import parse_config
from ahn_rt.init_weights import random_state_dict
from ahn_rt.train import checkpoint as ckpt_io
from ahn_rt.train.data import (BUDGETS, IGNORE_INDEX, SINK_CHOICES, BudgetSpec, budget_choices, collate,
                               load_dataset, sample_budget)
from ahn_rt.train.model import TrainModel
from ahn_rt.train.trainer import (Diverged, Progress, Trainer, TrainSettings, ahn_named_parameters, lr_at, read_log,
                                  truncate_log)
from ahn_rt.weights import ahn_shapes
from oracle import rel_max as rel

KL_RTOL = 1e-4
DECREASE = 1e-3
UNIFORM = 6.0

V = 61
CFG = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=32, intermediate_size=64,
           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=V,
           tie_word_embeddings=True, rope_theta=10000.0, max_position_embeddings=4096, hidden_act="silu",
           rms_norm_eps=1e-6, torch_dtype="float32")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one intra-op thread is fastest, and on a busy 2-core runner extra threads
    only spin against each other (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

@pytest.fixture(scope="module")
def base():
    return random_state_dict(CFG, ahn=False, dtype=torch.float32, std=0.2, seed=1)


@pytest.fixture(scope="module")
def config():
    return parse_config(CFG, "test")


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def random_ids(rng, n):
    return [rng.randrange(V) for _ in range(n)]


def dataset(tmp_path, lengths, budget, seed=0, name="d.jsonl"):
    rng = random.Random(seed)
    path = write_jsonl(tmp_path / name, [{"input_ids": random_ids(rng, n)} for n in lengths])
    return load_dataset(path, vocab_size=V, seq_len=4096, budget=budget)


def new_model(config, base, ahn=None):
    return TrainModel(config, base, ahn, base_dtype=torch.float32, seed=0)


# ----------------------------------------------------------------------------------------------
# The optimizer step
# ----------------------------------------------------------------------------------------------
def test_one_step_lowers_the_loss_and_changes_only_ahn(tmp_path, config, base):
    fixed = BudgetSpec(fixed=(8, 2))
    data = dataset(tmp_path, [48], fixed)
    model = new_model(config, base)
    base_before = {k: v.clone() for k, v in model.base_state_dict().items()}
    ahn_before = {k: v.clone() for k, v in model.ahn_state_dict().items()}
    tr = Trainer(model, data, TrainSettings(steps=1, lr=1e-2, warmup_ratio=0.0, budget=fixed))
    mb = collate([data.seq(0)], [(8, 2)])
    with torch.no_grad():
        loss0, n0 = tr.forward_loss(mb)
    rec = tr.train_step()
    assert rec["step"] == 0 and rec["valid"] == n0 == 48 - 1 - 10
    assert rec["loss"] == pytest.approx(float(loss0), rel=1e-6)
    with torch.no_grad():
        loss1, _ = tr.forward_loss(mb)
    assert float(loss1) < float(loss0) * (1 - DECREASE), (float(loss0), float(loss1))
    # the base is bit-identical; of the AHN, o_proj moved (it is the only parameter with a gradient
    # while o_proj = 0), the no-decay parameters did not move at all
    for k, v in model.base_state_dict().items():
        assert torch.equal(v, base_before[k]), k
    assert all(not p.requires_grad for n, p in model.named_parameters() if not n.startswith("ahn."))
    after = model.ahn_state_dict()
    assert not torch.equal(after["model.layers.0.ahn.fn.o_proj.weight"], ahn_before["model.layers.0.ahn.fn.o_proj.weight"])
    no_decay = type(model.ahn[0]).NO_DECAY
    for k in after:
        if k.rsplit(".fn.", 1)[1] in no_decay:
            assert torch.equal(after[k], ahn_before[k]), k


def test_train_layers_moves_only_those_layers_with_the_same_update(tmp_path, config, base):
    """--train-layers: the other layers' memory keeps its weights bit for bit and gets no gradient, and the
    trained layer takes the same step as in a run that trains every layer (no clipping, so AdamW's update
    of a tensor depends on its own gradient only)."""
    fixed = BudgetSpec(fixed=(8, 2))
    data = dataset(tmp_path, [48, 52], fixed)
    start = new_model(config, base).ahn_state_dict()
    g = torch.Generator().manual_seed(4)
    for k in start:          # o_proj != 0, so that every AHN tensor of both layers has a gradient
        if k.endswith("o_proj.weight"):
            start[k] = 0.1 * torch.randn(start[k].shape, generator=g)
    runs = {}
    for layers in (None, (1,)):
        settings = TrainSettings(steps=2, batch=2, lr=1e-2, warmup_ratio=0.0, max_grad_norm=0.0, budget=fixed,
                                 train_layers=layers)
        tr = Trainer(new_model(config, base, start), data, settings)
        recs = [tr.train_step() for _ in range(2)]
        runs[layers] = (recs, tr.model.ahn_state_dict(), tr)
    (rec_all, all_, _), (rec_one, one, tr_one) = runs[None], runs[(1,)]
    assert rec_all[0]["loss"] == rec_one[0]["loss"]                   # the same model before any update
    assert rec_all[1]["loss"] != rec_one[1]["loss"]                   # then layer 0 moved in one run only
    assert [k for k, _ in tr_one.trained] == [k for k in start if k.startswith("model.layers.1.")]
    assert sorted(k for k, _ in tr_one.named) == sorted(start)       # what is saved: every layer
    moved = {k for k in start if not torch.equal(all_[k], start[k])}   # (GatedDeltaNet does not use D)
    assert {k.split(".", 3)[3] for k in moved if k.startswith("model.layers.0.")} == \
           {k.split(".", 3)[3] for k in moved if k.startswith("model.layers.1.")} != set()
    for k, v in one.items():
        if k.startswith("model.layers.0."):
            assert torch.equal(v, start[k]), k                        # frozen, bit for bit
        else:
            assert torch.equal(v, start[k]) == (k not in moved), k
    # step 1's update of layer 1 sees layer 0 as it was at the start in one run only; step 0's is the same
    tr = Trainer(new_model(config, base, start), data, TrainSettings(
        steps=1, batch=2, lr=1e-2, warmup_ratio=0.0, max_grad_norm=0.0, budget=fixed, train_layers=(1,)))
    tr.train_step()
    ref = Trainer(new_model(config, base, start), data, TrainSettings(
        steps=1, batch=2, lr=1e-2, warmup_ratio=0.0, max_grad_norm=0.0, budget=fixed))
    ref.train_step()
    got, want = tr.model.ahn_state_dict(), ref.model.ahn_state_dict()
    for k in got:
        if k.startswith("model.layers.1."):
            torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)
    with pytest.raises(AhnError, match="layers 0..1"):
        Trainer(new_model(config, base), data, TrainSettings(budget=fixed, train_layers=(2,)))



def test_gradients_are_clipped_to_max_grad_norm_as_one_vector(tmp_path, config, base):
    """--max-grad-norm c: the step's gradient over every trained tensor together is scaled by c / ||g|| when
    ||g|| > c and left alone otherwise; the log's grad_norm is ||g|| before clipping. The reference is the
    unclipped gradient of a max_grad_norm = 0 step (no test clipped before: dropping the clip, clipping each
    tensor on its own or logging the clipped norm all passed)."""
    fixed = BudgetSpec(fixed=(8, 2))
    data = dataset(tmp_path, [40, 30], fixed)
    g = torch.Generator().manual_seed(5)
    start = new_model(config, base).ahn_state_dict()
    start = {k: 0.1 * torch.randn(v.shape, generator=g) if k.endswith("o_proj.weight") else v.clone()
             for k, v in start.items()}          # o_proj != 0: the gradient spans many tensors

    def step(max_grad_norm):
        tr = Trainer(new_model(config, base, start), data, TrainSettings(
            steps=1, batch=2, budget=fixed, max_grad_norm=max_grad_norm, warmup_ratio=0.0))
        got = {}
        tr.optimizer.step = lambda: got.update({k: p.grad.clone() for k, p in tr.trained})
        return tr.train_step(), got

    rec, raw = step(0.0)
    norm = float(torch.cat([v.double().flatten() for v in raw.values()]).norm())
    assert rec["grad_norm"] == pytest.approx(norm, rel=1e-6)
    big = [k for k, v in raw.items() if v.norm() > 0.05 * norm]
    assert len(big) >= 2, big               # so per-tensor clipping differs from the global one
    for c in (norm / 4, 4 * norm):
        rec_c, got = step(c)
        assert rec_c["grad_norm"] == pytest.approx(norm, rel=1e-6)      # logged before clipping
        scale = min(1.0, c / norm)
        for k in raw:
            torch.testing.assert_close(got[k], raw[k] * scale, rtol=1e-5, atol=1e-9 * norm, msg=k)
    assert float(torch.cat([v.double().flatten() for v in got.values()]).norm()) == pytest.approx(norm, rel=1e-6)


def test_the_update_is_adamw_with_decoupled_decay_on_the_decay_group(tmp_path, config, base):
    """Two optimizer steps equal AdamW written out here in float64 from the documented settings (betas 0.9 /
    0.999, eps 1e-8, weight decay 0.1 decoupled, p <- p (1 - lr wd) - lr m^ / (sqrt(v^) + eps)) on the
    gradients the trainer computed, at the logged learning rates; the no-decay names get no decay. Before,
    only 'the loss drops' and 'no-decay tensors stay put while they have no gradient' were checked: a trainer
    that never applied weight decay (or took other betas) passed."""
    fixed = BudgetSpec(fixed=(8, 2))
    data = dataset(tmp_path, [40, 30], fixed)
    g = torch.Generator().manual_seed(6)
    start = new_model(config, base).ahn_state_dict()
    start = {k: 0.1 * torch.randn(v.shape, generator=g) if k.endswith("o_proj.weight") else v.clone()
             for k, v in start.items()}          # o_proj != 0: the no-decay tensors have a gradient too
    tr = Trainer(new_model(config, base, start), data, TrainSettings(
        steps=2, batch=1, lr=1e-2, budget=fixed, max_grad_norm=0.0, warmup_ratio=0.0))
    grads, step = [], tr.optimizer.step
    tr.optimizer.step = lambda: (grads.append({k: p.grad.double().clone() for k, p in tr.trained}), step())
    lrs = [tr.train_step()["lr"] for _ in range(2)]
    assert lrs == [1e-2, 0.5e-2]
    no_decay = set(type(tr.model.ahn[0]).NO_DECAY)
    b1, b2, eps, wd = 0.9, 0.999, 1e-8, 0.1
    got = tr.model.ahn_state_dict()
    shift = {True: 0.0, False: 0.0}       # per group: what two steps of weight decay would move, at most
    for k, p0 in start.items():
        p, m, v = p0.double(), 0.0, 0.0
        decays = k.rsplit(".fn.", 1)[1] not in no_decay
        for t, (lr, gr) in enumerate(zip(lrs, grads), 1):
            m, v = b1 * m + (1 - b1) * gr[k], b2 * v + (1 - b2) * gr[k] ** 2
            p = p * (1 - lr * wd * decays) - lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
        torch.testing.assert_close(got[k].double(), p, rtol=1e-6, atol=1e-7, msg=k)
        shift[decays] = max(shift[decays], float((p0.double() * sum(lrs) * wd).abs().max()))
    # the decay is 100x the atol in both groups: decay missing, or on the no-decay group, fails above
    assert min(shift.values()) > 100 * 1e-7, shift

def test_schedule_warmup_then_cosine():
    lrs = [lr_at(s, 1e-4, 100, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-5) and lrs[9] == pytest.approx(1e-4) and lrs[10] == pytest.approx(1e-4)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:11]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and 0 < lrs[-1] < 1e-6
    assert lrs[55] == pytest.approx(0.5e-4)


# ----------------------------------------------------------------------------------------------
# Step 0 is exactly KL(full || swa): checked through ahn_rt's inference
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ce_weight", [0.0, 0.5])
def test_step0_loss_is_kl_of_full_vs_swa_inference(tmp_path, config, base, ce_weight):
    """The logged loss is the distillation loss alone, also with a CE term in the objective (it was KL +
    weight x CE there); the objective is logged beside it."""
    from ahn_rt.runtime import from_state_dict
    W, S = 8, 2
    fixed = BudgetSpec(fixed=(W, S))
    data = dataset(tmp_path, [40, 27], fixed)
    tr = Trainer(new_model(config, base), data, TrainSettings(steps=1, batch=2, budget=fixed, ce_weight=ce_weight))
    rec = tr.train_step()
    full = from_state_dict(CFG, base, mode="full", dtype="float32", device="cpu")
    swa = from_state_dict(CFG, base, mode="swa", window=W, sinks=S, dtype="float32", device="cpu")
    total, ce, n = 0.0, 0.0, 0
    for i in range(len(data)):
        ids, _ = data.seq(i)
        lt = full.new_session().forward(ids.tolist()).double().log_softmax(-1)
        ls = swa.new_session().forward(ids.tolist()).double().log_softmax(-1)
        kl = (lt.exp() * (lt - ls)).sum(-1)          # [L]: position t predicts token t + 1
        keep = kl[W + S: ids.numel() - 1]
        total += float(keep.sum())
        ce -= float(ls[W + S: ids.numel() - 1].gather(1, ids[W + S + 1:, None].long()).sum())
        n += keep.numel()
    assert rec["valid"] == n == (40 - 11) + (27 - 11)
    assert rec["loss"] == pytest.approx(total / n, rel=KL_RTOL)
    assert total / n > 1e-3          # the window really matters on this model
    if ce_weight:
        assert rec["objective"] == pytest.approx((total + ce_weight * ce) / n, rel=KL_RTOL)
        assert rec["objective"] - rec["loss"] > 0.1      # the CE term is really in the objective
    else:
        assert "objective" not in rec


def test_gradient_accumulation_weighs_micro_batches_by_their_loss_positions(tmp_path, config, base):
    """Micro-batches with different numbers of loss positions (sequences of 80, 20, 60 and 15 tokens): the
    step's gradient is that of the mean KL over all the step's loss positions (docs/training.md), the same
    for --batch 4, --batch 2 --grad-accum 2 and --grad-accum 4. The mean of the micro-batches' own means
    differs from it by far more than the tolerance, so a trainer that averaged those would fail."""
    fixed = BudgetSpec(fixed=(8, 2))
    data = dataset(tmp_path, [80, 20, 60, 15], fixed)
    g = torch.Generator().manual_seed(4)
    start = new_model(config, base).ahn_state_dict()
    start = {k: 0.1 * torch.randn(v.shape, generator=g) if k.endswith("o_proj.weight") else v.clone()
             for k, v in start.items()}          # o_proj != 0: every AHN tensor but D has a gradient

    def step_grads(batch, grad_accum):
        tr = Trainer(new_model(config, base, start), data, TrainSettings(
            steps=1, batch=batch, grad_accum=grad_accum, budget=fixed, max_grad_norm=0.0, warmup_ratio=0.0))
        got = {}
        tr.optimizer.step = lambda: got.update({k: p.grad.clone() for k, p in tr.trained})
        rec = tr.train_step()
        return rec, got, tr

    rec, ref, tr = step_grads(4, 1)
    order = tr.cursor._order(len(data), 0)
    assert sorted(data.length(i) for i in order) == [15, 20, 60, 80]
    for batch, k in ((2, 2), (1, 4)):
        rec_k, got, _ = step_grads(batch, k)
        assert rec_k["loss"] == pytest.approx(rec["loss"], rel=1e-6) and rec_k["valid"] == rec["valid"]
        for name in ref:
            assert rel(got[name], ref[name]) < 1e-5, (batch, k, name)
    # the reference: autograd through dense logits of the pooled mean, and the mean of per-sequence means
    model = new_model(config, base, start)
    params = dict(ahn_named_parameters(model))
    pooled, per_seq, n_all = 0.0, [], 0
    for i in order:
        mb = collate([data.seq(i)], [(8, 2)])
        lt = model.lm_logits(model.forward_teacher(mb.ids)).log_softmax(-1)
        ls = model.lm_logits(model.forward_student(mb.ids, mb.window, mb.sinks, checkpoint=False)).log_softmax(-1)
        kl = (lt.exp() * (lt - ls)).sum(-1)[mb.valid]
        pooled, n_all = pooled + kl.sum(), n_all + kl.numel()
        per_seq.append(kl.mean())
    assert n_all == rec["valid"] == sum(n - 11 for n in (80, 20, 60, 15))
    want = torch.autograd.grad(pooled / n_all, list(params.values()), allow_unused=True, materialize_grads=True,
                               retain_graph=True)
    means = torch.autograd.grad(sum(per_seq) / len(per_seq), list(params.values()), allow_unused=True,
                                materialize_grads=True)
    for (name, _), w, m in zip(params.items(), want, means):
        assert rel(ref[name], w) < 1e-5, name
    assert max(rel(m, w) for w, m in zip(want, means) if w.abs().max() > 0) > 0.05


# ----------------------------------------------------------------------------------------------
# Save -> load, kill -> resume
# ----------------------------------------------------------------------------------------------
def test_save_then_load_gives_a_bit_identical_training_forward(tmp_path, config, base):
    fixed = BudgetSpec(fixed=(8, 2))
    data = dataset(tmp_path, [40, 33, 50], fixed)
    model = new_model(config, base)
    tr = Trainer(model, data, TrainSettings(steps=3, lr=1e-2, budget=fixed))
    for _ in range(3):
        tr.train_step()
    out = tmp_path / "out"
    out.mkdir()
    tr.save(out, run={"x": 1}, config=ckpt_io.output_config(CFG, "qwen2", 8, 2))
    state, ahn, tensors = ckpt_io.load_resume(ckpt_io.find_resume(out))
    assert state["step"] == 3 and state["run"] == {"x": 1}
    assert set(ahn) == set(ahn_shapes(config, "GatedDeltaNet"))
    reloaded = new_model(config, base, ahn)
    mb = collate([data.seq(0), data.seq(1)], [(8, 2), (5, 3)])
    with torch.no_grad():
        h1 = model.forward_student(mb.ids, mb.window, mb.sinks)
        h2 = reloaded.forward_student(mb.ids, mb.window, mb.sinks)
    assert torch.equal(h1, h2)
    assert any(v.abs().max() > 0 for k, v in ahn.items() if k.endswith("o_proj.weight"))
    # the inference file: official names and shapes, float32 on request (bit-exact), bf16 by default
    path = ckpt_io.write_model(out, model.ahn_state_dict(), config, ckpt_io.output_config(CFG, "qwen2", 8, 2),
                               torch.float32)
    with safe_open(str(path), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    assert {k: tuple(v.shape) for k, v in saved.items()} == ahn_shapes(config, "GatedDeltaNet")
    with torch.no_grad():
        h3 = new_model(config, base, saved).forward_student(mb.ids, mb.window, mb.sinks)
    assert torch.equal(h1, h3)
    path = ckpt_io.write_model(out, model.ahn_state_dict(), config, ckpt_io.output_config(CFG, "qwen2", 8, 2),
                               torch.bfloat16)
    with safe_open(str(path), "pt") as f:
        k = "model.layers.1.ahn.fn.o_proj.weight"
        assert f.get_tensor(k).dtype == torch.bfloat16
        assert torch.equal(f.get_tensor(k), model.ahn_state_dict()[k].bfloat16())


class _Kill(Progress):
    """A progress display that 'kills' the run (KeyboardInterrupt) once step ``at`` is logged."""

    def __init__(self, total, at):
        super().__init__(total, every=10 ** 9)
        self.at = at

    def update(self, rec):
        if rec["step"] == self.at:
            raise KeyboardInterrupt


def _fit(out, config, base, data, settings, *, kill_at=None, resume=False):
    if resume:
        state, ahn, tensors = ckpt_io.load_resume(ckpt_io.find_resume(out))
        tr = Trainer(new_model(config, base, ahn), data, settings)
        tr.load_state(state, tensors)
        truncate_log(out, tr.step)
    else:
        tr = Trainer(new_model(config, base), data, settings)
    progress = _Kill(tr.total_steps, kill_at) if kill_at is not None else None
    try:
        tr.fit(out, run={}, config=ckpt_io.output_config(CFG, "qwen2", 8, 2), progress=progress)
    except KeyboardInterrupt:
        return None
    return tr


def test_kill_and_resume_reproduces_the_uninterrupted_losses(tmp_path, config, base):
    # random windows (S + W drawn per sequence), 2 micro-batches per step, 3 epochs of 5 sequences:
    # the resume must restore the data position, the budget RNG, AdamW and the schedule
    data = dataset(tmp_path, [40, 70, 36, 66, 52], BudgetSpec())
    settings = TrainSettings(steps=6, batch=1, grad_accum=2, lr=1e-2, save_every=3, seed=5,
                             activation_checkpointing=False)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir()
    killed.mkdir()
    full = _fit(straight, config, base, data, settings)
    assert _fit(killed, config, base, data, settings, kill_at=4) is None
    assert [r["step"] for r in read_log(killed)] == [0, 1, 2, 3, 4]       # step 4 logged, not saved
    assert json.loads((killed / "resume" / "state.json").read_text())["step"] == 3
    resumed = _fit(killed, config, base, data, settings, resume=True)
    a, b = read_log(straight), read_log(killed)
    assert [r["step"] for r in b] == list(range(6))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]               # bit-exact
    assert [r["lr"] for r in a] == [r["lr"] for r in b]
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]
    for k, v in full.model.ahn_state_dict().items():
        assert torch.equal(v, resumed.model.ahn_state_dict()[k]), k
    assert len({r["loss"] for r in a}) == 6                               # it really trained
    assert len({(r["tokens"]) for r in a}) > 1                            # and drew different sequences


def test_resume_state_is_replaced_atomically(tmp_path, config, base):
    fixed = BudgetSpec(fixed=(8, 2))
    data = dataset(tmp_path, [40], fixed)
    tr = Trainer(new_model(config, base), data, TrainSettings(steps=2, budget=fixed))
    out = tmp_path / "out"
    out.mkdir()
    tr.train_step()
    tr.save(out, {}, {})
    tr.train_step()
    tr.save(out, {}, {})
    assert sorted(p.name for p in out.iterdir()) == ["resume"]              # no temporaries, no resume.old
    assert json.loads((out / "resume" / "state.json").read_text())["step"] == 2
    # a process killed between the two renames leaves only resume.old: that is the state found
    (out / "resume").rename(out / "resume.old")
    (out / ".resume.tmp-123").mkdir()
    assert ckpt_io.find_resume(out) == out / "resume.old"
    ckpt_io.remove_stale_temporaries(out)
    assert not (out / ".resume.tmp-123").exists()
    # a changed file is noticed
    with open(out / "resume.old" / "ahn.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(AhnError, match="damaged"):
        ckpt_io.load_resume(out / "resume.old")


def test_a_non_finite_step_is_not_applied_and_non_finite_weights_are_not_saved(tmp_path, config, base):
    fixed = BudgetSpec(fixed=(8, 2))
    data = dataset(tmp_path, [40], fixed)
    model = new_model(config, base)
    tr = Trainer(model, data, TrainSettings(steps=3, budget=fixed))
    out = tmp_path / "out"
    out.mkdir()
    tr.train_step()
    tr.save(out, {}, {})
    saved = (out / "resume" / "ahn.safetensors").read_bytes()
    with torch.no_grad():          # what a too large step leaves: a weight that overflowed
        dict(tr.named)["model.layers.1.ahn.fn.o_proj.weight"][0, 0] = float("inf")
    before = {k: v.clone() for k, v in model.ahn_state_dict().items()}
    with pytest.raises(Diverged, match=r"training diverged at step 2 of 3 \(loss nan, gradient norm nan; lr "):
        tr.train_step()
    assert tr.step == 1 and isinstance(Diverged("x"), AhnError) and Diverged.exit_code == 1
    for k, v in model.ahn_state_dict().items():              # the step's update was not applied
        assert torch.equal(v, before[k]), k
    with pytest.raises(Diverged, match=r"left model.layers.1.ahn.fn.o_proj.weight non-finite"):
        tr.save(out, {}, {})
    assert (out / "resume" / "ahn.safetensors").read_bytes() == saved     # the last good state stays
    assert sorted(p.name for p in out.iterdir()) == ["resume"]


# ----------------------------------------------------------------------------------------------
# The window budget
# ----------------------------------------------------------------------------------------------
def test_sample_budget_respects_its_constraints():
    rng = random.Random(0)
    for L in (33, 40, 64, 65, 100, 257, 1000, 5000, 24576, 65535):
        choices = budget_choices(L)
        seen = Counter()
        draws = 3000
        for _ in range(draws):
            W, S = sample_budget(L, rng)
            wt = W + S
            assert wt in BUDGETS and L / 8 < wt < L, (L, W, S)
            assert S in SINK_CHOICES and 2 * S <= wt and W >= 1, (L, W, S)
            seen[wt] += 1
        # Wt is uniform over its admissible set
        assert set(seen) == set(choices)
        exp = draws / len(choices)
        assert all(abs(c - exp) / math.sqrt(exp) < UNIFORM for c in seen.values()), (L, seen)
    # S is uniform over the sinks allowed for the drawn budget
    s_seen = Counter(sample_budget(300, rng)[1] for _ in range(4000))    # Wt in {64, 128, 256}
    assert set(s_seen) == {0, 32, 64, 128}
    assert budget_choices(32) == [] and budget_choices(33) == [32]
    with pytest.raises(AhnError, match="shorter than the window"):
        sample_budget(20, rng)
    assert budget_choices(5000, wt_min=1024, wt_max=2048) == [1024, 2048]
    # past 8x the largest allowed budget, the largest one below L
    assert budget_choices(70000) == [8192] and budget_choices(5000, wt_max=256) == [256]
    assert sample_budget(10, rng, fixed=(7, 3)) == (7, 3)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def tiny_tokenizer(path):
    """A byte-level tokenizer.json with no merges (one token per byte) plus the ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.save(str(path))
    return path


def test_data_records_text_messages_input_ids_and_bad_ones(tmp_path):
    from ahn_rt.tokenizer import QWEN25_DEFAULT_SYSTEM, Tokenizer
    tok_path = tiny_tokenizer(tmp_path / "tokenizer.json")
    tok = Tokenizer.from_file(tok_path)
    msgs = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello, world!"}]
    records = [
        {"text": "abcdefghij" * 5},
        {"messages": msgs},
        {"input_ids": list(range(30, 80)), "labels": [-100] * 25 + list(range(55, 80))},
        "{not json",
        "[1, 2, 3]",
        {"input_ids": "abc"},
        {"input_ids": [1, 2, 300]},                      # outside the vocabulary (300)
        {"input_ids": []},
        {"text": 5},
        {"messages": [{"role": "robot", "content": "x"}]},
        {"input_ids": [1, 2, 3], "labels": [1, 2]},
        {"nothing": 1},
        "",                                               # blank lines are not records
        {"input_ids": list(range(12))},                  # shorter than the window
    ]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    d = load_dataset(path, vocab_size=300, seq_len=4096, budget=BudgetSpec(fixed=(16, 4)),
                     tokenizer_path=tok_path, family="qwen2")
    assert len(d) == 3 and d.stats.used == 3 and d.stats.lines == 13
    assert sum(d.stats.skipped.values()) == 10
    assert d.stats.skipped["invalid JSON"] == 1 and d.stats.skipped["token id outside the vocabulary"] == 1
    assert d.stats.skipped["empty"] == 1 and d.stats.skipped["shorter than the window"] == 1
    # text: every token is a target
    ids, mask = d.seq(0)
    assert tok.decode(ids.tolist()) == "abcdefghij" * 5 and bool(mask.all())
    # messages: ChatML with Qwen2.5's default system message, loss on the assistant turn only
    ids, mask = d.seq(1)
    chat = (f"<|im_start|>system\n{QWEN25_DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\nhi there<|im_end|>\n"
            f"<|im_start|>assistant\nhello, world!<|im_end|>\n")
    assert tok.decode(ids.tolist()) == chat
    assert tok.decode(ids[mask].tolist()) == "hello, world!<|im_end|>\n"
    assert bool(mask[-len(tok.encode("hello, world!<|im_end|>\n")):].all())
    # input_ids with labels: the labels are the mask
    ids, mask = d.seq(2)
    assert ids.tolist() == list(range(30, 80)) and mask.tolist() == [False] * 25 + [True] * 25

    # seq-len cuts, min-len drops, the same data without the messages needs no tokenizer
    d = load_dataset(write_jsonl(tmp_path / "e.jsonl", [{"input_ids": list(range(100))}, {"input_ids": list(range(50))}]),
                     vocab_size=300, seq_len=64, min_len=60, budget=BudgetSpec(fixed=(16, 4)))
    assert len(d) == 1 and d.length(0) == 64 and d.stats.truncated == 1
    assert d.stats.skipped["shorter than --min-len"] == 1


def test_null_fields_are_absent_and_text_parts_are_message_content(tmp_path):
    """A field set to null is an absent one ({"text": ..., "input_ids": null} was skipped as "input_ids is
    not a list"); a message content given as OpenAI text parts, which generate, Model.generate and the
    server take, is their text joined by newlines (it was skipped as a bad message). Any other part is a bad record."""
    tok_path = tiny_tokenizer(tmp_path / "tokenizer.json")
    text = "abcdefghij" * 5
    msgs = [{"role": "user", "content": "hi\nthere"}, {"role": "assistant", "content": "hello, world!"}]
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "hello, world!"}]}]
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
             {"role": "assistant", "content": "hello, world!"}]
    budget = BudgetSpec(fixed=(16, 4))
    load = (lambda name, records: load_dataset(write_jsonl(tmp_path / name, records), vocab_size=300,
                                               seq_len=4096, budget=budget, tokenizer_path=tok_path, family="qwen2"))
    want = load("want.jsonl", [{"text": text}, {"messages": msgs}, {"input_ids": list(range(30, 80))}])
    got = load("got.jsonl", [{"text": text, "input_ids": None}, {"messages": parts, "text": None},
                             {"input_ids": list(range(30, 80)), "labels": None, "loss_weights": None},
                             {"messages": image}, {"text": None}])
    assert (got.stats.used, dict(got.stats.skipped)) == (3, {"a message's content holds a part that is not text": 1,
                                                            "no input_ids, messages or text field": 1})
    for i in range(3):
        assert [t.tolist() for t in got.seq(i)] == [t.tolist() for t in want.seq(i)]


def test_loss_weights_are_read_checked_and_weight_the_step(tmp_path, config, base):
    rng = random.Random(3)
    a, b = random_ids(rng, 40), random_ids(rng, 40)
    wb = [1.0] * 20 + [0.0] * 4 + [25.0] * 16        # 0: no loss on those tokens; 25: a stressed stretch
    records = [{"input_ids": a},                      # before any weighted record: weights 1, filled in later
               {"input_ids": b, "loss_weights": wb},
               {"input_ids": b, "loss_weights": wb[:-1]},
               {"input_ids": b, "loss_weights": [1.0] * 39 + [-1.0]},
               {"input_ids": b, "loss_weights": [1.0] * 39 + [True]},
               {"input_ids": b, "loss_weights": [1.0] * 39 + ["2"]},
               '{"input_ids": %s, "loss_weights": %s}' % (json.dumps(b), json.dumps([1.0] * 39 + [1e400])),
               {"text": "abc", "loss_weights": [1, 1, 1]}]
    fixed = BudgetSpec(fixed=(8, 2))
    d = load_dataset(write_jsonl(tmp_path / "w.jsonl", records), vocab_size=V, seq_len=4096, budget=fixed)
    assert len(d) == 2 and d.stats.used == 2
    assert d.stats.skipped["loss_weights and input_ids differ in length"] == 1
    assert d.stats.skipped["a loss weight is not a finite number >= 0"] == 4
    assert d.stats.skipped["loss_weights needs input_ids"] == 1
    assert d.seq_weights(0).tolist() == [1.0] * 40 and d.seq_weights(1).tolist() == wb
    assert d.seq(1)[1].tolist() == [True] * 20 + [False] * 4 + [True] * 16
    plain = load_dataset(write_jsonl(tmp_path / "p.jsonl", [{"input_ids": a}, {"input_ids": b}]),
                         vocab_size=V, seq_len=4096, budget=fixed)
    assert plain.weights is None and plain.seq_weights(1) is None
    assert plain.fingerprint != d.fingerprint

    # collate: position t carries token t + 1's weight; the mass is the sum over the loss positions
    mb = collate([d.seq(0), d.seq(1)], [(8, 2), (8, 2)], [d.seq_weights(0), d.seq_weights(1)])
    assert mb.weight[1, :39].tolist() == wb[1:] and mb.weight[1, 39] == 0
    assert mb.loss_mass == pytest.approx((40 - 1 - 10) + sum(wb[11:]))

    # the trainer's step loss is the weighted mean of the two sequences' positions
    tr = Trainer(new_model(config, base), d, TrainSettings(steps=1, batch=2, budget=fixed))
    with torch.no_grad():
        h_t = tr.model.forward_teacher(mb.ids)
        h_s = tr.model.forward_student(mb.ids, mb.window, mb.sinks, checkpoint=False)
        lt = tr.model.lm_logits(h_t).log_softmax(-1)
        ls = tr.model.lm_logits(h_s).log_softmax(-1)
    kl = (lt.exp() * (lt - ls)).sum(-1).double()
    w = (mb.weight * mb.valid).double()
    want = float((w * kl).sum() / w.sum())
    assert abs(float((kl * mb.valid).sum() / mb.valid.sum()) - want) > 10 * KL_RTOL * want   # the weights matter
    rec = tr.train_step()
    assert rec["loss"] == pytest.approx(want, rel=KL_RTOL) and rec["valid"] == mb.n_valid


def test_a_loss_weight_below_float32s_smallest_is_no_loss_target(tmp_path):
    """Weights are stored as float32: one below its smallest value (1e-50, say) became 0 there but still made
    its token a loss target, so a step of such positions divided by a weight sum of 0 (a ZeroDivisionError
    traceback from the trainer). Now it is a weight of 0 (no loss target), like a 0 in the file."""
    rng = random.Random(4)
    a, b = random_ids(rng, 40), random_ids(rng, 40)
    d = load_dataset(write_jsonl(tmp_path / "tiny_w.jsonl", [{"input_ids": a, "loss_weights": [1e-50] * 40},
                                                            {"input_ids": b, "loss_weights": [1.0] * 30 + [1e-50] * 10}]),
                     vocab_size=V, seq_len=4096, budget=BudgetSpec(fixed=(8, 2)))
    assert len(d) == 1 and dict(d.stats.skipped) == {"no loss target": 1}
    assert d.seq(0)[1].tolist() == [True] * 30 + [False] * 10 and d.seq_weights(0).tolist() == [1.0] * 30 + [0.0] * 10


def test_data_errors_are_one_line(tmp_path):
    budget = BudgetSpec(fixed=(16, 4))

    def err(path, **kw):
        with pytest.raises(AhnError) as e:
            load_dataset(path, vocab_size=V, seq_len=4096, budget=kw.pop("budget", budget), **kw)
        assert "\n" not in str(e.value)
        return str(e.value)
    assert "not found" in err(tmp_path / "missing.jsonl")
    assert "empty" in err(write_jsonl(tmp_path / "empty.jsonl", ["", "  "]))
    assert "no usable record" in err(write_jsonl(tmp_path / "bad.jsonl", ["{", {"input_ids": [V]}]))
    assert "sequence shorter than the window" in err(
        write_jsonl(tmp_path / "short.jsonl", [{"input_ids": [1] * 20}, {"input_ids": [1] * 21}]))
    assert "sequence shorter than the window" in err(
        write_jsonl(tmp_path / "short2.jsonl", [{"input_ids": [1] * 32}]), budget=BudgetSpec())
    assert "tokenizer" in err(write_jsonl(tmp_path / "text.jsonl", [{"text": "hello"}]),
                              tokenizer_path=tmp_path / "nope.json")


def test_collate_pads_right_and_marks_loss_positions():
    a = (torch.arange(1, 11), torch.ones(10, dtype=torch.bool))
    m = torch.zeros(6, dtype=torch.bool)
    m[4:] = True
    b = (torch.arange(20, 26), m)
    mb = collate([a, b], [(3, 2), (2, 1)])
    assert mb.ids.tolist() == [list(range(1, 11)), [20, 21, 22, 23, 24, 25, 0, 0, 0, 0]]
    assert mb.labels[1].tolist() == [IGNORE_INDEX] * 4 + [24, 25] + [IGNORE_INDEX] * 4
    # position t is a loss position iff t >= S + W and token t + 1 is a target
    assert mb.valid[0].nonzero().squeeze(1).tolist() == [5, 6, 7, 8]
    assert mb.valid[1].nonzero().squeeze(1).tolist() == [3, 4]
    assert mb.tokens == 16 and mb.window.tolist() == [3, 2] and mb.sinks.tolist() == [2, 1]


def test_one_epoch_counts_the_global_batch_of_every_rank(tmp_path, config, base):
    """Without --steps a run is one epoch: ceil(sequences / global batch) steps, the global batch being
    batch x grad_accum x the strategy's ranks (the world size was taken from the ``world_size`` argument,
    which the command line never passes, so two ranks ran two epochs)."""
    from ahn_rt.train import dist
    fixed = BudgetSpec(fixed=(8, 2))
    data = dataset(tmp_path, [40] * 7, fixed)
    settings = TrainSettings(steps=None, batch=1, grad_accum=2, budget=fixed)
    assert Trainer(new_model(config, base), data, settings).total_steps == 4
    for rank in (0, 1):
        tr = Trainer(new_model(config, base), data, settings, parallel=dist.Single(rank=rank, world_size=2))
        assert tr.world_size == 2 and tr.total_steps == 2            # ceil(7 / (1 x 2 x 2))
    assert Trainer(new_model(config, base), data, settings, rank=1, world_size=2).total_steps == 2


def test_a_utf8_byte_order_mark_does_not_cost_the_first_record(tmp_path):
    """A JSONL file that starts with a UTF-8 byte order mark (as Windows editors and PowerShell write it):
    its first record was skipped as "invalid JSON", and a file of one record had "no usable record". The
    mark is dropped at the start of the file only; elsewhere it is still a bad record."""
    budget = BudgetSpec(fixed=(8, 2))
    bom = b"\xef\xbb\xbf"
    rec = [json.dumps({"input_ids": list(range(k, k + 30))}).encode() for k in range(3)]
    (tmp_path / "one.jsonl").write_bytes(bom + rec[0] + b"\r\n")
    d = load_dataset(tmp_path / "one.jsonl", vocab_size=V, seq_len=4096, budget=budget)
    assert len(d) == 1 and d.seq(0)[0].tolist() == list(range(30)) and not d.stats.skipped
    (tmp_path / "three.jsonl").write_bytes(bom + rec[0] + b"\n" + rec[1] + b"\n" + bom + rec[2] + b"\n")
    d = load_dataset(tmp_path / "three.jsonl", vocab_size=V, seq_len=4096, budget=budget)
    assert (d.stats.used, d.stats.lines, dict(d.stats.skipped)) == (2, 3, {"invalid JSON": 1})
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"input_ids": list(range(30))}])
    (tmp_path / "bom_blank.jsonl").write_bytes(bom + b"\n" + plain.read_bytes())   # a mark on a blank first line
    d = load_dataset(tmp_path / "bom_blank.jsonl", vocab_size=V, seq_len=4096, budget=budget)
    assert (d.stats.used, d.stats.lines) == (1, 1)
    assert d.fingerprint == load_dataset(plain, vocab_size=V, seq_len=4096, budget=budget).fingerprint


def test_a_gzip_file_is_named_as_such(tmp_path):
    """A .jsonl.gz given as --data: every line was counted "not UTF-8" and the error said "no usable record";
    now one line says it is gzip-compressed and how to decompress it."""
    import gzip
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for k in range(3):
            f.write(json.dumps({"input_ids": list(range(k, k + 30))}) + "\n")
    with pytest.raises(AhnError) as e:
        load_dataset(path, vocab_size=V, seq_len=4096, budget=BudgetSpec(fixed=(8, 2)))
    assert str(e.value) == f"--data {path} is gzip-compressed; decompress it first (gunzip -k {path}) and give the .jsonl file"


def test_an_integer_of_thousands_of_digits_is_a_bad_record(tmp_path):
    """json.loads refuses an integer of more than 4300 digits with a plain ValueError (not a JSONDecodeError):
    it escaped as a traceback and exit 1 instead of a skipped, counted record."""
    huge = "9" * 5000
    path = write_jsonl(tmp_path / "d.jsonl", ['{"input_ids": [' + huge + "]}", '{"input_ids": [1, 2], "labels": [' + huge + ", 2]}",
                                              {"input_ids": list(range(30))}])
    d = load_dataset(path, vocab_size=V, seq_len=4096, budget=BudgetSpec(fixed=(8, 2)))
    assert (d.stats.used, d.stats.lines, dict(d.stats.skipped)) == (1, 3, {"a number with too many digits": 2})


def test_a_loss_weight_beyond_float32_is_a_bad_record(tmp_path):
    """Loss weights are stored as float32. An integer weight of hundreds of digits escaped as an OverflowError
    traceback (float() of it), and 1e308 passed the check, became inf in the store and made the first step's
    loss NaN: "training diverged ... lower --lr", exit 1. Both are now skipped and counted; the largest float32
    is still taken."""
    ids = list(range(30))
    path = write_jsonl(tmp_path / "d.jsonl", [{"input_ids": ids, "loss_weights": [10 ** 400] + [1] * 29},
                                              {"input_ids": ids, "loss_weights": [1e308] * 30},
                                              {"input_ids": ids, "loss_weights": [3.4028234663852886e38] * 30},
                                              {"input_ids": ids}])
    d = load_dataset(path, vocab_size=V, seq_len=4096, budget=BudgetSpec(fixed=(8, 2)))
    assert (d.stats.used, dict(d.stats.skipped)) == (2, {"a loss weight is not a finite number >= 0": 2})
    assert bool(torch.isfinite(d.weights).all()) and float(d.weights.max()) == 3.4028234663852886e38


def test_data_from_a_pipe_is_read(tmp_path):
    """--data <(zcat d.jsonl.gz) or /dev/stdin: a pipe cannot seek. The gzip check read two bytes and seeked
    back, so every pipe was refused ("cannot read data file ...: Illegal seek"); it reads in one pass again."""
    import os
    import threading
    plain = write_jsonl(tmp_path / "d.jsonl", [{"input_ids": list(range(k, k + 30))} for k in range(3)])
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)

    def feed():
        with open(fifo, "wb") as f:
            f.write(plain.read_bytes())
    t = threading.Thread(target=feed, daemon=True)
    t.start()
    budget = BudgetSpec(fixed=(8, 2))
    d = load_dataset(fifo, vocab_size=V, seq_len=4096, budget=budget)
    t.join(5)
    want = load_dataset(plain, vocab_size=V, seq_len=4096, budget=budget)
    assert (d.stats.used, d.fingerprint) == (3, want.fingerprint)


@pytest.mark.parametrize("layout", ["pretty", "one line", "object per line"])
def test_a_json_array_is_named_as_such(tmp_path, layout):
    """A JSON array of records (json.dump of a list) given as --data: pretty-printed, every line was a
    skipped "invalid JSON" record, but one written as an object per line with commas trained on the last
    record alone (the only line without a trailing comma); on one line it said "1 not a JSON object". Now
    one line says the file is a JSON array, not JSONL, and how to convert it."""
    recs = [{"input_ids": list(range(k, k + 30))} for k in range(3)]
    path = tmp_path / "d.json"
    if layout == "pretty":
        path.write_text(json.dumps(recs, indent=1))
    elif layout == "one line":
        path.write_text(json.dumps(recs) + "\n")
    else:
        path.write_text("[\n" + ",\n".join(json.dumps(r) for r in recs) + "\n]\n")
    with pytest.raises(AhnError) as e:
        load_dataset(path, vocab_size=V, seq_len=4096, budget=BudgetSpec(fixed=(8, 2)))
    assert str(e.value) == (f"--data {path} is one JSON array, not JSONL (one JSON object per line); convert "
                            f"it first (jq -c '.[]' {path} > {path.with_suffix('.jsonl')}) and give the .jsonl file")


def test_the_suggested_conversion_never_writes_over_the_data_file(tmp_path):
    """A JSON array (or a gzip file) already named .jsonl: the advice was `jq -c '.[]' d.jsonl > d.jsonl`,
    which empties the file before jq reads it, so following it lost the data; and `gunzip -k d.jsonl`, which
    gunzip refuses ("unknown suffix"). The suggested output is now another file, and a path is quoted."""
    import gzip
    import shlex
    import subprocess
    recs = [{"input_ids": list(range(k, k + 30))} for k in range(3)]
    path = tmp_path / "my data.jsonl"
    path.write_text(json.dumps(recs, indent=1))
    with pytest.raises(AhnError) as e:
        load_dataset(path, vocab_size=V, seq_len=4096, budget=BudgetSpec(fixed=(8, 2)))
    new = tmp_path / "my data.lines.jsonl"
    assert f"(jq -c '.[]' {shlex.quote(str(path))} > {shlex.quote(str(new))})" in str(e.value), str(e.value)
    packed = tmp_path / "d.jsonl"
    with gzip.open(packed, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(AhnError) as e:
        load_dataset(packed, vocab_size=V, seq_len=4096, budget=BudgetSpec(fixed=(8, 2)))
    how = f"gunzip -c {packed} > {tmp_path / 'd.lines.jsonl'}"
    assert f"decompress it first ({how})" in str(e.value), str(e.value)
    subprocess.run(how, shell=True, check=True)       # the advice works, and the data file stays
    d = load_dataset(tmp_path / "d.lines.jsonl", vocab_size=V, seq_len=4096, budget=BudgetSpec(fixed=(8, 2)))
    assert len(d) == 3 and packed.read_bytes()[:2] == b"\x1f\x8b"


def test_an_array_record_in_jsonl_is_still_a_bad_record(tmp_path):
    """A line that is an array of numbers or an empty array stays one skipped record (the array check
    only looks for a file that is one array of records)."""
    path = write_jsonl(tmp_path / "d.jsonl", ["[]", "[1, 2, 3]", {"input_ids": list(range(30))}])
    d = load_dataset(path, vocab_size=V, seq_len=4096, budget=BudgetSpec(fixed=(8, 2)))
    assert (d.stats.used, dict(d.stats.skipped)) == (1, {"not a JSON object": 2})


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32"])
def test_a_utf16_file_is_named_as_such(tmp_path, encoding):
    """A JSONL file saved as UTF-16 (PowerShell's `>` writes it) said "no usable record (... invalid JSON,
    ... not UTF-8)"; now one line names the encoding and what to do."""
    text = "".join(json.dumps({"input_ids": list(range(k, k + 30))}) + "\n" for k in range(3))
    path = tmp_path / "d.jsonl"
    bom = {"utf-16-be": "\ufeff"}.get(encoding, "")
    path.write_bytes((bom + text).encode(encoding))
    with pytest.raises(AhnError) as e:
        load_dataset(path, vocab_size=V, seq_len=4096, budget=BudgetSpec(fixed=(8, 2)))
    name = "UTF-32" if encoding == "utf-32" else "UTF-16"
    assert str(e.value) == f"--data {path} is {name} text; save it as UTF-8 (one JSON object per line) and give that file"
