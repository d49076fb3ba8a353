"""Command line: stream text from an AHN-augmented (or plain) Qwen checkpoint.

    python -m ahn_rt.generate --weights qwen3b.safetensors --prompt "Hello" --max-new-tokens 64

A user's mistake (bad path, bad option, corrupt checkpoint) prints one line and exits 2; no traceback.
"""
from __future__ import annotations

import argparse
import sys

from .errors import AhnError


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m ahn_rt.generate",
                                 description="Generate text with an AHN-augmented Qwen model.")
    m = ap.add_argument_group("model")
    m.add_argument("--weights", required=True, help=".safetensors file or Hugging Face checkpoint folder")
    m.add_argument("--ahn", help="separate AHN-only checkpoint (file or folder)")
    m.add_argument("--tokenizer", help="tokenizer.json (default: the one beside the weights)")
    m.add_argument("--window", type=int, help="sliding window W (default: config, else 32640)")
    m.add_argument("--sinks", type=int, help="attention sinks S (default: config, else 128)")
    m.add_argument("--mode", choices=["ahn", "swa", "full"], help="default: ahn with AHN weights, else full")
    m.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available)")
    m.add_argument("--dtype", help="bf16, fp16 or float32 (default: the checkpoint's)")
    m.add_argument("--chunk-size", type=int, default=2048, help="prefill chunk in tokens (default 2048)")
    p = ap.add_argument_group("prompt")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text (default: read stdin)")
    src.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the Qwen ChatML template")
    p.add_argument("--system", help="system message for --chat")
    s = ap.add_argument_group("sampling")
    s.add_argument("--max-new-tokens", type=int, default=128)
    s.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--min-p", type=float, default=0.0)
    s.add_argument("--repetition-penalty", type=float, default=1.0)
    s.add_argument("--seed", type=int)
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    ap.add_argument("--quiet-stats", action="store_true", help="do not print the final stats line")
    return ap


def _read_prompt(args) -> str:
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                return f.read()
        except FileNotFoundError:
            raise AhnError(f"prompt file not found: {args.prompt_file}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise AhnError(f"cannot read prompt file {args.prompt_file}: {e}") from None
    if sys.stdin is None or sys.stdin.isatty():
        raise AhnError("no prompt: pass --prompt TEXT, --prompt-file PATH or pipe text on stdin")
    return sys.stdin.read()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import ahn_rt

        if args.max_new_tokens < 0:
            raise AhnError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
        prompt = _read_prompt(args)
        model = ahn_rt.load(args.weights, ahn=args.ahn, window=args.window, sinks=args.sinks,
                            dtype=args.dtype, device=args.device, mode=args.mode,
                            chunk_size=args.chunk_size, tokenizer=args.tokenizer)
        model.tokenizer  # fail early, before any compute, when the tokenizer is missing
        for piece in model.generate(prompt, max_new_tokens=args.max_new_tokens,
                                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                    min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                                    seed=args.seed, stop=args.stop, chat=args.chat, system=args.system):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        if not args.quiet_stats:
            print(model.last_stats.line(), file=sys.stderr)
    except AhnError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
