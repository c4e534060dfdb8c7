"""The web application: routes, the pages' data, and the headers every response carries.

Operator pages live under ``/quarantine`` (a session from ``/login``), a recipient's under
``/u/<link token>``. Every page is server-rendered HTML without a line of script (its
content-security policy forbids any); actions are plain forms posted with a CSRF token; each
POST answers with a page of outcomes, never with a redirect carrying text in its URL.

The work is the product's own: the store's search (:class:`pipeline.sinks.quarantine.Quarantine`),
releases, deletions and reports (:mod:`pipeline.feedback`, the command line's path: one release,
one feedback record, delivered once). Blocking work (SQLite, the broker) runs in Starlette's
thread pool.
"""

from __future__ import annotations

import contextlib
import math
import secrets
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import jinja2
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline import feedback
from pipeline.core import log as logs
from pipeline.core import metrics
from pipeline.core.config import Settings
from pipeline.sinks import iso
from pipeline.sinks.maildir import EVENT_ID
from pipeline.sinks.quarantine import COUNT_MAX, STATES, Cursor, Entry, Quarantine, Search, recipient_key
from pipeline.web import message as messages
from pipeline.web.security import (
    COMMON_HEADERS,
    FRAME_CSP,
    LOGIN_COOKIE,
    PAGE_CSP,
    SESSION_COOKIE,
    Denied,
    LoginThrottle,
    Operator,
    Signer,
    check_origin,
)
from pipeline.web.status import LaneStatus

HERE = Path(__file__).resolve().parent
log = logs.get("web")

PAGE_SIZE = 50  # rows a list page shows unless asked for more
PAGE_SIZES = (25, 50, 100, 200, 500)  # the choices; 500 is the store's page limit
FORM_MAX_IDS = 500  # ids one bulk action takes (a page's worth)
FIELD_MAX = 200  # characters of a search field kept
OPERATOR_ACTIONS = ("release", "delete", "report-ham")
RECIPIENT_ACTIONS = ("release",)


