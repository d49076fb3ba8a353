"""Write the distillation sequences for ``python -m ahn_rt.train``: pre-tokenized JSONL, one
``{"input_ids": [...]}`` per line, every sequence exactly --seq-len tokens of demo-corpus text (by default
the ``distill`` split, which the teacher never trained on) with a passkey in a fraction of them.
``--answer-weight W`` (W != 1) adds ``"loss_weights"`` to the passkey records: W on the passkey's answer
digits, 1 elsewhere, so that the distillation loss stresses the long-range recall (the trainer takes the
weighted mean); ``--answer-end`` puts W on the newline that ends the answer too (where the sequence holds
it), so that the model also learns where the number stops. ``--text-weight T`` (T != 1) puts T instead of 1 on every other token, of every record
(``--text-weight 0 --passkey-frac 1``: a loss on the answer digits alone).

    python scripts/demo/make_distill_data.py --data data/demo --out runs/demo/distill.jsonl --num 19200 \\
        --seq-len 4096 --passkey-frac 1.0 --dist-min 600 --seed 1

Sequences and passkeys come from ``longrange.SequenceSampler`` (the helper the teacher's data and the
evaluation use), seeded: the same flags write the same file. Every token is a loss target; the trainer
takes the loss at positions t >= S + W.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import longrange  # noqa: E402
from demo_args import (AhnError, ArgParser, check_apart, check_not_corpus, check_out_file,  # noqa: E402
                       check_tokens, fraction, need_data, nonneg_float, nonneg_int, positive_int, run, seed_arg,
                       write_text)


def write_jsonl(path: Path, sampler: longrange.SequenceSampler, num: int, answer_weight: float = 1.0,
                text_weight: float = 1.0, answer_end: bool = False) -> dict:
    """Write ``num`` sequences (when either weight is not 1, with loss weights: ``answer_weight`` on a
    passkey's answer digits, and with ``answer_end`` on the newline after them, ``text_weight`` on every
    other token); returns counts, the distance range and
    the file's sha256."""
    h = hashlib.sha256()
    with_key, dists = 0, []
    from ahn_rt.weights import atomic_write

    def write(tmp):
        nonlocal with_key
        with open(tmp, "w", encoding="ascii") as f:
            for _ in range(num):
                ids, item = sampler.sample()
                line = '{"input_ids": [' + ",".join(map(str, ids.tolist())) + "]"
                if text_weight != 1.0 or (item is not None and answer_weight != 1.0):
                    w = [repr(float(text_weight))] * len(ids)
                    span = item.answer_positions if item is not None else range(0)
                    if answer_end:   # the answer's newline, where the sequence is long enough to hold it
                        span = range(span.start, min(span.stop + 1, len(ids)))
                    for p in span:
                        w[p] = repr(float(answer_weight))
                    line += ', "loss_weights": [' + ",".join(w) + "]"
                line += "}\n"
                f.write(line)
                h.update(line.encode("ascii"))
                if item is not None:
                    with_key += 1
                    dists.append(item.distance)

    try:   # a temporary of this process beside --out, on the disk before it is renamed over --out; Ctrl-C or
        atomic_write(path, write)   # a full disk leave no temporary behind
    except OSError as e:
        err = AhnError(f"cannot write {path}: {e.strerror or e}; nothing was written")
        err.exit_code = 1   # a run-time failure, not a usage error
        raise err from None
    return {"sequences": num, "with_passkey": with_key,
            "distance_min": min(dists) if dists else None, "distance_max": max(dists) if dists else None,
            "distance_mean": round(sum(dists) / len(dists), 1) if dists else None, "sha256": h.hexdigest()}


def main(argv=None) -> int:
    ap = ArgParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="data/demo")
    ap.add_argument("--split", default="distill", choices=["train", "distill", "heldout"])
    ap.add_argument("--out", required=True, help="output .jsonl")
    ap.add_argument("--num", type=positive_int, required=True, help="number of sequences")
    ap.add_argument("--seq-len", type=positive_int, default=4096)
    ap.add_argument("--passkey-frac", type=fraction, default=1.0)
    ap.add_argument("--dist-min", type=nonneg_int, default=None, help="smallest passkey distance (default: any)")
    ap.add_argument("--dist-max", type=nonneg_int, default=None)
    ap.add_argument("--seed", type=seed_arg, default=1)
    ap.add_argument("--answer-weight", type=nonneg_float, default=1.0,
                    help="loss weight of a passkey's answer digits (default 1: no weights written)")
    ap.add_argument("--answer-end", action="store_true",
                    help="also put --answer-weight on the newline that ends the answer")
    ap.add_argument("--text-weight", type=nonneg_float, default=1.0,
                    help="loss weight of every token that is not an answer digit (default 1)")
    ap.add_argument("--stats", help="also write the counts as JSON to this file")
    args = ap.parse_args(argv)
    if args.answer_weight == 0 and args.text_weight == 0:
        ap.error("--answer-weight 0 with --text-weight 0 leaves no loss at all")
    return run(write_data, args)


def write_data(args) -> int:
    data = need_data(args.data, [args.split])
    check_out_file(args.out, "--out")
    check_out_file(args.stats, "--stats")
    check_apart(("--out", args.out), ("--stats", args.stats))   # the counts were written over the sequences
    check_not_corpus(data, ("--out", args.out), ("--stats", args.stats))
    t = longrange.Templates.from_data(data)
    tokens = longrange.load_tokens(data / f"{args.split}.bin")
    check_tokens(tokens, args.seq_len, args.split)
    if args.dist_min is not None and args.dist_max is not None and args.dist_min > args.dist_max:
        raise AhnError(f"--dist-min {args.dist_min} is above --dist-max {args.dist_max}")
    if args.passkey_frac > 0:    # the sampler's distances: [--dist-min, --dist-max] clipped to what fits
        low, top = t.min_distance(), t.max_distance(args.seq_len)
        if top < low:
            raise AhnError(f"--seq-len {args.seq_len} is too short for a passkey (it needs {low - top + args.seq_len} "
                           "tokens or more); give a longer --seq-len, or --passkey-frac 0")
        if max(low, args.dist_min or 0) > min(top, top if args.dist_max is None else args.dist_max):
            raise AhnError(f"no passkey distance in [--dist-min, --dist-max] = "
                           f"[{'any' if args.dist_min is None else args.dist_min}, "
                           f"{'any' if args.dist_max is None else args.dist_max}] "
                           f"fits sequences of {args.seq_len} tokens (they take {low} to {top})")
    sampler = longrange.SequenceSampler(tokens, args.seq_len, t, seed=args.seed, passkey_frac=args.passkey_frac,
                                        dist_min=args.dist_min, dist_max=args.dist_max)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stats = write_jsonl(out, sampler, args.num, args.answer_weight, args.text_weight, args.answer_end)
    stats.update(split=args.split, split_tokens=len(tokens), seq_len=args.seq_len, seed=args.seed,
                 passkey_frac=args.passkey_frac, answer_weight=args.answer_weight, text_weight=args.text_weight,
                 **({"answer_end": True} if args.answer_end else {}))
    print("[distill-data] " + json.dumps(stats), flush=True)
    if args.stats:
        write_text(args.stats, json.dumps(stats, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
