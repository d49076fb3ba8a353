"""The OpenAI-compatible HTTP server (FastAPI): ``/v1/completions``, ``/v1/chat/completions`` (streaming
SSE and not), ``/v1/models``, ``/health``, ``/metrics``, and ``DELETE /v1/sessions/{id}``.

Every generation runs on the model's scheduler (``ahn_rt.serve.scheduler``); the event loop only
parses, tokenizes (in a thread) and streams. Errors use OpenAI's shape, ``{"error": {"message", "type",
"param", "code"}}``, and name the offending field. ``python -m ahn_rt.serve`` builds and runs this app;
docs/serving.md describes the API.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..errors import AhnError
from ..sampling import MAX_LOGPROBS, SEED_MAX, SEED_MIN, TokenLogprob
from ..tokenizer import check_text, text_offsets
from .metrics import Metrics
from .prompt import Prompt, chat_prompt, normalize_messages
from .scheduler import AsyncGeneration, QueueFull
from .sessions import Conversation, SessionBusy, SessionLost, SessionStore, check_session_id

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


@dataclasses.dataclass
class Options:
    model_name: str
    api_key: str | None = None
    max_prompt_tokens: int = 131072    # new tokens of one request
    max_tokens: int = 4096             # cap on max_tokens, and the chat default
    retry_after: int = 1               # seconds, with a 503

    @property
    def max_body_bytes(self) -> int:
        """Request bodies above this are refused (413) before they are read to the end."""
        return self.max_prompt_tokens * 64 + (1 << 20)


class ApiError(Exception):
    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             405: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
             415: "invalid_request_error",
             500: "server_error",
             503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        # A message may quote the request (a lone surrogate such as "\ud800" is valid JSON): escaped as JSON
        # writes it, since the UTF-8 body cannot carry it (the 400 became a 500 "UnicodeEncodeError").
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# ---- request fields ------------------------------------------------------------------------------
def _shown(v, limit: int = 40) -> str:
    """A request's value as an error message quotes it: JSON, cut to about ``limit`` characters (a field
    may hold megabytes, or arrays nested hundreds deep: the message stays one short line)."""
    if isinstance(v, (list, dict)) and any(isinstance(x, (list, dict)) for x in (v.values() if isinstance(v, dict) else v)):
        return "a nested array" if isinstance(v, list) else "a nested object"
    cut = isinstance(v, str) and len(v) > limit
    text = json.dumps(v[:limit] if cut else v, ensure_ascii=False)
    return text[:limit + 2] + "..." if cut or len(text) > limit + 2 else text


def _number(body, name, default, lo=None, hi=None, lo_open=False):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
        raise ApiError(400, f"{name} must be a number, got {_shown(v)}", name)
    # json.loads reads 1e400 (a JSON number) and Infinity as inf: a field without an upper bound
    # (repetition_penalty) let it through to the sampler, whose refusal named no field
    if isinstance(v, float) and v in (float("inf"), float("-inf")):
        raise ApiError(400, f"{name} must be a finite number, got {_shown(v)}", name)
    if (lo is not None and (v < lo or (lo_open and v == lo))) or (hi is not None and v > hi):
        rng = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}{']' if hi is not None else ')'}"
        raise ApiError(400, f"{name} must be in {rng}, got {_shown(v)}", name)
    return float(v)


def _integer(body, name, default, lo=None, hi=None):
    v = given = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise ApiError(400, f"{name} must be an integer, got {_shown(v)}", name)
    if lo is not None and v < lo:
        raise ApiError(400, f"{name} must be >= {lo}, got {_shown(given)}", name)
    if hi is not None and v > hi:
        raise ApiError(400, f"{name} must be <= {hi}, got {_shown(given)}", name)
    return v


def _typed(body, name, kind):
    """The field, None or of ``kind`` (bool, list or dict): else ApiError 400 naming it (a false-looking value
    of another type, such as "logprobs": 0 or "tools": "", is a mistake, not "off")."""
    v = body.get(name)
    if v is not None and (type(v) is not kind):
        what = {bool: "true or false", list: "an array", dict: "an object"}[kind]
        raise ApiError(400, f"{name} must be {what}, got {_shown(v)}", name)
    return v


def _unsupported(name: str, why: str = "") -> ApiError:
    return ApiError(400, f"{name} is not supported by this server{': ' + why if why else ''}", name,
                    "unsupported_parameter")


def sampling_args(body: dict, chat: bool, opts: Options) -> dict:
    """OpenAI sampling fields -> ``Model.generate`` arguments (ApiError 400 naming the field)."""
    n = _integer(body, "n", 1, lo=1)
    if n != 1:
        raise _unsupported("n", "n > 1; send one request per choice")
    if _typed(body, "logit_bias", dict):
        raise _unsupported("logit_bias")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, 0.0, -2, 2) != 0:
            raise _unsupported(name, "use repetition_penalty")
    # JSON mode on either endpoint (vLLM takes it on /v1/completions too), and vLLM's fields for constrained
    # output: completions ignored the first and both endpoints the others, answering free text to a client that
    # asked for JSON (or a regex, a choice, a grammar)
    rf = body.get("response_format")
    if rf is not None and (not isinstance(rf, dict) or rf.get("type") != "text"):
        raise _unsupported("response_format", "only {\"type\": \"text\"}")
    for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs"):
        if body.get(name) is not None:
            raise _unsupported(name, "no constrained (structured) output")
    echo = False
    if chat:
        want = _typed(body, "logprobs", bool)
        top = _integer(body, "top_logprobs", None, lo=0, hi=MAX_LOGPROBS)
        if top is not None and not want:   # as OpenAI and vLLM
            raise ApiError(400, "top_logprobs is only allowed with \"logprobs\": true", "top_logprobs")
        logprobs = (top or 0) if want else None
        no_calls = "none" in (body.get("tool_choice"), body.get("function_call"))
        for name in ("tools", "functions"):   # with a choice of "none", served without their definitions
            if _typed(body, name, list) and not no_calls:
                raise _unsupported(name, "no tool or function calling")
        for name in ("tool_choice", "function_call"):   # function_call: the older name of tool_choice
            if body.get(name) not in (None, "none"):
                raise _unsupported(name, "no tool or function calling")
        mt_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        _integer(body, "max_tokens", None, lo=1)   # checked even when max_completion_tokens wins
        default_max = opts.max_tokens
    else:
        logprobs = _integer(body, "logprobs", None, lo=0, hi=MAX_LOGPROBS)   # OpenAI's legacy API: at most 5
        echo = bool(_typed(body, "echo", bool))
        if echo and body.get("session_id") is not None:
            raise _unsupported("echo", "not with session_id (the prompt continues a conversation)")
        if body.get("suffix") is not None:
            raise _unsupported("suffix")
        if _integer(body, "best_of", 1, lo=1) != 1:
            raise _unsupported("best_of", "best_of > 1")
        mt_name, default_max = "max_tokens", min(16, opts.max_tokens)   # OpenAI's default, within --max-tokens
    max_tokens = _integer(body, mt_name, default_max, lo=0)
    if max_tokens == 0 and not echo:   # as OpenAI and vLLM: 0 (nothing generated) only scores an echoed prompt
        raise ApiError(400, f"{mt_name} must be >= 1, got 0 (0 only with \"echo\": true, to score the prompt)"
                       if not chat else f"{mt_name} must be >= 1, got 0", mt_name)
    if max_tokens > opts.max_tokens:
        raise ApiError(400, f"{mt_name} must be at most {opts.max_tokens} on this server, got {_shown(body.get(mt_name))}",
                       mt_name)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 16 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "stop must be a non-empty string or a list of at most 16 non-empty strings", "stop")
    for s in stop:
        try:
            check_text(s, "stop")        # a lone surrogate (U+D800) can never match: it was ignored
        except AhnError as e:
            raise ApiError(400, str(e), "stop") from None
    top_k = _integer(body, "top_k", 0, lo=-1)
    return dict(max_new_tokens=max_tokens,
                temperature=_number(body, "temperature", 1.0, 0, 2),
                top_p=_number(body, "top_p", 1.0, 0, 1, lo_open=True),
                top_k=max(top_k, 0),                                   # -1 (vLLM's "off") is 0 here
                min_p=_number(body, "min_p", 0.0, 0, 1),
                repetition_penalty=_number(body, "repetition_penalty", 1.0, 0, None, lo_open=True),
                seed=_integer(body, "seed", None, lo=SEED_MIN, hi=SEED_MAX),
                stop=stop, logprobs=logprobs,
                # as vLLM: special tokens the model samples (<|im_start|>) are left out of the text by default
                skip_special_tokens=_typed(body, "skip_special_tokens", bool) is not False,
                # echo with logprobs: the prompt's own entries, from its prefill (server's "echo" below)
                prompt_logprobs=logprobs if echo else None, echo=echo)


# ---- logprobs -----------------------------------------------------------------------------------
def _token(tok, tid: int) -> tuple[str, bytes]:
    """A token as logprobs show it: its text (U+FFFD for part of a UTF-8 character) and its raw bytes."""
    raw = tok.token_bytes(tid)
    return raw.decode("utf-8", "replace"), raw


def _lp(value: float) -> float:
    return max(value, -9999.0)   # as vLLM: -inf is no JSON number


def chat_logprobs(tok, entries) -> dict:
    """A chat choice's ``logprobs``: {"content": [{token, logprob, bytes, top_logprobs}], "refusal": null}."""
    def one(tid, value):
        text, raw = _token(tok, tid)
        return {"token": text, "logprob": _lp(value), "bytes": list(raw)}
    return {"content": [{**one(e.token_id, e.logprob), "top_logprobs": [one(i, v) for i, v in e.top]}
                        for e in entries], "refusal": None}


