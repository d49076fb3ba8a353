"""``python -m ahn_rt.serve [--weights PATH]``: the OpenAI-compatible server (needs FastAPI and uvicorn: the
``serve`` extra, ``pip install --no-build-isolation -e ".[serve]"`` in a checkout). Without --weights it serves
the demo model in weights/demo, as ``python -m ahn_rt.generate`` runs it.

A user's mistake (bad path or option, missing extra, port in use) prints one line and exits 2. SIGTERM
or Ctrl-C drains: the server stops accepting connections, every in-flight request (streams included)
completes, conversations are written to --state-dir, and the process exits 0 (130 after Ctrl-C).
"""
from __future__ import annotations

import logging
import math
import os
import signal
import socket
import sys

from ..cli import (ArgParser, add_model_arguments, exit_on_interrupt, load_model, one_line_warnings, refuse_empty,
                   stderr_or_nowhere, use_demo_weights)
from ..errors import AhnError
from ..tokenizer import check_text

if __name__ == "__main__":
    # Ctrl-C during start-up: one line, exit 130. Without it a Ctrl-C while torch imports NumPy was swallowed
    # (the server then started anyway) or ended in an ImportError traceback. uvicorn takes SIGINT over while it
    # serves (to drain) and hands it back to this handler afterwards.
    exit_on_interrupt()

SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 1000 ** 2,
              "mib": 1 << 20, "g": 1 << 30, "gb": 1000 ** 3, "gib": 1 << 30, "t": 1 << 40, "tb": 1000 ** 4, "tib": 1 << 40}


def parse_size(text: str, what: str) -> int:
    """'8GiB', '512M', '1000000' -> bytes (AhnError naming the option otherwise)."""
    t = text.strip().lower().replace(" ", "")
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):]
    try:
        value = float(num)
        ok = unit in SIZE_UNITS and math.isfinite(value) and value >= 0   # 'inf' and '1e400' are not sizes
    except ValueError:
        ok = False
    if not ok:
        try:   # a number with a unit that is not one: name the unit as given
            float(num)
            given = text.strip().replace(" ", "")[len(num):]
            known = "" if unit in SIZE_UNITS else (
                f" (unknown unit {given!r}: use B, K/KiB, KB, M/MiB, MB, G/GiB, GB, T/TiB or TB)")
        except ValueError:
            known = ""
        raise AhnError(f"{what} must be a finite size >= 0 such as 4GiB, 512MiB or a number of bytes, "
                       f"got {text!r}{known}")
    return int(value * SIZE_UNITS[unit])


def build_parser() -> ArgParser:
    ap = ArgParser(prog="python -m ahn_rt.serve",
                   description="OpenAI-compatible HTTP server for an AHN-augmented Qwen model.")
    m = add_model_arguments(ap, ".safetensors file or Hugging Face checkpoint folder (default: the demo model "
                               "in weights/demo)")
    m.add_argument("--model-name", help="the id clients pass as 'model' (default: the weights' name)")
    n = ap.add_argument_group("network")
    n.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    n.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    n.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every request")
    n.add_argument("--access-log", action="store_true", help="log every request (uvicorn's access log)")
    a = ap.add_argument_group("capacity")
    a.add_argument("--max-sessions", type=int, default=16,
                   help="generations that hold a session at once (default 16; also bounded by --memory-budget)")
    a.add_argument("--memory-budget", help="bytes for the sessions of running generations (e.g. 40GiB; default: "
                                           "80%% of the free GPU memory (CPU: available RAM) less the two caches)")
    a.add_argument("--max-queue", type=int, default=64,
                   help="requests that wait for a session (default 64); beyond that: 503 with Retry-After")
    a.add_argument("--prefix-cache", help="bytes for the prefix cache (default: 8 full states, at most 15%% of "
                                          "free memory; 0 turns it off)")
    a.add_argument("--session-cache", help="bytes for conversations (session_id) kept in memory (default: 8 states, "
                                           "at most 10%% of free memory)")
    a.add_argument("--state-dir", help="write conversations here and restore them after a restart")
    a.add_argument("--max-prompt-tokens", type=int, default=131072, help="prompt tokens a request may add (for a continued conversation, its new turn; "
                        "default 131072)")
    a.add_argument("--max-tokens", type=int, default=4096,
                   help="cap on max_tokens, and the default for chat (default 4096)")
    return ap


