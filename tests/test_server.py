"""`qlite serve`: the OpenAI-compatible server, driven by the official `openai` client over
127.0.0.1 (a tiny random model with a real tokenizer, and once the demo model).

Reference replies come from `qlite.generate` on a second copy of the same model, float32, so
greedy and seeded text must match exactly (same sampling code, same per-request generator)."""
import http.client
import json
import threading
import time
from urllib.parse import urlsplit

import openai
import pytest

import qlite
from qlite.server import Server

KEY = "test-key"
MAX_BATCH, MAX_QUEUE = 8, 8
USER = [{"role": "user", "content": "Write a decoder."}]
PROMPTS = ["def decode(self, s):", "class JSONDecoder(object):", "    return obj, end",
           "import re", "def py_scanstring(s, end, strict=True):", "# the end of the number",
           "raise JSONDecodeError(", "if nextchar == '}':"]


@pytest.fixture(scope="module")
def served(tiny_dense):
    path, _ = tiny_dense
    server = Server(qlite.load(path, dtype="float32"), "tiny", port=0, api_key=KEY,
                    max_batch=MAX_BATCH, max_queue=MAX_QUEUE).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def reference(tiny_dense):
    """The same model loaded apart: qlite.generate's replies, the expected output."""
    model = qlite.load(tiny_dense[0], dtype="float32")

    def generate(prompt, raw=False, **sampling):
        gen = model.generate(prompt, raw=raw, **sampling)
        return gen.text(), gen

    return generate


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def send(served, method, path, body=None, key=KEY) -> http.client.HTTPConnection:
    """Send a raw request (bytes as they are, anything else as JSON); the answer is unread."""
    url = urlsplit(served.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    conn.request(method, path, body=data, headers=headers)
    return conn


def connect(served, method, path, body=None, key=KEY) -> http.client.HTTPResponse:
    return send(served, method, path, body, key).getresponse()


def post(served, path, body, key=KEY) -> tuple[int, dict]:
    r = connect(served, "POST", path, body, key)
    return r.status, json.loads(r.read())


def greedy(**kw):
    return dict(temperature=0, **kw)


def stream_text(stream):
    """(text, finish_reason, usage) of a streamed chat or text completion."""
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += getattr(choice, "text", None) or \
                (getattr(getattr(choice, "delta", None), "content", None) or "")
            finish = choice.finish_reason or finish
    return text, finish, usage


def test_health_and_models_list(served, client):
    assert json.loads(connect(served, "GET", "/health", key=None).read()) == {"status": "ok"}
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_api_key_accepted_and_refused(served):
    refused = openai.OpenAI(base_url=served.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="API key"):
        refused.models.list()
    status, body = post(served, "/v1/completions", {"model": "tiny", "prompt": "x"}, key=None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    status, body = post(served, "/v1/completions", {"model": "tiny", "prompt": "x",
                                                    "max_tokens": 2})
    assert status == 200 and body["usage"]["completion_tokens"] <= 2


def test_chat_equals_qlite_generate(client, reference):
    want, gen = reference(USER, max_new_tokens=16, temperature=0)
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=16,
                                       temperature=0)
    assert r.choices[0].message.content == want
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == ("length" if gen.stats.finish_reason == "length"
                                          else "stop")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == \
        (gen.stats.prompt_tokens, gen.stats.generated_tokens)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streamed_chat_with_usage(client, reference):
    want, gen = reference(USER, max_new_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(
        model="tiny", messages=USER, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == \
        gen.stats.generated_tokens
    assert all(c.usage is None for c in chunks[:-1])
    text, finish, usage = stream_text(chunks)
    assert text == want and finish in ("length", "stop")
    assert usage.prompt_tokens == gen.stats.prompt_tokens


def test_completions_raw_prompt_streamed_and_whole(client, reference):
    for prompt in PROMPTS[:3]:
        want, gen = reference(prompt, raw=True, max_new_tokens=12, temperature=0)
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12,
                                      temperature=0)
        assert r.choices[0].text == want
        assert r.usage.prompt_tokens == len(gen.prompt_ids)
        text, finish, usage = stream_text(client.completions.create(
            model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True))
        assert text == want and usage is None  # no include_usage: no usage chunk


def _long_reply(reference, n):
    """A prompt whose greedy reply runs n tokens without an end-of-turn token."""
    for prompt in PROMPTS:
        text, gen = reference(prompt, raw=True, max_new_tokens=n, temperature=0)
        if gen.stats.finish_reason == "length" and len(text) >= 12:
            return prompt, text
    pytest.fail("no prompt gives a long reply on the tiny model")


def test_max_tokens_ends_with_length(client, reference):
    prompt, _ = _long_reply(reference, 20)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5


def test_stop_strings_cut_the_reply(client, reference):
    prompt, text = _long_reply(reference, 20)
    stop = text[6:9]
    want = text[:text.find(stop)]
    for kind in (stop, ["never seen", stop]):
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=20,
                                      temperature=0, stop=kind)
        assert (r.choices[0].text, r.choices[0].finish_reason) == (want, "stop")
        streamed, finish, _ = stream_text(client.completions.create(
            model="tiny", prompt=prompt, max_tokens=20, temperature=0, stop=kind, stream=True))
        assert (streamed, finish) == (want, "stop")


def test_seed_reproduces_and_equals_generate(client, reference):
    sampling = dict(temperature=1.0, top_p=0.95, seed=7)
    want, _ = reference(USER, max_new_tokens=24, **sampling)
    replies = [client.chat.completions.create(model="tiny", messages=USER, max_tokens=24,
                                              **sampling).choices[0].message.content
               for _ in range(2)]
    assert replies == [want, want]
    other = client.chat.completions.create(model="tiny", messages=USER, max_tokens=24,
                                           **dict(sampling, seed=8))
    assert other.choices[0].message.content != want


def test_penalties_change_the_reply(client):
    prompt = PROMPTS[0]
    plain = client.completions.create(model="tiny", prompt=prompt, max_tokens=24,
                                      temperature=0).choices[0].text
    penalized = client.completions.create(model="tiny", prompt=prompt, max_tokens=24,
                                          temperature=0, frequency_penalty=2.0,
                                          presence_penalty=2.0).choices[0].text
    assert penalized != plain


def test_eight_concurrent_streams_get_their_solo_replies(served, client):
    solo = {p: client.completions.create(model="tiny", prompt=p, max_tokens=24,
                                         temperature=0).choices[0].text for p in PROMPTS}
    steps_before = served.engine.stats.decode_steps
    got, start = {}, threading.Barrier(len(PROMPTS))

    def run(prompt):
        start.wait()
        got[prompt] = stream_text(client.completions.create(
            model="tiny", prompt=prompt, max_tokens=24, temperature=0, stream=True))[0]

    threads = [threading.Thread(target=run, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == solo
    assert served.engine.stats.decode_steps > steps_before
    assert served.engine.stats.max_rows > 1  # the replies were decoded together


def test_disconnect_mid_stream_frees_the_row(served, client, reference):
    prompt, _ = _long_reply(reference, 150)
    others = PROMPTS[:2]
    solo = [client.completions.create(model="tiny", prompt=p, max_tokens=40,
                                      temperature=0).choices[0].text for p in others]
    cancelled = served.engine.stats.cancelled
    got = {}

    def run(i):
        got[i] = stream_text(client.completions.create(
            model="tiny", prompt=others[i], max_tokens=40, temperature=0, stream=True))[0]

    body = {"model": "tiny", "prompt": prompt, "max_tokens": 150, "temperature": 0,
            "stream": True}
    r = connect(served, "POST", "/v1/completions", body)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(others))]
    for t in threads:
        t.start()
    events = []
    while len(events) < 3:
        line = r.readline()
        if line.strip():
            events.append(line)
    assert all(e.startswith(b"data: {") for e in events)
    r.close()  # the client goes away, long before 150 tokens
    for t in threads:
        t.join()
    assert [got[i] for i in range(len(others))] == solo
    deadline = time.monotonic() + 10
    while served.engine.stats.cancelled == cancelled and time.monotonic() < deadline:
        time.sleep(0.01)
    assert served.engine.stats.cancelled == cancelled + 1


def test_disconnect_before_a_whole_reply_frees_the_row(served, reference):
    prompt, _ = _long_reply(reference, 150)
    cancelled = served.engine.stats.cancelled
    conn = send(served, "POST", "/v1/completions",
                {"model": "tiny", "prompt": prompt, "max_tokens": 150, "temperature": 0})
    time.sleep(0.05)
    conn.close()  # gone before the reply
    deadline = time.monotonic() + 10
    while served.engine.stats.cancelled == cancelled and time.monotonic() < deadline:
        time.sleep(0.01)
    assert served.engine.stats.cancelled == cancelled + 1


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    ({"model": "tiny"}, 400, "messages"),
    ({"model": "tiny", "messages": "hi"}, 400, "messages"),
    ({"model": "tiny", "messages": [{"role": "user", "content": 3}]}, 400,
     "messages[0].content"),
    ({"model": "tiny", "messages": USER, "temperature": "hot"}, 400, "temperature"),
    ({"model": "tiny", "messages": USER, "max_tokens": 2.5}, 400, "max_tokens"),
    ({"model": "tiny", "messages": USER, "stream": "yes"}, 400, "stream"),
    ({"model": "tiny", "messages": USER, "stop": [1, 2]}, 400, "stop"),
    ({"model": "gpt-4", "messages": USER}, 404, "model"),
    ({"messages": USER}, 400, "model"),
    ({"model": "tiny", "messages": USER, "n": 2}, 400, "n"),
    ({"model": "tiny", "messages": USER, "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "tiny", "messages": USER, "max_tokens": -3}, 400, "max_tokens"),
    ({"model": "tiny", "messages": USER, "top_p": 0}, 400, "top_p"),
    ({"model": "tiny", "messages": USER, "presence_penalty": 3}, 400, "presence_penalty"),
])
def test_bad_chat_requests_are_refused(served, body, status, param):
    got, reply = post(served, "/v1/chat/completions", body)
    assert got == status
    assert reply["error"]["param"] == param and reply["error"]["message"]
    assert post(served, "/v1/chat/completions",
                {"model": "tiny", "messages": USER, "max_tokens": 2})[0] == 200


def test_prompt_over_the_context_is_refused_with_counts(served, client):
    context = served.engine.context
    ids = list(range(50, 50 + context))
    with pytest.raises(openai.BadRequestError, match=f"context window is {context} tokens; "
                                                     f"the prompt has {context}"):
        client.completions.create(model="tiny", prompt=ids, max_tokens=1)
    with pytest.raises(openai.BadRequestError, match=f"the prompt has 10 \\+ {context} "
                                                     f"max_tokens = {context + 10}"):
        client.completions.create(model="tiny", prompt=ids[:10], max_tokens=context)
    assert client.completions.create(model="tiny", prompt=ids[:10], max_tokens=2).usage


def test_flood_beyond_the_queue_gets_503(served, client):
    engine = served.engine
    limit = engine.max_batch + engine.max_queue
    got = []
    with engine.step_lock:  # hold the engine so the requests pile up
        threads = [threading.Thread(target=lambda: got.append(client.completions.create(
            model="tiny", prompt=PROMPTS[1], max_tokens=4, temperature=0).choices[0].text))
            for _ in range(limit)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while engine.pending < limit and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(openai.APIStatusError, match="busy") as e:
            client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=4)
        assert e.value.status_code == 503
    for t in threads:
        t.join()
    assert len(got) == limit and len(set(got)) == 1
    assert client.completions.create(model="tiny", prompt="x", max_tokens=2).usage


@pytest.mark.demo
def test_demo_concurrent_chats_equal_their_solo_replies(demo_model):
    """The real model, float32: three chats decoded together give each its solo greedy text
    (greedy top-2 margins go down to ~0.016 here, FACTS.md: any mixing of rows would show)."""
    asks = ["Write a Python function that reverses a string.", "What is a mutex?",
            "Say hello in French."]
    chats = [[{"role": "user", "content": a}] for a in asks]
    solo = [demo_model.generate(c, temperature=0, max_new_tokens=12).text() for c in chats]
    context = demo_model.max_context
    demo_model.max_context = 256  # a small cache per row
    server = Server(demo_model, "demo", port=0, max_batch=len(chats)).start()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0)
        got = {}

        def run(i):
            got[i] = stream_text(client.chat.completions.create(
                model="demo", messages=chats[i], max_tokens=12, temperature=0, stream=True))[0]

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(chats))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [got[i] for i in range(len(chats))] == solo
    finally:
        server.stop()
        demo_model.max_context = context
        demo_model.setup_cache(1, 0)  # generate makes the one row it needs


def test_cli_serve_refuses_bad_options_in_one_line(tiny_dense, capsys):
    from qlite.cli import main
    with pytest.raises(SystemExit) as e:
        main(["serve", "--model", str(tiny_dense[0]), "--max-batch", "0"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 1 and err.startswith("qlite: error: --max-batch 0")
