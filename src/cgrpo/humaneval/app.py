"""The FastAPI app of a pairwise study: annotation pages, the vote API, images and the admin page.

Routes (every one except ``/static`` needs a token; ``/static`` holds only the page's CSS and JS):

- ``GET /a/{token}``: the invite link, the only way a browser signs in: sets an HttpOnly cookie and
  redirects to ``/annotate`` (or ``/admin``). A browser already signed in as someone else gets a
  confirmation page instead, whose form (``POST /a/{token}``) switches. Scripts send the token as
  ``Authorization: Bearer ...``, which never sets a cookie; a ``?token=`` query is ignored.
- ``GET /annotate``: the current pair (reference, prompt, two images, three criteria, key legend).
- ``GET /api/next``: the same as JSON. ``POST /api/votes``: one judgement of a pair on every criterion,
  given as left/tie/right; stored as method A/B. 201 on success, 409 for a second vote.
- ``GET /img/{pair_id}/{slot}``: slot ``reference``, ``left`` or ``right`` (annotators, only for pairs
  shown to them) or ``a``/``b`` (admins). Always ``image/png``: the bytes stored in the study database
  when its pairs were registered (``images``), never a file named by a path.
- ``GET /admin``, ``/admin/results.json``, ``/admin/results.csv``: results (admins only).
"""

import hmac
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import parse_qs

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cgrpo.humaneval.export import build_results, results_to_csv
from cgrpo.humaneval.images import SERVED_MEDIA_TYPE
from cgrpo.humaneval.pairs import PAIR_ID_PATTERN
from cgrpo.humaneval.store import (
    CRITERIA,
    CRITERION_LABELS,
    DuplicateVote,
    PairNotShown,
    Principal,
    Side,
    Store,
    UnknownPair,
    hash_token,
)

PACKAGE_DIR = Path(__file__).parent
# A vote is about 150 bytes; nothing this app accepts comes near 4 KiB.
MAX_BODY_BYTES = 4096
COOKIE_NAME = "cgrpo_humaneval_token"
COOKIE_MAX_AGE_S = 30 * 24 * 3600
# Keys per criterion in the order left / tie / right; the page shows them as a legend.
SHORTCUTS: dict[str, tuple[str, str, str]] = {
    "identity": ("1", "2", "3"),
    "prompt": ("q", "w", "e"),
    "overall": ("a", "s", "d"),
}
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; img-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",  # the invite token must never leak through a Referer header
    "x-frame-options": "DENY",
}


class VoteIn(BaseModel):
    """One submission: the annotator's judgement of one pair on every criterion, as clicked."""

    model_config = ConfigDict(extra="forbid")

    pair_id: str = Field(pattern=PAIR_ID_PATTERN)
    identity: Side
    prompt: Side
    overall: Side
    # strict: JSON true, 1.0 or "1500" are not milliseconds (lax mode would store true as 1)
    elapsed_ms: int | None = Field(default=None, ge=0, le=24 * 3600 * 1000, strict=True)


