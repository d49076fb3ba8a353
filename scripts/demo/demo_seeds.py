"""How representative the demo prompt is: the passkey prompts of make_prompt.py for a range of seeds at one
distance, each answered greedily (8 tokens at most, stopping at a newline, as the demo runs) by the demo
model in every mode. Prints one row per seed and the exact-match count per mode.

    python scripts/demo/demo_seeds.py --distance 1000 --seeds 12

The shipped demo prompt is the first seed where full attention and the memory both answer right (the
table in weights/README.md); runs on a 2-core CPU in about 15 seconds.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import make_prompt  # noqa: E402
from demo_args import ArgParser, need_folder, nonneg_int, positive_int, run  # noqa: E402

MODES = ("full", "swa", "ahn")


def main(argv=None) -> int:
    ap = ArgParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default="weights/demo")
    ap.add_argument("--distance", type=nonneg_int, default=1000)
    ap.add_argument("--seeds", type=positive_int, default=12, help="seeds 0 .. N-1")
    return run(seeds_table, ap.parse_args(argv))


def seeds_table(args) -> int:
    need_folder(args.weights, "--weights", "the demo model's folder (weights/demo)",
                ["config.json", "model.safetensors", "tokenizer.json"])
    import ahn_rt
    prompts = [make_prompt.build(args.distance, s, tokenizer=os.path.join(args.weights, "tokenizer.json"))[:2]
               for s in range(args.seeds)]
    answers = {}
    for mode in MODES:
        model = ahn_rt.load(args.weights, mode=mode)
        answers[mode] = ["".join(model.generate(text, max_new_tokens=8, temperature=0.0, stop=["\n"])).strip()
                         for text, _ in prompts]
    print(f"distance {args.distance}; answers per mode (* = exact)")
    print("seed  passkey  " + "  ".join(f"{m:>8}" for m in MODES))
    for s, (_, item) in enumerate(prompts):
        cells = [f"{a:>7}{'*' if a == item.text else ' '}" for a in (answers[m][s] for m in MODES)]
        print(f"{s:>4}  {item.text:>7}  " + "  ".join(cells))
    print("exact " + "  ".join(f"{m} {sum(answers[m][s] == it.text for s, (_, it) in enumerate(prompts))}/"
                               f"{len(prompts)}" for m in MODES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
