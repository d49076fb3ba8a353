"""Fallback for run_gpu.sh: turn the last resume state of an interrupted ``python -m ahn_rt.train`` run into
the same outputs a finished run writes (OUT/model.safetensors AHN-only, OUT/config.json, OUT/merged/).

    python scripts/demo/merge_resume.py --base runs/demo/teacher --run runs/demo/ahn --window 512 --sinks 32

Used only when the distillation is stopped by its time guard; the state's step is printed and recorded in
OUT/partial.json so that a partial run is never mistaken for a finished one.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from demo_args import quiet_startup  # noqa: E402

quiet_startup(__name__)   # Ctrl-C while torch imports: one line

import torch  # noqa: E402

from ahn_rt.config import check_cache_slots  # noqa: E402
from demo_args import AhnError, ArgParser, run as run_script  # noqa: E402


def main(argv=None) -> int:
    ap = ArgParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--run", required=True, help="the trainer's --out folder")
    ap.add_argument("--window", type=int, required=True)
    ap.add_argument("--sinks", type=int, required=True)
    # a damaged resume state or base: one line, exit 2 (the outputs are written last); Ctrl-C one line, 130
    return run_script(merge, ap.parse_args(argv))


def merge(args) -> int:
    # before anything is written: the outputs replace the run's model.safetensors and config.json, and a
    # config with sliding_window 0 or num_attn_sinks -1 is one no loader takes
    if args.window < 1 or args.sinks < 0:
        raise AhnError(f"--window must be >= 1 and --sinks >= 0, got --window {args.window} --sinks {args.sinks}")
    check_cache_slots(args.window, args.sinks, names=("--window", "--sinks"))
    from ahn_rt import weights as W
    from ahn_rt.train import checkpoint as ckpt_io
    run = Path(args.run)
    folder = ckpt_io.find_resume(run)
    if folder is None:   # a user's mistake like the others (was a bare line and exit 1)
        raise AhnError(f"--run {run} holds no resume state (no {run / ckpt_io.RESUME / 'state.json'}); give the "
                       "--out folder of a python -m ahn_rt.train run that wrote one")
    state, ahn, _ = ckpt_io.load_resume(folder)
    ckpt = W.open_checkpoint(Path(args.base))
    base_cfg = W.find_config(Path(args.base), sorted(set(ckpt.src.where.values()), key=str))
    # the base the run trained on (what the trainer's --resume checks): merged onto another base of the same
    # config the memory is garbage, silently; of another shape it failed with an "internal:" shape error
    if state.get("base_config") not in (None, base_cfg):
        raise AhnError(f"--base {args.base} is not the model the run in {run} trained (its config differs); "
                       "give the --base it trained on")
    if state.get("base_fingerprint") is not None:
        if ckpt_io.base_fingerprint({k: ckpt.src.get(k) for k in W.base_shapes(ckpt.config)}) != state["base_fingerprint"]:
            raise AhnError(f"--base {args.base} is not the model the run in {run} trained (same config, other "
                           "weights); give the --base it trained on")
    # the memory variant the run trained (its recorded settings; runs older than the variants: GatedDeltaNet)
    impl = (state.get("run") or {}).get("ahn")
    cfg = ckpt_io.output_config(base_cfg, ckpt.config.family, args.window, args.sinks, implementation=impl)
    ckpt_io.write_model(run, ahn, ckpt.config, cfg, torch.bfloat16)
    merged_cfg = dict(cfg, torch_dtype=base_cfg.get("torch_dtype", "bfloat16"))
    ckpt_io.write_merged(run, ckpt, ahn, merged_cfg, torch.bfloat16)
    total = state.get("schedule", {}).get("total_steps")
    W.atomic_write_text(run / "partial.json", json.dumps({"step": state["step"], "planned_steps": total}) + "\n")
    print(f"[merge_resume] wrote {run / 'merged'} from the resume state at step {state['step']} of {total}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
