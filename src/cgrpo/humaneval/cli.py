"""``cgrpo humaneval``: build pairs from two evaluation runs, serve the study, invite, export."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

app = typer.Typer(
    help="Pairwise A/B human evaluation (the paper's Fig. 5 study): pairs, web app, invites, results.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
# soft_wrap: long paths and links stay on one line to be copied; markup=False: a "[" in a path is literal
console = Console(soft_wrap=True, highlight=False, markup=False)
err_console = Console(stderr=True, soft_wrap=True, highlight=False, markup=False)

# Where `invite` points before any `serve` has recorded its address in the study.
DEFAULT_BASE_URL = "http://127.0.0.1:8080"
DbOption = Annotated[Path, typer.Option("--db", help="The study's SQLite database (created if missing).")]
ReferencesOption = Annotated[
    list[Path],
    typer.Option(
        "--references",
        help="A folder the reference images may come from besides the runs (e.g. the DreamBench dataset); "
        "repeatable.",
    ),
]


def _fail(message: str) -> None:
    err_console.print(Text.assemble(("error: ", "bold red"), message))
    raise typer.Exit(code=2)


def _require_extra() -> None:
    """The web stack is an optional extra; say how to get it instead of showing an ImportError."""
    import importlib.util

    for module in ("fastapi", "pydantic", "uvicorn", "jinja2"):
        if importlib.util.find_spec(module) is None:
            _fail(f"`cgrpo humaneval` needs {module}: pip install 'customized-grpo[humaneval]'.")


def _open_store(db: Path):
    from cgrpo.humaneval.store import Store, StoreError

    try:
        return Store(db)
    except StoreError as error:
        _fail(str(error))


@app.command("make-pairs")
def make_pairs_command(
    run_a: Annotated[Path, typer.Argument(help="Evaluation output dir of method A (holds scores.csv).")],
    run_b: Annotated[Path, typer.Argument(help="Evaluation output dir of method B.")],
    out: Annotated[Path, typer.Option("--out", help="pairs.jsonl to write.")] = Path("pairs.jsonl"),
    max_pairs: Annotated[int | None, typer.Option(min=1, help="Keep a random subset of this size.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random subset.")] = 0,
    references: ReferencesOption = None,
) -> None:
    """Pair the images of two evaluation runs by (subject, prompt, seed); every image is checked."""
    _require_extra()
    from cgrpo.humaneval.images import ImagePolicy
    from cgrpo.humaneval.pairs import PairsError, check_pair_images, make_pairs, read_eval_run, write_pairs

    reference_roots = tuple(references or ())
    try:
        first = read_eval_run(run_a, reference_roots=reference_roots)
        second = read_eval_run(run_b, reference_roots=reference_roots)
        pairs = make_pairs(first, second, max_pairs=max_pairs, seed=seed)
        roots = (first.directory, second.directory, *reference_roots)
        check_pair_images(first, second, pairs, ImagePolicy(roots=roots))
    except PairsError as error:
        _fail(str(error))
    write_pairs(out, pairs)
    console.print(f"wrote {len(pairs)} pairs ({first.method} vs {second.method}) to {out}")
    for run, other in ((first, second), (second, first)):
        unmatched = len(run.rows.keys() - other.rows.keys())
        if unmatched:
            console.print(f"note: {unmatched} image(s) of {run.method} have no counterpart")


@app.command()
def invite(
    db: DbOption,
    name: Annotated[str, typer.Option("--name", help="Annotator name (unique in the study).")],
    admin: Annotated[
        bool, typer.Option("--admin", help="Create an admin link (results page) instead.")
    ] = False,
    rotate: Annotated[bool, typer.Option("--rotate", help="Replace the link of an existing name.")] = False,
    base_url: Annotated[
        str | None,
        typer.Option(help="Where the server is reached; default: where `serve` last ran for this study."),
    ] = None,
) -> None:
    """Create an annotator (or admin) and print the private link; only a hash of it is stored."""
    _require_extra()
    from cgrpo.humaneval.store import StoreError

    store = _open_store(db)
    try:
        token = store.add_annotator(name, admin=admin, rotate=rotate)
    except StoreError as error:
        _fail(str(error))
    if store.created:
        err_console.print(f"created a new study database {db}")
    if base_url is None:
        base_url = store.get_meta("base_url")  # recorded by `serve`
    if base_url is None:
        base_url = DEFAULT_BASE_URL
        err_console.print(
            f"note: no server has run for {db} yet; the link assumes {base_url} (see --base-url)"
        )
    # Printed alone on stdout so that scripts can capture it.
    print(f"{base_url.rstrip('/')}/a/{token}")


def _url_host(host: str) -> str:
    """``host`` as it appears in a URL or a Host header: IPv6 literals in brackets."""
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host


def _default_base_url(host: str, port: int) -> str:
    try:
        wildcard = ipaddress.ip_address(host).is_unspecified  # 0.0.0.0 or ::, every interface
    except ValueError:
        wildcard = False
    return f"http://{socket.gethostname() if wildcard else _url_host(host)}:{port}"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@app.command()
def serve(
    db: DbOption,
    pairs: Annotated[
        Path | None, typer.Option("--pairs", help="pairs.jsonl to register (needed the first time).")
    ] = None,
    host: Annotated[
        str, typer.Option(help="Interface to bind; the default is this machine only.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8080,
    runs: Annotated[
        list[Path],
        typer.Option(
            "--runs",
            help="An eval run the pairs' images come from (repeat for both runs); needed with --pairs. "
            "Images elsewhere, symlinks out included, are refused.",
        ),
    ] = None,
    references: ReferencesOption = None,
    image_size: Annotated[
        int | None,
        typer.Option(
            min=64, max=2048, help="Every image is served as a PNG of this many pixels square (default 512)."
        ),
    ] = None,
    base_url: Annotated[
        str | None,
        typer.Option(
            help="The URL annotators open (e.g. https://study.example.org behind a TLS proxy); recorded in "
            "the study for `invite`. Default: http://HOST:PORT."
        ),
    ] = None,
    allowed_hosts: Annotated[
        list[str],
        typer.Option(
            "--allowed-hosts",
            help="Host names the server answers for (comma-separated or repeated); default: the bind "
            "address, localhost, 127.0.0.1 and [::1]. The host of --base-url is always allowed.",
        ),
    ] = None,
    secure_cookies: Annotated[
        bool,
        typer.Option(
            "--secure-cookies",
            help="Mark the sign-in cookie Secure (HTTPS only). On by default for an https --base-url; a "
            "request forwarded as https by a local proxy gets it anyway.",
        ),
    ] = False,
    n_boot: Annotated[int, typer.Option(min=100, help="Bootstrap resamples for the admin page.")] = 2000,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "warning",
) -> None:
    """Serve the study; prints an admin link valid while this server runs."""
    _require_extra()
    import uvicorn

    from cgrpo.humaneval.app import create_app
    from cgrpo.humaneval.store import new_token

    store = _open_store(db)
    if pairs is not None:
        _register(store, pairs, tuple(runs or ()), tuple(references or ()), image_size)
    registered = store.pairs()
    if not registered:
        _fail(f"{db} has no pairs yet; pass --pairs pairs.jsonl (from `cgrpo humaneval make-pairs`).")
    missing = store.pairs_without_images()
    if missing:
        _fail(
            f"{db} has {missing} pair(s) registered without their images (by an older cgrpo); import them "
            "with --pairs pairs.jsonl --runs RUN_A --runs RUN_B."
        )
    if not _is_loopback(host):
        err_console.print(
            Text.assemble(("warning: ", "yellow"), f"binding {host} exposes the study beyond this machine.")
        )
    session_admin = new_token()
    base = (base_url or _default_base_url(host, port)).rstrip("/")
    if urlsplit(base).scheme not in ("http", "https") or not urlsplit(base).hostname:
        _fail(f"--base-url {base} must be an http:// or https:// URL with a host name.")
    store.set_meta("base_url", base)  # so that `cgrpo humaneval invite` prints links to this server
    hosts = [name.strip() for entry in (allowed_hosts or []) for name in entry.split(",") if name.strip()]
    if not hosts:
        hosts = [_url_host(host), "localhost", "127.0.0.1", "[::1]"]
    hosts.append(_url_host(urlsplit(base).hostname))
    secure = secure_cookies or base.startswith("https://")
    n_annotators = len(store.annotators())
    console.print(f"study {db}: {len(registered)} pairs, {n_annotators} annotator(s)")
    console.print(f"admin (valid while this server runs): {base}/a/{session_admin}")
    if n_annotators == 0:
        console.print("invite annotators with: cgrpo humaneval invite --db DB --name NAME")
    uvicorn.run(
        create_app(
            store,
            session_admin_token=session_admin,
            n_boot=n_boot,
            secure_cookies=secure,
            allowed_hosts=sorted(set(hosts)),
        ),
        host=host,
        port=port,
        log_level=log_level,
        log_config=_log_config(),
        timeout_graceful_shutdown=5,
    )


def _register(store, pairs: Path, runs: tuple[Path, ...], references: tuple[Path, ...], size: int | None):
    """Check every image of ``pairs`` (inside ``runs``, a raster image), re-encode it into the study, or fail.

    All or nothing: one bad image anywhere leaves the study database as it was.
    """
    from cgrpo.humaneval.images import DEFAULT_IMAGE_SIZE, ImageError, ImagePolicy, resolve_inside
    from cgrpo.humaneval.pairs import PairsError, read_numbered_pairs
    from cgrpo.humaneval.store import StoreError

    try:
        numbered = read_numbered_pairs(pairs)
    except PairsError as error:
        _fail(str(error))
    if not runs:
        _fail(f"--pairs {pairs} needs --runs RUN_A --runs RUN_B: the eval runs its images may come from.")
    line_of: dict[str, int] = {}
    for line, pair in numbered:
        for path, roots in ((pair.image_a, runs), (pair.image_b, runs), (pair.reference, runs + references)):
            line_of.setdefault(path, line)
            try:
                resolve_inside(path, roots)
            except ImageError as error:
                _fail(f"{pairs} line {line}: {error}")
    policy = ImagePolicy(roots=runs + references, size=size or store.image_size() or DEFAULT_IMAGE_SIZE)
    try:
        added = store.register_pairs([pair for _, pair in numbered], images=policy)
    except ImageError as error:
        _fail(f"{pairs} line {line_of.get(error.path, '?')}: {error}")
    except StoreError as error:
        _fail(str(error))
    console.print(f"registered {added} new pair(s) from {pairs}; images served at {policy.size} px")


def _log_config() -> dict:
    """uvicorn's own logging setup with a filter that redacts tokens from every line (access log too)."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["redact_tokens"] = {"()": "cgrpo.humaneval.app.RedactTokensFilter"}
    for handler in config["handlers"].values():
        handler.setdefault("filters", []).append("redact_tokens")
    return config


