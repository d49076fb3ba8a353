"""Where the demo model's SWA -> full loss gap lives, and how much of each part the memory recovers.

    python scripts/demo/gap_anatomy.py --model weights/demo --data data/demo --n-text 16 --out-md anatomy.md

The held-out text sequences of the evaluation (``longrange.eval_text_sequences``: the same sequences as
``evaluate.py`` at the same --seq-len and --n-text), every mode through ``ahn_rt.load`` and
``Session.forward`` (float32 logits on the CPU by default). At each position t >= S + W (where the modes
differ) the next token y = ids[t + 1] falls in one class by where the bigram (ids[t], y) occurred earlier in
the sequence, that is where a model could copy y from:

* ``visible``: an earlier occurrence whose y sits in the sinks or the window that a query at t sees
  ({0..S-1} and {t-W+1..t});
* ``beyond``: earlier occurrences, every one of them beyond the window (only full attention or the memory
  can reach them);
* ``unseen``: the bigram never occurred earlier in the sequence.

``--ngram 3`` classes by the trigram ending at y instead (fewer chance repeats count as a copy).

Per class: its share of the positions, its share of the gap (the sum of nll_swa - nll_full over the class,
divided by the sum over every position), each mode's mean loss, and the share of the class's own gap that the
memory recovers, (swa - ahn) / (swa - full). The whole-sequence row repeats evaluate.py's figure.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from demo_args import quiet_startup  # noqa: E402

quiet_startup(__name__)   # Ctrl-C while torch imports: one line

import numpy as np  # noqa: E402
import torch  # noqa: E402

import longrange  # noqa: E402
from demo_args import (AhnError, ArgParser, check_apart, check_out_file, check_tokens, need_data,  # noqa: E402
                       need_model, positive_int, run, write_text)
from evaluate import RuntimeForward, token_nll  # noqa: E402

CLASSES = ("visible", "beyond", "unseen")
MODES = ("full", "swa", "ahn")


def classify(ids: np.ndarray, window: int, sinks: int, n: int = 2) -> np.ndarray:
    """cls[t] for t < T - 1 (0 visible, 1 beyond, 2 unseen), by the earlier occurrences of the n-gram ending
    at t + 1 (n = 2: the bigram (ids[t], ids[t + 1])): its copy sources q (the position of y in an earlier
    occurrence ending at q) with q <= t. Only the first and the last source matter: a source in the sinks is
    the first one, one in the window the last one. Positions t < n - 2 have no n-gram: unseen."""
    T = len(ids)
    first: dict = {}
    last: dict = {}
    cls = np.full(T - 1, 2, dtype=np.int64)
    for t in range(max(0, n - 2), T - 1):
        key = tuple(int(x) for x in ids[t + 2 - n:t + 2])
        if key in last:
            seen = last[key] >= t - window + 1 or first[key] < sinks
            cls[t] = 0 if seen else 1
        # this occurrence's source is t + 1: a query at t' > t may copy from it
        first.setdefault(key, t + 1)
        last[key] = t + 1
    return cls


def anatomy(nll: dict, cls: list[np.ndarray], start: int) -> dict:
    """Per class and overall: positions, gap share, each mode's mean loss, the memory's recovered share."""
    c = np.concatenate([x[start:] for x in cls])
    per = {m: np.concatenate([x[start:] for x in nll[m]]) for m in nll}
    gap = per["swa"] - per["full"]
    total_gap = float(gap.sum())
    rows = {}
    for k, name in enumerate(CLASSES + ("all",)):
        sel = c == k if name != "all" else np.ones_like(c, dtype=bool)
        n = int(sel.sum())
        row = {"positions": n, "position_share": n / len(c) if len(c) else None,
               "gap_share": float(gap[sel].sum()) / total_gap if total_gap else None}
        for m in per:
            row[f"loss_{m}"] = float(per[m][sel].mean()) if n else None
        g = float(gap[sel].sum())
        row["recovered"] = (float((per["swa"][sel] - per["ahn"][sel]).sum()) / g
                            if "ahn" in per and n and g else None)
        rows[name] = row
    return rows


def markdown(meta: dict, rows: dict) -> str:
    def f(x, pct=False):
        return "–" if x is None else (f"{100 * x:.1f}%" if pct else f"{x:.4f}")
    gram = {2: "bigram", 3: "trigram"}.get(meta.get("ngram", 2), f"{meta.get('ngram')}-gram")
    out = [f"Gap anatomy: {meta['n_text']} held-out sequences of {meta['seq_len']} tokens, positions t >= "
           f"S + W = {meta['start']} ({meta['positions']} positions), {meta['dtype']} on {meta['device']}.", "",
           f"| next token's {gram} | positions | share of the gap | full | swa | ahn | gap recovered |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    label = {"visible": "seen in the sinks or the window", "beyond": "seen only beyond the window",
             "unseen": "not seen earlier", "all": "all positions"}
    for name, r in rows.items():
        out.append(f"| {label[name]} | {f(r['position_share'], True)} | {f(r['gap_share'], True)} | "
                   f"{f(r.get('loss_full'))} | {f(r.get('loss_swa'))} | {f(r.get('loss_ahn'))} | "
                   f"{f(r['recovered'], True)} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = ArgParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="merged demo folder (base + AHN)")
    ap.add_argument("--data", default="data/demo", help="folder of build_corpus.py (heldout.bin)")
    ap.add_argument("--seq-len", type=positive_int, default=4096)
    ap.add_argument("--n-text", type=positive_int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--ngram", type=int, default=2, help="class by this n-gram ending at the next token (>= 2)")
    ap.add_argument("--out-md")
    ap.add_argument("--out-json")
    args = ap.parse_args(argv)
    if args.ngram < 2:
        ap.error(f"--ngram must be >= 2, got {args.ngram}")
    return run(gap_anatomy, args)


def gap_anatomy(args) -> int:
    cfg = need_model(args.model)
    if "sliding_window" not in cfg or "num_attn_sinks" not in cfg:
        raise AhnError(f"--model {args.model}: its config.json has no sliding_window / num_attn_sinks; give a "
                       "merged demo folder (base + AHN)")
    window, sinks = cfg["sliding_window"], cfg["num_attn_sinks"]
    if window + sinks >= args.seq_len - 1:
        raise AhnError(f"--seq-len {args.seq_len} leaves no position past the sinks + window ({sinks} + {window}); "
                       f"give a --seq-len above {window + sinks + 1}")
    heldout = longrange.load_tokens(need_data(args.data) / "heldout.bin")
    check_tokens(heldout, args.seq_len, "heldout")
    check_out_file(args.out_md, "--out-md")
    check_out_file(args.out_json, "--out-json")
    check_apart(("--out-md", args.out_md), ("--out-json", args.out_json))   # the JSON was written over the table

    import ahn_rt
    seqs = longrange.eval_text_sequences(heldout, args.seq_len, args.n_text)
    start = window + sinks
    nll = {}
    for mode in MODES:
        kw = {} if mode == "full" else {"window": window, "sinks": sinks}
        model = ahn_rt.load(args.model, mode=mode, device=args.device, dtype=args.dtype, **kw)
        fwd = RuntimeForward(model)
        nll[mode] = [token_nll(fwd(ids), torch.as_tensor(ids)).cpu().numpy() for ids in seqs]
        print(f"[anatomy] {mode}: {float(np.concatenate([x[start:] for x in nll[mode]]).mean()):.4f}", flush=True)
        del model
    cls = [classify(ids, window, sinks, args.ngram) for ids in seqs]
    rows = anatomy(nll, cls, start)
    meta = {"model": args.model, "seq_len": args.seq_len, "n_text": args.n_text, "window": window,
            "sinks": sinks, "start": start, "positions": rows["all"]["positions"], "device": args.device,
            "dtype": args.dtype, "ngram": args.ngram}
    md = markdown(meta, rows)
    print(md, flush=True)
    if args.out_md:
        write_text(args.out_md, md)
    if args.out_json:
        write_text(args.out_json, json.dumps({"meta": meta, "classes": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
