"""The study database: migrations, WAL, tokens, layouts, vote uniqueness, busy retries."""

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from cgrpo.humaneval import store as store_module
from cgrpo.humaneval.pairs import make_pairs, read_eval_run
from cgrpo.humaneval.store import (
    MIGRATIONS,
    SCHEMA_VERSION,
    DuplicateVote,
    PairNotShown,
    Store,
    StoreError,
    UnknownPair,
    hash_token,
    side_to_choice,
)
from cgrpo.testing.humaneval import grid_keys, write_eval_run

ALL_TIE = {"identity": "tie", "prompt": "tie", "overall": "tie"}


@pytest.fixture
def pairs(tmp_path: Path):
    keys = grid_keys(2, 2)
    run_a = read_eval_run(write_eval_run(tmp_path / "a", "A", keys, size=16))
    run_b = read_eval_run(write_eval_run(tmp_path / "b", "B", keys, size=16))
    return make_pairs(run_a, run_b)


def test_new_database_is_wal_at_the_latest_version(tmp_path):
    store = Store(tmp_path / "study.sqlite")
    assert store.created and store.schema_version() == SCHEMA_VERSION == len(MIGRATIONS)
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert not Store(store.path).created


def test_migrating_a_version_1_database_keeps_its_data(tmp_path, pairs):
    path = tmp_path / "old.sqlite"
    Store(path, target_version=1)  # what the first release created
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
        columns = {row[1] for row in conn.execute("PRAGMA table_info(votes)")}
        assert "elapsed_ms" not in columns
        pair = pairs[0]
        conn.execute(
            "INSERT INTO pairs VALUES (?, 0, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                pair.pair_id,
                pair.subject,
                pair.prompt,
                pair.seed,
                pair.reference,
                "A",
                "B",
                pair.image_a,
                pair.image_b,
            ),
        )
        conn.execute(
            "INSERT INTO annotators (name, token_hash, created_at) VALUES ('old', ?, 'then')",
            (hash_token("t0"),),
        )
        conn.execute(
            "INSERT INTO votes (annotator_id, pair_id, criterion, choice, created_at)"
            " VALUES (1, ?, 'identity', 'a', 'then')",
            (pair.pair_id,),
        )

    store = Store(path)
    assert store.schema_version() == SCHEMA_VERSION
    who = store.authenticate("t0")
    assert who is not None and who.name == "old" and not who.is_admin  # is_admin added with default 0
    [vote] = store.votes()
    assert (vote.annotator, vote.pair_id, vote.choice, vote.a_on_left, vote.elapsed_ms) == (
        "old",
        pairs[0].pair_id,
        "a",
        None,  # there was no layout table in version 1
        None,
    )
    assert store.get_pair(pairs[0].pair_id).scores_a == {}
    # the migrated database accepts the full pairs file and new-style votes
    assert store.register_pairs(pairs) == len(pairs) - 1
    store.layout(who.annotator_id, pairs[1].pair_id)
    assert store.record_votes(who.annotator_id, pairs[1].pair_id, ALL_TIE, elapsed_ms=1200) == 3


def test_a_database_from_a_newer_release_is_refused(tmp_path):
    path = tmp_path / "future.sqlite"
    Store(path)
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer than this cgrpo"):
        Store(path)


def test_a_failing_migration_leaves_the_database_untouched(tmp_path, monkeypatch):
    path = tmp_path / "study.sqlite"
    Store(path, target_version=1)

    def broken(conn):
        conn.execute("CREATE TABLE half_done (x)")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(store_module, "MIGRATIONS", [MIGRATIONS[0], broken, *MIGRATIONS[2:]])
    with pytest.raises(RuntimeError, match="disk on fire"):
        Store(path)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
        assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'half_done'").fetchone() is None