def _free_bytes(model) -> int:
    """Free memory where the states live: the GPU's, or the machine's available RAM (4 GiB where unknown)."""
    from ..devices import free_bytes
    free = free_bytes(model.device)
    return 4 << 30 if free is None else free


def _default_name(weights: str) -> str:
    """'ckpt/qwen-ahn/model.safetensors' -> 'qwen-ahn'; 'x/tiny.safetensors' -> 'tiny'; a folder: its name."""
    p = os.path.normpath(os.path.abspath(os.path.expanduser(weights)))   # as ahn_rt.load reads it
    base = os.path.basename(p)
    if os.path.isfile(p):
        stem = base.rsplit(".", 1)[0]
        return os.path.basename(os.path.dirname(p)) if stem == "model" else stem
    return base


def _bind(host: str, port: int) -> socket.socket:
    if host.startswith("[") and host.endswith("]"):   # [::1], as URLs (and the "listening on" line) write it
        host = host[1:-1]
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(2048)
    except (OSError, socket.gaierror) as e:
        raise AhnError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    except UnicodeError:   # the IDNA codec refuses the name ("bad..host", a label over 63 characters): a traceback
        raise AhnError(f"cannot listen on {host}:{port}: {host!r} is not a valid host name; give an address "
                       "such as 127.0.0.1 or 0.0.0.0, or a host name") from None
    sock.setblocking(False)
    return sock


