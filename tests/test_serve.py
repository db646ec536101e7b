"""expertflow-serve: the real server process on a free loopback port, talked to with the official
``openai`` client (and raw HTTP where a client would hide the error): exactness against
expertflow-generate, concurrent streams, cancellation, bad requests, a full queue, SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from expertflow import runtime  # noqa: E402
from expertflow.tools.cli import generate as generate_cli  # noqa: E402

NAME = "tiny-trained-moe"
BUDGET = "8"  # of 32 experts: the server offloads, as it would a real model
PROMPTS = ["def __init__(self", "import os\nimport sys\n", "class Parser(object):", "for line in open(",
           "    return self.", "if __name__ ==", "with open(path) as f:", "try:\n    import"]


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    lines: list[str]

    def client(self) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url, api_key="unused", max_retries=0, timeout=60)

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url.removesuffix("/v1") + path, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def post(self, path: str, body: bytes) -> tuple[int, Any, dict]:
        req = urllib.request.Request(self.url + path, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.headers, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers, json.loads(exc.read())


def start(path, *extra: str) -> Server:
    proc = subprocess.Popen([sys.executable, "-m", "expertflow.tools.cli.serve", str(path), "--port", "0",
                             "--served-model-name", "tiny", "--budget", BUDGET, "--quiet", *extra],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if "serving tiny at " in line:
            url = line.split(" at ")[1].split()[0]
            threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
            return Server(proc, url, lines)
    proc.kill()
    raise AssertionError(f"the server did not start: {''.join(lines)}")


@pytest.fixture(scope="module")
def server(compiled_dir):
    s = start(compiled_dir(NAME), "--max-batch", "8", "--max-context", "256")
    yield s
    s.proc.send_signal(signal.SIGTERM)
    try:
        s.proc.wait(30)
    except subprocess.TimeoutExpired:
        s.proc.kill()
        s.proc.wait(30)


@pytest.fixture(scope="module")
def reference(compiled_dir):
    """Greedy completions in this process, the way expertflow-generate makes them (same budget)."""
    path = compiled_dir(NAME)
    model = runtime.load(path, expert_cache=int(BUDGET))
    tokenizer = runtime.load_tokenizer(path)

    def complete(prompt: str, n: int) -> str:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    return complete


def test_greedy_chat_is_exactly_expertflow_generate(server, compiled_dir, capsys):
    question = "Is flat better than nested?"
    assert generate_cli.main([str(compiled_dir(NAME)), question, "--chat", "--max-new-tokens", "16", "--budget",
                              BUDGET, "--quiet"]) == 0
    expected = capsys.readouterr().out.removesuffix("\n")
    client = server.client()
    messages = [{"role": "user", "content": question}]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    assert reply.choices[0].message.content == expected and expected
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 16
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 16 and chunks[-1].usage.prompt_tokens == reply.usage.prompt_tokens


def test_eight_concurrent_streams_each_give_their_solo_output(server, reference):
    client, got, errors = server.client(), {}, []

    def run(i: int) -> None:
        try:
            stream = client.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=12, temperature=0,
                                               stream=True)
            got[i] = "".join(c.choices[0].text for c in stream)
        except Exception as exc:  # surfaced below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
        time.sleep(0.02)  # they arrive while others are generating: each joins the running batch
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert [got[i] for i in range(len(PROMPTS))] == [reference(p, 12) for p in PROMPTS]


def test_a_closed_stream_frees_its_row_and_the_server_serves_on(server):
    client = server.client()
    stream = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=200, temperature=0, stream=True)
    next(iter(stream))
    stream.close()  # the client goes away mid-generation
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and json.loads(server.get("/health")[1])["running"]:
        time.sleep(0.05)
    assert json.loads(server.get("/health")[1])["running"] == 0, "the closed stream's row still runs"
    status, metrics = server.get("/metrics")
    assert status == 200 and "expertflow_requests_cancelled_total 0" not in metrics
    assert client.completions.create(model="tiny", prompt="x", max_tokens=2).usage.completion_tokens == 2


def test_bad_requests_get_their_4xx_and_the_server_serves_on(server):
    client = server.client()
    status, _, body = server.post("/chat/completions", b"{not json")
    assert status == 400 and body["error"]["message"] == "the request body is not valid JSON"
    with pytest.raises(openai.NotFoundError, match="the model 'gpt-4' does not exist here"):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="'max_tokens' must be a positive integer, got -3"):
        client.completions.create(model="tiny", prompt="x", max_tokens=-3)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="word " * 300, max_tokens=4)
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="only n=1 is supported"):
        client.completions.create(model="tiny", prompt="x", n=2)
    with pytest.raises(openai.BadRequestError, match="'logprobs' is not supported"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], logprobs=True)
    with pytest.raises(openai.BadRequestError, match="'temperature' must be a number in"):
        client.completions.create(model="tiny", prompt="x", temperature=5)
    status, _, body = server.post("/completions", json.dumps({"model": "tiny", "prompt": [1, 99999]}).encode())
    assert status == 400 and "outside this model's vocabulary" in body["error"]["message"]
    assert server.get("/v1/nothing")[0] == 404
    status, _, body = server.post("/completions", b"[" * 100_000)  # json recurses per bracket
    assert status == 400 and body["error"]["message"] == "the request body is nested too deeply"
    status, _, body = server.post("/completions", b" " * (3 << 20))  # over 256 tokens x 64 bytes, and 1 MiB
    assert status == 413 and "over this server's 1048576" in body["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="'stop' must be a non-empty string of at most 1000"):
        client.completions.create(model="tiny", prompt="x", stop="s" * 1001)
    assert client.completions.create(model="tiny", prompt="x", max_tokens=3).choices[0].finish_reason == "length"


def test_sampling_is_repeatable_by_seed_and_stop_strings_end_the_text(server):
    client = server.client()
    draws = [client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=16, temperature=1.0, seed=s).
             choices[0].text for s in (7, 7, 8)]
    assert draws[0] == draws[1] and draws[0] != draws[2]
    full = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=16, temperature=0).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    cut = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_models_health_and_metrics(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]
    status, health = server.get("/health")
    assert status == 200 and json.loads(health)["status"] == "ok"
    status, metrics = server.get("/metrics")
    names = {line.split()[0].split("{")[0] for line in metrics.splitlines() if line and not line.startswith("#")}
    assert {"expertflow_requests_total", "expertflow_generated_tokens_total", "expertflow_tokens_per_second",
            "expertflow_requests_waiting", "expertflow_expert_hit_rate", "expertflow_expert_bytes_moved_total"} <= names


def test_a_full_queue_is_429_and_sigterm_stops_the_server_cleanly(compiled_dir):
    s = start(compiled_dir(NAME), "--max-batch", "1", "--max-queue", "1")
    try:
        client = s.client()
        running = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=480, stream=True,
                                            temperature=0)
        next(iter(running))  # generating
        queued = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=5, stream=True,
                                           temperature=0)
        deadline = time.monotonic() + 10
        while json.loads(s.get("/health")[1])["waiting"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        status, headers, body = s.post("/completions", json.dumps({"model": "tiny", "prompt": "x"}).encode())
        assert status == 429 and headers["Retry-After"] == "1" and body["error"]["code"] == "queue_full"
        start_stop = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)  # with a stream running and one waiting
        assert s.proc.wait(30) == 0 and time.monotonic() - start_stop < 20
        assert "expertflow-serve: stopped" in "".join(s.lines)
        for stream in (running, queued):
            try:
                list(stream)  # each ends (cut short), never hangs
            except Exception:
                pass
    finally:
        if s.proc.poll() is None:  # a failed assertion above: no server outlives the test
            s.proc.kill()
            s.proc.wait(30)


def test_help_explains_every_option(capsys):
    from expertflow.tools.cli import serve

    with pytest.raises(SystemExit) as exit_:
        serve.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in ("--host", "--port", "--budget", "--host-memory", "--memory", "--device", "--cache-dir",
                   "--max-batch", "--max-queue", "--max-context", "--served-model-name", "--quiet"):
        assert option in text
    assert "/v1/chat/completions" in text and "SIGTERM" in text


def test_a_busy_port_or_a_bad_option_is_a_one_line_error(compiled_dir, capsys):
    import socket

    from expertflow.tools.cli import serve

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        assert serve.main([str(compiled_dir(NAME)), "--port", str(port)]) == 2
    finally:
        busy.close()
    err = capsys.readouterr().err
    assert err == (f"expertflow-serve: error: cannot listen on 127.0.0.1:{port} (Address already in use); choose "
                   "another --port or --host\n")
    with pytest.raises(SystemExit) as exit_:
        serve.main([str(compiled_dir(NAME)), "--max-batch", "0"])
    assert exit_.value.code == 2 and "--max-batch must be at least 1, got 0" in capsys.readouterr().err


def test_the_listening_socket_is_tcp_so_responses_are_not_held_back():
    """asyncio sets TCP_NODELAY on accepted connections only when the listening socket's proto
    says TCP; with proto 0 every response waited out the client's delayed ACK (40 ms each)."""
    import socket

    from expertflow.tools.cli import serve

    sock = serve._listen("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()


def test_text_streams_as_the_whole_decode_and_stops_at_the_first_stop_string(compiled_dir):
    """TextStream decodes a window per token; what it sends, joined, is the whole decode (and,
    with a stop string, the whole decode up to it), for random token sequences."""
    import random

    from expertflow.tools.serve.protocol import TextStream

    tokenizer = runtime.load_tokenizer(compiled_dir(NAME))
    rng = random.Random(0)
    for _ in range(100):
        ids = [rng.randrange(3, len(tokenizer)) for _ in range(rng.randrange(1, 40))]
        full = tokenizer.decode(ids, skip_special_tokens=True)
        stream = TextStream(tokenizer, ())
        assert "".join(stream.push(t)[0] for t in ids) + stream.flush() == full
        if len(full) > 6:
            stop = full[len(full) // 2:len(full) // 2 + 3]
            stream, sent = TextStream(tokenizer, (stop,)), []
            for t in ids:
                piece, stopped = stream.push(t)
                sent.append(piece)
                if stopped:
                    break
            else:
                sent.append(stream.flush())
            assert "".join(sent) == full[:full.find(stop)]
