"""vlm_judge against a local OpenAI-compatible server that answers, fails, stalls or talks nonsense."""

from __future__ import annotations

import base64
import io
import json
import math
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from PIL import Image

from cgrpo.rewards import build
from cgrpo.rewards.vlm_judge import RewardServerError, parse_scores, user_prompt


class FakeVLM:
    """A chat-completions server on 127.0.0.1. ``behaviour(n, body) -> (status, payload|str, headers)``.

    By default it answers ``identity = k, prompt = 10 - k`` for the prompt text ``"p<k>"``, so that results
    can be matched to their samples whatever order the concurrent requests arrive in.
    """

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.behaviour = self.answer
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests.append({"path": self.path, "body": body})
                    fake.headers.append(dict(self.headers))
                    n = len(fake.requests)
                status, payload, headers = fake.behaviour(n, body)
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    for key, value in headers.items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        ).start()

    @staticmethod
    def completion(content: str) -> dict:
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}

    @staticmethod
    def prompt_number(body: dict) -> int:
        text = body["messages"][1]["content"][-1]["text"]
        return int(re.search(r'Text prompt: "p(\d+)"', text).group(1))

    def answer(self, n: int, body: dict):
        k = self.prompt_number(body)
        return 200, self.completion(json.dumps({"identity": k, "prompt": 10 - k})), {}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server():
    fake = FakeVLM()
    yield fake
    fake.close()


def samples(n: int):
    images = torch.rand(n, 3, 16, 20)
    references = torch.rand(n, 3, 16, 20)
    return images, references, [f"p{k}" for k in range(n)]


def judge(server: FakeVLM, **options):
    options = {"base_url": server.url, "model": "judge-model", "backoff": 0.01, "timeout": 5.0, **options}
    return build("vlm_judge", **options)


def test_scores_requests_and_criteria(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "secret-from-env")
    images, references, prompts = samples(5)
    both = judge(server, concurrency=3)
    scores = both(images, references, prompts)
    expected_identity = torch.arange(5) / 10
    torch.testing.assert_close(both.last_scores["identity"], expected_identity)
    torch.testing.assert_close(both.last_scores["prompt"], 1 - expected_identity)
    torch.testing.assert_close(scores, torch.full((5,), 0.5))
    assert both.stats == {"requests": 5, "retries": 0, "malformed": 0}

    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions"
    body = request["body"]
    assert body["model"] == "judge-model" and body["temperature"] == 0.0
    parts = body["messages"][1]["content"]
    urls = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
    assert len(urls) == 2 and all(u.startswith("data:image/png;base64,") for u in urls)
    decoded = Image.open(io.BytesIO(base64.b64decode(urls[1].split(",", 1)[1])))
    assert decoded.format == "PNG" and decoded.size == (20, 16)
    assert '"identity"' in parts[-1]["text"] and '"prompt"' in parts[-1]["text"]
    assert server.headers[0]["Authorization"] == "Bearer secret-from-env"

    identity = judge(server, criterion="identity", api_key="explicit")
    torch.testing.assert_close(identity(images, references, prompts), expected_identity)
    assert server.headers[-1]["Authorization"] == "Bearer explicit"
    assert '"prompt"' not in server.requests[-1]["body"]["messages"][1]["content"][-1]["text"]
    prompt_only = judge(server, criterion="prompt")
    torch.testing.assert_close(prompt_only(images, references, prompts), 1 - expected_identity)


def test_retries_with_backoff_then_succeeds(server):
    def flaky(n, body):
        if n <= 2:
            return 503, {"error": "overloaded"}, {}
        if n == 3:
            return 429, {"error": "slow down"}, {"Retry-After": "0"}
        return server.answer(n, body)

    server.behaviour = flaky
    reward = judge(server, max_retries=3, concurrency=1)
    torch.testing.assert_close(reward(*samples(1)), torch.tensor([0.5]))
    assert reward.stats["retries"] == 3 and reward.stats["requests"] == 4


def test_exhausted_retries_raise_a_clear_error(server):
    server.behaviour = lambda n, body: (500, {"error": "boom"}, {})
    reward = judge(server, max_retries=2)
    with pytest.raises(RewardServerError, match=r"failed after 3 attempts.*HTTP 500"):
        reward(*samples(1))
    assert len(server.requests) == 3


def test_client_errors_are_not_retried(server):
    server.behaviour = lambda n, body: (401, {"error": "bad key"}, {})
    with pytest.raises(RewardServerError, match="HTTP 401.*not retrying"):
        judge(server, max_retries=5)(*samples(1))
    assert len(server.requests) == 1


def test_a_stalled_server_times_out(server):
    def stall(n, body):
        time.sleep(1.0)
        return server.answer(n, body)

    server.behaviour = stall
    reward = judge(server, timeout=0.2, max_retries=1)
    start = time.perf_counter()
    with pytest.raises(RewardServerError, match="timed out"):
        reward(*samples(1))
    assert time.perf_counter() - start < 0.9
    assert reward.stats["requests"] == 2


def test_malformed_answers_give_nan_and_are_counted(server):
    answers = {
        0: '```json\n{"identity": 7, "prompt": "8/10"}\n```',  # fenced, number as text: fine
        1: "I would rate it highly!",  # no JSON
        2: '{"identity": 7}',  # a criterion missing
        3: '{"identity": 11, "prompt": 5}',  # out of range
        4: 'Sure. {"Identity": 9.5, "PROMPT": 4} Hope that helps.',  # prose and odd key case: fine
    }

    def mixed(n, body):
        return 200, server.completion(answers[server.prompt_number(body)]), {}

    server.behaviour = mixed
    reward = judge(server)
    scores = reward(*samples(5))
    assert scores[0].item() == pytest.approx(0.75) and scores[4].item() == pytest.approx(0.675)
    assert all(math.isnan(scores[i].item()) for i in (1, 2, 3))
    assert reward.stats["malformed"] == 3

    server.behaviour = lambda n, body: (200, "<html>not json</html>", {"Content-Type": "text/html"})
    assert math.isnan(reward(*samples(1)).item())
    assert reward.stats["malformed"] == 4


def test_parse_scores_and_prompt_text():
    assert parse_scores('{"identity": 3, "prompt": 4}', ("identity", "prompt")) == {
        "identity": 3.0,
        "prompt": 4.0,
    }
    assert parse_scores('{"identity": true}', ("identity",)) is None
    assert parse_scores("[1, 2]", ("identity",)) is None
    text = user_prompt("a dog on the moon", ("identity",))
    assert "a dog on the moon" in text and '{"identity": <0-10>}' in text
    with pytest.raises(ValueError, match="criterion"):
        build("vlm_judge", criterion="style")