def main(argv=None) -> int:
    stderr_or_nowhere()
    args = build_parser().parse_args(argv)
    one_line_warnings()
    try:
        try:
            import fastapi  # noqa: F401
            import uvicorn
        except ImportError as e:
            raise AhnError(f"the server needs FastAPI and uvicorn ({e.name} is missing): "
                           "pip install fastapi uvicorn (the 'serve' extra)") from None
        for name in ("max_sessions", "max_prompt_tokens", "max_tokens"):
            if getattr(args, name) < 1:
                raise AhnError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        if args.max_queue < 0:
            raise AhnError(f"--max-queue must be >= 0, got {args.max_queue}")
        if not 0 <= args.port < 65536:
            raise AhnError(f"--port must be in 0..65535, got {args.port}")
        # A byte of the command line that is not UTF-8 arrives as a surrogate escape: the key could not be
        # compared with a header (a traceback at start), nor the name sent in a JSON body (every answer failed).
        for flag, value in (("--api-key", args.api_key), ("--model-name", args.model_name)):
            if value is not None:
                check_text(value, flag)
        if args.api_key is not None and not args.api_key:
            raise AhnError("--api-key needs a non-empty key")
        if args.api_key is not None and args.api_key != args.api_key.strip():   # the bearer token is stripped
            raise AhnError("--api-key begins or ends with white space, which no 'Authorization: Bearer' header "
                           "can carry (every request would get 401); give the key without it")
        if args.model_name is not None and not args.model_name.strip():      # was the weights' name, silently
            raise AhnError("--model-name is empty; give the id clients pass as 'model', or leave --model-name out "
                           "(default: the weights' name)")
        if args.model_name is not None and args.model_name != args.model_name.strip():   # clients send the id exactly
            raise AhnError(f"--model-name {args.model_name!r} begins or ends with white space, which clients would "
                           f"have to send too ('model': {args.model_name.strip()!r} would get 404); give the id "
                           "without it")
        refuse_empty(args.state_dir, "--state-dir", "a folder, or leave --state-dir out")   # else: keeps nothing
        refuse_empty(args.host, "--host", "an address such as 127.0.0.1 (this machine) or 0.0.0.0 (every interface)")
        demo = use_demo_weights(args)   # (said with the start-up line: an error before it comes alone)
        for k in ("memory_budget", "prefix_cache", "session_cache"):   # '' (an unset variable) meant the default
            flag = "--" + k.replace("_", "-")
            refuse_empty(getattr(args, k), flag, f"a size such as 8GiB or 512MiB, or leave {flag} out for the default")
        sizes = {k: parse_size(getattr(args, k), "--" + k.replace("_", "-")) if getattr(args, k) is not None else None
                 for k in ("memory_budget", "prefix_cache", "session_cache")}
        name = args.model_name or _default_name(args.weights)
        if args.model_name is None and os.path.exists(os.path.expanduser(args.weights)):   # else: "not found"
            # a folder name with a byte that is not UTF-8 would put a surrogate into every answer naming the model
            check_text(name, f"the served id {name!r} (from the weights' path)", "give the id with --model-name")
        sock = _bind(args.host, args.port)

        from .metrics import Metrics
        from .server import Options, create_app
        from .sessions import SessionStore
        from ..runtime import human_bytes

        model = load_model(args)   # the tokenizer too: fail now, not on the first request
        state = model.new_session().state_nbytes
        free = _free_bytes(model)
        pick = (lambda given, default: given if given is not None else default)
        prefix = pick(sizes["prefix_cache"], min(8 * (state + model.config.vocab_size * 4), int(0.15 * free)))
        convs = pick(sizes["session_cache"], min(8 * state, int(0.10 * free)))
        budget = pick(sizes["memory_budget"], max(0, int(0.8 * free) - prefix - convs))
        fit = budget // state
        if fit < 1 and sizes["memory_budget"] is None:   # the default budget: what the two caches leave
            raise AhnError(f"80% of the free memory ({human_bytes(0.8 * free)}) less the prefix cache "
                           f"({human_bytes(prefix)}) and the conversations ({human_bytes(convs)}) holds no session "
                           f"of {human_bytes(state)}; lower --prefix-cache / --session-cache, or give --memory-budget")
        if fit < 1:
            raise AhnError(f"--memory-budget {human_bytes(budget)} holds no session of {human_bytes(state)}")
        max_active = min(args.max_sessions, fit)
        model.enable_prefix_cache(prefix)
        metrics = Metrics()
        scheduler = model.start_scheduler(max_active=max_active, max_queue=args.max_queue, metrics=metrics)
        sessions = SessionStore(model, convs, args.state_dir)
        opts = Options(model_name=name, api_key=args.api_key, max_prompt_tokens=args.max_prompt_tokens,
                       max_tokens=args.max_tokens)
        app = create_app(model, opts, scheduler, sessions, metrics)
        host, port = sock.getsockname()[:2]
        c = model.config
        if demo:
            print(f"[ahn_rt.serve] no --weights: serving the demo model in {args.weights}", file=sys.stderr)
        rule = "full attention" if c.mode == "full" else f"window {c.window}, sinks {c.sinks}"
        # under one state and with no folder a conversation is dropped as soon as it is kept (404 next turn)
        none_kept = (" (holds none: session_id turns are not kept; give --state-dir or more --session-cache)"
                     if convs < state else "")
        print(f"[ahn_rt.serve] {name}: {c.mode} mode, {rule}, {c.dtype}, "
              f"{model.device}; state {human_bytes(state)} per session; "
              f"{max_active} session{'' if max_active == 1 else 's'} at once "
              f"(--max-sessions {args.max_sessions}, budget {human_bytes(budget)}), queue {args.max_queue}; "
              f"prefix cache {human_bytes(prefix)}; conversations {human_bytes(convs)}"
              f"{', saved in ' + args.state_dir if args.state_dir else none_kept}"
              f"{'; API key required' if args.api_key else ''}", file=sys.stderr)
        config = uvicorn.Config(app, log_level="warning", access_log=args.access_log, lifespan="on",
                                timeout_graceful_shutdown=None)
        if args.access_log:   # uvicorn writes a request's line at INFO, below the "warning" level set above
            logging.getLogger("uvicorn.access").setLevel(logging.INFO)
        server = uvicorn.Server(config)
        # uvicorn drains on SIGTERM and then re-raises the signal under the handler it found. That handler asks
        # the server to stop (uvicorn's own does the same), so a drained server exits 0 (Ctrl-C keeps Python's:
        # exit 130 after the drain), and it is in place before the "listening on" line: a SIGTERM sent on that
        # line, before uvicorn took the signal over, killed the process (-15) or, under a no-op, was lost (the
        # server never stopped).
        signal.signal(signal.SIGTERM, lambda signum, frame: setattr(server, "should_exit", True))
        shown = f"[{host}]" if ":" in host else host
        print(f"[ahn_rt.serve] listening on http://{shown}:{port}", file=sys.stderr, flush=True)
        server.run(sockets=[sock])
        print("[ahn_rt.serve] stopped", file=sys.stderr, flush=True)
    except AhnError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
