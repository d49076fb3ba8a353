"""Command line: stream text from an AHN-augmented (or plain) Qwen checkpoint.

    python -m ahn_rt.generate                       # the demo model in weights/demo and its demo prompt
    echo "import os" | python -m ahn_rt.generate    # the demo model on your prompt (piped text)
    python -m ahn_rt.generate --weights qwen3b.safetensors --prompt "Hello" --max-new-tokens 64

The prompt is --prompt, else --prompt-file, else stdin when it is not a terminal. An empty stdin (</dev/null,
as in CI) or a closed one is no prompt: the demo model then runs its demo prompt, another model says so.

A user's mistake (bad path, bad option, corrupt checkpoint, text that is not UTF-8, stdout closed) prints one
line and exits 2; a stdout that cannot take the text (a full disk behind a redirection, an encoding such as
PYTHONIOENCODING=ascii that lacks one of its characters), memory that runs
out or a model whose logits turn NaN/inf (weights holding NaN) one line and exit 1;
Ctrl-C at any moment prints one line and exits 130; no traceback.
"""
from __future__ import annotations

import sys

from .cli import (DEMO_DIR, ArgParser, add_model_arguments, exit_on_interrupt, load_model, one_line_warnings,
                  refuse_empty, stderr_or_nowhere, use_demo_weights)

if __name__ == "__main__":
    exit_on_interrupt()   # Ctrl-C during start-up (torch is being imported) or anywhere else

import json  # noqa: E402

from .errors import AhnError, oom_message, out_of_memory  # noqa: E402



def build_parser() -> ArgParser:
    ap = ArgParser(prog="python -m ahn_rt.generate", description="Generate text with an AHN-augmented Qwen model.")
    add_model_arguments(ap, ".safetensors file or Hugging Face checkpoint folder "
                            "(default: the demo model in weights/demo, with its demo prompt)")
    p = ap.add_argument_group("prompt")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text (default: stdin when text is piped; with no --weights and "
                                      "nothing piped, the demo prompt)")
    src.add_argument("--prompt-file", help="read the prompt from this file (- reads stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the Qwen ChatML template")
    p.add_argument("--system", help="system message for --chat")
    s = ap.add_argument_group("sampling")
    s.add_argument("--max-new-tokens", type=int, help="default 128 (the demo prompt: 8, stopping at a newline)")
    s.add_argument("--temperature", type=float, help="0 = greedy, as is anything below 1e-5 (default 0.7; the "
                                                     "demo prompt: 0)")
    s.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (default 0: all)")
    s.add_argument("--top-p", type=float, default=1.0,
                   help="sample from the fewest tokens whose probability reaches p, in (0, 1] (default 1: all)")
    s.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens less likely than min-p x the top token's probability (default 0: none)")
    s.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="> 1 makes the prompt's and the reply's tokens less likely (default 1: off)")
    s.add_argument("--seed", type=int, help="sampling seed: the same seed gives the same text (default: random)")
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    ap.add_argument("--quiet-stats", action="store_true", help="do not print the final stats line")
    return ap


def _read_prompt(args, required: bool = True) -> str | None:
    """The prompt of --prompt, --prompt-file or stdin (when stdin is not a terminal). No prompt (no option,
    stdin a terminal, closed or empty): None when not ``required`` (the demo prompt runs), else AhnError."""
    from .tokenizer import check_text, decode_utf8
    if args.prompt is not None:
        check_text(args.prompt)
        return args.prompt
    if args.prompt_file is not None:
        refuse_empty(args.prompt_file, "--prompt-file", "a UTF-8 text file, or leave --prompt-file out")
        try:
            if args.prompt_file == "-":   # the usual spelling of stdin (a file named "-": ./-)
                data = sys.stdin.buffer.read() if sys.stdin is not None else b""
            else:
                with open(args.prompt_file, "rb") as f:
                    data = f.read()
        except FileNotFoundError:
            raise AhnError(f"prompt file not found: {args.prompt_file}") from None
        except OSError as e:
            raise AhnError(f"cannot read prompt file {args.prompt_file}: {e.strerror or e}") from None
        return decode_utf8(data, f"prompt file {args.prompt_file}")
    data = b""
    if sys.stdin is not None and not sys.stdin.isatty():
        try:
            data = sys.stdin.buffer.read()
        except OSError as e:
            raise AhnError(f"cannot read the prompt from stdin: {e.strerror or e}") from None
    if not data:
        if not required:
            return None
        raise AhnError("no prompt: pass --prompt TEXT, --prompt-file PATH or pipe text on stdin"
                       + (" (stdin is empty)" if sys.stdin is not None and not sys.stdin.isatty() else ""))
    return decode_utf8(data, "the prompt on stdin")


def _check_sampling(args):
    """The sampling options, checked by the rule the API uses (SamplingParams) before the model loads; the
    message names the option (--top-k, not top_k)."""
    from .sampling import SamplingParams
    try:
        SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                       repetition_penalty=args.repetition_penalty, seed=args.seed)
    except AhnError as e:
        name, _, rest = str(e).partition(" ")
        raise AhnError(f"--{name.replace('_', '-')} {rest}") from None


def _demo_prompt() -> tuple[str, dict]:
    """The demo prompt and what it tests (weights/demo/demo.json: the answer and its distance)."""
    try:
        info = json.loads((DEMO_DIR / "demo.json").read_text(encoding="utf-8"))
        return (DEMO_DIR / info["prompt_file"]).read_text(encoding="utf-8"), info
    except (OSError, ValueError, KeyError):
        raise AhnError(f"the demo prompt in {DEMO_DIR} is missing or damaged; pass --prompt TEXT") from None