class SecurityHeadersMiddleware:
    """Adds the security headers to every response (plain ASGI: no per-request task overhead)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)


class BodyGuardMiddleware:
    """Refuses a request body before the app reads any of it: over ``max_bytes`` or without a valid token.

    FastAPI reads (and buffers) the whole body before it runs the dependencies that check the token, so a
    token-less 256 MiB POST used to be held in memory. Here a body is refused with 413 when its declared
    length is over the limit, with 401 before that when the request carries no valid token (both on the
    head alone), and with 413 as soon as the bytes actually streamed (chunked) pass the limit. Refusals carry
    ``Connection: close`` so that the server stops reading the rest. An accepted body, at most
    ``max_bytes``, is replayed to the app, with the caller stored in ``scope["state"]["principal"]``.
    """

    def __init__(
        self, app: ASGIApp, *, authenticate: Callable[[str | None], Principal | None], max_bytes: int
    ) -> None:
        self.app = app
        self.authenticate = authenticate
        self.max_bytes = max_bytes

    @staticmethod
    async def _refuse(status: int, detail: str, scope: Scope, receive: Receive, send: Send) -> None:
        response = JSONResponse({"detail": detail}, status, headers={"connection": "close"})
        await response(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length")
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        if not chunked and declared in (None, "0"):  # no body (GET, HEAD, an empty POST)
            await self.app(scope, receive, send)
            return
        # The token first: an outsider learns nothing, not even the size limit, and sends nothing more.
        who = await run_in_threadpool(self.authenticate, _request_token(Request(scope)))
        if who is None:
            await self._refuse(401, "A valid token is needed to send a body.", scope, receive, send)
            return
        too_large = f"Request body over {self.max_bytes} bytes."
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(413, too_large, scope, receive, send)
            return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left; nothing to answer
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                await self._refuse(413, too_large, scope, receive, send)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body only a disconnect can come
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        scope.setdefault("state", {})["principal"] = who
        await self.app(scope, replay, send)


def _request_token(request: Request) -> str | None:
    """The bearer token or else the cookie; never the query string (it ends up in logs and history)."""
    authorization = request.headers.get("authorization", "")
    if authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return request.cookies.get(COOKIE_NAME)


def switch_code(current_token: str, new_token: str) -> str:
    """What the switch confirmation form must send back: only a page shown to this browser knows it.

    Keyed with the browser's current token, so a form on another site cannot forge a switch.
    """
    return hmac.new(current_token.encode(), f"switch:{new_token}".encode(), "sha256").hexdigest()


_TOKEN_IN_PATH = re.compile(r"(/a/)[^/?#\s\"]+")
_TOKEN_IN_QUERY = re.compile(r"([?&]token=)[^&#\s\"]*", re.IGNORECASE)


def redact_tokens(text: str) -> str:
    """Replace the token of an invite link (``/a/TOKEN``) and of a ``token=`` query with ``[redacted]``."""
    return _TOKEN_IN_QUERY.sub(r"\1[redacted]", _TOKEN_IN_PATH.sub(r"\1[redacted]", text))


class RedactTokensFilter(logging.Filter):
    """Logging filter for uvicorn's handlers: no token reaches a log line (the path is one of the args)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact_tokens(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact_tokens(a) if isinstance(a, str) else a for a in record.args)
        return True


