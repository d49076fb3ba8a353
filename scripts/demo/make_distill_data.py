"""Write the distillation sequences for ``python -m ahn_rt.train``: pre-tokenized JSONL, one
``{"input_ids": [...]}`` per line, every sequence exactly --seq-len tokens of demo-corpus text (by default
the ``distill`` split, which the teacher never trained on) with a passkey in a fraction of them.
``--answer-weight W`` (W != 1) adds ``"loss_weights"`` to the passkey records: W on the passkey's answer
digits, 1 elsewhere, so that the distillation loss stresses the long-range recall (the trainer takes the
weighted mean). ``--text-weight T`` (T != 1) puts T instead of 1 on every other token, of every record
(``--text-weight 0 --passkey-frac 1``: a loss on the answer digits alone).

    python scripts/demo/make_distill_data.py --data data/demo --out runs/demo/distill.jsonl --num 19200 \\
        --seq-len 4096 --passkey-frac 1.0 --dist-min 600 --seed 1

Sequences and passkeys come from ``longrange.SequenceSampler`` (the helper the teacher's data and the
evaluation use), seeded: the same flags write the same file. Every token is a loss target; the trainer
takes the loss at positions t >= S + W.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import longrange  # noqa: E402


def write_jsonl(path: Path, sampler: longrange.SequenceSampler, num: int, answer_weight: float = 1.0,
                text_weight: float = 1.0) -> dict:
    """Write ``num`` sequences (when either weight is not 1, with loss weights: ``answer_weight`` on a
    passkey's answer digits, ``text_weight`` on every other token); returns counts, the distance range and
    the file's sha256."""
    h = hashlib.sha256()
    with_key, dists = 0, []
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="ascii") as f:
        for _ in range(num):
            ids, item = sampler.sample()
            line = '{"input_ids": [' + ",".join(map(str, ids.tolist())) + "]"
            if text_weight != 1.0 or (item is not None and answer_weight != 1.0):
                w = [repr(float(text_weight))] * len(ids)
                for p in (item.answer_positions if item is not None else ()):
                    w[p] = repr(float(answer_weight))
                line += ', "loss_weights": [' + ",".join(w) + "]"
            line += "}\n"
            f.write(line)
            h.update(line.encode("ascii"))
            if item is not None:
                with_key += 1
                dists.append(item.distance)
    os.replace(tmp, path)
    return {"sequences": num, "with_passkey": with_key,
            "distance_min": min(dists) if dists else None, "distance_max": max(dists) if dists else None,
            "distance_mean": round(sum(dists) / len(dists), 1) if dists else None, "sha256": h.hexdigest()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="data/demo")
    ap.add_argument("--split", default="distill", choices=["train", "distill", "heldout"])
    ap.add_argument("--out", required=True, help="output .jsonl")
    ap.add_argument("--num", type=int, required=True, help="number of sequences")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--passkey-frac", type=float, default=1.0)
    ap.add_argument("--dist-min", type=int, default=None, help="smallest passkey distance (default: any)")
    ap.add_argument("--dist-max", type=int, default=None)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--answer-weight", type=float, default=1.0,
                    help="loss weight of a passkey's answer digits (default 1: no weights written)")
    ap.add_argument("--text-weight", type=float, default=1.0,
                    help="loss weight of every token that is not an answer digit (default 1)")
    ap.add_argument("--stats", help="also write the counts as JSON to this file")
    args = ap.parse_args(argv)
    data = Path(args.data)
    t = longrange.Templates.from_data(data)
    tokens = longrange.load_tokens(data / f"{args.split}.bin")
    sampler = longrange.SequenceSampler(tokens, args.seq_len, t, seed=args.seed, passkey_frac=args.passkey_frac,
                                        dist_min=args.dist_min, dist_max=args.dist_max)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for flag, v in (("--answer-weight", args.answer_weight), ("--text-weight", args.text_weight)):
        if not (0 <= v < float("inf")):
            ap.error(f"{flag} {v}: give a finite number >= 0")
    if args.answer_weight == 0 and args.text_weight == 0:
        ap.error("--answer-weight 0 with --text-weight 0 leaves no loss at all")
    stats = write_jsonl(out, sampler, args.num, args.answer_weight, args.text_weight)
    stats.update(split=args.split, split_tokens=len(tokens), seq_len=args.seq_len, seed=args.seed,
                 passkey_frac=args.passkey_frac, answer_weight=args.answer_weight, text_weight=args.text_weight)
    print("[distill-data] " + json.dumps(stats), flush=True)
    if args.stats:
        Path(args.stats).write_text(json.dumps(stats, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
