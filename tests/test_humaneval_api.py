"""The web app through FastAPI's TestClient: auth, blinding, votes, images, traversal, admin, export."""

import csv
import io
import json
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from cgrpo.humaneval.app import COOKIE_NAME, create_app
from cgrpo.humaneval.cli import app as cli_app
from cgrpo.humaneval.images import ImagePolicy
from cgrpo.humaneval.pairs import make_pairs, read_eval_run, write_pairs
from cgrpo.humaneval.store import Store
from cgrpo.testing.humaneval import grid_keys, write_eval_run

VOTE = {"identity": "left", "prompt": "right", "overall": "tie"}


class Study:
    def __init__(self, root: Path) -> None:
        keys = grid_keys(2, 2)
        run_a = read_eval_run(write_eval_run(root / "eval_a", "alphamethod", keys, size=24))
        run_b = read_eval_run(write_eval_run(root / "eval_b", "betamethod", keys, size=24, tint=(60, 60, 60)))
        self.pairs = make_pairs(run_a, run_b)
        self.pairs_file = write_pairs(root / "pairs.jsonl", self.pairs)
        self.db = root / "study.sqlite"
        self.store = Store(self.db)
        self.images = ImagePolicy(roots=(root / "eval_a", root / "eval_b"), size=64)
        self.store.register_pairs(self.pairs, images=self.images)
        self.alice = self.store.add_annotator("alice")
        self.bob = self.store.add_annotator("bob")
        self.admin = self.store.add_annotator("lead", admin=True)
        self.session_admin = "session-admin-token-for-tests"
        self.app = create_app(self.store, session_admin_token=self.session_admin, n_boot=200)

    def client(self, token: str | None = None) -> TestClient:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        return TestClient(self.app, headers=headers, follow_redirects=False)


@pytest.fixture
def study(tmp_path: Path) -> Study:
    return Study(tmp_path)


def current_pair(client: TestClient) -> str:
    response = client.get("/api/next")
    assert response.status_code == 200, response.text
    return response.json()["pair_id"]


def test_every_route_needs_a_valid_token(study):
    anonymous = study.client()
    for path in ("/", "/annotate", "/api/next", "/admin", "/admin/results.json", "/admin/results.csv"):
        assert anonymous.get(path).status_code == 401, path
        assert anonymous.get(path, params={"token": "not-a-token"}).status_code == 401, path
        assert (
            anonymous.get(path, headers={"authorization": "Bearer " + study.alice + "x"}).status_code == 401
        )
    pair_id = study.pairs[0].pair_id
    assert anonymous.get(f"/img/{pair_id}/reference").status_code == 401
    assert anonymous.post("/api/votes", json={"pair_id": pair_id, **VOTE}).status_code == 401
    assert anonymous.get("/a/not-a-token").status_code == 401
    stale_cookie = study.client()
    stale_cookie.cookies.set(COOKIE_NAME, study.alice[:-2] + "zz")
    assert stale_cookie.get("/api/next").status_code == 401
    page = anonymous.get("/annotate")
    assert "text/html" in page.headers["content-type"] and "invite link" in page.text
    assert anonymous.get("/static/annotate.js").status_code == 200  # the page's script holds no study data


def test_invite_link_sets_a_cookie_and_redirects(study):
    client = study.client()
    response = client.get(f"/a/{study.alice}")
    assert response.status_code == 303 and response.headers["location"] == "/annotate"
    cookie = response.headers["set-cookie"]
    assert (
        f"{COOKIE_NAME}={study.alice}" in cookie and "HttpOnly" in cookie and "samesite=lax" in cookie.lower()
    )
    page = client.get("/annotate")  # the cookie alone authenticates now
    assert page.status_code == 200 and "Pair 1 of 4" in page.text
    assert page.headers["referrer-policy"] == "no-referrer"
    assert "script-src 'self'" in page.headers["content-security-policy"]
    admin_redirect = study.client().get(f"/a/{study.admin}")
    assert admin_redirect.headers["location"] == "/admin"
    # a token in the query string signs nobody in (it would land in access logs and browser history)
    assert study.client().get("/annotate", params={"token": study.bob}).status_code == 401


