"""Pretrain the demo teacher: a small Qwen2-architecture model trained FROM SCRATCH on the demo corpus with
full causal attention (next-token cross-entropy), passkeys in a fraction of the sequences.

    python scripts/demo/train_teacher.py --data data/demo --out runs/demo/teacher --steps 1800 --device cuda

Fixed seed and fixed number of steps (no time budget: ``--time-limit`` only guards a run that is far
slower than planned, stops early and says so in the log). AdamW (betas 0.9/0.95, weight decay 0.1 on the
matrices), linear warmup then cosine decay to ``--min-lr-ratio`` x lr, gradient clipping at 1.0, bf16
autocast with float32 master weights on CUDA.

Writes a folder the runtime loads as is (``ahn_rt.load(OUT, mode="full")``):
model.safetensors (bf16, config in its metadata, written by ``ahn_rt.weights.write_checkpoint``),
config.json, generation_config.json, tokenizer.json (copied from --data), and log.jsonl (one record per
logged step: train loss, learning rate, tokens/s; held-out loss and passkey recall every --eval-every).
An --out that already holds a teacher is refused before any work unless ``--overwrite`` is given.

The default shape keeps the merged demo checkpoint (this base + the AHN memory, bf16) under 15 MiB, one file
the GPU machine can return; the demo's files may total 25 MB (a larger one comes back in parts: run_gpu.sh).
``--print-size`` prints the parameter count and bytes of a shape and exits.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import longrange  # noqa: E402
from demo_args import (AhnError, ArgParser, check_not_corpus, check_out_dir, check_tokens, fraction,  # noqa: E402
                       need_data, nonneg_float, nonneg_int, positive_float, positive_int, run, seed_arg)

SHAPE_DEFAULTS = dict(hidden=320, layers=6, heads=5, kv_heads=1, head_dim=64, mlp=768, rope_theta=10000.0)


def model_config(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, mlp: int,
                 rope_theta: float, max_pos: int, eos: list[int], bos: int, head_dim: int | None = None) -> dict:
    """A Hugging Face Qwen2 config.json for the shape (plain model, no AHN fields)."""
    cfg = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": mlp, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "hidden_act": "silu",
        "max_position_embeddings": max_pos, "rms_norm_eps": 1e-6, "rope_theta": rope_theta,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "bos_token_id": bos, "eos_token_id": eos,
        "use_sliding_window": False, "attention_dropout": 0.0, "initializer_range": 0.02,
    }
    if head_dim is not None and head_dim * heads != hidden:
        cfg["head_dim"] = head_dim
    return cfg


def shape_bytes(cfg: dict, bytes_per_param: int = 2) -> dict:
    """Parameter counts of the base and of the AHN memory of a config, and the bf16 bytes of the merged
    checkpoint's tensors (the safetensors header adds a few KiB)."""
    from ahn_rt.config import parse_config
    from ahn_rt.weights import ahn_shapes, base_shapes
    c = parse_config(cfg, "shape")
    base = sum(math.prod(s) for k, s in base_shapes(c).items())
    ahn = sum(math.prod(s) for s in ahn_shapes(c, "GatedDeltaNet").values())
    return {"base_params": base, "ahn_params": ahn, "total_params": base + ahn,
            "tensor_bytes": (base + ahn) * bytes_per_param}


def init_base(cfg: dict, seed: int) -> dict:
    """Random initial weights under the Hugging Face names: matrices N(0, 0.02) (the residual-output
    projections o_proj and down_proj scaled by 1/sqrt(2 * layers)), biases 0, norm weights 1. Drawn on the
    CPU with a seeded generator, in sorted key order, so every machine starts from the same weights."""
    import torch
    from ahn_rt.config import parse_config
    from ahn_rt.weights import base_shapes
    c = parse_config(cfg, "teacher")
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in sorted(base_shapes(c).items()):
        if key.endswith("norm.weight"):
            out[key] = torch.ones(shape)
        elif key.endswith(".bias"):
            out[key] = torch.zeros(shape)
        else:
            std = 0.02 / math.sqrt(2 * c.num_layers) if key.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
            out[key] = torch.randn(shape, generator=g) * std
    return out


def lr_at(step: int, lr: float, steps: int, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def evaluate(model, heldout, L, n_text, passkey_dist, n_pass, templates, device, autocast):
    """Held-out mean next-token loss over n_text plain sequences, and teacher-forced exact passkey recall
    at one distance (n_pass sequences)."""
    import torch
    from ahn_rt.train.loss import lm_loss
    model.eval()
    out = {}
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=autocast):
        seqs = longrange.eval_text_sequences(heldout, L, n_text)
        losses = []
        for s in seqs:
            ids = torch.from_numpy(s)[None].to(device)
            losses.append(float(lm_loss(model, model.forward_teacher(ids), ids)))
        out["heldout_loss"] = sum(losses) / len(losses)
        if n_pass:
            items = longrange.eval_passkey_sequences(heldout, L, [passkey_dist], n_pass, templates, seed=12345)
            hits = 0
            for ids_np, item in items[passkey_dist]:
                ids = torch.from_numpy(ids_np)[None].to(device)
                h = model.forward_teacher(ids)[0]
                pos = torch.tensor([p - 1 for p in item.answer_positions], device=device)
                pred = model.lm_logits(h[pos]).argmax(-1).tolist()
                hits += int(tuple(pred) == item.digits)
            out[f"passkey_recall@{passkey_dist}"] = hits / n_pass
    model.train()
    return out


