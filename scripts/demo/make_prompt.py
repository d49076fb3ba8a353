"""Write a passkey prompt for trying the demo model by hand: the text of held-out standard-library files
(the same split rule as build_corpus.py, so no data/ folder is needed), a passkey line early on, and the
question at the end, about --distance tokens later.

    python scripts/demo/make_prompt.py --distance 2000 --seed 1 > /tmp/passkey.txt
    for m in full swa ahn; do python -m ahn_rt.generate --weights weights/demo --prompt-file /tmp/passkey.txt \\
        --mode $m --temperature 0 --max-new-tokens 5 --quiet-stats; echo "  <- $m"; done

The expected answer and the measured distance go to stderr.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import build_corpus  # noqa: E402
import longrange  # noqa: E402
from demo_args import ArgParser, AhnError, need_file, nonneg_int, run, seed_arg  # noqa: E402


def heldout_text(min_tokens: int, tok) -> list[int]:
    """Token ids of held-out stdlib files (sorted, each followed by <|endoftext|>) until min_tokens."""
    files, _ = build_corpus.list_sources(build_corpus.stdlib_dir())
    held = [t for rel, t in files if build_corpus.split_of(rel, 20, 100) == "heldout"] or [t for _, t in files]
    eot = tok.token_to_id(build_corpus.EOT)
    ids: list[int] = []
    for text in held:
        ids += tok.encode(text, add_special_tokens=False).ids + [eot]
        if len(ids) >= min_tokens:
            break
    return ids


def build(distance: int, seed: int, key_pos: int = 300, tokenizer: str = "weights/demo/tokenizer.json"):
    """The prompt text (up to the question) and its passkey item (``.text``, ``.key_pos``, ``.distance``).
    AhnError (before any work) for a tokenizer that is not one, a distance or key position that does not fit."""
    from tokenizers import Tokenizer
    need_file(tokenizer, "--tokenizer", "a tokenizer.json (the demo model's: weights/demo/tokenizer.json)")
    try:
        tok = Tokenizer.from_file(str(tokenizer))
        t = longrange.Templates.from_tokenizer(tokenizer)
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises its own exception type
        raise AhnError(f"--tokenizer {tokenizer} is not a usable tokenizer.json ({str(e).splitlines()[0][:160]}); "
                       "give the demo model's, weights/demo/tokenizer.json") from None
    if key_pos < len(t.statement):
        raise AhnError(f"--key-pos must be >= {len(t.statement)} (the passkey line comes before it), got {key_pos}")
    L = key_pos + distance + longrange.N_DIGITS
    if distance < t.min_distance():
        raise AhnError(f"--distance must be >= {t.min_distance()} (the question line right after the passkey "
                       f"line), got {distance}")
    filler = np.asarray(heldout_text(L, tok), dtype=np.int64)
    if len(filler) < L:
        raise AhnError(f"--distance {distance}: the held-out text has {len(filler):,} tokens, too few for a prompt "
                       f"of {L}; give a smaller --distance or --key-pos")
    ids, item = longrange.insert_passkey(filler, L, distance, np.random.default_rng(seed), t,
                                         min_start=key_pos - len(t.statement), key_pos=key_pos)
    return tok.decode(ids[:item.answer_pos].tolist(), skip_special_tokens=False), item, tok


def main(argv=None) -> int:
    ap = ArgParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", default="weights/demo/tokenizer.json")
    ap.add_argument("--distance", type=nonneg_int, default=2000, help="tokens from the stated to the asked passkey")
    ap.add_argument("--key-pos", type=nonneg_int, default=300, help="token position of the stated passkey")
    ap.add_argument("--seed", type=seed_arg, default=0)
    return run(write_prompt, ap.parse_args(argv))


def write_prompt(args) -> int:
    text, item, tok = build(args.distance, args.seed, args.key_pos, args.tokenizer)
    again = tok.encode(text, add_special_tokens=False).ids
    sys.stdout.write(text)
    print(f"passkey {item.text}; prompt {len(again)} tokens, the passkey's first digit at token "
          f"{item.key_pos} (distance {item.distance} as built)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
