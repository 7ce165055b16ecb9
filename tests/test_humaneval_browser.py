"""End to end in a real headless Chromium: invite link -> keyboard votes -> rows in the database.

Uses Debian's chromium (never a downloaded browser); skipped with a reason when it is missing.
"""

import os
import shutil
import sqlite3
import time
from pathlib import Path

import pytest

from cgrpo.humaneval.pairs import make_pairs, read_eval_run, write_pairs
from cgrpo.humaneval.store import Store, side_to_choice
from cgrpo.testing.humaneval import grid_keys, serve_in_subprocess, write_eval_run

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Keys pressed on each pair in the order shown; 1/q/a mean left better, 2/w/s tie, 3/e/d right better.
KEYS = [("1", "w", "d"), ("3", "q", "s"), ("2", "e", "a")]
SIDE_OF_KEY = {"1": "left", "2": "tie", "3": "right", "q": "left", "w": "tie", "e": "right"}
SIDE_OF_KEY |= {"a": "left", "s": "tie", "d": "right"}

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (make browser-deps)"
    ),
]


def test_annotator_votes_with_the_keyboard_in_chromium(tmp_path: Path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright python package")
    keys = grid_keys(3, 1)  # 3 pairs, one per subject
    run_a = read_eval_run(write_eval_run(tmp_path / "eval_a", "customized-grpo", keys, size=192))
    run_b = read_eval_run(
        write_eval_run(tmp_path / "eval_b", "uno", keys, size=192, tint=(150, 190, 230), scale=0.35)
    )
    pairs_file = write_pairs(tmp_path / "pairs.jsonl", make_pairs(run_a, run_b))
    db = tmp_path / "study.sqlite"
    with Store(db) as store:
        token = store.add_annotator("alice")

    shown: list[str] = []
    console_errors: list[str] = []
    runs = [tmp_path / "eval_a", tmp_path / "eval_b"]
    with serve_in_subprocess(db, pairs_file, runs=runs) as server, sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on(
                "console", lambda message: message.type == "error" and console_errors.append(message.text)
            )
            page.goto(f"{server.base_url}/a/{token}")
            assert page.url == f"{server.base_url}/annotate"
            for number, (identity, prompt, overall) in enumerate(KEYS, start=1):
                sync_api.expect(page.locator("#progress")).to_have_text(f"Pair {number} of 3")
                pair_id = page.locator("#vote-form").get_attribute("data-pair-id")
                shown.append(pair_id)
                # all three images really loaded (served through the token-checked image route)
                # Polled from Python: wait_for_function re-evaluates its predicate with eval() inside the
                # page, which the app's Content-Security-Policy (rightly) forbids; page.evaluate goes
                # through the DevTools protocol instead.
                deadline = time.monotonic() + 15
                while not page.evaluate(
                    "Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)"
                ):
                    assert time.monotonic() < deadline, "the pair's images did not load"
                    page.wait_for_timeout(50)
                assert page.locator("#submit").is_disabled()
                for key in (identity, prompt, overall):
                    page.keyboard.press(key)
                assert page.locator("#submit").is_enabled()
                if number == 1:
                    page.reload()  # a reload shows the same pair; the unsent choices are gone
                    assert page.locator("#vote-form").get_attribute("data-pair-id") == pair_id
                    assert page.locator("#submit").is_disabled()
                    for key in (identity, prompt, overall):
                        page.keyboard.press(key)
                    save_screenshot(page, tmp_path, "humaneval_annotate.png")
                page.keyboard.press("Enter")
            sync_api.expect(page.locator("#done h1")).to_have_text("All 3 pairs judged")
            page.keyboard.press("Enter")  # nothing left to submit: no extra vote
            # the admin link printed by `serve` opens the results page in the same browser, after the
            # browser, signed in as alice, has been asked to confirm the switch
            assert server.admin_link and server.admin_link.startswith(f"{server.base_url}/a/")
            page.goto(server.admin_link)
            sync_api.expect(page.locator("#switch h1")).to_have_text("Switch to admin (this server session)?")
            page.click("#switch-confirm")
            page.wait_for_url(f"{server.base_url}/admin")
            sync_api.expect(page.locator("h2").first).to_have_text("customized-grpo (A) vs uno (B) — 3 pairs")
            sync_api.expect(page.locator("table.annotators")).to_contain_text("alice")
            save_screenshot(page, tmp_path, "humaneval_admin.png")
        finally:
            browser.close()

    assert not console_errors, console_errors  # e.g. a Content-Security-Policy violation
    assert len(set(shown)) == 3
    with sqlite3.connect(db) as conn:
        layouts = dict(conn.execute("SELECT pair_id, a_on_left FROM layouts"))
        rows = conn.execute("SELECT pair_id, criterion, choice, elapsed_ms FROM votes").fetchall()
    assert len(rows) == 9
    stored = {(pair_id, criterion): choice for pair_id, criterion, choice, _ in rows}
    for pair_id, pressed in zip(shown, KEYS, strict=True):
        for criterion, key in zip(("identity", "prompt", "overall"), pressed, strict=True):
            assert stored[(pair_id, criterion)] == side_to_choice(SIDE_OF_KEY[key], bool(layouts[pair_id]))
    assert all(elapsed is not None and elapsed > 0 for *_, elapsed in rows)


def save_screenshot(page, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 5_000
    target = os.environ.get("CGRPO_SCREENSHOT_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / path.name)