def main(argv=None) -> int:
    ap = ArgParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="data/demo", help="folder of build_corpus.py (train.bin, heldout.bin, tokenizer.json)")
    ap.add_argument("--out", required=False, help="output checkpoint folder")
    ap.add_argument("--overwrite", action="store_true", help="train over the teacher an --out already holds")
    ap.add_argument("--steps", type=positive_int, default=1800)
    ap.add_argument("--batch", type=positive_int, default=32, help="sequences per step")
    ap.add_argument("--micro-batch", type=nonneg_int, default=0, help="sequences per forward (default: --batch)")
    ap.add_argument("--seq-len", type=positive_int, default=4096)
    ap.add_argument("--lr", type=positive_float, default=1.5e-3)
    ap.add_argument("--min-lr-ratio", type=fraction, default=0.1)
    ap.add_argument("--warmup", type=nonneg_int, default=100)
    ap.add_argument("--weight-decay", type=nonneg_float, default=0.1)
    ap.add_argument("--seed", type=seed_arg, default=0)
    ap.add_argument("--passkey-frac", type=fraction, default=0.5)
    for k, v in SHAPE_DEFAULTS.items():
        ap.add_argument("--" + k.replace("_", "-"), type=positive_int if isinstance(v, int) else positive_float,
                        default=v)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", choices=["bf16", "float32"], default=None,
                    help="bf16 autocast (default on cuda) or plain float32 (default on cpu)")
    ap.add_argument("--loss-chunk", type=positive_int, default=8192, help="rows per LM-head chunk in the loss")
    ap.add_argument("--log-every", type=positive_int, default=20)
    ap.add_argument("--eval-every", type=nonneg_int, default=400)
    ap.add_argument("--eval-seqs", type=positive_int, default=8)
    ap.add_argument("--time-limit", type=nonneg_float, default=0, help="safety stop after this many seconds (0: none)")
    ap.add_argument("--print-size", action="store_true", help="print the shape's parameters and bytes, exit")
    args = ap.parse_args(argv)
    if not args.print_size and not args.out:
        ap.error("--out is required")
    return run(train_teacher, args)


OUTPUTS = ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "log.jsonl",
           "train_summary.json")   # what a run writes in --out