def completion_logprobs(tok, entries, k: int) -> dict:
    """A completion choice's ``logprobs`` (OpenAI's legacy shape): tokens, token_logprobs, top_logprobs (per
    token a {token: logprob} object of the chosen token and the k likeliest, so up to k + 1 of them, as OpenAI
    and vLLM; with k 0 the chosen token alone; two ids with the same text keep the likelier) and text_offset
    (where each token's text starts in the generated text). An entry whose ``logprob`` is None (an echoed
    prompt's first token) has null for both."""
    tops = []
    for e in entries:
        if e.logprob is None:
            tops.append(None)
            continue
        top: dict = {}
        for i, v in sorted([*e.top[:k], (e.token_id, e.logprob)], key=lambda iv: -iv[1]):   # stable: ties keep
            top.setdefault(_token(tok, i)[0], _lp(v))                                        # the top's order
        tops.append(top)
    return {"tokens": [_token(tok, e.token_id)[0] for e in entries],
            "token_logprobs": [None if e.logprob is None else _lp(e.logprob) for e in entries],
            "top_logprobs": tops, "text_offset": [e.offset for e in entries]}


def echo_entries(gen, entries, with_prompt: bool) -> list:
    """Generated ``entries`` of an echoed completion (``gen`` scored its prompt): their offsets moved past the
    prompt's text, and with ``with_prompt`` the prompt's entries first (its first token's value null, as
    OpenAI and vLLM)."""
    shift = len(gen.prompt_text)
    moved = [dataclasses.replace(e, offset=e.offset + shift) for e in entries]
    if not with_prompt:
        return moved
    first = TokenLogprob(gen.run.prompt.ids[0], None, None, 0)
    return [first, *gen.prompt_logprobs[1:], *moved]