def test_annotation_page_is_blind_and_shows_legend_and_progress(study):
    page = study.client(study.alice).get("/annotate").text
    pair = study.store.get_pair(current_pair(study.client(study.alice)))
    assert (
        pair.prompt in page and f"/img/{pair.pair_id}/left" in page and f"/img/{pair.pair_id}/right" in page
    )
    for secret in ("alphamethod", "betamethod", f"/img/{pair.pair_id}/a", f"/img/{pair.pair_id}/b", "eval_"):
        assert secret not in page, secret
    for key in ("1", "2", "3", "Q", "W", "E", "A", "S", "D", "Enter"):
        assert f"<kbd>{key}</kbd>" in page
    assert "Pair 1 of 4" in page


def test_vote_is_recorded_as_method_a_or_b_and_progress_advances(study):
    client = study.client(study.alice)
    pair_id = current_pair(client)
    a_on_left = study.store.shown_layout(study.store.authenticate(study.alice).annotator_id, pair_id)
    response = client.post("/api/votes", json={"pair_id": pair_id, "elapsed_ms": 4321, **VOTE})
    assert response.status_code == 201 and response.json() == {"stored": 3, "pair_id": pair_id}
    left, right = ("a", "b") if a_on_left else ("b", "a")
    stored = {(v.annotator, v.criterion): (v.choice, v.elapsed_ms) for v in study.store.votes()}
    assert stored == {
        ("alice", "identity"): (left, 4321),
        ("alice", "prompt"): (right, 4321),
        ("alice", "overall"): ("tie", 4321),
    }
    following = client.get("/api/next").json()
    assert following["done"] == 1 and following["pair_id"] != pair_id
    assert "Pair 2 of 4" in client.get("/annotate").text


def test_second_vote_on_the_same_pair_is_rejected_with_409(study):
    client = study.client(study.alice)
    pair_id = current_pair(client)
    assert client.post("/api/votes", json={"pair_id": pair_id, **VOTE}).status_code == 201
    again = client.post(
        "/api/votes", json={"pair_id": pair_id, "identity": "right", "prompt": "tie", "overall": "tie"}
    )
    assert again.status_code == 409 and "already has your vote" in again.json()["detail"]
    assert len(study.store.votes()) == 3
    # another annotator may judge the same pair
    bob = study.client(study.bob)
    bob.get("/annotate")
    study.store.layout(study.store.authenticate(study.bob).annotator_id, pair_id)
    assert bob.post("/api/votes", json={"pair_id": pair_id, **VOTE}).status_code == 201


def test_votes_are_validated(study):
    client = study.client(study.alice)
    pair_id = current_pair(client)
    bad_bodies = [
        {"pair_id": pair_id, "identity": "left", "prompt": "right"},  # a criterion missing
        {"pair_id": pair_id, **VOTE, "identity": "a"},  # methods are never sent by the page
        {"pair_id": pair_id, **VOTE, "extra": 1},
        {"pair_id": "../../etc/passwd", **VOTE},
        {"pair_id": pair_id, **VOTE, "elapsed_ms": -5},
    ]
    for body in bad_bodies:
        assert client.post("/api/votes", json=body).status_code == 422, body
    assert (
        client.post(
            "/api/votes", content=b"not json", headers={"content-type": "application/json"}
        ).status_code
        == 422
    )
    assert client.post("/api/votes", json={"pair_id": "0" * 16, **VOTE}).status_code == 404
    unseen = next(p.pair_id for p in study.pairs if p.pair_id != pair_id)
    response = client.post("/api/votes", json={"pair_id": unseen, **VOTE})
    assert response.status_code == 409 and "has not been shown" in response.json()["detail"]
    assert study.store.votes() == []


def test_admins_cannot_vote_and_annotators_cannot_see_results(study):
    for token in (study.admin, study.session_admin):
        admin = study.client(token)
        assert admin.get("/api/next").status_code == 403
        assert admin.post("/api/votes", json={"pair_id": study.pairs[0].pair_id, **VOTE}).status_code == 403
        assert admin.get("/admin").status_code == 200
    annotator = study.client(study.alice)
    for path in ("/admin", "/admin/results.json", "/admin/results.csv"):
        assert annotator.get(path).status_code == 403


