"""Two CPU diagnostics of passkey recall beyond the window, on the demo teacher (weights/README.md, "Can the
memory recall at all?").

    python scripts/demo/recall_probe.py heads                     # which heads copy the passkey, ~1 min
    python scripts/demo/recall_probe.py train --layers 5 --steps 150 --out probe.json   # ~30 min, 2 cores

``heads``: for held-out passkey sequences, at each answer position and for every layer and query head,
the teacher's attention weight on the source digit, and the source key's rank among the keys that have
left the window (t - W and earlier) under the memory's own match: the cosine of the post-RoPE query with
the post-RoPE key (GatedDeltaNet L2-normalizes both). Rank 0 means the memory's read would score the
right key first.

``train``: trains only the memory of ``--layers`` (the rest of the student stays SWA: o_proj = 0) on
passkey sequences, with the distillation KL weighted ``--answer-weight`` on the 5 answer digits and
``--text-weight`` elsewhere (0: the answers alone), through ``ahn_rt.train``'s own model and loss. Then
it reports, for full / swa / ahn, the text loss past the window and teacher-forced passkey accuracy
(exact, per digit, answer loss) at ``--distances``. float32, the SDPA attention path, fixed W and S.
``--init-from-model`` starts from the checkpoint's own memory instead of a fresh one; ``--heads`` trains
only those memory heads of ``--layers`` (the other heads' rows keep their start, and the output norm,
which the heads share, stays fixed).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from demo_args import quiet_startup  # noqa: E402

quiet_startup(__name__)   # Ctrl-C while torch imports: one line

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import longrange  # noqa: E402
from demo_args import (AhnError, ArgParser, check_distance, check_out_file, check_tokens, int_list,  # noqa: E402
                       need_data, need_model, nonneg_float, nonneg_int, positive_float, positive_int, run,
                       write_text)


def load_teacher(model_dir: str, decay_init: str = "official", seed: int = 0, with_ahn: bool = False):
    """(config, TrainModel) of the checkpoint's base, with a fresh memory, or with the checkpoint's own
    (``with_ahn``)."""
    from ahn_rt.config import parse_config
    from ahn_rt.train.model import TrainModel
    from ahn_rt.weights import ahn_shapes, base_shapes, open_checkpoint
    ckpt = open_checkpoint(model_dir)
    config = parse_config(json.loads((Path(model_dir) / "config.json").read_text()), model_dir)
    base = {k: ckpt.src.get(k).float() for k in base_shapes(config)}
    if with_ahn:
        names = list(ahn_shapes(config, config.ahn_implementation))
        missing = [k for k in names if k not in ckpt.src.where]   # a base model's: was a KeyError traceback
        if missing:
            raise AhnError(f"--init-from-model: --model {model_dir} holds no memory of its own (no {missing[0]}); "
                           "give a merged model (base + AHN), or leave --init-from-model out to train a fresh one")
        ahn = {k: ckpt.src.get(k).float() for k in names}
        return config, TrainModel(config, base, ahn, base_dtype=torch.float32, seed=seed)
    return config, TrainModel(config, base, None, base_dtype=torch.float32, seed=seed, decay_init=decay_init)


def head_rows(layer, heads):
    """{parameter: rows of the memory heads NOT in ``heads``} for a GatedDeltaNet-style memory whose
    per-head parameters have the head on dim 0; the parameters without a head dim (the output norm,
    shared by the heads) are frozen whole (every row)."""
    out = {}
    H = layer.A_log.shape[0]
    for p in layer.parameters():
        if p.dim() >= 1 and p.shape[0] == H:
            out[p] = [h for h in range(H) if h not in heads]
        else:
            out[p] = None        # all of it
    return out


# ----------------------------------------------------------------------------------------------
# heads
# ----------------------------------------------------------------------------------------------
def copy_heads(model, config, seqs, W: int) -> list[dict]:
    """Per (layer, head): mean attention on the source digit, mean rank of its key under the memory's
    cosine among the evicted keys, mean cosine of the source and mean |cosine| of all evicted keys."""
    H, D = config.num_heads, config.head_dim
    G = H // config.num_kv_heads
    seen = {}
    original = type(model)._layer

    def layer(self, i, h, rope, student):   # the unchanged layer; its input gives q and k
        _, q, k, _ = self.attention_inputs(i, h, rope)
        seen[i] = (q[0], k[0])
        return original(self, i, h, rope, student)

    acc = {}
    type(model)._layer = layer
    try:
        for ids, item in seqs:
            with torch.no_grad():
                model.forward_teacher(torch.from_numpy(ids)[None])
            for li in range(config.num_layers):
                q, k = seen[li]
                for hh in range(H):
                    kh = k[:, hh // G]
                    for j in range(longrange.N_DIGITS):
                        qp, src = item.answer_pos + j - 1, item.key_pos + j   # predicts digit j; its source
                        att = ((q[qp, hh] @ kh[:qp + 1].T) * D ** -0.5).softmax(-1)
                        cosine = F.normalize(kh[:qp - W + 1], dim=-1) @ F.normalize(q[qp, hh], dim=-1)
                        a = acc.setdefault((li, hh), [0.0, 0.0, 0.0, 0.0, 0])
                        a[0] += float(att[src])
                        a[1] += int((cosine > cosine[src]).sum())
                        a[2] += float(cosine[src])
                        a[3] += float(cosine.abs().mean())
                        a[4] += 1
    finally:
        type(model)._layer = original
    return [{"layer": li, "head": hh, "attention_on_source": a[0] / a[4], "source_rank": a[1] / a[4],
             "source_cosine": a[2] / a[4], "mean_abs_cosine": a[3] / a[4]} for (li, hh), a in sorted(acc.items())]


# ----------------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------------
def position_weights(items, B: int, L: int, answer_w: float, text_w: float) -> torch.Tensor:
    """[B, L] loss weights: position p - 1 predicts answer digit p."""
    w = torch.full((B, L), float(text_w))
    for b, it in enumerate(items):
        if it is not None:
            for p in it.answer_positions:
                w[b, p - 1] = answer_w
    return w


def train(model, sampler, a, log=print) -> list[dict]:
    from ahn_rt.train.loss import distill_loss
    from ahn_rt.train.trainer import lr_at
    layers = [int(x) for x in a.layers.split(",")] if a.layers else list(range(len(model.ahn)))
    params = [p for i in layers for p in model.ahn[i].parameters()]
    heads = [int(x) for x in a.heads.split(",")] if a.heads else None
    frozen = {}                   # --heads: parameter -> rows kept at their start (None: the whole tensor)
    if heads is not None:
        for i in layers:
            frozen.update(head_rows(model.ahn[i], heads))
    start = {p: p.detach().clone() for p in frozen}
    for p in model.ahn.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.1)
    B, L, W, S = a.batch, a.seq_len, a.window, a.sinks
    window, sinks = torch.full((B,), W), torch.full((B,), S)
    valid = torch.zeros(B, L, dtype=torch.bool)
    valid[:, S + W:L - 1] = True
    warmup = max(1, a.steps // 10)
    out = []
    for step in range(a.steps):
        ids_np, items = sampler.batch(B)
        ids = torch.from_numpy(ids_np)
        w = position_weights(items, B, L, a.answer_weight, a.text_weight)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a.lr, a.steps, warmup)
        with torch.no_grad():
            h_t = model.forward_teacher(ids)
        h_s = model.forward_student(ids, window, sinks, checkpoint=False)
        loss, _ = distill_loss(model, h_t, h_s, valid, weight=w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p, rows in frozen.items():          # the frozen heads get no gradient ...
            if p.grad is not None:
                if rows is None:
                    p.grad.zero_()
                else:
                    p.grad[rows] = 0
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():                   # ... and no weight decay
            for p, rows in frozen.items():
                if rows is None:
                    p.copy_(start[p])
                else:
                    p[rows] = start[p][rows]
        if step % 10 == 0 or step == a.steps - 1:
            with torch.no_grad():   # the plain KL on the answer digits and on the text, before this update
                ans = position_weights(items, B, L, 1.0, 0.0)
                kl_ans, _ = distill_loss(model, h_t, h_s.detach(), valid, weight=ans)
                kl_txt, _ = distill_loss(model, h_t, h_s.detach(), valid, weight=position_weights(items, B, L, 0.0, 1.0))
            rec = {"step": step, "loss": float(loss.detach()), "answer_kl": float(kl_ans), "text_kl": float(kl_txt)}
            out.append(rec)
            log(json.dumps(rec))
    return out


@torch.no_grad()
def evaluate(model, held, templates, a) -> dict:
    W, S, L = a.window, a.sinks, a.seq_len
    start = S + W

    def logits(ids, mode):
        x = torch.from_numpy(ids)[None]
        if mode == "full":
            return model.lm_logits(model.forward_teacher(x))[0]
        saved = [layer.o_proj.weight.clone() for layer in model.ahn]
        if mode == "swa":   # o_proj = 0: the student is exactly the sinks + window model
            for layer in model.ahn:
                layer.o_proj.weight.zero_()
        try:
            return model.lm_logits(model.forward_student(x, torch.tensor([W]), torch.tensor([S]), checkpoint=False))[0]
        finally:
            for layer, s in zip(model.ahn, saved):
                layer.o_proj.weight.copy_(s)

    dists = [int(d) for d in a.distances.split(",")]
    passkeys = longrange.eval_passkey_sequences(held, L, dists, a.n_passkey, templates, seed=7)
    texts = longrange.eval_text_sequences(held, L, a.n_text)
    res = {}
    for mode in ("full", "swa", "ahn"):
        tot = n = 0.0
        for ids in texts:
            lp = logits(ids, mode)[start:-1].log_softmax(-1)
            tot += float(-lp.gather(1, torch.from_numpy(ids[start + 1:])[:, None]).sum())
            n += L - start - 1
        r = {"text_loss": tot / n}
        for d, seqs in passkeys.items():
            exact = right = 0
            nll = 0.0
            for ids, item in seqs:
                lg = logits(ids, mode)[[p - 1 for p in item.answer_positions]].double()
                tgt = torch.tensor(item.digits)
                k = int((lg.argmax(-1) == tgt).sum())
                right, exact = right + k, exact + (k == len(tgt))
                nll += float(-lg.log_softmax(-1).gather(1, tgt[:, None]).sum())
            r[str(d)] = {"exact": exact, "n": len(seqs), "digit_accuracy": right / (len(seqs) * longrange.N_DIGITS),
                         "answer_nll": nll / len(seqs)}
        res[mode] = r
    gap = res["swa"]["text_loss"] - res["full"]["text_loss"]
    res["gap_recovered"] = (res["swa"]["text_loss"] - res["ahn"]["text_loss"]) / gap if gap > 0 else None
    return res


def main(argv=None) -> int:
    ap = ArgParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("heads", "train"))
    ap.add_argument("--model", default="weights/demo")
    ap.add_argument("--data", default="data/demo")
    ap.add_argument("--seq-len", type=positive_int, default=1024)
    ap.add_argument("--window", type=positive_int, default=128)
    ap.add_argument("--sinks", type=nonneg_int, default=32)
    ap.add_argument("--distances", default="300,700")
    ap.add_argument("--n-passkey", type=positive_int, default=24)
    ap.add_argument("--n-text", type=positive_int, default=16)
    ap.add_argument("--layers", help="comma list of the layers whose memory trains (default: all)")
    ap.add_argument("--steps", type=positive_int, default=150)
    ap.add_argument("--batch", type=positive_int, default=8)
    ap.add_argument("--lr", type=positive_float, default=5e-3)
    ap.add_argument("--answer-weight", type=nonneg_float, default=1.0)
    ap.add_argument("--text-weight", type=nonneg_float, default=0.0)
    ap.add_argument("--decay-init", choices=("official", "long"), help="a fresh memory's decay gates (default long)")
    ap.add_argument("--init-from-model", action="store_true",
                    help="start from the --model checkpoint's own memory (default: a fresh one)")
    ap.add_argument("--heads", help="train only these memory heads of --layers (e.g. 0,1); the "
                                    "output norm, shared by the heads, stays fixed")
    ap.add_argument("--threads", type=nonneg_int, default=0, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", help="write every number as JSON here")
    a = ap.parse_args(argv)
    if a.answer_weight == 0 and a.text_weight == 0:
        ap.error("--answer-weight 0 with --text-weight 0 leaves no loss at all")
    return run(probe, a)


def check_args(a) -> Path:
    """Every option checked against the model and the data before any work; returns the data folder."""
    cfg = need_model(a.model)
    splits = ["heldout", "distill"] if a.what == "train" else ["heldout"]
    data = need_data(a.data, splits)
    if a.window + a.sinks >= a.seq_len - 1:
        raise AhnError(f"--seq-len {a.seq_len} leaves no position past --sinks + --window ({a.sinks} + {a.window}); "
                       f"give a --seq-len above {a.window + a.sinks + 1}")
    t = longrange.Templates.from_data(data)
    for d in int_list(a.distances, "--distances", hint="300,700"):
        check_distance(d, a.seq_len, t)
    if a.what == "train" and a.window + 40 > t.max_distance(a.seq_len):
        raise AhnError(f"--window {a.window}: the training passkeys sit at distance --window + 40 or more, beyond "
                       f"the {t.max_distance(a.seq_len)} that fits a sequence of {a.seq_len} tokens; give a smaller "
                       "--window or a longer --seq-len")
    if a.init_from_model and a.decay_init is not None:   # (was ignored: the checkpoint's memory has its gates)
        raise AhnError(f"--decay-init {a.decay_init} sets a fresh memory's gates; --init-from-model starts from the "
                       "checkpoint's own memory: give one of them")
    n_layers = cfg.get("num_hidden_layers")
    # given empty (an unset shell variable) they are refused, not read as their defaults (all layers, all heads)
    if a.layers is not None:
        int_list(a.layers, "--layers", 0, None if n_layers is None else n_layers - 1, hint="1,4")
    if a.heads is not None:
        int_list(a.heads, "--heads", 0, hint="0,1")
    for split in splits:
        check_tokens(longrange.load_tokens(data / f"{split}.bin"), a.seq_len, split)
    check_out_file(a.out, "--out")
    return data


def probe(a) -> int:
    data = check_args(a)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    templates = longrange.Templates.from_data(data)
    held = longrange.load_tokens(data / "heldout.bin")
    config, model = load_teacher(a.model, a.decay_init or "long", with_ahn=a.init_from_model)
    if a.heads:   # the memory's heads (a GatedDeltaNet-style memory: A_log holds one value per head)
        H = getattr(model.ahn[0], "A_log", None)
        if H is not None and max(int_list(a.heads, "--heads")) >= H.shape[0]:
            raise AhnError(f"--heads: the memory has {H.shape[0]} heads (0 to {H.shape[0] - 1}), got {a.heads}")
    t0 = time.time()
    if a.what == "heads":
        seqs = longrange.eval_passkey_sequences(held, a.seq_len, [int(a.distances.split(",")[-1])], a.n_passkey,
                                                templates, seed=7)
        rows = copy_heads(model, config, next(iter(seqs.values())), a.window)
        for r in rows:
            print(f"layer {r['layer']} head {r['head']}: attention on the source {r['attention_on_source']:.3f}, "
                  f"source rank {r['source_rank']:.1f}, source cosine {r['source_cosine']:.3f} "
                  f"(mean |cosine| {r['mean_abs_cosine']:.3f})")
        result = {"heads": rows}
    else:
        sampler = longrange.SequenceSampler(longrange.load_tokens(data / "distill.bin"), a.seq_len, templates,
                                            seed=1, passkey_frac=1.0, dist_min=a.window + 40)
        result = {"log": train(model, sampler, a)}
        result["eval"] = evaluate(model, held, templates, a)
        for mode in ("full", "swa", "ahn"):
            print(mode, json.dumps(result["eval"][mode]))
        print("gap recovered", result["eval"]["gap_recovered"])
    result["args"] = vars(a)
    result["seconds"] = round(time.time() - t0, 1)
    if a.out:
        write_text(a.out, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