def test_tokens_are_stored_only_as_hashes(tmp_path):
    store = Store(tmp_path / "study.sqlite")
    token = store.add_annotator("alice")
    admin_token = store.add_annotator("lead", admin=True)
    assert store.authenticate(token).name == "alice"
    assert store.authenticate(admin_token).is_admin
    for bad in (None, "", token[:-1], token + "x", "x" * 1000):
        assert store.authenticate(bad) is None
    wal = Path(f"{store.path}-wal")  # removed when the last connection closes
    raw = store.path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")
    assert token.encode() not in raw and hash_token(token).encode() in raw
    with pytest.raises(StoreError, match="already exists"):
        store.add_annotator("alice")
    new_token = store.add_annotator("alice", rotate=True)
    assert store.authenticate(token) is None and store.authenticate(new_token).name == "alice"
    with pytest.raises(StoreError, match="same role"):
        store.add_annotator("alice", admin=True, rotate=True)


def test_register_pairs_is_idempotent_and_refuses_changed_pairs(tmp_path, pairs):
    store = Store(tmp_path / "study.sqlite")
    assert store.register_pairs(pairs) == len(pairs)
    assert store.register_pairs(pairs) == 0
    assert [p.pair_id for p in store.pairs()] == [p.pair_id for p in pairs]
    changed = pairs[0].model_copy(update={"image_a": pairs[1].image_a})
    with pytest.raises(StoreError, match="different image_a"):
        store.register_pairs([changed])


def test_assignment_resumes_and_each_pair_is_judged_once(tmp_path, pairs):
    store = Store(tmp_path / "study.sqlite")
    store.register_pairs(pairs)
    alice = store.authenticate(store.add_annotator("alice")).annotator_id
    bob = store.authenticate(store.add_annotator("bob")).annotator_id
    first = store.next_assignment(alice)
    assert (first.done, first.total) == (0, 4)
    assert store.next_assignment(alice).pair == first.pair  # a reload shows the same pair...
    assert store.next_assignment(alice).a_on_left == first.a_on_left  # ...in the same order
    store.record_votes(alice, first.pair.pair_id, ALL_TIE)
    with pytest.raises(DuplicateVote, match="already has your vote on identity, overall, prompt"):
        store.record_votes(alice, first.pair.pair_id, ALL_TIE)
    # a restart is a new Store on the same file
    seen = [first.pair.pair_id]
    for done in range(1, 4):
        assignment = Store(store.path).next_assignment(alice)
        assert assignment.done == done and assignment.pair.pair_id not in seen
        seen.append(assignment.pair.pair_id)
        store.record_votes(alice, assignment.pair.pair_id, ALL_TIE)
    assert store.next_assignment(alice).pair is None and store.next_assignment(alice).done == 4
    assert sorted(seen) == sorted(p.pair_id for p in pairs)
    assert store.next_assignment(bob).done == 0  # progress is per annotator
    assert store.annotators()[0] | {"first_vote_at": None, "last_vote_at": None, "invited_at": None} == {
        "name": "alice",
        "invited_at": None,
        "pairs_done": 4,
        "votes": 12,
        "first_vote_at": None,
        "last_vote_at": None,
    }


def test_per_annotator_order_differs_between_annotators(tmp_path, pairs):
    store = Store(tmp_path / "study.sqlite")
    store.register_pairs(pairs)
    orders = []
    for name in ("a1", "a2", "a3", "a4", "a5"):
        annotator = store.authenticate(store.add_annotator(name)).annotator_id
        order = []
        while (assignment := store.next_assignment(annotator)).pair is not None:
            order.append(assignment.pair.pair_id)
            store.record_votes(annotator, assignment.pair.pair_id, ALL_TIE)
        orders.append(tuple(order))
    assert len(set(orders)) > 1  # 5 annotators all in one of 24 orders by chance: p < 1e-5


def test_votes_are_stored_as_methods_not_sides(tmp_path, pairs):
    store = Store(tmp_path / "study.sqlite")
    store.register_pairs(pairs)
    alice = store.authenticate(store.add_annotator("alice")).annotator_id
    assignment = store.next_assignment(alice)
    store.record_votes(
        alice, assignment.pair.pair_id, {"identity": "left", "prompt": "right", "overall": "tie"}
    )
    stored = {vote.criterion: vote.choice for vote in store.votes()}
    left, right = ("a", "b") if assignment.a_on_left else ("b", "a")
    assert stored == {"identity": left, "prompt": right, "overall": "tie"}
    assert {side_to_choice("left", True), side_to_choice("left", False)} == {"a", "b"}