def test_images_are_served_by_slot_and_reload_keeps_the_order(study):
    client = study.client(study.alice)
    pair_id = current_pair(client)
    pair = study.store.get_pair(pair_id)
    # what the study stored when it was created: the files re-encoded, not the files themselves
    a_bytes, b_bytes = study.images.encode(pair.image_a), study.images.encode(pair.image_b)
    assert a_bytes != b_bytes and a_bytes != Path(pair.image_a).read_bytes()
    left = client.get(f"/img/{pair_id}/left")
    assert left.status_code == 200 and left.headers["content-type"] == "image/png"
    assert left.headers["cache-control"] == "no-store"
    right = client.get(f"/img/{pair_id}/right").content
    assert {left.content, right} == {a_bytes, b_bytes}
    for _ in range(3):  # reloads (and a second call of /api/next) show the same order
        assert current_pair(client) == pair_id
        assert client.get(f"/img/{pair_id}/left").content == left.content
    assert client.get(f"/img/{pair_id}/reference").content == study.images.encode(pair.reference)
    # annotators cannot ask for a method by name, nor for a pair they were not shown
    assert client.get(f"/img/{pair_id}/a").status_code == 404
    unseen = next(p.pair_id for p in study.pairs if p.pair_id != pair_id)
    assert client.get(f"/img/{unseen}/left").status_code == 404
    admin = study.client(study.admin)
    assert admin.get(f"/img/{pair_id}/a").content == a_bytes
    assert admin.get(f"/img/{pair_id}/b").content == b_bytes


def test_left_right_order_is_randomised_per_annotator_and_pair(tmp_path):
    keys = grid_keys(4, 5)  # 20 pairs
    run_a = read_eval_run(write_eval_run(tmp_path / "a", "A", keys, size=8))
    run_b = read_eval_run(write_eval_run(tmp_path / "b", "B", keys, size=8))
    store = Store(tmp_path / "s.sqlite")
    store.register_pairs(make_pairs(run_a, run_b))
    layouts = []
    for name in ("x", "y", "z"):
        annotator = store.authenticate(store.add_annotator(name)).annotator_id
        layouts += [store.layout(annotator, pair.pair_id) for pair in store.pairs()]
    # 60 fair coin flips: all equal with probability 2^-59
    assert 0 < sum(layouts) < len(layouts)