@app.command()
def export(
    db: DbOption,
    out: Annotated[
        Path, typer.Option("--out", help="results.json (summary + per-pair votes) or results.csv.")
    ],
    n_boot: Annotated[int, typer.Option(min=100, help="Bootstrap resamples.")] = 2000,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
) -> None:
    """Write win/tie/loss shares with bootstrap CIs, agreement and per-pair votes."""
    _require_extra()
    from cgrpo.humaneval.export import build_results, write_results

    if out.suffix.lower() not in (".json", ".csv"):
        _fail(f"--out {out} must end in .json or .csv.")
    if not db.is_file():
        _fail(f"study database {db} does not exist.")
    results = build_results(_open_store(db), n_boot=n_boot, seed=seed)
    write_results(results, out)
    for comparison in results["comparisons"]:
        table = Table(title=f"{comparison['method_a']} (A) vs {comparison['method_b']} (B)")
        for column in ("criterion", "votes", "A wins", "tie", "B wins", "agreement", "Fleiss κ", "Kripp. α"):
            table.add_column(column)
        for criterion, entry in comparison["criteria"].items():
            shares, agree = entry["shares"], entry["agreement"]
            table.add_row(
                criterion,
                str(shares["n_votes"]),
                *(_share(shares[name], shares[f"{name}_ci"]) for name in ("win", "tie", "loss")),
                _number(agree["percent_agreement"], percent=True),
                _number(agree["fleiss_kappa"]),
                _number(agree["krippendorff_alpha"]),
            )
        console.print(table)
    console.print(f"wrote {out}")


def _share(value: float | None, interval: list[float] | None) -> str:
    if value is None or interval is None:
        return "–"
    return f"{100 * value:.0f}% [{100 * interval[0]:.0f}, {100 * interval[1]:.0f}]"


def _number(value: float | None, *, percent: bool = False) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.0f}%" if percent else f"{value:.2f}"


if __name__ == "__main__":
    app()