def _demo_banner(model, prompt: str, info: dict) -> str:
    """What the demo prompt tests under this model's sinks + window. The passkey's digits are located in the
    tokenized prompt: a query at position t sees the sinks {0..S-1} and the window {t-W+1..t}, and each answer
    digit's query lies as far after its source digit as the first one does (the prompt's length minus the
    passkey's start), so the window sees the whole passkey or none of it."""
    c = model.config
    ids = model.tokenizer.encode(prompt)
    digits = [model.tokenizer.token_id(d) for d in info["answer"]]
    start = next((i for i in range(len(ids) - len(digits) + 1) if ids[i:i + len(digits)] == digits), None)
    head = (f"[demo] {DEMO_DIR / info['prompt_file']}: Python source with a passkey stated {info['distance']} "
            f"tokens before the question; expected answer {info['answer']}. ")
    if start is None:   # (a demo prompt whose digits are not single tokens: say nothing about visibility)
        return head + f"Mode {c.mode}."
    in_window, in_sinks = start >= len(ids) - c.window, start + len(digits) <= c.sinks
    need = f"the demo shows the memory at a window below {len(ids) - start} and at most {start} sinks"
    if in_window or in_sinks:
        where = f"window ({c.window} tokens)" if in_window else f"sinks ({c.sinks} tokens)"
        return head + f"It lies inside the {where}, so every mode sees it; {need}."
    if start < c.sinks:
        return (head + f"{c.sinks - start} of its {len(digits)} digits lie inside the sinks ({c.sinks} tokens), "
                f"the rest beyond the window ({c.window} tokens); {need}.")
    return (head + f"It lies beyond the sinks + window ({c.sinks} + {c.window} tokens). Mode {c.mode}: "
            + {"full": "full attention sees the passkey.", "swa": "the window alone cannot see it.",
               "ahn": "only the memory can carry it."}[c.mode])


class _OutputFailed(Exception):
    """Writing the text to stdout failed (not a closed pipe: the reader is gone, which ends quietly)."""


def _write(text: str):
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as e:   # a full disk (or a file system error) behind a redirection of stdout
        raise _OutputFailed(e.strerror or str(e)) from None
    except UnicodeEncodeError as e:   # PYTHONIOENCODING=ascii, a latin-1 locale: it was a traceback
        char = e.object[e.start]
        raise _OutputFailed(f"its encoding ({e.encoding}) has no U+{ord(char):04X} ({char!r:.12}); set "
                            "PYTHONIOENCODING=utf-8 or use a UTF-8 locale") from None


def main(argv=None) -> int:
    stderr_or_nowhere()
    args = build_parser().parse_args(argv)
    one_line_warnings()
    loading = False   # which advice an out-of-memory error gets: the weights' or the prompt's
    try:
        demo = use_demo_weights(args)
        if not demo and args.weights:   # a missing model before "no prompt": both are needed, this one first
            from pathlib import Path
            from .weights import check_weights_exist
            check_weights_exist(Path(args.weights).expanduser())
        prompt = _read_prompt(args, required=not demo)   # before the defaults: piped text is no demo prompt
        demo_prompt = prompt is None
        if args.max_new_tokens is None:
            args.max_new_tokens = 8 if demo_prompt else 128
        if args.temperature is None:
            args.temperature = 0.0 if demo_prompt else 0.7
        if args.max_new_tokens < 0:
            raise AhnError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
        if any(s == "" for s in args.stop):
            raise AhnError("--stop needs a non-empty string")
        from .tokenizer import check_text
        for s in args.stop:            # a byte that is not UTF-8 never matches: the stop string was ignored
            check_text(s, f"--stop {s!r}")
        if args.system is not None:    # was reported as "the prompt" it is templated into
            check_text(args.system, "--system")
        if args.system is not None and not args.chat:
            raise AhnError("--system is the system message of --chat's template: add --chat, or drop --system")
        if demo_prompt and args.chat:   # the template around it: no passkey answer, under a banner promising one
            raise AhnError("--chat wraps your own prompt in the chat template, and the demo prompt is plain text "
                           "(the demo model never saw a chat): give --prompt, or drop --chat")
        _check_sampling(args)
        if demo_prompt:
            prompt, info = _demo_prompt()
            args.stop = args.stop or ["\n"]
        if sys.stdout is None:   # started with stdout closed (>&-): the text would go nowhere
            raise AhnError("stdout is closed, so the text has nowhere to go; redirect it to a file or a pipe")
        loading = True
        model = load_model(args)
        loading = False
        if demo_prompt:
            print(_demo_banner(model, prompt, info), file=sys.stderr)
        gen = model.generate(prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                             repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop,
                             chat=args.chat, system=args.system)
        for piece in gen:
            _write(piece)
        _write("\n")
        if not args.quiet_stats:
            print(gen.stats.line(), file=sys.stderr)
    except AhnError as e:
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)   # 2: a user's mistake; 1: a runtime failure (NonFiniteLogits)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except _OutputFailed as e:
        print(f"error: cannot write the text to stdout: {e}", file=sys.stderr)
        return 1
    except (RuntimeError, MemoryError) as e:   # torch.OutOfMemoryError; the CPU allocator's is a plain RuntimeError
        if not out_of_memory(e):
            raise
        fix = ("the weights do not fit: use --dtype bf16 (or fp16), a smaller model or another --device" if loading else
               "use a smaller --chunk-size, a shorter prompt, --mode ahn or swa (a fixed-size state) or --dtype bf16")
        print(f"error: {oom_message(e, fix)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