def _stream_args(body: dict) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false", "stream")
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise ApiError(400, "stream_options must be an object", "stream_options")
    if so and not stream:   # as OpenAI and vLLM: a 400, not options silently dropped
        raise ApiError(400, "stream_options is only allowed with \"stream\": true", "stream_options")
    include_usage = (so or {}).get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):   # "false" is not false
        raise ApiError(400, f"stream_options.include_usage must be true or false, got {_shown(include_usage)}",
                       "stream_options")
    return stream, bool(include_usage)


# ---- prompts -------------------------------------------------------------------------------------
def _completion_ids(tok, prompt) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise ApiError(400, "prompt is empty", "prompt")
        try:
            return tok.encode(prompt)
        except AhnError as e:
            raise ApiError(400, str(e), "prompt") from None
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return list(prompt)
    if isinstance(prompt, list) and not prompt:
        raise ApiError(400, "prompt is empty", "prompt")
    raise ApiError(400, "prompt must be a string or a list of token ids (one prompt per request)", "prompt")


def _continuation_head(model, tok, conv: Conversation, chat: bool) -> list[int]:
    """What a conversation's next request feeds first: its last sampled token (unless it ended the
    sequence) and, for a chat turn after a chat reply, the end of that reply's assistant turn."""
    last, eos = conv.last_token, model.eos_ids()
    head = [last] if last is not None and last not in eos else []
    if chat and conv.chat_open:
        head += tok.encode("<|im_end|>\n")
    return head


