"""Blinding: nothing in an image response tells an annotator which run (method) the image came from.

Two runs are written as real runs are: on different days, by different code, in different formats, sizes
and file names, with different metadata. A script that sees only the annotator's HTTP responses then
tries every rule it can (each header, the decoded format, size, mode and metadata, each compared between
the two sides or with the reference, which comes from run A) to name the method of the left image.
"""

import csv
import io
import os
import random
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image, PngImagePlugin

from cgrpo.humaneval.app import create_app
from cgrpo.humaneval.images import ImagePolicy
from cgrpo.humaneval.pairs import make_pairs, read_eval_run
from cgrpo.humaneval.store import Store
from cgrpo.testing.humaneval import draw_subject, grid_keys

N_PAIRS = 24
SERVED_SIZE = 128
DAY_A = datetime(2024, 1, 10, 9, 30, tzinfo=UTC).timestamp()
DAY_B = datetime(2024, 3, 2, 17, 5, tzinfo=UTC).timestamp()


def scene(seed: int, size: int) -> Image.Image:
    """A distinct picture per seed: a subject on a coloured, noisy background."""
    rng = random.Random(seed)
    background = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
    picture = draw_subject(size, seed % 3, background, scale=rng.uniform(0.3, 0.8))
    noise = Image.effect_noise((size, size), rng.uniform(5, 60)).convert("RGB")
    return Image.blend(picture, noise, 0.2)


def save_alpha_style(image: Image.Image, path: Path) -> None:
    """Method A's sampler: JPEG with EXIF."""
    exif = Image.Exif()
    exif[0x0131] = "alpha-sampler 1.0"  # Software
    exif[0x0132] = "2024:01:10 09:30:00"  # DateTime
    image.save(path, format="JPEG", quality=92, exif=exif.tobytes())


def save_beta_style(image: Image.Image, path: Path) -> None:
    """Method B's sampler: RGBA PNG with its generation parameters in a text chunk."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "beta sampler, 28 steps")
    image.convert("RGBA").save(path, format="PNG", pnginfo=info, dpi=(300, 300))


def write_run(directory: Path, method: str, rows: list[dict], day: float) -> Path:
    """scores.csv + summary.json for ``rows`` (image files already written); every file dated ``day``."""
    with open(directory / "scores.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["subject", "prompt", "seed", "image", "reference"])
        writer.writeheader()
        writer.writerows(rows)
    (directory / "summary.json").write_text(f'{{"method": "{method}"}}')
    for path in directory.rglob("*"):
        os.utime(path, (day, day))
    return directory


def annotate_everything(store: Store, policy: ImagePolicy, run_a: Path, run_b: Path) -> tuple[list, int]:
    """Create the study, then return what an annotator's browser receives for every pair (the three image
    responses; a vote after each) and the annotator's id."""
    store.register_pairs(make_pairs(read_eval_run(run_a), read_eval_run(run_b)), images=policy)
    token = store.add_annotator("alice")
    seen = []
    # one client for all requests: one event loop and thread pool, so one database connection per thread
    with TestClient(create_app(store, n_boot=100), headers={"authorization": f"Bearer {token}"}) as client:
        while (pair_id := client.get("/api/next").json()["pair_id"]) is not None:
            responses = {
                slot: client.get(f"/img/{pair_id}/{slot}") for slot in ("reference", "left", "right")
            }
            assert all(response.status_code == 200 for response in responses.values())
            seen.append({"pair_id": pair_id, **responses})
            vote = {"pair_id": pair_id, "identity": "tie", "prompt": "tie", "overall": "tie"}
            assert client.post("/api/votes", json=vote).status_code == 201
    return seen, store.authenticate(token).annotator_id


def observations(response) -> dict[str, object]:
    """Everything about one image response except its pixels."""
    seen: dict[str, object] = {f"header {name}": value for name, value in response.headers.items()}
    # The byte count measures the pixels, which annotators are meant to judge (the PNG bytes depend on the
    # pixels alone: test_identical_pixels_get_identical_responses); every other header is fair game.
    seen.pop("header content-length")
    with Image.open(io.BytesIO(response.content)) as image:
        seen |= {
            "format": image.format,
            "size": image.size,
            "mode": image.mode,
            "metadata": sorted(image.info),
            "exif": image.getexif().tobytes(),
        }
    return seen


def order_key(value: object) -> object:
    if isinstance(value, str):
        try:
            return parsedate_to_datetime(value).timestamp()  # Last-Modified and other HTTP dates
        except (TypeError, ValueError):
            return value
    return value if isinstance(value, int | float | tuple) else repr(value)


def identification_rates(seen: list[dict], a_on_left: dict[str, bool]) -> dict[str, float]:
    """For every rule, the share of pairs whose left method it names correctly (0.5 for a tie: a guess),
    taking the better of the rule and its opposite, as a script free to learn the direction would."""
    rules: dict[str, list[float]] = {}
    for item in seen:
        left, right, reference = (observations(item[slot]) for slot in ("left", "right", "reference"))
        truth = a_on_left[item["pair_id"]]
        for feature in sorted(set(left) | set(right)):
            lv, rv, ref = left.get(feature), right.get(feature), reference.get(feature)
            # "left is A when its value is the smaller", e.g. the older Last-Modified
            lk, rk = order_key(lv), order_key(rv)
            guess = None if lv == rv else (lk < rk if type(lk) is type(rk) else str(lk) < str(rk))
            rules.setdefault(f"{feature}: order", []).append(0.5 if guess is None else float(guess == truth))
            # "A is the side like the reference" (the reference image comes from run A)
            like = None if (lv == ref) == (rv == ref) else lv == ref
            rules.setdefault(f"{feature}: like reference", []).append(
                0.5 if like is None else float(like == truth)
            )
    return {rule: max(sum(hits) / len(hits), 1 - sum(hits) / len(hits)) for rule, hits in rules.items()}


