"""One side-by-side table of the AHN memory variants distilled onto the same teacher (compare_variants.sh):
loss past the window per mode and position bucket, the share of the SWA -> full gap each memory recovers,
passkey recall per distance, each memory's parameter count and the distillation steps it took (a time
guard can stop the variants at different steps: their steps differ in cost).

    python scripts/demo/variants_table.py --run gdn=WORK/gdn --run dn=WORK/dn --run mamba2=WORK/mamba2 \
        --eval-root OUT --out OUT/variants.md

--run NAME=DIR: the variant's work folder of run_gpu.sh (DIR/ahn/model.safetensors: the AHN-only weights);
its evaluation is --eval-root/NAME/eval/eval.json.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from safetensors import safe_open  # noqa: E402

from demo_args import AhnError, ArgParser, check_out_file, read_json, run, write_text  # noqa: E402


def ahn_params(path: Path) -> int | None:
    if not path.exists():
        return None
    from ahn_rt.weights import check_safetensors   # torch: not at import
    check_safetensors(path, fix="check that variant's run")
    with safe_open(str(path), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def distill_steps(ev: dict) -> str | None:
    """The optimizer steps behind a variant's memory: the resume step a time guard merged from, else all the
    planned steps (run_gpu.sh attaches both records to the evaluation)."""
    pipe = ev.get("pipeline") or {}
    part = pipe.get("distill_partial") or {}
    if "step" in part:
        return f"{part['step']} of {part.get('planned_steps', '?')}"
    steps = ((pipe.get("distill_run") or {}).get("run") or {}).get("steps")
    return None if steps is None else str(steps)


def main(argv=None) -> int:
    ap = ArgParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="append", required=True, metavar="NAME=DIR")
    ap.add_argument("--eval-root", required=True)
    ap.add_argument("--out", required=True)
    return run(table, ap.parse_args(argv))


def table(a) -> int:
    check_out_file(a.out, "--out")
    runs = []
    for spec in a.run:
        name, eq, work = spec.partition("=")
        if not name or not eq or not work:
            raise AhnError(f"--run {spec!r}: give NAME=DIR (the variant's work folder of run_gpu.sh)")
        if name in [r[0] for r in runs]:
            raise AhnError(f"--run: {name} is given twice; name each variant once")
        ev = Path(a.eval_root) / name / "eval" / "eval.json"
        if not ev.exists():
            raise AhnError(f"no evaluation for {name} ({ev}); did its run_gpu.sh finish?")
        res = read_json(ev, "--eval-root", "the folder holding NAME/eval/eval.json of each run")
        modes = ("full", "swa", "ahn") if not runs else ("ahn",)   # the references come from the first run
        if not isinstance(res, dict) or "meta" not in res or any(m not in res.get("modes", {}) for m in modes):
            raise AhnError(f"{ev} is not an evaluation of scripts/demo/evaluate.py with the modes "
                           f"{', '.join(modes)}; rerun it")
        runs.append((name, res, ahn_params(Path(work) / "ahn" / "model.safetensors")))

    try:
        text = markdown(runs)
    except (KeyError, TypeError, AttributeError, IndexError) as e:   # an eval.json of another shape
        raise AhnError(f"--eval-root: an eval.json lacks {e!s} or holds it in another form; rerun "
                       "scripts/demo/evaluate.py for every variant") from None
    write_text(a.out, text)
    print(text)
    return 0


def markdown(runs) -> str:
    first = runs[0][1]
    m = first["meta"]
    buckets = first["modes"]["ahn"]["text_loss_by_position"]
    dists = [d for d, p in first["modes"]["ahn"]["passkey"].items() if p["n"]]   # runs without passkeys: none
    lines = [f"Same teacher, same distillation data, settings and step or time budget for every memory; held-out files, "
             f"{m['seq_len']} tokens, S = {m['sinks']}, W = {m['window']}, {m['dtype']} on {m['device']}, "
             f"{m['n_text']} text sequences; passkey: exact recall (per-digit accuracy).", ""]
    head = ["memory", "AHN params", "steps", "loss"] + [f"t {b['from']}–{b['to'] - 1}" for b in buckets] + ["gap recovered"]
    head += [f"passkey @ {d}" for d in dists]
    lines += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]

    def row(label, res, params, gap, steps=None):
        cells = [label, "–" if params is None else f"{params:,}", "–" if steps is None else str(steps),
                 f"{res['text_loss']:.4f}"]
        cells += [f"{b['loss']:.4f}" for b in res["text_loss_by_position"]]
        cells.append("–" if gap is None else f"{100 * gap:.1f}%")
        for d in dists:
            p = res["passkey"][d]
            cells.append(f"{p['exact']}/{p['n']} ({100 * p['digit_acc']:.0f}%)")
        return "| " + " | ".join(cells) + " |"

    for mode in ("full", "swa"):   # the references, from the first run (the same teacher in every run)
        lines.append(row(f"{mode} (no memory)", first["modes"][mode], None, None))
    for name, ev, params in runs:
        lines.append(row(f"ahn-{name}", ev["modes"]["ahn"], params, ev.get("gap_recovered"), distill_steps(ev)))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