def create_app(
    store: Store,
    *,
    session_admin_token: str | None = None,
    n_boot: int = 2000,
    secure_cookies: bool = False,
    allowed_hosts: Sequence[str] | None = None,
) -> FastAPI:
    """Build the app over ``store``. ``session_admin_token`` is an admin token valid for this process only.

    ``secure_cookies``: mark the cookie ``Secure`` (it is anyway on a request that arrived over https,
    e.g. from a TLS proxy whose ``X-Forwarded-Proto`` uvicorn trusts). ``allowed_hosts``: the host names
    the app answers for (400 otherwise, against DNS rebinding); None answers for any.
    """
    app = FastAPI(title="cgrpo human evaluation", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=PACKAGE_DIR / "static"), name="static")
    templates = Jinja2Templates(directory=PACKAGE_DIR / "templates")
    templates.env.filters["pct"] = lambda value: "–" if value is None else f"{100 * value:.0f}%"
    templates.env.filters["num"] = lambda value: "–" if value is None else f"{value:.2f}"
    session_hash = hash_token(session_admin_token) if session_admin_token else None

    def authenticate(token: str | None) -> Principal | None:
        if token and session_hash and hmac.compare_digest(hash_token(token), session_hash):
            return Principal(annotator_id=None, name="admin (this server session)", is_admin=True)
        return store.authenticate(token)

    # Starlette runs the last-added middleware first: security headers on every answer, refusals included.
    app.add_middleware(BodyGuardMiddleware, authenticate=authenticate, max_bytes=MAX_BODY_BYTES)
    if allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts), www_redirect=False)
    app.add_middleware(SecurityHeadersMiddleware)

    def principal(request: Request) -> Principal:
        checked = request.scope.get("state", {}).get("principal")
        if checked is not None:  # the body guard already checked this request's token
            return checked
        token = _request_token(request)
        if not token:
            raise HTTPException(401, "No token: open the invite link you were given.")
        found = authenticate(token)
        if found is None:
            raise HTTPException(401, "This link or token is not valid (it may have been replaced).")
        return found

    def annotator(who: Annotated[Principal, Depends(principal)]) -> Principal:
        if who.is_admin or who.annotator_id is None:
            raise HTTPException(403, "Admin tokens cannot vote; open an annotator's invite link.")
        return who

    def admin(who: Annotated[Principal, Depends(principal)]) -> Principal:
        if not who.is_admin:
            raise HTTPException(403, "This page is for the study admin only.")
        return who

    def wants_html(request: Request) -> bool:
        return not request.url.path.startswith(("/api/", "/img/")) and not request.url.path.endswith(
            (".json", ".csv")
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        if wants_html(request):
            return templates.TemplateResponse(
                request,
                "error.html",
                {"status": error.status_code, "message": error.detail},
                error.status_code,
            )
        return JSONResponse({"detail": error.detail}, error.status_code, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> Response:
        problems = [
            {"loc": [str(part) for part in item["loc"]], "msg": item["msg"]} for item in error.errors()
        ]
        return JSONResponse({"detail": problems}, 422)

    def no_store(response: Response) -> Response:
        response.headers["cache-control"] = "no-store"
        return response

    def sign_in(token: str, who: Principal, request: Request) -> Response:
        """The one place that sets the cookie: after an invite link (and, for a switch, its confirmation)."""
        response = RedirectResponse("/admin" if who.is_admin else "/annotate", status_code=303)
        secure = secure_cookies or request.url.scheme == "https"
        response.set_cookie(
            COOKIE_NAME,
            token,
            max_age=COOKIE_MAX_AGE_S,
            httponly=True,
            samesite="lax",
            path="/",
            secure=secure,
        )
        return no_store(response)

    def invited(token: str) -> Principal:
        who = authenticate(token)
        if who is None:
            raise HTTPException(401, "This invite link is not valid (it may have been replaced).")
        return who

    @app.get("/a/{token}")
    def invite(token: str, request: Request) -> Response:
        who = invited(token)
        current_token = request.cookies.get(COOKIE_NAME)
        current = authenticate(current_token)
        if current is None or current == who:  # Principal is a frozen dataclass: equal fields, same person
            return sign_in(token, who, request)
        # Signed in as someone else: a link alone must not move this browser's next votes to another name.
        context = {
            "name": current.name,
            "new_name": who.name,
            "token": token,
            "confirm": switch_code(current_token, token),
        }
        return no_store(templates.TemplateResponse(request, "switch.html", context))

    @app.post("/a/{token}")
    async def confirm_switch(token: str, request: Request) -> Response:
        who = await run_in_threadpool(invited, token)
        current_token = request.cookies.get(COOKIE_NAME) or ""
        sent = parse_qs((await request.body()).decode("utf-8", "replace")).get("confirm", [""])[0]
        # Only a browser that holds a cookie and was shown the question can answer it; a form posted from
        # another site carries no (SameSite=Lax) cookie, so it lands here too and switches nothing.
        expected = switch_code(current_token, token).encode()
        if not current_token or not hmac.compare_digest(sent.encode(), expected):
            raise HTTPException(403, "Switching annotators needs the confirmation on this site's page.")
        return sign_in(token, who, request)

    @app.get("/")
    def home(who: Annotated[Principal, Depends(principal)]) -> Response:
        return no_store(RedirectResponse("/admin" if who.is_admin else "/annotate", 303))

    @app.get("/annotate", response_class=HTMLResponse)
    def annotate(who: Annotated[Principal, Depends(annotator)], request: Request) -> Response:
        assignment = store.next_assignment(who.annotator_id)
        if assignment.pair is None:
            context = {"name": who.name, "total": assignment.total}
            return no_store(templates.TemplateResponse(request, "done.html", context))
        context = {
            "name": who.name,
            "pair": assignment.pair,
            "position": assignment.done + 1,
            "done": assignment.done,
            "total": assignment.total,
            "criteria": [(c, CRITERION_LABELS[c], SHORTCUTS[c]) for c in CRITERIA],
        }
        return no_store(templates.TemplateResponse(request, "annotate.html", context))

    @app.get("/api/next")
    def next_pair(who: Annotated[Principal, Depends(annotator)]) -> dict[str, object]:
        assignment = store.next_assignment(who.annotator_id)
        pair = assignment.pair
        return {
            "done": assignment.done,
            "total": assignment.total,
            "pair_id": None if pair is None else pair.pair_id,
            "prompt": None if pair is None else pair.prompt,
            "images": None
            if pair is None
            else {slot: f"/img/{pair.pair_id}/{slot}" for slot in ("reference", "left", "right")},
            "criteria": list(CRITERIA),
        }

    @app.post("/api/votes", status_code=201)
    def vote(vote_in: VoteIn, who: Annotated[Principal, Depends(annotator)]) -> dict[str, object]:
        sides = {criterion: getattr(vote_in, criterion) for criterion in CRITERIA}
        try:
            stored = store.record_votes(who.annotator_id, vote_in.pair_id, sides, vote_in.elapsed_ms)
        except UnknownPair as error:
            raise HTTPException(404, str(error)) from None
        except PairNotShown as error:
            raise HTTPException(409, str(error)) from None
        except DuplicateVote as error:
            raise HTTPException(409, str(error)) from None
        return {"stored": stored, "pair_id": vote_in.pair_id}

    @app.get("/img/{pair_id}/{slot}")
    def image(
        pair_id: Annotated[str, PathParam(pattern=PAIR_ID_PATTERN)],
        slot: Literal["reference", "left", "right", "a", "b"],
        who: Annotated[Principal, Depends(principal)],
    ) -> Response:
        pair = store.get_pair(pair_id)
        if pair is None:
            raise HTTPException(404, "No such pair.")
        a, b = pair.image_a_sha, pair.image_b_sha
        if who.is_admin:
            images = {"reference": pair.reference_sha, "a": a, "b": b}
        else:
            # Annotators address images by screen side only, so that a URL never reveals the method.
            a_on_left = store.shown_layout(who.annotator_id, pair_id)
            if a_on_left is None:
                raise HTTPException(404, "No such image.")
            left, right = (a, b) if a_on_left else (b, a)
            images = {"reference": pair.reference_sha, "left": left, "right": right}
        sha = images.get(slot)
        data = None if sha is None else store.image(sha)
        if data is None:
            raise HTTPException(404, "No such image.")
        # The bytes re-encoded when the study was created: one format and size, no file date, name or
        # metadata, so nothing but the pixels can tell the two methods apart; never cached.
        return Response(data, media_type=SERVED_MEDIA_TYPE, headers={"cache-control": "no-store"})

    @app.get("/admin", response_class=HTMLResponse)
    def admin_page(who: Annotated[Principal, Depends(admin)], request: Request) -> Response:
        results = build_results(store, n_boot=n_boot)
        context = {"name": who.name, "results": results, "labels": CRITERION_LABELS, "criteria": CRITERIA}
        return no_store(templates.TemplateResponse(request, "admin.html", context))

    @app.get("/admin/results.json")
    def admin_json(who: Annotated[Principal, Depends(admin)]) -> Response:
        return JSONResponse(build_results(store, n_boot=n_boot), headers={"cache-control": "no-store"})

    @app.get("/admin/results.csv")
    def admin_csv(who: Annotated[Principal, Depends(admin)]) -> Response:
        text = results_to_csv(build_results(store, n_boot=n_boot))
        headers = {"cache-control": "no-store", "content-disposition": 'attachment; filename="results.csv"'}
        return Response(text, media_type="text/csv", headers=headers)

    return app
