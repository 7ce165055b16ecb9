"""Load test against the real server over loopback HTTP: 20 concurrent annotators, 2,000 votes, then a crash.

Run with ``-s`` to see the figures (votes/s, p50/p95 latency).
"""

import random
import sqlite3
import statistics
import threading
import time
from pathlib import Path

import httpx

from cgrpo.humaneval.pairs import make_pairs, read_eval_run, write_pairs
from cgrpo.humaneval.store import CRITERIA, Store, side_to_choice
from cgrpo.testing.humaneval import grid_keys, serve_in_subprocess, write_eval_run

N_ANNOTATORS = 20
N_PAIRS = 100  # every annotator judges every pair: 20 x 100 = 2,000 votes (6,000 criterion rows)
DUPLICATE_RATE = 0.05  # share of votes sent a second time, as a double Enter or a client retry would


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def test_20_concurrent_annotators_2000_votes_each_stored_exactly_once(tmp_path: Path):
    keys = grid_keys(10, 10)
    run_a = read_eval_run(write_eval_run(tmp_path / "a", "A", keys, size=8))
    run_b = read_eval_run(write_eval_run(tmp_path / "b", "B", keys, size=8))
    pairs_file = write_pairs(tmp_path / "pairs.jsonl", make_pairs(run_a, run_b))
    db = tmp_path / "study.sqlite"
    with Store(db) as store:
        tokens = [store.add_annotator(f"annotator{i:02d}") for i in range(N_ANNOTATORS)]

    acknowledged: list[tuple[str, str, dict[str, str]]] = []  # (annotator, pair, sides) answered 201
    duplicate_statuses: list[int] = []
    vote_latency_ms: list[float] = []
    next_latency_ms: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    barrier = threading.Barrier(N_ANNOTATORS + 1)

    def annotate(index: int) -> None:
        rng = random.Random(index)
        name = f"annotator{index:02d}"
        headers = {"authorization": f"Bearer {tokens[index]}"}
        try:
            with httpx.Client(base_url=server.base_url, headers=headers, timeout=30.0) as client:
                barrier.wait()
                while True:
                    started = time.perf_counter()
                    assignment = client.get("/api/next")
                    fetched = time.perf_counter()
                    assert assignment.status_code == 200, assignment.text
                    pair_id = assignment.json()["pair_id"]
                    if pair_id is None:
                        break
                    sides = {criterion: rng.choice(["left", "tie", "right"]) for criterion in CRITERIA}
                    body = {"pair_id": pair_id, "elapsed_ms": rng.randint(500, 9000), **sides}
                    sent = time.perf_counter()
                    response = client.post("/api/votes", json=body)
                    done = time.perf_counter()
                    assert response.status_code == 201, response.text
                    with lock:
                        acknowledged.append((name, pair_id, sides))
                        next_latency_ms.append(1000 * (fetched - started))
                        vote_latency_ms.append(1000 * (done - sent))
                    if rng.random() < DUPLICATE_RATE:
                        again = client.post("/api/votes", json=body)
                        with lock:
                            duplicate_statuses.append(again.status_code)
        except BaseException as error:  # reported by the main thread
            errors.append(error)
            barrier.abort()

    # small served images: this test never fetches one, and the study's creation re-encodes all 210
    runs = [tmp_path / "a", tmp_path / "b"]
    with serve_in_subprocess(db, pairs_file, runs=runs, extra_args=["--image-size", "64"]) as server:
        threads = [threading.Thread(target=annotate, args=(i,)) for i in range(N_ANNOTATORS)]
        for thread in threads:
            thread.start()
        barrier.wait()
        started = time.perf_counter()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
        server.kill()  # crash the server: acknowledged votes must already be on disk

    assert not errors, errors[0]
    n_votes = len(acknowledged)
    assert n_votes == N_ANNOTATORS * N_PAIRS
    assert duplicate_statuses and set(duplicate_statuses) == {409}

    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM votes").fetchone()[0] == n_votes * len(CRITERIA)
        distinct = conn.execute(
            "SELECT COUNT(DISTINCT annotator_id || ':' || pair_id) FROM votes"
        ).fetchone()[0]
        assert distinct == n_votes
        layouts = {
            (name, pair_id): bool(a_on_left)
            for name, pair_id, a_on_left in conn.execute(
                "SELECT a.name, l.pair_id, l.a_on_left FROM layouts l"
                " JOIN annotators a ON a.id = l.annotator_id"
            )
        }
        stored = {
            (name, pair_id, criterion): choice
            for name, pair_id, criterion, choice in conn.execute(
                "SELECT a.name, v.pair_id, v.criterion, v.choice FROM votes v"
                " JOIN annotators a ON a.id = v.annotator_id"
            )
        }
        per_annotator = conn.execute(
            "SELECT COUNT(DISTINCT pair_id) FROM votes GROUP BY annotator_id ORDER BY annotator_id"
        ).fetchall()
    assert per_annotator == [(N_PAIRS,)] * N_ANNOTATORS
    # exactly what each annotator clicked, translated with the layout they saw, and nothing else
    expected = {
        (name, pair_id, criterion): side_to_choice(side, layouts[(name, pair_id)])
        for name, pair_id, sides in acknowledged
        for criterion, side in sides.items()
    }
    assert stored == expected

    print(
        f"\nhumaneval load test: {n_votes} votes ({n_votes * len(CRITERIA)} criterion rows) from "
        f"{N_ANNOTATORS} concurrent annotators in {elapsed:.2f} s = {n_votes / elapsed:.0f} votes/s "
        f"(each vote also fetched its pair: {2 * n_votes / elapsed:.0f} requests/s)\n"
        f"  POST /api/votes latency: p50 {percentile(vote_latency_ms, 50):.1f} ms, "
        f"p95 {percentile(vote_latency_ms, 95):.1f} ms, max {max(vote_latency_ms):.1f} ms\n"
        f"  GET /api/next latency:   p50 {percentile(next_latency_ms, 50):.1f} ms, "
        f"p95 {percentile(next_latency_ms, 95):.1f} ms\n"
        f"  {len(duplicate_statuses)} duplicate submissions all rejected with 409; after SIGKILL of the "
        "server the database holds every acknowledged vote exactly once"
    )