def build_prompt(model, body: dict, chat: bool, conv: Conversation | None) -> Prompt:
    tok = model.tokenizer
    if chat:
        if "messages" not in body and "prompt" in body:   # as a chat body sent to /v1/completions is pointed to chat
            raise ApiError(400, "messages is required: a prompt (text or token ids) goes to POST /v1/completions",
                           "messages")
        try:
            msgs = normalize_messages(body.get("messages"))
        except AhnError as e:
            raise ApiError(400, str(e), "messages") from None
        for i, (_, content) in enumerate(msgs):
            try:
                check_text(content, f"messages[{i}].content")
            except AhnError as e:
                raise ApiError(400, str(e), "messages") from None
        if conv is None:
            return chat_prompt(tok, msgs)
        return chat_prompt(tok, msgs, add_system=False, head=_continuation_head(model, tok, conv, True))
    if "prompt" not in body:
        hint = ": chat messages go to POST /v1/chat/completions" if "messages" in body else ""
        raise ApiError(400, f"prompt is required{hint}", "prompt")
    ids = _completion_ids(tok, body["prompt"])
    if conv is None:
        return Prompt(tuple(ids))
    return Prompt(tuple(_continuation_head(model, tok, conv, False) + ids))


# ---- the app -------------------------------------------------------------------------------------
# Line breaks that JSON leaves raw with ensure_ascii=False but that str.splitlines() splits on: SSE readers
# built on it (httpx's iter_lines, requests' iter_lines(decode_unicode=True)) would cut a data line there.
_SSE_ESCAPES = str.maketrans({"\u0085": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False).translate(_SSE_ESCAPES)}\n\n"


class _Guard:
    """Pure ASGI middleware: the bearer token (constant-time compare) and request counting."""

    def __init__(self, app, api_key: str | None, metrics: Metrics):
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "/v1/sessions" if path.startswith("/v1/sessions/") else \
            "/v1/models" if path.startswith("/v1/models/") else "other"
        if self.key is not None:
            auth = dict(scope.get("headers") or []).get(b"authorization", b"")
            token = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(token, self.key):
                err = ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'", None,
                               "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                self.metrics.request(endpoint, 401)
                return await err.response()(scope, receive, send)
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.request(endpoint, status[0])


