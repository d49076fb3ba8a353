"""Evaluate the demo model through the inference runtime: full attention (the teacher), sinks + window
(swa) and sinks + window + AHN memory (ahn), on held-out files of the demo corpus.

    python scripts/demo/evaluate.py --model weights/demo --data data/demo --out-md eval.md --out-json eval.json

Every number comes from ``ahn_rt.load(model, mode=...)`` and ``Session.forward(ids)`` (float32 logits):

* text loss: mean next-token cross-entropy at the positions t >= S + W (the ones that differ between the
  modes) of --n-text plain held-out sequences of --seq-len tokens, also split by position; the fraction of
  the SWA -> full gap AHN recovers is (loss_swa - loss_ahn) / (loss_swa - loss_full);
* passkey recall: --n-passkey held-out sequences per distance, each with a 5-digit passkey stated once and
  asked for ``distance`` tokens later (``longrange.py``, the helper that built the training data, seeded).
  Exact-match recall under greedy decoding (= the argmax at each of the 5 answer positions is the right
  digit; chance 1e-5), per-digit accuracy (chance 0.1), and the mean loss on the 5 answer tokens; and how
  many exact answers also end there (the argmax after the fifth digit is the newline that follows it in the
  sequence), as a user reading the greedy answer sees it (``exact_end`` of ``end_n``: the items whose newline
  fits in the sequence). A real greedy continuation (prefill, then 4 one-token decode steps) is also run on the first item of every
  distance and mode and must agree with the teacher-forced answer.

Writes a markdown table (--out-md) and every number (--out-json).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from demo_args import quiet_startup  # noqa: E402

quiet_startup(__name__)   # Ctrl-C while torch imports: one line

import numpy as np  # noqa: E402
import torch  # noqa: E402

import longrange  # noqa: E402
from demo_args import (AhnError, ArgParser, check_apart, check_distance, check_out_file, check_tokens,  # noqa: E402
                       int_list, need_data, need_model, nonneg_int, positive_int, read_json, run, seed_arg, write_text)

MODES = ("full", "swa", "ahn")


# ----------------------------------------------------------------------------------------------
# Scoring (pure functions of logits; the tests check them)
# ----------------------------------------------------------------------------------------------
def token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """nll[t] = -log p(ids[t + 1] | logits[t]) for t < T - 1 (float64 [T - 1])."""
    lp = torch.log_softmax(logits[:-1].double(), dim=-1)
    return -lp.gather(1, ids[1:].long().to(lp.device)[:, None])[:, 0]


def score_text(logits: torch.Tensor, ids, start: int, edges=()) -> dict:
    """Sum and count of the next-token loss at positions start <= t < T - 1, overall and per bucket
    [edges[i], edges[i+1]) (the first bucket starts at ``start``, the last ends at T - 1)."""
    ids = torch.as_tensor(np.asarray(ids))
    nll = token_nll(logits, ids).cpu()
    T = ids.numel()
    bounds = [start] + [e for e in edges if start < e < T - 1] + [T - 1]
    buckets = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        buckets.append((a, b, float(nll[a:b].sum()), b - a))
    return {"sum": float(nll[start:].sum()), "n": max(0, T - 1 - start), "buckets": buckets}


def score_item(logits: torch.Tensor, ids, item: longrange.Item, end_token: int | None = None) -> dict:
    """Teacher-forced scoring of one passkey: exact (all 5 argmaxes right), digits right, answer nll; and
    ended: whether the argmax after the last digit (logits row answer_pos + 4) is ``end_token`` (None when
    there is none to compare with)."""
    pos = torch.tensor([p - 1 for p in item.answer_positions])
    lg = logits[pos.to(logits.device)].double().cpu()
    target = torch.tensor(item.digits)
    pred = lg.argmax(-1)
    nll = -torch.log_softmax(lg, -1).gather(1, target[:, None])[:, 0]
    right = int((pred == target).sum())
    last = item.answer_pos + longrange.N_DIGITS - 1
    ended = None if end_token is None else int(logits[last].argmax()) == end_token
    return {"exact": right == len(item.digits), "digits_right": right, "answer_nll": float(nll.sum()),
            "pred": pred.tolist(), "ended": ended}


def greedy_agrees(greedy, forced, digits) -> bool:
    """Does a greedy continuation agree with the teacher-forced argmaxes? They must match at every position
    up to and including the first one where greedy leaves the true digits (after that greedy is fed its own
    tokens, the teacher-forced pass the true ones, so the two are no longer comparable)."""
    for g, f, d in zip(greedy, forced, digits):
        if g != f:
            return False
        if g != d:
            return True
    return True


# ----------------------------------------------------------------------------------------------
# Running the modes
# ----------------------------------------------------------------------------------------------
class RuntimeForward:
    """ids -> float32 logits [T, V] through one runtime Session (reset before every sequence)."""

    def __init__(self, model):
        self.model = model
        self.sess = model.new_session()

    @torch.inference_mode()
    def __call__(self, ids: np.ndarray) -> torch.Tensor:
        self.sess.reset()
        return self.sess.forward(torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)))

    @torch.inference_mode()
    def greedy(self, prefix: np.ndarray, n: int) -> list[int]:
        """Prefill ``prefix`` then n - 1 one-token decode steps, greedy: the n generated ids."""
        self.sess.reset()
        logits = self.sess.forward(torch.from_numpy(np.ascontiguousarray(prefix, dtype=np.int64)), last_only=True)
        out = [int(logits[-1].argmax())]
        for _ in range(n - 1):
            logits = self.sess.forward([out[-1]])
            out.append(int(logits[-1].argmax()))
        return out


def evaluate_mode(fwd, text_seqs, passkey_seqs, start: int, edges=(), greedy_check: bool = True) -> dict:
    """All numbers of one mode. fwd: ids -> logits (and .greedy when greedy_check)."""
    t0 = time.perf_counter()
    tot, n = 0.0, 0
    bucket_sum: dict = {}
    for ids in text_seqs:
        r = score_text(fwd(ids), ids, start, edges)
        tot, n = tot + r["sum"], n + r["n"]
        for a, b, s, c in r["buckets"]:
            acc = bucket_sum.setdefault((a, b), [0.0, 0])
            acc[0] += s
            acc[1] += c
    res = {"text_loss": tot / n if n else None, "text_tokens": n,
           "text_loss_by_position": [{"from": a, "to": b, "loss": s / c if c else None, "tokens": c}
                                     for (a, b), (s, c) in sorted(bucket_sum.items())],
           "passkey": {}}
    for dist, seqs in passkey_seqs.items():
        exact = digits = exact_end = end_n = 0
        nll = 0.0
        check = None
        for j, (ids, item) in enumerate(seqs):
            end = item.answer_pos + longrange.N_DIGITS         # the newline after the answer, where it fits
            end_token = int(ids[end]) if end < len(ids) else None
            ids = ids[:end + 1]   # through the newline (causal: the rows scored do not see it)
            r = score_item(fwd(ids), ids, item, end_token)
            exact += r["exact"]
            end_n += end_token is not None
            exact_end += bool(r["exact"] and r["ended"])
            digits += r["digits_right"]
            nll += r["answer_nll"]
            if j == 0 and greedy_check and hasattr(fwd, "greedy"):
                g = fwd.greedy(ids[:item.answer_pos], longrange.N_DIGITS)
                check = {"greedy": g, "teacher_forced_argmax": r["pred"],
                         "agree": greedy_agrees(g, r["pred"], item.digits)}
        k = len(seqs)
        res["passkey"][str(dist)] = {"n": k, "exact": exact, "recall": exact / k if k else None,
                                     "digit_acc": digits / (k * longrange.N_DIGITS) if k else None,
                                     "answer_loss": nll / (k * longrange.N_DIGITS) if k else None,
                                     "exact_end": exact_end, "end_n": end_n, "greedy_check": check}
    res["seconds"] = round(time.perf_counter() - t0, 2)
    return res


def gap_recovered(res: dict) -> float | None:
    try:
        full, swa, ahn = (res[m]["text_loss"] for m in MODES)
    except KeyError:
        return None
    gap = swa - full
    return (swa - ahn) / gap if gap > 0 else None


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def _pct(x):
    return "–" if x is None else f"{100 * x:.0f}%"


def markdown(report: dict) -> str:
    m = report["meta"]
    res = report["modes"]
    modes = [x for x in MODES if x in res]
    S, W = m["sinks"], m["window"]
    lines = [f"Held-out files of the demo corpus (never trained on), sequences of {m['seq_len']} tokens, "
             f"S = {S} sinks + W = {W} window, {m['dtype']} on {m['device']}, runtime backend {m['backend']}.",
             "",
             f"Next-token loss (nats/token) at positions t >= S + W = {S + W}, "
             f"{m['n_text']} sequences ({res[modes[0]]['text_tokens']:,} tokens):",
             ""]
    buckets = res[modes[0]]["text_loss_by_position"]
    lines.append("| mode | loss | " + " | ".join(f"t {b['from']}–{b['to'] - 1}" for b in buckets) + " |")
    lines.append("|---|---:|" + "---:|" * len(buckets))
    for mode in modes:
        r = res[mode]
        lines.append(f"| {mode} | {r['text_loss']:.4f} | " +
                     " | ".join(f"{b['loss']:.4f}" for b in r["text_loss_by_position"]) + " |")
    g = report.get("gap_recovered")
    if g is not None:
        lines += ["", f"AHN recovers **{100 * g:.1f}%** of the SWA -> full gap "
                      f"({res['swa']['text_loss'] - res['full']['text_loss']:.4f} nats/token)."]
    dists = list(res[modes[0]]["passkey"])
    if dists and res[modes[0]]["passkey"][dists[0]]["n"]:
        n = res[modes[0]]["passkey"][dists[0]]["n"]
        lines += ["", f"Passkey recall: 5 random digits stated once, asked for `distance` tokens later; exact match "
                      f"under greedy decoding, {n} sequences per distance (chance 1e-5); in brackets the per-digit "
                      f"accuracy (chance 10%) and the loss on the 5 answer tokens; then how many exact answers also "
                      f"end (the newline is the argmax after the fifth digit):", ""]
        lines.append("| distance | " + " | ".join(modes) + " |")
        lines.append("|---:|" + "---|" * len(modes))
        for d in dists:
            # answer digit i is predicted at answer_pos - 1 + i from stated digit key_pos + i: d - 1 tokens back
            inside = " (inside the window)" if int(d) <= W else ""
            cells = []
            for mode in modes:
                p = res[mode]["passkey"][d]
                ends = f"; ended {p['exact_end']}/{p['end_n']}" if "exact_end" in p else ""   # (older reports: none)
                cells.append(f"{p['exact']}/{p['n']} = {_pct(p['recall'])} ({_pct(p['digit_acc'])}, "
                             f"{p['answer_loss']:.2f}){ends}")
            lines.append(f"| {d}{inside} | " + " | ".join(cells) + " |")
    checks = [(mode, d, res[mode]["passkey"][d]["greedy_check"]) for mode in modes for d in dists
              if res[mode]["passkey"][d]["greedy_check"] is not None]
    bad = [f"{mode}@{d}" for mode, d, c in checks if not c["agree"]]
    if checks:
        lines += ["", f"Greedy decoding check (prefill + decode steps vs teacher-forced argmax): "
                      f"{len(checks) - len(bad)}/{len(checks)} agree" + (f" (differ: {', '.join(bad)})" if bad else "") + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = ArgParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="merged demo folder (base + AHN); full/swa need only a base")
    ap.add_argument("--data", default="data/demo")
    ap.add_argument("--modes", default="full,swa,ahn")
    ap.add_argument("--window", type=positive_int, help="default: the model config's sliding_window")
    ap.add_argument("--sinks", type=nonneg_int, help="default: the model config's num_attn_sinks")
    ap.add_argument("--seq-len", type=positive_int, default=4096)
    ap.add_argument("--n-text", type=positive_int, default=32)
    ap.add_argument("--n-passkey", type=nonneg_int, default=32)
    ap.add_argument("--distances", default="256,1000,2000,3500")
    ap.add_argument("--edges", default="1024,2048", help="position buckets of the text loss")
    ap.add_argument("--seed", type=seed_arg, default=2024)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, help="default: the checkpoint's (bf16)")
    ap.add_argument("--no-greedy-check", action="store_true")
    ap.add_argument("--attach", action="append", default=[], metavar="NAME=FILE.json",
                    help="copy a JSON file into the report under pipeline.NAME (repeatable)")
    ap.add_argument("--out-md")
    ap.add_argument("--out-json")
    return run(evaluate_all, ap.parse_args(argv))


def evaluate_all(args) -> int:
    # every input and output checked before the first model loads (a bad --out-md was found after the run)
    cfg = need_model(args.model)
    data = need_data(args.data)
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            raise AhnError(f"--modes: {m!r} is not a mode; give a comma list of {', '.join(MODES)}")
    if not modes or len(set(modes)) != len(modes):
        raise AhnError(f"--modes {args.modes!r}: name each mode once, e.g. full,swa,ahn")
    window = args.window or cfg.get("sliding_window")
    sinks = args.sinks if args.sinks is not None else cfg.get("num_attn_sinks")
    if window is None or sinks is None:
        raise AhnError("the model config has no sliding_window / num_attn_sinks: pass --window and --sinks")
    L = args.seq_len
    if window + sinks >= L - 1:
        raise AhnError(f"--seq-len {L} leaves no position past the sinks + window ({sinks} + {window}) to score; "
                       f"give a --seq-len above {window + sinks + 1}")
    t = longrange.Templates.from_data(data)
    distances = int_list(args.distances, "--distances", hint="256,1000")
    for d in distances:
        check_distance(d, L, t)
    edges = int_list(args.edges, "--edges", 1, ascending=True, hint="1024,2048")
    attached = {}
    for spec in args.attach:
        name, eq, path = spec.partition("=")
        if not name or not eq or not path:
            raise AhnError(f"--attach {spec!r}: give NAME=FILE.json")
        p = Path(path)    # a record a run did not write (an optional step) is attached as null
        attached[name] = read_json(p, "--attach", "a JSON file") if p.is_file() else None
    check_out_file(args.out_md, "--out-md")
    check_out_file(args.out_json, "--out-json")
    check_apart(("--out-md", args.out_md), ("--out-json", args.out_json))   # the JSON was written over the table

    import ahn_rt
    from ahn_rt import ops
    heldout = longrange.load_tokens(data / "heldout.bin")
    check_tokens(heldout, L, "heldout")
    text_seqs = longrange.eval_text_sequences(heldout, L, args.n_text)
    passkey_seqs = longrange.eval_passkey_sequences(heldout, L, distances, args.n_passkey, t, seed=args.seed)
    start = window + sinks
    report = {"meta": {"model": str(args.model), "seq_len": L, "window": window, "sinks": sinks,
                       "n_text": args.n_text, "n_passkey": args.n_passkey, "distances": distances,
                       "seed": args.seed, "chance_exact": longrange.CHANCE, "chance_digit": 0.1,
                       "heldout_tokens": int(len(heldout))},
              "modes": {}}
    for mode in modes:
        kw = {} if mode == "full" else {"window": window, "sinks": sinks}
        model = ahn_rt.load(args.model, mode=mode, device=args.device, dtype=args.dtype, **kw)
        report["meta"].update(device=str(model.device), dtype=str(model.config.dtype).replace("torch.", ""),
                              backend=ops.backend())
        res = evaluate_mode(RuntimeForward(model), text_seqs, passkey_seqs, start, edges,
                            greedy_check=not args.no_greedy_check)
        report["modes"][mode] = res
        pk = " ".join(f"{d}:{v['exact']}/{v['n']}" for d, v in res["passkey"].items())
        pe = " ".join(f"{d}:{v['exact_end']}/{v['end_n']}" for d, v in res["passkey"].items())
        print(f"[eval] {mode}: text loss {res['text_loss']:.4f}; passkey exact {pk}; exact and ended {pe}; "
              f"{res['seconds']} s", flush=True)
        del model
    report["gap_recovered"] = gap_recovered(report["modes"])
    for name, value in attached.items():
        report.setdefault("pipeline", {})[name] = value
    md = markdown(report)
    print(md, flush=True)
    if args.out_md:
        write_text(args.out_md, md)
    if args.out_json:
        write_text(args.out_json, json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
