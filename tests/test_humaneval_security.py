"""The real server over loopback HTTP, attacked as an outsider would: oversized and token-less bodies.

Raw sockets, so that the test controls when each body byte is sent and sees when the server answers.
"""

import select
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from typer.testing import CliRunner

from cgrpo.humaneval.cli import app as cli_app
from cgrpo.humaneval.pairs import make_pairs, read_eval_run, write_pairs
from cgrpo.humaneval.store import Store
from cgrpo.testing.humaneval import grid_keys, serve_in_subprocess, write_eval_run

MIB = 1 << 20


class Study:
    def __init__(self, root: Path) -> None:
        keys = grid_keys(2, 1)
        self.run_a = write_eval_run(root / "eval_a", "alphamethod", keys, size=16)
        self.run_b = write_eval_run(root / "eval_b", "betamethod", keys, size=16, tint=(60, 60, 60))
        self.runs = [self.run_a, self.run_b]
        self.pairs_file = write_pairs(
            root / "pairs.jsonl", make_pairs(read_eval_run(self.run_a), read_eval_run(self.run_b))
        )
        self.db = root / "study.sqlite"
        with Store(self.db) as store:
            self.token = store.add_annotator("alice")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    study = Study(tmp_path_factory.mktemp("security"))
    with serve_in_subprocess(study.db, study.pairs_file, runs=study.runs) as running:
        running.study = study
        yield running


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident memory (VmHWM) so far."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc")


def post(
    base_url: str,
    headers: dict[str, str],
    *,
    body_bytes: int,
    chunked: bool = False,
    chunk: int = MIB,
    answer_timeout_s: float = 30.0,
) -> tuple[int | None, int]:
    """POST /api/votes with ``body_bytes`` zeros, sent a chunk at a time while watching for an answer.

    Returns (status or None when the connection closed without one, body bytes sent before the answer).
    """
    url = urlsplit(base_url)
    lines = ["POST /api/votes HTTP/1.1", f"Host: {url.hostname}:{url.port}", "Content-Type: application/json"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {body_bytes}")
    sent = 0
    with socket.create_connection((url.hostname, url.port), timeout=answer_timeout_s) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())

        poller = select.poll()  # not select.select: the suite's other tests may have pushed fds past 1024
        poller.register(sock, select.POLLIN)

        def answered(wait_s: float) -> bool:
            return bool(poller.poll(wait_s * 1000))

        # The head alone may be enough for the server to answer: give it a moment before any body byte.
        if not answered(0.5):
            payload = b"0" * chunk
            try:
                while sent < body_bytes and not answered(0):
                    piece = payload[: min(chunk, body_bytes - sent)]
                    sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                    sent += len(piece)
                if chunked and sent >= body_bytes and not answered(0):
                    sock.sendall(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server answered and closed; its answer is read below
            answered(answer_timeout_s)
        try:
            head = sock.recv(65536)
        except ConnectionResetError:
            return None, sent
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else None
    return status, sent


def test_token_less_and_oversized_bodies_are_refused_unread_and_memory_stays_flat(server):
    bearer = {"Authorization": f"Bearer {server.study.token}"}
    pid = server.process.pid
    before = peak_rss_bytes(pid)

    # No token, or a wrong one: 401 on the head alone, before a single body byte is read.
    for headers in ({}, {"Authorization": "Bearer not-a-token"}, {"Cookie": "cgrpo_humaneval_token=nope"}):
        assert post(server.base_url, headers, body_bytes=256 * MIB) == (401, 0), headers
    # A valid token but a declared length over the limit: 413 on the head alone.
    assert post(server.base_url, bearer, body_bytes=256 * MIB) == (413, 0)
    # A valid token and a chunked body with no declared length: 413 once the streamed bytes pass the limit,
    # long before the whole body is sent (what was sent meanwhile sat in the sockets' kernel buffers).
    status, sent = post(server.base_url, bearer, body_bytes=64 * MIB, chunked=True, chunk=16 * 1024)
    assert status == 413 and sent < 16 * MIB, (status, sent)

    # Four token-less 64 MiB uploads at once (the issue measured 3.8 GB peak for four of 256 MiB).
    results: list[tuple[int | None, int]] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(post(server.base_url, {}, body_bytes=64 * MIB, chunked=True))
        )
        for _ in range(4)
    ]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [status for status, _ in results] == [401] * 4, results
    growth = peak_rss_bytes(pid) - before
    print(f"\npeak RSS growth of the server under the oversized POSTs: {growth / MIB:.1f} MiB")
    assert growth < 16 * MIB, f"server peak memory grew by {growth / MIB:.0f} MiB"
    assert time.monotonic() - started < 10


def test_a_vote_of_normal_size_still_goes_through(server):
    headers = {"authorization": f"Bearer {server.study.token}"}
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=10) as client:
        pair_id = client.get("/api/next").json()["pair_id"]
        vote = {"pair_id": pair_id, "identity": "left", "prompt": "tie", "overall": "right"}
        assert client.post("/api/votes", json=vote).status_code == 201
        assert client.post("/api/votes", json=vote).status_code == 409


def test_tokens_never_reach_the_access_log(tmp_path):
    study = Study(tmp_path)
    with serve_in_subprocess(
        study.db, study.pairs_file, runs=study.runs, extra_args=["--log-level", "info"]
    ) as server:
        with httpx.Client(base_url=server.base_url, timeout=10) as client:
            assert client.get(f"/a/{study.token}").status_code == 303
            client.get("/annotate", params={"token": study.token})
            client.get(f"/a/{study.token}/", params={"x": "1", "token": study.token})
            client.post(f"/a/{study.token}", data={"confirm": "0"})
        deadline = time.monotonic() + 10
        while "".join(server.output).count('"POST /a/') < 1 and time.monotonic() < deadline:
            time.sleep(0.05)  # the access log arrives through a pipe
        log = "".join(server.output)
    access = [line for line in log.splitlines() if '"GET /a' in line or '"POST /a' in line]
    assert len(access) == 4, log  # the access log is on and saw the four requests
    assert study.token not in log, [line for line in access if study.token in line]
    assert any('"GET /a/' in line for line in access)


def test_the_server_answers_only_for_its_own_host_names(server):
    port = urlsplit(server.base_url).port
    with httpx.Client(base_url=server.base_url, timeout=10) as client:
        # a page of another site whose name resolves to 127.0.0.1 (DNS rebinding) sends its own Host
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example"):
            refused = client.get("/annotate", headers={"host": host})
            assert refused.status_code == 400, host
        for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
            assert client.get("/annotate", headers={"host": host}).status_code == 401, host  # no token yet


def test_invite_prints_a_link_to_where_the_server_runs(server):
    result = CliRunner().invoke(cli_app, ["invite", "--db", str(server.study.db), "--name", "carol"])
    assert result.exit_code == 0, result.output
    link = result.stdout.strip().splitlines()[-1]
    assert link.startswith(f"{server.base_url}/a/"), (link, server.base_url)
    with httpx.Client(timeout=10) as client:
        opened = client.get(link)
    assert opened.status_code == 303 and opened.headers["location"] == "/annotate"