def test_vote_errors(tmp_path, pairs):
    store = Store(tmp_path / "study.sqlite")
    store.register_pairs(pairs)
    alice = store.authenticate(store.add_annotator("alice")).annotator_id
    with pytest.raises(UnknownPair):
        store.record_votes(alice, "0" * 16, ALL_TIE)
    with pytest.raises(PairNotShown):
        store.record_votes(alice, pairs[0].pair_id, ALL_TIE)
    store.layout(alice, pairs[0].pair_id)
    with pytest.raises(StoreError, match="unknown criteria"):
        store.record_votes(alice, pairs[0].pair_id, {"beauty": "left"})
    assert store.votes() == []


def test_unique_constraint_guards_votes_even_without_the_check(tmp_path, pairs):
    store = Store(tmp_path / "study.sqlite")
    store.register_pairs(pairs)
    alice = store.authenticate(store.add_annotator("alice")).annotator_id
    store.layout(alice, pairs[0].pair_id)
    store.record_votes(alice, pairs[0].pair_id, ALL_TIE)
    with sqlite3.connect(store.path) as conn, pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
        conn.execute(
            "INSERT INTO votes (annotator_id, pair_id, criterion, choice, created_at)"
            " VALUES (?, ?, 'identity', 'a', 'x')",
            (alice, pairs[0].pair_id),
        )


def test_write_waits_and_retries_while_another_process_holds_the_lock(tmp_path, pairs):
    path = tmp_path / "study.sqlite"
    Store(path).register_pairs(pairs)
    # A tiny busy timeout makes SQLite give up at once, so only the retry loop can get the vote through.
    store = Store(path, busy_timeout_s=0.01, busy_retries=8)
    alice = store.authenticate(store.add_annotator("alice")).annotator_id
    store.layout(alice, pairs[0].pair_id)
    blocker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")
    release = threading.Timer(0.3, lambda: blocker.execute("COMMIT"))
    release.start()
    started = time.monotonic()
    try:
        assert store.record_votes(alice, pairs[0].pair_id, ALL_TIE) == 3
    finally:
        release.join()
        blocker.close()
    assert time.monotonic() - started >= 0.25
    assert len(store.votes()) == 3


def test_write_gives_up_with_a_clear_error_when_the_lock_is_never_released(tmp_path):
    store = Store(tmp_path / "study.sqlite", busy_timeout_s=0.01, busy_retries=2)
    blocker = sqlite3.connect(store.path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreError, match="stayed locked through 2 retries"):
            store.add_annotator("alice")
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()


def test_opening_waits_while_another_command_is_creating_the_database(tmp_path):
    """SQLite refuses ``PRAGMA journal_mode = WAL`` at once (no busy wait) while another connection holds
    the write lock of a rollback-journal database, as a second `cgrpo humaneval invite` meets the first
    one creating the schema; opening must wait for it instead of failing."""
    path = tmp_path / "study.sqlite"
    creator = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    creator.execute("BEGIN IMMEDIATE")
    creator.execute("CREATE TABLE half_created (x)")
    release = threading.Timer(0.3, lambda: creator.execute("COMMIT"))
    release.start()
    started = time.monotonic()
    try:
        store = Store(path, busy_timeout_s=5.0)
    finally:
        release.join()
        creator.close()
    assert time.monotonic() - started >= 0.25
    assert store.schema_version() == SCHEMA_VERSION
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_two_commands_creating_one_database_at_once_both_succeed(tmp_path):
    # 30 races of two openers on a new file; before the fix about 1 in 12 failed ("database is locked").
    failures = []
    for attempt in range(30):
        path = tmp_path / f"study{attempt}.sqlite"
        barrier = threading.Barrier(2)

        def open_and_invite(name: str, path: Path = path, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            try:
                with Store(path) as store:
                    store.add_annotator(name)
            except Exception as error:  # collected: a thread's exception would otherwise be lost
                failures.append(repr(error))

        threads = [threading.Thread(target=open_and_invite, args=(name,)) for name in ("alice", "bob")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failures == [], f"attempt {attempt}"
        with Store(path) as store:
            assert sorted(a["name"] for a in store.annotators()) == ["alice", "bob"]