def create_app(model, opts: Options, scheduler, sessions: SessionStore, metrics: Metrics) -> FastAPI:
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        # uvicorn has drained every in-flight request by now (SIGTERM / Ctrl-C): stop the worker
        await asyncio.to_thread(scheduler.shutdown, True)
        await asyncio.to_thread(sessions.flush)

    # redirect_slashes off: "/v1/chat/completions/" gets the OpenAI-shaped 404 naming the path, not a bare 307
    # (which a client follows by sending its body again, and which names plain http:// behind a TLS proxy)
    app = FastAPI(title="ahn_rt", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  redirect_slashes=False)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        # The message names the request (one line: the decoded path may hold anything, %0A included) and what to
        # send instead; Starlette's own ("Not Found", "Method Not Allowed") said neither.
        path = request.url.path
        shown = json.dumps(path[:80], ensure_ascii=False)[1:-1] + ("..." if len(path) > 80 else "")
        asked = f"{request.method} {shown}"
        if e.status_code == 405:
            allow = (e.headers or {}).get("Allow", "")
            msg = f"{asked} is not allowed: use {allow}" if allow else f"{asked} is not allowed"
        elif e.status_code == 404 and ("/v1" + path in ENDPOINTS or path.startswith("/models/")):
            # the openai client given base_url="http://host:port", without /v1: the most common wrong URL
            msg = (f"{asked} is not an endpoint of this server: the API is under /v1 ({request.method} /v1{shown}); "
                   "give the client a base_url that ends in /v1, such as http://host:port/v1")
        elif e.status_code == 404:
            msg = (f"{asked} is not an endpoint of this server: see GET /v1/models, POST /v1/completions, "
                   "POST /v1/chat/completions")
        else:
            msg = str(e.detail)
        return ApiError(e.status_code, msg, headers=e.headers).response()   # a 405 keeps its Allow header

    @app.exception_handler(Exception)
    async def _bug(request, e):
        return ApiError(500, f"internal error: {type(e).__name__}: {e}").response()

    def model_card():
        return {"id": opts.model_name, "object": "model", "created": created, "owned_by": "ahn_rt"}

    @app.api_route("/health", methods=["GET", "HEAD"])   # HEAD: load balancers' probes
    async def health():
        return {"status": "ok", "active_sessions": scheduler.active, "queue_depth": scheduler.queued}

    @app.get("/metrics")
    async def prom():
        text = metrics.render(scheduler, model.prefix_cache, sessions)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def one_model(model_id: str):
        if model_id != opts.model_name:
            raise ApiError(404, f"model {_shown(model_id)} is not served here; this server serves "
                           f"{json.dumps(opts.model_name, ensure_ascii=False)}", "model", "model_not_found")
        return model_card()

    @app.delete("/v1/sessions/{sid}")
    async def delete_session(sid: str):
        try:
            check_session_id(sid)
            found = await asyncio.to_thread(sessions.delete, sid)
        except SessionBusy as e:
            raise ApiError(409, str(e), "session_id", "session_busy") from None
        except AhnError as e:
            raise ApiError(400, str(e), "session_id") from None
        if not found:
            raise ApiError(404, f"session_id {sid!r} not found", "session_id", "session_not_found")
        return {"id": sid, "object": "session", "deleted": True}

    async def parse(request: Request) -> dict:
        # The body is JSON: another declared type is a 415, as vLLM (FastAPI) refuses it. Such a body was read
        # as JSON anyway, so a web page could make a browser POST here without a CORS preflight (text/plain
        # and form types are "simple" requests): run generations, add turns to a session_id's conversation.
        ctype = request.headers.get("content-type", "")
        media = ctype.split(";", 1)[0].strip().lower()
        if media and media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
            raise ApiError(415, f"Content-Type {_shown(ctype)} is not supported: send the JSON body with "
                           "'Content-Type: application/json' (curl: -H 'Content-Type: application/json')", None,
                           "unsupported_media_type")
        limit = opts.max_body_bytes
        length = request.headers.get("content-length", "")
        too_big = ApiError(413, f"the request body is larger than this server's limit of {limit} bytes (it takes at most "
                           f"{opts.max_prompt_tokens} prompt tokens per request): send a shorter prompt", None,
                           "request_too_large")
        if length.isdigit() and int(length) > limit:
            raise too_big
        parts, size = [], 0
        try:
            async for part in request.stream():
                size += len(part)
                if size > limit:
                    raise too_big
                parts.append(part)
        except ClientDisconnect:   # gone before its body arrived: was a 500 and a traceback in the log
            raise ApiError(499, "the client disconnected before its request body arrived") from None
        raw = b"".join(parts)
        if not raw.strip():   # curl -X POST without -d: json.loads said "Expecting value: line 1 column 1 (char 0)"
            raise ApiError(400, "the request body is empty: send a JSON object (curl: -d '{...}' with "
                           "-H 'Content-Type: application/json')", None, "invalid_json")
        try:
            body = json.loads(raw)
        except UnicodeDecodeError:
            raise ApiError(400, "the request body is not UTF-8 JSON", None, "invalid_json") from None
        except ValueError as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})", None, "invalid_json") from None
        except RecursionError:   # json.loads recurses once per level: [[[[... 1000 deep was a 500
            raise ApiError(400, "the request body is nested too deeply to be a request", None,
                           "invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
        name = body.get("model")
        if name is not None and not isinstance(name, str):
            raise ApiError(400, "model must be a string", "model")
        if name is not None and name != opts.model_name:   # 404 as OpenAI (the SDK raises NotFoundError)
            raise ApiError(404, f"model {_shown(name)} is not served here; send \"model\": {json.dumps(opts.model_name)} "
                           "(GET /v1/models)", "model", "model_not_found")
        return body

    async def generate(request: Request, chat: bool):
        body = await parse(request)
        args = sampling_args(body, chat, opts)
        echo = args.pop("echo")
        stream, include_usage = _stream_args(body)
        sid = body.get("session_id")
        if sid is not None:
            try:
                check_session_id(sid)
            except AhnError as e:
                raise ApiError(400, str(e), "session_id") from None
        field = "messages" if chat else "prompt"
        conv = None
        if sid is not None:
            try:
                conv = await asyncio.to_thread(sessions.checkout, sid)
            except SessionBusy as e:
                raise ApiError(409, str(e), "session_id", "session_busy") from None
            except SessionLost as e:
                raise ApiError(404, str(e), "session_id", "session_not_found") from None
            except AhnError as e:
                raise ApiError(500, f"cannot restore session {sid!r}: {e}", "session_id") from None
        try:
            prompt = await asyncio.to_thread(build_prompt, model, body, chat, conv)
            if len(prompt) > opts.max_prompt_tokens:
                what = "the messages are" if chat else "the prompt is"
                raise ApiError(400, f"{what} {len(prompt)} tokens, over this server's limit of {opts.max_prompt_tokens} "
                               f"tokens per request: send a shorter {'conversation' if chat else 'prompt'}", field,
                               "context_length_exceeded")
            try:
                run = model._new_run(prompt, **args)
            except AhnError as e:
                raise ApiError(400, str(e), field if "prompt" in str(e) or "token" in str(e) else None) from None

            def keep_conversation(ticket):       # in the worker, once the generation has ended
                if ticket.final_state is not None:
                    tensors, position = ticket.final_state
                    sessions.checkin(sid, Conversation(tensors, position, ticket.run.last_token, chat))
                else:                              # cancelled or failed: the conversation stays as it was
                    sessions.release(sid)
            on_end = keep_conversation if sid is not None else None
            try:
                gen = AsyncGeneration(scheduler, run, start_state=(conv.tensors, conv.position) if conv else None,
                                      keep_state=sid is not None, on_end=on_end)
            except QueueFull as e:
                raise ApiError(503, str(e), None, "server_overloaded",
                               headers={"Retry-After": str(opts.retry_after)}) from None
        except BaseException:
            if sid is not None:
                sessions.release(sid)
            raise
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if echo and run.prompt_logprobs_k is None:   # echo without logprobs: the prompt's text only
            echo = (await asyncio.to_thread(text_offsets, model.tokenizer, prompt.ids))[0]
        meta = dict(rid=rid, created=int(time.time()), sid=sid, chat=chat, echo=echo)
        if stream:
            return StreamingResponse(_stream(gen, include_usage, **meta), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _complete(request, gen, **meta)

    def _usage(gen) -> dict:
        s = gen.stats
        return {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.new_tokens,
                "total_tokens": s.prompt_tokens + s.new_tokens,
                "prompt_tokens_details": {"cached_tokens": s.cached_tokens}}

    def _envelope(rid, created, sid, chat, choices, chunk: bool, usage=None, null_usage=False) -> dict:
        obj = {"id": rid, "object": ("chat.completion" if chat else "text_completion") + (".chunk" if chunk and chat else ""),
               "created": created, "model": opts.model_name, "choices": choices}
        if usage is not None or null_usage:   # with include_usage, every chunk before the last has "usage": null
            obj["usage"] = usage
        if sid is not None:
            obj["session_id"] = sid
        return obj

    def _choice(chat, text, finish, chunk: bool, first=False, logprobs=None) -> dict:
        if chat and chunk:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        if chat:
            return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                    "finish_reason": finish}
        return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def _logprobs(gen, chat, start=0, final=False, echo=False):
        """The choice's ``logprobs`` for the entries from ``start`` on (None without logprobs, and for a
        ``final`` chunk that has none left); with ``echo`` (completions, logprobs), the prompt's entries first.
        An echoed run's generated entries count their offsets from the start of the prompt's text."""
        if gen.logprobs is None or (final and len(gen.logprobs) == start and not echo):
            return None
        entries = gen.logprobs[start:]
        if chat:
            return chat_logprobs(model.tokenizer, entries)
        if gen.prompt_logprobs is not None:   # echoed (the prompt's own entries in the first chunk only)
            entries = echo_entries(gen, entries, echo)
        return completion_logprobs(model.tokenizer, entries, gen.run.logprobs)

    def _echoed(gen, echo) -> str:
        """The prompt's text for an echo: ``echo`` itself (computed with the request) or, with logprobs, the text
        the prompt's entries count in."""
        return echo if isinstance(echo, str) else gen.prompt_text

    def client_gone(gen, sid):
        """The client went away: its run stops at the next token, and a request on its session meanwhile waits
        for that (``SessionStore.closing``) instead of getting 409."""
        gen.ticket.cancel()
        if sid is not None:
            sessions.closing(sid)

    async def _stream(gen, include_usage, rid, created, sid, chat, echo):
        env = (lambda choices, usage=None: _sse(_envelope(rid, created, sid, chat, choices, True, usage,
                                                          null_usage=include_usage)))
        seen = 0   # logprobs entries sent: a chunk carries those of the tokens its text completes
        try:
            if chat:
                yield env([_choice(chat, "", None, True, first=True)])
            try:
                async for piece in gen:
                    lp = _logprobs(gen, chat, seen, echo=bool(echo))
                    if echo:   # as vLLM: the first chunk carries the prompt's text (and entries) before its own
                        piece, echo = _echoed(gen, echo) + piece, False
                    seen = len(gen.logprobs) if lp is not None else 0
                    yield env([_choice(chat, piece, None, True, logprobs=lp)])
            except Exception as e:  # noqa: BLE001 - the run failed after the stream began
                yield _sse(ApiError(500, f"generation failed: {type(e).__name__}: {e}").body())
                yield "data: [DONE]\n\n"
                return
            # nothing generated (max_tokens 0, or an end of sequence at once): the finish chunk carries the echo
            lp = _logprobs(gen, chat, seen, final=True, echo=bool(echo))
            yield env([_choice(chat, _echoed(gen, echo) if echo else "", gen.finish_reason, True, logprobs=lp)])
            if include_usage:
                yield env([], _usage(gen))
            yield "data: [DONE]\n\n"
        finally:
            if not gen.ticket.ended.is_set():
                client_gone(gen, sid)

    async def _complete(request, gen, rid, created, sid, chat, echo):
        async def collect():
            return "".join([p async for p in gen])

        async def disconnected():
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    return

        work = asyncio.ensure_future(collect())
        watch = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not work.done():
                client_gone(gen, sid)
                work.cancel()
            watch.cancel()
        if not work.done() or work.cancelled():
            return Response(status_code=499)    # nobody is listening
        try:
            text = work.result()
        except Exception as e:  # noqa: BLE001
            raise ApiError(500, f"generation failed: {type(e).__name__}: {e}") from None
        if echo:
            text = _echoed(gen, echo) + text
        choice = _choice(chat, text, gen.finish_reason, False, logprobs=_logprobs(gen, chat, echo=bool(echo)))
        return _envelope(rid, created, sid, chat, [choice], False, _usage(gen))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    return _Guard(app, opts.api_key, metrics)
