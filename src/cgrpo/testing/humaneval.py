"""Helpers for tests and demos: fake evaluation runs with PIL images, and a real server in a subprocess."""

from __future__ import annotations

import csv
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = ("ellipse", "rectangle", "triangle")


def draw_subject(
    size: int, subject_index: int, background: tuple[int, int, int], scale: float = 0.6
) -> Image.Image:
    """A coloured shape (the 'subject') on a background; distinct per subject index."""
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    colour = (
        (70 * subject_index + 200) % 256,
        (130 * subject_index + 60) % 256,
        (50 * subject_index + 120) % 256,
    )
    half = size * scale / 2
    box = (size / 2 - half, size / 2 - half, size / 2 + half, size / 2 + half)
    shape = SHAPES[subject_index % len(SHAPES)]
    if shape == "ellipse":
        draw.ellipse(box, fill=colour, outline=(0, 0, 0), width=2)
    elif shape == "rectangle":
        draw.rectangle(box, fill=colour, outline=(0, 0, 0), width=2)
    else:
        draw.polygon([(box[0], box[3]), (box[2], box[3]), (size / 2, box[1])], fill=colour, outline=(0, 0, 0))
    return image


def write_eval_run(
    directory: Path,
    method: str | None,
    keys: list[tuple[str, str, int]],
    *,
    size: int = 64,
    tint: tuple[int, int, int] = (235, 235, 235),
    scale: float = 0.6,
) -> Path:
    """Write ``scores.csv`` (+ ``summary.json`` when ``method`` is given) and one PNG per row.

    Every image differs (background depends on prompt and seed), so a test can tell files apart by bytes.
    """
    directory.mkdir(parents=True, exist_ok=True)
    subjects = sorted({subject for subject, _, _ in keys})
    prompts = sorted({prompt for _, prompt, _ in keys})
    (directory / "refs").mkdir(exist_ok=True)
    (directory / "images").mkdir(exist_ok=True)
    for index in range(len(subjects)):
        draw_subject(size, index, (255, 255, 255)).save(directory / "refs" / f"{index}.png")
    rows = []
    for number, (subject, prompt, seed) in enumerate(keys):
        subject_index, prompt_index = subjects.index(subject), prompts.index(prompt)
        background = (
            (tint[0] + 37 * prompt_index) % 256,
            (tint[1] + 11 * seed) % 256,
            (tint[2] + 23 * prompt_index + 5 * seed) % 256,
        )
        image_path = Path("images") / f"{number}.png"
        draw_subject(size, subject_index, background, scale).save(directory / image_path)
        rows.append(
            {
                "subject": subject,
                "prompt": prompt,
                "seed": seed,
                "image": str(image_path),
                # absolute on purpose: scores.csv may hold both kinds of path
                "reference": str((directory / "refs" / f"{subject_index}.png").resolve()),
                "dino_seg": round(0.5 + 0.01 * ((number * 7) % 40), 4),
                "hpsv3": round(6.0 + 0.1 * ((number * 3) % 25), 4),
                "note": "free text is not a score",
            }
        )
    with open(directory / "scores.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if method is not None:
        (directory / "summary.json").write_text(json.dumps({"method": method}))
    return directory


def grid_keys(n_subjects: int, n_prompts: int, seeds: tuple[int, ...] = (0,)) -> list[tuple[str, str, int]]:
    """(subject, prompt, seed) keys of a small benchmark; prompts mention their subject."""
    return [
        (f"subject{s}", f"a photo of subject{s} in scene {p}", seed)
        for s in range(n_subjects)
        for p in range(n_prompts)
        for seed in seeds
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServerProcess:
    process: subprocess.Popen
    base_url: str
    admin_link: str | None
    output: list[str] = field(default_factory=list)

    def kill(self) -> None:
        """SIGKILL: a crash, not a clean shutdown (tests that acknowledged votes survive it)."""
        self.process.kill()
        self.process.wait(timeout=10)


@contextmanager
def serve_in_subprocess(
    db: Path,
    pairs: Path | None = None,
    *,
    runs: Sequence[Path] = (),
    extra_args: Sequence[str] = (),
    startup_timeout_s: float = 30.0,
) -> Iterator[ServerProcess]:
    """Run ``python -m cgrpo.humaneval serve`` on a free loopback port until the block exits.

    ``runs``: the eval runs the images of ``pairs`` come from (``--runs``).
    """
    import httpx

    port = free_port()
    command = [sys.executable, "-m", "cgrpo.humaneval", "serve", "--db", str(db), "--port", str(port)]
    if pairs is not None:
        command += ["--pairs", str(pairs)]
    for run in runs:
        command += ["--runs", str(run)]
    command += list(extra_args)
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(iter(process.stdout.readline, "")), daemon=True)
    reader.start()
    server = ServerProcess(
        process=process, base_url=f"http://127.0.0.1:{port}", admin_link=None, output=output
    )
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if process.poll() is not None:
                reader.join(timeout=2)
                raise RuntimeError(f"server exited with {process.returncode}:\n{''.join(output)}")
            try:
                httpx.get(server.base_url + "/", timeout=1.0)
                break  # any answer (401 without a token) means it is listening
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"server did not start in {startup_timeout_s} s:\n{''.join(output)}"
                    ) from None
                time.sleep(0.1)
        found = re.search(r"admin \(valid while this server runs\): (\S+)", "".join(output))
        server.admin_link = found.group(1) if found else None
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        reader.join(timeout=2)