@dataclass
class Web:
    """What the routes share: settings, the signer, the login brake, the lanes' status."""

    settings: Settings
    signer: Signer
    admin_token: str  # "" : no operator can log in
    env: Mapping[str, str]
    throttle: LoginThrottle
    lanes: LaneStatus
    templates: jinja2.Environment

    @contextlib.contextmanager
    def store(self) -> Iterator[Quarantine]:
        store = Quarantine(self.settings.paths.quarantine_db)
        try:
            yield store
        finally:
            store.close()

    def render(self, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        html = self.templates.get_template(name).render(**context)
        return HTMLResponse(html, status_code=status)


# -- helpers -----------------------------------------------------------------------------------

def _when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _score(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.3f}"


def _text(value: str | None) -> str:
    return messages.visible(value or "")[:FIELD_MAX].strip()


def _number(value: str | None) -> float | None:
    try:
        n = float(value) if value else None
    except ValueError:
        return None
    return n if n is not None and math.isfinite(n) else None


def _date(value: str | None) -> float | None:
    """A YYYY-MM-DD form value as the UTC midnight it starts with."""
    try:
        return datetime.strptime(value or "", "%Y-%m-%d").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


def _cursor(value: str | None) -> Cursor | None:
    """A page cursor from a URL (``<quarantined_at>~<event id>``); None if absent or malformed."""
    at, _, event_id = (value or "").partition("~")
    number = _number(at)
    return (number, event_id) if number is not None and EVENT_ID.fullmatch(event_id) else None


def _cursor_param(cursor: Cursor | None) -> str | None:
    return None if cursor is None else f"{cursor[0]!r}~{cursor[1]}"


def _search(params: Mapping[str, str], recipients: tuple[str, ...] = ()) -> tuple[Search, dict[str, str]]:
    """The search a list URL asks for, and its parameters as the form shows them again."""
    state = params.get("state", "held")
    form = {k: _text(params.get(k)) for k in ("rcpt", "sender", "subject", "score_min", "score_max", "model",
                                             "since", "until")}
    form["state"] = state if state in STATES else "held"
    until = _date(form["until"])
    query = Search(recipient=form["rcpt"], sender=form["sender"], subject=form["subject"],
                   score_min=_number(form["score_min"]), score_max=_number(form["score_max"]),
                   model_version=form["model"], since=_date(form["since"]),
                   until=None if until is None else until + 86_400,  # the whole day named
                   state=form["state"], recipients=recipients)
    return query, form


def _limit(params: Mapping[str, str]) -> int:
    try:
        n = int(params.get("limit", PAGE_SIZE))
    except ValueError:
        return PAGE_SIZE
    return n if n in PAGE_SIZES else PAGE_SIZE


def _ids(form: FormData) -> list[str]:
    ids = [v for v in form.getlist("id") if isinstance(v, str)]
    if len(ids) > FORM_MAX_IDS:
        raise Denied(f"at most {FORM_MAX_IDS} messages at once")
    if not ids:
        raise Denied("no message selected")
    bad = [i for i in ids if not EVENT_ID.fullmatch(i)]
    if bad:
        raise Denied("not a message id")
    return list(dict.fromkeys(ids))


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _own_origin(request: Request) -> str:
    return f"{request.url.scheme}://{request.url.netloc}"


def _state(entry: Entry) -> str:
    if entry.released_at is not None:
        return "released"
    return "releasing" if entry.releasing(feedback.RELEASE_LEASE_S) else "held"


def _mine(entry: Entry, addresses: tuple[str, ...]) -> bool:
    """Whether every recipient of the message is one of ``addresses`` (a recipient may release it)."""
    own = {recipient_key(a) for a in addresses}
    return bool(entry.rcpt_to) and all(recipient_key(r) in own for r in entry.rcpt_to)


def _held_for(entry: Entry, addresses: tuple[str, ...]) -> bool:
    own = {recipient_key(a) for a in addresses}
    return any(recipient_key(r) in own for r in entry.rcpt_to)


# -- operator pages ----------------------------------------------------------------------------

def _operator(web: Web, request: Request) -> Operator | None:
    return web.signer.operator(request.cookies.get(SESSION_COOKIE)) if web.admin_token else None


def _login_redirect() -> RedirectResponse:
    return RedirectResponse("/login", status_code=303)


def _set_cookie(web: Web, response: Response, name: str, value: str, max_age: int | None) -> None:
    secure = urlsplit(web.settings.web.public_url).scheme == "https"
    response.set_cookie(name, value, max_age=max_age, httponly=True, samesite="strict", secure=secure, path="/")


async def home(request: Request) -> Response:
    web: Web = request.app.state.web
    return RedirectResponse("/quarantine" if _operator(web, request) else "/login", status_code=303)


async def login_page(request: Request) -> Response:
    web: Web = request.app.state.web
    nonce = request.cookies.get(LOGIN_COOKIE)
    if not nonce or len(nonce) > 64:
        nonce = secrets.token_urlsafe(16)
    response = web.render("login.html", enabled=bool(web.admin_token), csrf=web.signer.csrf("login:" + nonce),
                          error=None)
    _set_cookie(web, response, LOGIN_COOKIE, nonce, 3600)
    return response


def _check_post(web: Web, request: Request, form: FormData, binding: str) -> None:
    """Every form POST: from our own origin, with the CSRF token bound to ``binding`` (the
    session, the login nonce or the recipient's link); Denied otherwise."""
    check_origin(dict(request.headers), web.signer.allowed_origins(_own_origin(request)))
    web.signer.check_csrf(binding, str(form.get("csrf") or ""))


async def login(request: Request) -> Response:
    web: Web = request.app.state.web
    form = await request.form()
    client = _client(request)
    nonce = request.cookies.get(LOGIN_COOKIE) or ""
    name, token = str(form.get("operator") or ""), str(form.get("token") or "")

    def again(error: str, status: int) -> Response:
        response = web.render("login.html", status=status, enabled=bool(web.admin_token),
                              csrf=web.signer.csrf("login:" + nonce), error=error)
        return response

    _check_post(web, request, form, "login:" + nonce)
    if not web.admin_token:
        return again("operator logins are off: no admin token is configured", 403)
    if web.throttle.blocked(client):
        return again("too many failed logins; wait a minute", 429)
    try:
        feedback.authorize(name, token, {feedback.TOKEN_ENV: web.admin_token})
    except feedback.FeedbackError:
        web.throttle.failed(client)
        log.warning("web login refused", extra={"client": client})
        return again("wrong name or token", 403)
    operator = name.strip()[:100]
    log.info("web login", extra={"operator": operator, "client": client})
    response = RedirectResponse("/quarantine", status_code=303)
    _set_cookie(web, response, SESSION_COOKIE, web.signer.session(operator), int(web.settings.web.session_max_age_s))
    response.delete_cookie(LOGIN_COOKIE, path="/")
    return response


async def logout(request: Request) -> Response:
    web: Web = request.app.state.web
    operator = _operator(web, request)
    if operator is None:
        return _login_redirect()
    form = await request.form()
    _check_post(web, request, form, operator.session_id)
    response = _login_redirect()
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


def _list_context(web: Web, params: Mapping[str, str], base: str, recipients: tuple[str, ...] = ()) -> dict[str, Any]:
    """What a list page shows: a page of the search, its count, the links to the pages around it."""
    query, form = _search(params, recipients)
    limit = _limit(params)
    after, before = _cursor(params.get("after")), _cursor(params.get("before"))
    with web.store() as store:
        page = store.search(query, limit, after=after, before=before, count=True)
        models = store.model_versions() if not recipients else []
    # A first page counts its matches in its own pass; later pages carry that count in their links
    # (only a number shown to whoever follows them).
    carried = params.get("n", "")
    total = page.total if page.total is not None else (int(carried) if carried.isdigit() else None)
    keep = {k: v for k, v in form.items() if v and not (k == "state" and v == "held")}
    if limit != PAGE_SIZE:
        keep["limit"] = str(limit)
    counted = {"n": str(total)} if total is not None else {}

    def link(**extra: str | None) -> str:
        merged = {**keep, **{k: v for k, v in extra.items() if v is not None}}
        return base + ("?" + urlencode(merged) if merged else "")

    return {
        "entries": page.entries, "form": form, "limit": limit, "page_sizes": PAGE_SIZES, "models": models,
        "total": total, "total_capped": total is not None and total > COUNT_MAX, "count_max": COUNT_MAX,
        "next_url": link(after=_cursor_param(page.next), **counted) if page.next else None,
        "prev_url": link(before=_cursor_param(page.prev), **counted) if page.prev else None,
        "first_url": link() if (after or before) else None,
        "select_all_url": link(after=params.get("after"), before=params.get("before"), select="all", **counted),
        "select_none_url": link(after=params.get("after"), before=params.get("before"), **counted),
        "selected": params.get("select") == "all",
    }


async def quarantine_list(request: Request) -> Response:
    web: Web = request.app.state.web
    operator = _operator(web, request)
    if operator is None:
        return _login_redirect()
    context = await run_in_threadpool(_list_context, web, request.query_params, "/quarantine")
    return web.render("list.html", operator=operator, csrf=web.signer.csrf(operator.session_id), base="/quarantine",
                      addresses=(), lanes=web.lanes.snapshot(), now=time.time(), **context)


def _message_context(web: Web, event_id: str) -> dict[str, Any] | None:
    if not EVENT_ID.fullmatch(event_id):
        return None
    with web.store() as store:
        entry = store.entry(event_id)
        raw = store.raw(event_id) if entry else None
    if entry is None or raw is None:
        return None
    return {"entry": entry, "view": messages.view(raw), "state": _state(entry)}


async def quarantine_message(request: Request) -> Response:
    web: Web = request.app.state.web
    operator = _operator(web, request)
    if operator is None:
        return _login_redirect()
    context = await run_in_threadpool(_message_context, web, request.path_params["event_id"])
    if context is None:
        return web.render("error.html", status=404, message="no such message in the quarantine")
    frame_url = f"/quarantine/m/{context['entry'].event_id}/body"
    return web.render("message.html", operator=operator, csrf=web.signer.csrf(operator.session_id),
                      actions=OPERATOR_ACTIONS, base="/quarantine", frame_url=frame_url, may_release=True, **context)


def _frame(web: Web, context: dict[str, Any] | None) -> Response:
    if context is None or context["view"].html is None:
        response: Response = HTMLResponse("", status_code=404)
    else:
        response = HTMLResponse('<!doctype html><meta charset="utf-8">' + context["view"].html)
    response.headers["Content-Security-Policy"] = FRAME_CSP
    response.headers["X-Frame-Options"] = "SAMEORIGIN"
    return response


async def quarantine_frame(request: Request) -> Response:
    web: Web = request.app.state.web
    if _operator(web, request) is None:
        return HTMLResponse("", status_code=403)
    return _frame(web, await run_in_threadpool(_message_context, web, request.path_params["event_id"]))


def _operator_act(web: Web, operator: Operator, action: str, ids: list[str]) -> list[tuple[str, str, str | None]]:
    """(event id, action, error or None) for each message."""
    settings, token, env = web.settings, web.admin_token, {feedback.TOKEN_ENV: web.admin_token}
    results: list[tuple[str, str, str | None]] = []
    if action == "release":
        for o in feedback.release_many(settings, ids, operator.name, token, env):
            results.append((o.event_id, action, o.error))
    else:
        for event_id in ids:
            try:
                if action == "delete":
                    feedback.delete(settings, event_id, operator.name, token, env)
                else:
                    feedback.report(settings, event_id, "ham", operator.name)
                results.append((event_id, action, None))
            except feedback.FeedbackError as e:
                results.append((event_id, action, str(e)))
    for event_id, _, error in results:
        metrics.WEB_ACTIONS.labels(action, "operator", "refused" if error else "done").inc()
        log.info("web action", extra={"action": action, "event_id": event_id, "operator": operator.name,
                                      "ok": error is None})
    return results


async def quarantine_act(request: Request) -> Response:
    web: Web = request.app.state.web
    operator = _operator(web, request)
    if operator is None:
        return _login_redirect()
    form = await request.form()
    _check_post(web, request, form, operator.session_id)
    action = str(form.get("action") or "")
    if action not in OPERATOR_ACTIONS:
        raise Denied("unknown action")
    results = await run_in_threadpool(_operator_act, web, operator, action, _ids(form))
    return web.render("done.html", operator=operator, csrf=web.signer.csrf(operator.session_id),
                      results=results, done=sum(e is None for _, _, e in results), back="/quarantine",
                      base="/quarantine")


# -- recipient pages ---------------------------------------------------------------------------

async def user_list(request: Request) -> Response:
    web: Web = request.app.state.web
    token = request.path_params["token"]
    addresses = web.signer.addresses(token)
    base = f"/u/{token}"
    context = await run_in_threadpool(_list_context, web, request.query_params, base, addresses)
    releasable = {e.event_id for e in context["entries"] if _mine(e, addresses)}
    return web.render("user_list.html", addresses=addresses, base=base, csrf=web.signer.csrf("link:" + token),
                      releasable=releasable, **context)


def _user_message(web: Web, event_id: str, addresses: tuple[str, ...]) -> dict[str, Any] | None:
    context = _message_context(web, event_id)
    # Another recipient's message does not exist as far as this link goes (no 403 to probe with).
    return context if context is not None and _held_for(context["entry"], addresses) else None


async def user_message(request: Request) -> Response:
    web: Web = request.app.state.web
    token = request.path_params["token"]
    addresses = web.signer.addresses(token)
    context = await run_in_threadpool(_user_message, web, request.path_params["event_id"], addresses)
    if context is None:
        return web.render("error.html", status=404, message="no such message held for you")
    base = f"/u/{token}"
    return web.render("message.html", operator=None, csrf=web.signer.csrf("link:" + token), actions=RECIPIENT_ACTIONS,
                      base=base, frame_url=f"{base}/m/{context['entry'].event_id}/body",
                      may_release=_mine(context["entry"], addresses), **context)


async def user_frame(request: Request) -> Response:
    web: Web = request.app.state.web
    addresses = web.signer.addresses(request.path_params["token"])
    return _frame(web, await run_in_threadpool(_user_message, web, request.path_params["event_id"], addresses))


def _user_act(web: Web, addresses: tuple[str, ...], ids: list[str]) -> list[tuple[str, str, str | None]]:
    results: list[tuple[str, str, str | None]] = []
    releasable: list[tuple[str, str]] = []  # (event id, the address that releases it)
    with web.store() as store:
        for event_id in ids:
            entry = store.entry(event_id)
            if entry is None or not _held_for(entry, addresses):
                results.append((event_id, "release", "no such message held for you"))
            elif not _mine(entry, addresses):
                results.append((event_id, "release", "this message was sent to others too; ask your administrator "
                                                     "to release it"))
            else:
                releasable.append((event_id, recipient_key(entry.rcpt_to[0])))
    token, env = web.admin_token or None, {feedback.TOKEN_ENV: web.admin_token}
    for by in sorted({b for _, b in releasable}):
        mine = [i for i, b in releasable if b == by]
        for o in feedback.release_many(web.settings, mine, by, token, env, by_recipient=True):
            results.append((o.event_id, "release", o.error))
    for event_id, _, error in results:
        metrics.WEB_ACTIONS.labels("release", "recipient", "refused" if error else "done").inc()
        log.info("web action", extra={"action": "release", "event_id": event_id, "role": "recipient",
                                      "ok": error is None})
    return results


async def user_act(request: Request) -> Response:
    web: Web = request.app.state.web
    token = request.path_params["token"]
    addresses = web.signer.addresses(token)
    form = await request.form()
    _check_post(web, request, form, "link:" + token)
    if str(form.get("action") or "") not in RECIPIENT_ACTIONS:
        raise Denied("unknown action")
    results = await run_in_threadpool(_user_act, web, addresses, _ids(form))
    base = f"/u/{token}"
    return web.render("done.html", operator=None, csrf=None, results=results,
                      done=sum(e is None for _, _, e in results), back=base, base=base)


# -- the application ---------------------------------------------------------------------------

class Headers:
    """ASGI middleware: the security headers of every response (the frame's own CSP is kept), and
    each request timed and counted by view (its endpoint's name: a fixed set)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                headers = list(message.get("headers", []))
                have = {k.lower() for k, _ in headers}
                for name, value in {**COMMON_HEADERS, "Content-Security-Policy": PAGE_CSP,
                                    "X-Frame-Options": "DENY"}.items():
                    if name.lower().encode() not in have:
                        headers.append((name.lower().encode(), value.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            endpoint = scope.get("endpoint")
            view = getattr(endpoint, "__name__", None) or ("static" if endpoint is not None else "other")
            metrics.WEB_REQUESTS.labels(view, f"{status['code'] // 100}xx").inc()
            metrics.WEB_SECONDS.labels(view).observe(time.perf_counter() - start)


def templates() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    env.filters.update(when=_when, score=_score, visible=messages.visible, iso=iso)
    return env


def create_app(settings: Settings, secret_key: str, admin_token: str, env: Mapping[str, str] | None = None,
               lanes: LaneStatus | None = None) -> Starlette:
    """The ASGI application. ``admin_token`` empty: operator logins are off."""
    web = Web(settings, Signer(settings.web, secret_key), admin_token, env or {}, LoginThrottle(),
              lanes or LaneStatus(settings), templates())
    routes = [
        Route("/", home, name="home"),
        Route("/login", login_page, methods=["GET"], name="login_page"),
        Route("/login", login, methods=["POST"], name="login"),
        Route("/logout", logout, methods=["POST"], name="logout"),
        Route("/quarantine", quarantine_list, name="list"),
        Route("/quarantine/act", quarantine_act, methods=["POST"], name="act"),
        Route("/quarantine/m/{event_id}", quarantine_message, name="message"),
        Route("/quarantine/m/{event_id}/body", quarantine_frame, name="frame"),
        Route("/u/{token}", user_list, name="user_list"),
        Route("/u/{token}/act", user_act, methods=["POST"], name="user_act"),
        Route("/u/{token}/m/{event_id}", user_message, name="user_message"),
        Route("/u/{token}/m/{event_id}/body", user_frame, name="user_frame"),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]

    async def denied(_request: Request, exc: Exception) -> Response:
        return web.render("error.html", status=403, message=str(exc))

    app = Starlette(routes=routes, middleware=[Middleware(Headers)], exception_handlers={Denied: denied})
    app.state.web = web
    return app