def test_the_method_cannot_be_told_from_image_responses(tmp_path):
    keys = grid_keys(3, N_PAIRS // 3)
    run_a, run_b = tmp_path / "runs" / "alpha", tmp_path / "elsewhere" / "beta_eval"
    rows_a, rows_b = [], []
    rng = random.Random(0)
    for run in (run_a, run_b):
        (run / "images").mkdir(parents=True)
        (run / "refs").mkdir()
    for subject in range(3):
        scene(1000 + subject, 80).save(run_a / "refs" / f"{subject}.webp", quality=90)
        scene(1000 + subject, 80).save(run_b / "refs" / f"s{subject}.png")
    for number, (subject, prompt, seed) in enumerate(keys):
        index = int(subject.removeprefix("subject"))
        first, second = 2 * number, 2 * number + 1
        if rng.random() < 0.5:  # which picture each method "made" is random: pixels carry no method
            first, second = second, first
        save_alpha_style(scene(first, 96), run_a / "images" / f"alpha-{number:04d}.jpg")
        save_beta_style(scene(second, 64), run_b / "images" / f"{number}.png")
        common = {"subject": subject, "prompt": prompt, "seed": seed}
        rows_a.append(common | {"image": f"images/alpha-{number:04d}.jpg", "reference": f"refs/{index}.webp"})
        rows_b.append(common | {"image": f"images/{number}.png", "reference": f"refs/s{index}.png"})
    write_run(run_a, "alphamethod", rows_a, DAY_A)
    write_run(run_b, "betamethod", rows_b, DAY_B)

    with Store(tmp_path / "study.sqlite") as store:
        policy = ImagePolicy(roots=(run_a, run_b), size=SERVED_SIZE)
        seen, annotator = annotate_everything(store, policy, run_a, run_b)
        a_on_left = {item["pair_id"]: store.shown_layout(annotator, item["pair_id"]) for item in seen}
    assert len(seen) == N_PAIRS
    assert 0 < sum(a_on_left.values()) < N_PAIRS  # both layouts occur (2^-23 otherwise)

    rates = identification_rates(seen, a_on_left)
    best = max(rates, key=rates.get)
    print(
        f"\nbest of {len(rates)} rules names the left method on {rates[best]:.0%} of {N_PAIRS} pairs ({best})"
    )
    assert rates[best] <= 0.6, {rule: rate for rule, rate in rates.items() if rate > 0.6}
    # and what makes that so: one format and size, no file metadata, nothing cacheable
    for item in seen:
        for slot in ("reference", "left", "right"):
            response = item[slot]
            assert response.headers["content-type"] == "image/png"
            assert response.headers["cache-control"] == "no-store"
            assert "last-modified" not in response.headers and "etag" not in response.headers
            with Image.open(io.BytesIO(response.content)) as image:
                assert (image.format, image.size, image.mode) == ("PNG", (SERVED_SIZE, SERVED_SIZE), "RGB")
                assert image.info == {} and not image.getexif()


@pytest.mark.parametrize("served_size", [64, SERVED_SIZE])
def test_identical_pixels_get_identical_responses(tmp_path, served_size):
    """The same pixels written by the two runs in different formats, names, metadata and days: left and
    right then answer byte for byte and header for header the same, so nothing but pixels can differ."""
    keys = grid_keys(2, 10)
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    rows_a, rows_b = [], []
    for run in (run_a, run_b):
        (run / "images").mkdir(parents=True)
    scene(7, 64).save(run_a / "ref.png")
    scene(7, 64).save(run_b / "ref.jpg")
    for number, (subject, prompt, seed) in enumerate(keys):
        picture = scene(number, 64)
        save_beta_style(picture, run_a / "images" / f"a-{number}.png")
        exif = Image.Exif()
        exif[0x0131] = "alpha-sampler 1.0"
        picture.save(run_b / "images" / f"{number:03d}.webp", lossless=True, exact=True, exif=exif.tobytes())
        common = {"subject": subject, "prompt": prompt, "seed": seed}
        rows_a.append(common | {"image": f"images/a-{number}.png", "reference": str(run_a / "ref.png")})
        rows_b.append(common | {"image": f"images/{number:03d}.webp", "reference": "ref.jpg"})
    write_run(run_a, "A", rows_a, DAY_A)
    write_run(run_b, "B", rows_b, DAY_B)
    with Store(tmp_path / "study.sqlite") as store:
        policy = ImagePolicy(roots=(run_a, run_b), size=served_size)
        seen, _ = annotate_everything(store, policy, run_a, run_b)
    assert len(seen) == 20
    for item in seen:
        left, right = item["left"], item["right"]
        assert left.content == right.content
        assert dict(left.headers) == dict(right.headers)