def train_teacher(args) -> int:
    data = need_data(args.data, [] if args.print_size else ["train", "heldout"])
    manifest = json.loads((data / "manifest.json").read_text())
    if (not isinstance(manifest.get("special_tokens"), dict) or "vocab_size" not in manifest
            or not {"<|im_end|>", "<|endoftext|>"} <= manifest["special_tokens"].keys()):
        raise AhnError(f"--data {data}: its manifest.json has no vocab_size / special_tokens (<|im_end|>, "
                       "<|endoftext|>); give a folder written by scripts/demo/build_corpus.py")
    special = manifest["special_tokens"]
    cfg = model_config(manifest["vocab_size"], args.hidden, args.layers, args.heads, args.kv_heads, args.mlp,
                       args.rope_theta, args.seq_len, eos=[special["<|im_end|>"], special["<|endoftext|>"]],
                       bos=special["<|endoftext|>"], head_dim=args.head_dim)
    size = shape_bytes(cfg)
    if args.print_size:
        print(json.dumps(size))
        return 0
    # before any training: what the run reads, and the folder it writes at the end
    if not (data / "tokenizer.json").is_file():
        raise AhnError(f"--data {data} has no tokenizer.json (the checkpoint's copy); give a folder written by "
                       "scripts/demo/build_corpus.py")
    templates = longrange.Templates.from_data(data)
    evals = bool(args.eval_every or args.time_limit)   # an evaluation: every --eval-every, and at a time stop
    if (args.passkey_frac > 0 or evals) and templates.max_distance(args.seq_len) < templates.min_distance():
        need = templates.min_distance() - templates.max_distance(args.seq_len) + args.seq_len
        raise AhnError(f"--seq-len {args.seq_len} is too short for a passkey (it needs {need} tokens or more); give "
                       "a longer --seq-len, or --passkey-frac 0 --eval-every 0")
    check_tokens(longrange.load_tokens(data / "train.bin"), args.seq_len, "train")
    if evals:
        check_tokens(longrange.load_tokens(data / "heldout.bin"), args.seq_len, "heldout")
    from ahn_rt.devices import parse_device
    parse_device(args.device)
    check_out_dir(args.out)
    check_not_corpus(data, ("--out", args.out))
    held = [f for f in OUTPUTS if (Path(args.out) / f).exists()]
    if held and not args.overwrite:   # its log.jsonl was truncated at the first step, the rest replaced at the end
        raise AhnError(f"--out {args.out} already holds a teacher ({', '.join(held)}); pass --overwrite to train "
                       "over it, or choose another folder")

    import torch
    from ahn_rt.config import parse_config
    from ahn_rt.train.loss import lm_loss
    from ahn_rt.train.model import TrainModel
    from ahn_rt.weights import atomic_write_text, write_checkpoint

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    autocast = (args.dtype or ("bf16" if device.type == "cuda" else "float32")) == "bf16"
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = parse_config(cfg, "teacher")
    model = TrainModel(config, init_base(cfg, args.seed), None, train_base=True, with_ahn=False,
                       seed=args.seed).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95),
                            eps=1e-8, **({"fused": True} if device.type == "cuda" else {}))
    train = longrange.load_tokens(data / "train.bin")
    heldout = longrange.load_tokens(data / "heldout.bin")
    sampler = longrange.SequenceSampler(train, args.seq_len, templates, seed=args.seed,
                                        passkey_frac=args.passkey_frac)
    L, B = args.seq_len, args.batch
    micro = args.micro_batch or B
    n_base = sum(p.numel() for p in params)
    print(f"[teacher] {n_base:,} parameters ({size['total_params']:,} with the AHN memory, merged bf16 "
          f"{size['tensor_bytes'] / 2**20:.2f} MiB of tensors); {args.steps} steps x {B} x {L} tokens on "
          f"{device} ({'bf16 autocast' if autocast else 'float32'}); train split {len(train):,} tokens "
          f"= {args.steps * B * L / len(train):.1f} epochs", flush=True)
    log = open(out / "log.jsonl", "w", encoding="utf-8")
    t0 = time.perf_counter()
    tokens_done = 0
    truncated = None
    last = {}
    model.train()
    for step in range(args.steps):
        lr = lr_at(step, args.lr, args.steps, args.warmup, args.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        batch, _ = sampler.batch(B)
        ids_all = torch.from_numpy(batch)
        if device.type == "cuda":
            ids_all = ids_all.pin_memory()
        ids_all = ids_all.to(device, non_blocking=True)
        loss_sum = torch.zeros((), device=device)
        for s in range(0, B, micro):
            ids = ids_all[s:s + micro]
            with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
                h = model.forward_teacher(ids)
                loss = lm_loss(model, h, ids, chunk=args.loss_chunk)
            (loss * (ids.shape[0] / B)).backward()
            loss_sum += loss.detach() * (ids.shape[0] / B)
        gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens_done += B * L
        elapsed = time.perf_counter() - t0
        if (step + 1) % args.log_every == 0 or step == 0 or step + 1 == args.steps:
            rec = {"step": step + 1, "loss": round(float(loss_sum), 5), "lr": lr, "grad_norm": round(float(gn), 4),
                   "tokens": tokens_done, "elapsed_s": round(elapsed, 2),
                   "tokens_per_s": round(tokens_done / max(elapsed, 1e-9))}
            if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
                rec.update(evaluate(model, heldout, L, args.eval_seqs, min(2000, templates.max_distance(L)),
                                    args.eval_seqs, templates, device, autocast))
            last = rec
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print("[teacher] " + " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in rec.items()), flush=True)
        if args.time_limit and elapsed > args.time_limit and step + 1 < args.steps:
            truncated = step + 1
            rec = {"step": step + 1, "truncated_by_time_limit": args.time_limit, "planned_steps": args.steps}
            rec.update(evaluate(model, heldout, L, args.eval_seqs, min(2000, templates.max_distance(L)),
                                args.eval_seqs, templates, device, autocast))
            log.write(json.dumps(rec) + "\n")
            print(f"[teacher] WARNING: stopped by --time-limit {args.time_limit}s after step {step + 1} of "
                  f"{args.steps}", flush=True)
            break
    log.close()
    elapsed = time.perf_counter() - t0

    tensors = {k: v.detach().to("cpu", torch.bfloat16) for k, v in model.base_state_dict().items()}
    write_checkpoint(out / "model.safetensors", tensors, cfg, config_json=True)
    atomic_write_text(out / "generation_config.json", json.dumps(
        {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}, indent=2) + "\n")
    shutil.copyfile(data / "tokenizer.json", out / "tokenizer.json")
    summary = {"steps_done": truncated or args.steps, "steps_planned": args.steps, "seconds": round(elapsed, 1),
               "tokens": tokens_done, "final": last, "seed": args.seed, "params": n_base,
               "corpus_sha256": manifest.get("sha256")}   # (read after the run: a missing record is no error)
    atomic_write_text(out / "train_summary.json", json.dumps(summary, indent=1) + "\n")
    print(f"[teacher] wrote {out} ({(out / 'model.safetensors').stat().st_size:,} bytes) in {elapsed:.0f} s",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