def test_path_traversal_attempts_never_reach_the_disk(study, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET")
    client = study.client(study.alice)
    pair_id = current_pair(client)
    attempts = [
        f"/img/{pair_id}/..%2f..%2fsecret.txt",
        f"/img/{pair_id}/../../secret.txt",
        f"/img/..%2f..%2f{tmp_path}%2fsecret.txt/left",
        f"/img/{pair_id}/{secret}",
        f"/img/{pair_id}/%2e%2e%2f%2e%2e%2fsecret.txt",
        "/img/%2e%2e/%2e%2e",
        "/static/../store.py",
        "/static/..%2fstore.py",
        "/static/%2e%2e/store.py",
        f"/img/{pair_id}/left?path={secret}",
    ]
    for url in attempts:
        response = client.get(url)
        assert "TOP-SECRET" not in response.text and "class Store" not in response.text, url
        if "?path=" not in url:
            assert response.status_code in (404, 422), (url, response.status_code)


def test_restart_resumes_where_the_annotator_left_off(study):
    client = study.client(study.alice)
    first = current_pair(client)
    client.post("/api/votes", json={"pair_id": first, **VOTE})
    second = current_pair(client)
    left_before = client.get(f"/img/{second}/left").content
    restarted = TestClient(create_app(Store(study.db), n_boot=200), headers=client.headers)
    assert "Pair 2 of 4" in restarted.get("/annotate").text
    assert current_pair(restarted) == second
    assert restarted.get(f"/img/{second}/left").content == left_before
    assert restarted.post("/api/votes", json={"pair_id": first, **VOTE}).status_code == 409


def test_done_page_after_the_last_pair(study):
    client = study.client(study.bob)
    for _ in range(4):
        assert client.post("/api/votes", json={"pair_id": current_pair(client), **VOTE}).status_code == 201
    assert client.get("/api/next").json()["pair_id"] is None
    page = client.get("/annotate")
    assert page.status_code == 200 and "All 4 pairs judged" in page.text


def vote_all(client: TestClient, sides: dict[str, str]) -> None:
    while (pair_id := current_pair(client)) is not None:
        assert client.post("/api/votes", json={"pair_id": pair_id, **sides}).status_code == 201


def test_admin_page_and_cli_export(study, tmp_path):
    # alice always prefers method A on identity, bob too: the identity share of A is 100%, agreement perfect
    user_ids = {}
    for name, token in (("alice", study.alice), ("bob", study.bob)):
        client = study.client(token)
        user_ids[name] = study.store.authenticate(token).annotator_id
        while (pair_id := current_pair(client)) is not None:
            a_on_left = study.store.shown_layout(user_ids[name], pair_id)
            sides = {"identity": "left" if a_on_left else "right", "prompt": "tie", "overall": "left"}
            assert client.post("/api/votes", json={"pair_id": pair_id, **sides}).status_code == 201
    page = study.client(study.admin).get("/admin")
    assert page.status_code == 200
    assert "alphamethod (A) vs betamethod (B)" in page.text and "alice" in page.text and "100%" in page.text

    results = study.client(study.session_admin).get("/admin/results.json").json()
    [comparison] = results["comparisons"]
    identity = comparison["criteria"]["identity"]
    assert identity["shares"]["win"] == 1.0 and identity["shares"]["win_ci"] == [1.0, 1.0]
    assert identity["agreement"]["percent_agreement"] == 1.0 and identity["agreement"]["n_items"] == 4
    assert comparison["criteria"]["prompt"]["shares"]["tie"] == 1.0

    runner = CliRunner()
    out_json, out_csv = tmp_path / "results.json", tmp_path / "results.csv"
    result = runner.invoke(
        cli_app, ["export", "--db", str(study.db), "--out", str(out_json), "--n-boot", "300"]
    )
    assert result.exit_code == 0, result.output
    exported = json.loads(out_json.read_text())
    assert exported["format"] == "cgrpo-humaneval-results/1"
    assert [a["pairs_done"] for a in exported["annotators"]] == [4, 4]
    assert len(exported["pairs"]) == 4 and all(len(p["votes"]) == 6 for p in exported["pairs"])
    assert all(
        p["preference"]["identity"] == 1.0 and p["preference"]["prompt"] == 0.0 for p in exported["pairs"]
    )
    assert set(exported["pairs"][0]["scores_a"]) == {"dino_seg", "hpsv3"}
    assert runner.invoke(cli_app, ["export", "--db", str(study.db), "--out", str(out_csv)]).exit_code == 0
    rows = list(csv.DictReader(io.StringIO(out_csv.read_text())))
    assert len(rows) == 24  # 2 annotators x 4 pairs x 3 criteria
    assert {r["winner"] for r in rows if r["criterion"] == "identity"} == {"alphamethod"}
    assert {"score_a.dino_seg", "score_b.hpsv3", "a_on_left", "elapsed_ms"} <= set(rows[0])
    bad = runner.invoke(cli_app, ["export", "--db", str(study.db), "--out", str(tmp_path / "r.txt")])
    assert bad.exit_code == 2 and "must end in .json or .csv" in bad.output


def test_cli_invite_prints_a_working_link(study):
    runner = CliRunner()
    result = runner.invoke(
        cli_app, ["invite", "--db", str(study.db), "--name", "carol", "--base-url", "http://h:1"]
    )
    assert result.exit_code == 0, result.output
    link = result.stdout.strip().splitlines()[-1]
    assert link.startswith("http://h:1/a/")
    token = link.rsplit("/", 1)[1]
    assert study.store.authenticate(token).name == "carol"
    assert study.client().get(f"/a/{token}").status_code == 303
    again = runner.invoke(cli_app, ["invite", "--db", str(study.db), "--name", "carol"])
    assert again.exit_code == 2 and "already exists" in again.output
    admin = runner.invoke(cli_app, ["invite", "--db", str(study.db), "--name", "boss", "--admin"])
    assert study.store.authenticate(admin.stdout.strip().rsplit("/", 1)[1]).is_admin


def test_cli_serve_refuses_a_study_without_pairs_or_with_changed_pairs(study, tmp_path):
    runner = CliRunner()
    empty = runner.invoke(cli_app, ["serve", "--db", str(tmp_path / "new.sqlite")])
    assert empty.exit_code == 2 and "has no pairs yet; pass --pairs" in empty.output
    missing = runner.invoke(
        cli_app, ["serve", "--db", str(study.db), "--pairs", str(tmp_path / "nope.jsonl")]
    )
    assert missing.exit_code == 2 and "nope.jsonl does not exist" in missing.output
    record = json.loads(study.pairs_file.read_text().splitlines()[0])
    changed = tmp_path / "changed.jsonl"
    changed.write_text(json.dumps(record | {"prompt": "another prompt"}) + "\n")
    runs = ["--runs", str(tmp_path / "eval_a"), "--runs", str(tmp_path / "eval_b")]
    refused = runner.invoke(cli_app, ["serve", "--db", str(study.db), "--pairs", str(changed), *runs])
    assert refused.exit_code == 2 and "with a different prompt" in refused.output


def test_elapsed_ms_must_be_a_strict_integer(study):
    client = study.client(study.alice)
    pair_id = current_pair(client)
    # JSON true, a float and a numeric string are not a number of milliseconds
    for value in (True, 1500.0, 1500.5, "1500"):
        response = client.post("/api/votes", json={"pair_id": pair_id, **VOTE, "elapsed_ms": value})
        assert response.status_code == 422, value
        assert response.json()["detail"][0]["loc"][-1] == "elapsed_ms"
    assert study.store.votes() == []
    assert client.post("/api/votes", json={"pair_id": pair_id, **VOTE, "elapsed_ms": 1500}).status_code == 201
    assert {vote.elapsed_ms for vote in study.store.votes()} == {1500}


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def test_results_csv_neutralises_spreadsheet_formulas(tmp_path):
    keys = [
        ("@SUM(A1:A9)", '=HYPERLINK("http://evil.example","click")', 0),
        ("-2+3", "+cmd|' /C calc'!A0", 0),
        ("dog", "\tTAB then text", 0),
        ("cat", "\r=1+1", 0),
    ]
    run_a = read_eval_run(write_eval_run(tmp_path / "a", "=1+1", keys, size=8))
    run_b = read_eval_run(write_eval_run(tmp_path / "b", "-uno", keys, size=8))
    pairs = [
        pair.model_copy(update={"scores_a": {"delta": -0.25}, "scores_b": {"delta": 0.5}})
        for pair in make_pairs(run_a, run_b)
    ]
    store = Store(tmp_path / "study.sqlite")
    store.register_pairs(pairs)
    token = store.add_annotator("=cmd()")
    annotator = store.authenticate(token).annotator_id
    for pair in pairs:
        store.layout(annotator, pair.pair_id)
        store.record_votes(annotator, pair.pair_id, {"identity": "left", "prompt": "tie", "overall": "right"})
    admin = store.add_annotator("lead", admin=True)
    admin_client = TestClient(create_app(store, n_boot=100), headers={"authorization": f"Bearer {admin}"})
    served = admin_client.get("/admin/results.csv").text
    exported = tmp_path / "results.csv"
    runner_result = CliRunner().invoke(
        cli_app, ["export", "--db", str(store.path), "--out", str(exported), "--n-boot", "100"]
    )
    assert runner_result.exit_code == 0, runner_result.output
    for text in (served, exported.read_bytes().decode()):  # bytes: keep a quoted \r as it is
        rows = list(csv.DictReader(io.StringIO(text)))
        assert len(rows) == 12
        for row in rows:
            for column, cell in row.items():
                if column.startswith("score_"):
                    float(cell)  # numbers stay numbers (a negative score is not a formula)
                    continue
                assert not cell.startswith(FORMULA_STARTS), (column, cell)
        by_prompt = {row["prompt"]: row for row in rows}
        row = by_prompt["'" + keys[0][1]]  # the original text follows the quote, unchanged
        assert (row["subject"], row["method_a"], row["method_b"]) == ("'" + keys[0][0], "'=1+1", "'-uno")
        assert row["annotator"] == "'=cmd()" and {"'\tTAB then text", "'\r=1+1"} <= set(by_prompt)
        assert {r["winner"] for r in rows} == {"'=1+1", "'-uno", "tie"}
        assert {r["score_a.delta"] for r in rows} == {"-0.25"}


def signed_in_as(client: TestClient) -> str:
    page = client.get("/annotate")
    assert page.status_code == 200, page.text
    return re.search(r"signed in as <strong>(.*?)</strong>", page.text).group(1)


def test_a_link_never_switches_a_signed_in_browser_silently(study):
    browser = study.client()
    assert browser.get(f"/a/{study.alice}").status_code == 303
    alice_cookie = browser.cookies[COOKIE_NAME]
    # bob's token in the query string of a page: no switch, no cookie
    page = browser.get("/annotate", params={"token": study.bob})
    assert "set-cookie" not in page.headers and signed_in_as(browser) == "alice"
    # bob's invitation link: a confirmation page, still no cookie
    question = browser.get(f"/a/{study.bob}")
    assert question.status_code == 200 and "set-cookie" not in question.headers
    assert "Switch to bob?" in question.text and "alice" in question.text
    assert question.headers["cache-control"] == "no-store"
    assert browser.cookies[COOKIE_NAME] == alice_cookie and signed_in_as(browser) == "alice"
    # votes still count for alice
    pair_id = current_pair(browser)
    assert browser.post("/api/votes", json={"pair_id": pair_id, **VOTE}).status_code == 201
    assert {vote.annotator for vote in study.store.votes()} == {"alice"}
    # a forged confirmation (wrong code, or no cookie: a cross-site form) switches nothing
    for forged in ({"confirm": "0" * 64}, {}, {"confirm": "é" * 64}):
        refused = browser.post(f"/a/{study.bob}", data=forged)
        assert refused.status_code == 403 and "set-cookie" not in refused.headers
    cross_site = study.client().post(f"/a/{study.bob}", data={"confirm": "x"})
    assert cross_site.status_code in (401, 403) and "set-cookie" not in cross_site.headers
    empty_form = study.client().post(f"/a/{study.bob}")
    assert empty_form.status_code == 403 and "set-cookie" not in empty_form.headers
    assert signed_in_as(browser) == "alice"
    # the explicit confirmation from the page switches
    confirm = re.search(r'name="confirm" value="([0-9a-f]+)"', question.text).group(1)
    action = re.search(r'<form method="post" action="([^"]+)"', question.text).group(1)
    switched = browser.post(action, data={"confirm": confirm})
    assert switched.status_code == 303 and switched.headers["location"] == "/annotate"
    assert browser.cookies[COOKIE_NAME] == study.bob and signed_in_as(browser) == "bob"
    # the same person's link again, or a browser without a valid cookie: no question asked
    assert browser.get(f"/a/{study.bob}").status_code == 303
    fresh = study.client()
    fresh.cookies.set(COOKIE_NAME, "stale-token")
    assert fresh.get(f"/a/{study.alice}").status_code == 303 and signed_in_as(fresh) == "alice"


def test_a_bearer_request_never_sets_a_cookie(study):
    client = study.client(study.alice)
    for path in ("/", "/annotate", "/api/next"):
        response = client.get(path, params={"token": "garbage"})
        assert response.status_code in (200, 303) and "set-cookie" not in response.headers, path
    admin = study.client(study.admin)
    assert "set-cookie" not in admin.get("/admin", params={"token": "garbage"}).headers


@pytest.fixture
def no_uvicorn(monkeypatch):
    """`serve` runs every check, then hands its app to this stub instead of starting a server."""
    import uvicorn

    started: list[dict[str, object]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: started.append({"app": app, **options}))
    return started


def edit_first_pair(pairs_file: Path, **changes: str) -> Path:
    lines = pairs_file.read_text().splitlines()
    lines[0] = json.dumps(json.loads(lines[0]) | changes)
    pairs_file.write_text("\n".join(lines) + "\n")
    return pairs_file


@pytest.mark.parametrize("kind", ["passwd", "symlink out", "html", "svg", "js", "html named png"])
def test_serve_accepts_only_raster_images_inside_the_runs(tmp_path, no_uvicorn, kind):
    keys = grid_keys(2, 2)
    run_a = write_eval_run(tmp_path / "eval_a", "alphamethod", keys, size=24)
    run_b = write_eval_run(tmp_path / "eval_b", "betamethod", keys, size=24)
    pairs_file = write_pairs(tmp_path / "pairs.jsonl", make_pairs(read_eval_run(run_a), read_eval_run(run_b)))
    outside = tmp_path / "private.png"
    Image.new("RGB", (8, 8)).save(outside)
    planted = {
        "passwd": "/etc/passwd",
        "symlink out": run_b / "images" / "link.png",
        "html": run_b / "images" / "x.html",
        "svg": run_b / "images" / "x.svg",
        "js": run_b / "images" / "x.js",
        "html named png": run_b / "images" / "x.png",
    }[kind]
    if kind == "symlink out":
        planted.symlink_to(outside)
    elif kind != "passwd":
        planted.write_text("<html><script src='/img/x/left'></script></html>")
    edit_first_pair(pairs_file, image_b=str(planted))
    db = tmp_path / "study.sqlite"
    args = ["serve", "--db", str(db), "--pairs", str(pairs_file), "--runs", str(run_a), "--runs", str(run_b)]
    result = CliRunner().invoke(cli_app, args)
    assert result.exit_code == 2, result.output
    assert "pairs.jsonl line 1" in result.output and Path(planted).name in result.output, result.output
    assert no_uvicorn == [] and Store(db).pairs() == []  # nothing registered, nothing served


def test_serve_needs_the_runs_the_images_come_from(study, tmp_path, no_uvicorn):
    result = CliRunner().invoke(
        cli_app, ["serve", "--db", str(tmp_path / "new.sqlite"), "--pairs", str(study.pairs_file)]
    )
    assert result.exit_code == 2 and "--runs" in result.output, result.output
    assert no_uvicorn == []


def test_the_image_route_only_answers_raster_image_types(tmp_path, no_uvicorn):
    # real images whose names say otherwise: served re-encoded, as image/png whatever the name
    keys = grid_keys(1, 3)
    run_a = write_eval_run(tmp_path / "a", "A", keys, size=24)
    run_b = write_eval_run(tmp_path / "b", "B", keys, size=24, tint=(60, 60, 60))
    renamed = {0: "page.html", 1: "logo.svg", 2: "app.js"}
    for number, name in renamed.items():
        (run_b / "images" / f"{number}.png").rename(run_b / "images" / name)
    scores = (run_b / "scores.csv").read_text()
    for number, name in renamed.items():
        scores = scores.replace(f"images/{number}.png", f"images/{name}")
    (run_b / "scores.csv").write_text(scores)
    pairs_file = write_pairs(tmp_path / "pairs.jsonl", make_pairs(read_eval_run(run_a), read_eval_run(run_b)))
    db = tmp_path / "study.sqlite"
    with Store(db) as store:
        token = store.add_annotator("alice")
        admin_token = store.add_annotator("lead", admin=True)
    args = ["serve", "--db", str(db), "--pairs", str(pairs_file), "--runs", str(run_a), "--runs", str(run_b)]
    result = CliRunner().invoke(cli_app, args)
    assert result.exit_code == 0, result.output
    [started] = no_uvicorn
    local = "http://127.0.0.1:8080"  # the app answers only for its own host names
    client = TestClient(started["app"], base_url=local, headers={"authorization": f"Bearer {token}"})
    admin = TestClient(started["app"], base_url=local, headers={"authorization": f"Bearer {admin_token}"})
    served = []
    while (pair_id := current_pair(client)) is not None:
        served += [client.get(f"/img/{pair_id}/{slot}") for slot in ("reference", "left", "right")]
        served += [admin.get(f"/img/{pair_id}/{slot}") for slot in ("a", "b")]
        client.post("/api/votes", json={"pair_id": pair_id, **VOTE})
    assert len(served) == 15
    for response in served:
        assert response.status_code == 200
        assert response.headers["content-type"] in ("image/png", "image/jpeg", "image/webp")
        kind = response.headers["content-type"].split("/")[1].upper()
        with Image.open(io.BytesIO(response.content)) as image:
            assert image.format == kind


def test_a_study_registered_without_images_is_served_only_after_importing_them(tmp_path, no_uvicorn):
    # what an older cgrpo left behind: pairs whose images were never stored in the database
    keys = grid_keys(1, 2)
    run_a = write_eval_run(tmp_path / "a", "A", keys, size=24)
    run_b = write_eval_run(tmp_path / "b", "B", keys, size=24, tint=(60, 60, 60))
    pairs = make_pairs(read_eval_run(run_a), read_eval_run(run_b))
    pairs_file = write_pairs(tmp_path / "pairs.jsonl", pairs)
    db = tmp_path / "study.sqlite"
    with Store(db) as store:
        store.register_pairs(pairs)
    runner = CliRunner()
    refused = runner.invoke(cli_app, ["serve", "--db", str(db)])
    assert refused.exit_code == 2 and "2 pair(s) registered without their images" in refused.output
    assert no_uvicorn == []
    runs = ["--runs", str(run_a), "--runs", str(run_b), "--image-size", "96"]
    imported = runner.invoke(cli_app, ["serve", "--db", str(db), "--pairs", str(pairs_file), *runs])
    assert imported.exit_code == 0, imported.output
    assert "registered 0 new pair(s)" in imported.output and len(no_uvicorn) == 1
    with Store(db) as store:
        assert store.pairs_without_images() == 0 and store.image_size() == 96
        pair = store.pairs()[0]
        with Image.open(io.BytesIO(store.image(pair.image_b_sha))) as image:
            assert image.size == (96, 96)
    # the study's images keep one size: a later import at another size is refused
    other = runner.invoke(
        cli_app, ["serve", "--db", str(db), "--pairs", str(pairs_file), *runs[:4], "--image-size", "128"]
    )
    assert other.exit_code == 2 and "stores its images at 96 px" in other.output


def test_the_cookie_is_secure_when_the_app_is_served_over_https(study, tmp_path, no_uvicorn):
    def cookie_of(client: TestClient) -> str:
        response = client.get(f"/a/{study.alice}")
        assert response.status_code == 303
        return response.headers["set-cookie"]

    assert "secure" not in cookie_of(study.client()).lower()  # plain http on this machine
    # behind a TLS proxy uvicorn takes the scheme from X-Forwarded-Proto: the request says https
    https = TestClient(study.app, base_url="https://testserver", follow_redirects=False)
    assert "; secure" in cookie_of(https).lower()
    flagged = create_app(study.store, secure_cookies=True)
    assert "; secure" in cookie_of(TestClient(flagged, follow_redirects=False)).lower()
    result = CliRunner().invoke(cli_app, ["serve", "--db", str(study.db), "--secure-cookies"])
    assert result.exit_code == 0, result.output
    served = TestClient(no_uvicorn[-1]["app"], base_url="http://127.0.0.1", follow_redirects=False)
    assert "; secure" in cookie_of(served).lower()


def test_serve_answers_only_for_the_allowed_host_names(study, no_uvicorn):
    runner = CliRunner()
    assert runner.invoke(cli_app, ["serve", "--db", str(study.db)]).exit_code == 0
    default = no_uvicorn[-1]["app"]
    for base, status in (
        ("http://127.0.0.1:8080", 401),
        ("http://localhost", 401),
        ("http://evil.example", 400),
    ):
        assert TestClient(default, base_url=base).get("/annotate").status_code == status, base
    # an explicit list replaces the defaults; the host of the base URL (where links point) stays allowed
    args = ["serve", "--db", str(study.db), "--allowed-hosts", "study.example.org,[::1]"]
    assert runner.invoke(cli_app, args).exit_code == 0
    named = no_uvicorn[-1]["app"]
    for base, status in (
        ("https://study.example.org", 401),
        ("http://[::1]:8080", 401),
        ("http://127.0.0.1:8080", 401),
        ("http://localhost", 400),
        ("http://evil.example", 400),
    ):
        assert TestClient(named, base_url=base).get("/annotate").status_code == status, base
