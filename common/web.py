"""What the hospital's and the coordinator's web consoles share: console users with scrypt-hashed
passwords, sessions that expire, a CSRF token on every state-changing request, a rate limit on
wrong passwords, strict security headers, and TLS required off loopback. Pages are Jinja2
templates (common/templates), assets are served from the package (common/static): nothing is
fetched from a CDN, at build or run time.

Every path but /login and /static needs a session: a page asked for without one redirects to
the login page, anything else (a POST, a JSON or download route) gets 401. Every POST, the
login's included, must carry the form field `csrf` matching the session's (the login form's:
a cookie set with it), or it gets 403 and nothing happens."""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, quote

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup

from common.logins import ConsoleError, Session, Sessions, Throttle, password_ok, read_users
from common.i18n import LANGUAGES, NAMES, _, _request, current, negotiate, normalise, number, render, shown, speak

COOKIE, LOGIN_COOKIE = "aseanfl_session", "aseanfl_login"
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                               "frame-ancestors 'none'; form-action 'self'; base-uri 'none'; object-src 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
PUBLIC = ("/login", "/static/")


# ---- users ------------------------------------------------------------------------------------

_templates = Environment(loader=PackageLoader("common", "templates"), autoescape=select_autoescape(["html"]))
LANG_COOKIE = "aseanfl_lang"


def _t(msgid: str, **values) -> Markup:
    """A template's message in the reader's language: the translation escaped, its values escaped
    unless they are Markup (code(), strong())."""
    return render(msgid, values, template=Markup.escape)


_templates.globals.update(_=_t, number=number, shown=shown, Markup=Markup,
                          code=lambda v: Markup("<code>{}</code>").format(v),
                          strong=lambda v: Markup("<strong>{}</strong>").format(v))
_templates.filters.update(enumerate_labels=lambda labels: ", ".join(f"{k} = {c}" for k, c in enumerate(labels)),
                          sizes=lambda sizes: ", ".join(f"{k} ({n})" for k, n in sizes))


def page_language(request: Request, default: str | None) -> tuple[str, bool]:
    """(language, chosen now): ?lang= (the switch), the cookie it set, the browser's Accept-Language,
    the console's own (a hospital's site.yaml language), English."""
    asked = normalise(request.query_params.get("lang"))
    if asked:
        return asked, True
    return (normalise(request.cookies.get(LANG_COOKIE)) or negotiate(request.headers.get("accept-language"))
            or normalise(default) or "en"), False


@dataclass
class Console:
    """One console: its title, its pages (path, label) for the menu, its users' file."""

    title: str
    subtitle: str
    pages: list[tuple[str, str]]
    users: Path
    name: str = ""  # the hospital's id or the federation's name, in the title
    language: str | None = None  # the page's language where the browser names none of ours (site.yaml's)
    secure: bool = False  # served over TLS: the session cookie is Secure
    add_user: str = "console-user"  # the command that adds a user, for the 'no user yet' line
    sessions: Sessions = field(default_factory=Sessions)
    throttle: Throttle = field(default_factory=Throttle)

    def label(self) -> str:
        """The console's title in the current language ('hospital console: cho-ray')."""
        return _(self.title, name=self.name)

    def render(self, request: Request, template: str, status: int = 200, **values) -> HTMLResponse:
        session: Session | None = request.scope.get("aseanfl.session")
        html = _templates.get_template(template).render(
            console=self, path=request.url.path, user=session.user if session else None,
            csrf=session.csrf if session else "", lang=current(), languages=[(code, NAMES[code]) for code in LANGUAGES],
            **values)
        return HTMLResponse(html, status_code=status)


def form(request: Request) -> dict[str, str]:
    """The POST's fields (url-encoded forms only; the middleware has read and checked them)."""
    return request.scope.get("aseanfl.form", {})


def _client(scope) -> str:
    return (scope.get("client") or ("?", 0))[0]


def build(console: Console) -> FastAPI:
    """A FastAPI app with the console's login, logout, assets and guard; the caller adds pages."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(packages=[("common", "static")]), name="static")

    def login_form(request: Request, next: str, error: str = "", status: int = 200) -> HTMLResponse:
        """The login page with a fresh login CSRF token, in its form and in a cookie."""
        token = secrets.token_urlsafe(32)
        resp = console.render(request, "login.html", status=status, next=_local(next), login_csrf=token, error=error)
        resp.set_cookie(LOGIN_COOKIE, token, httponly=True, samesite="strict", secure=console.secure, path="/login")
        return resp

    @app.get("/login")
    def login_page(request: Request, next: str = "/") -> HTMLResponse:
        return login_form(request, next)

    @app.post("/login")
    def login(request: Request) -> Response:
        fields, who = form(request), _client(request.scope)
        wait = console.throttle.wait(who)
        if wait > 0:
            return PlainTextResponse(_("too many wrong passwords: try again in {seconds} s", seconds=f"{wait:.0f}"), status_code=429,
                                     headers={"Retry-After": str(int(wait) + 1)})
        user = fields.get("user", "")
        stored = read_users(console.users).get(user, {}).get("password", "")
        if not stored or not password_ok(stored, fields.get("password", "")):
            console.throttle.failed(who)
            return login_form(request, fields.get("next", "/"), _("wrong user name or password"), 401)
        console.throttle.passed(who)
        token, _session = console.sessions.new(user)
        resp = RedirectResponse(_local(fields.get("next", "/")), status_code=303)
        resp.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=console.secure)
        resp.delete_cookie(LOGIN_COOKIE, path="/login")
        return resp

    @app.post("/logout")
    def logout(request: Request) -> Response:
        console.sessions.end(request.cookies.get(COOKIE))
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(COOKIE)
        return resp

    app.add_middleware(_Guard, console=console)
    return app


def _local(target: str) -> str:
    """A redirect target on this console only (no //host or scheme: no open redirect)."""
    return target if target.startswith("/") and not target.startswith("//") and "\\" not in target else "/"


class _Guard:
    """ASGI middleware: security headers on every answer; a session for every non-public path; on
    every POST the form is read here, and its csrf field checked, before any route runs."""

    def __init__(self, app, console: Console):
        self.app, self.console = app, console

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]

        async def send_headers(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], *((k.lower().encode(), v.encode()) for k, v in HEADERS.items())]
            await send(message)

        if path == "/favicon.ico":
            return await Response(status_code=204)(scope, receive, send_headers)
        request = Request(scope)
        lang, chosen = page_language(request, self.console.language)
        token = speak(lang)  # every message of this request, the templates' and the routes', in this language
        if chosen:  # the switch: remembered for the next pages
            cookie = (f"{LANG_COOKIE}={lang}; Path=/; Max-Age=31536000; HttpOnly; SameSite=Strict"
                      + ("; Secure" if self.console.secure else ""))
            inner = send_headers

            async def send_headers(message):
                if message["type"] == "http.response.start":
                    message.setdefault("headers", [])
                    message["headers"] = [*message["headers"], (b"set-cookie", cookie.encode())]
                await inner(message)
        try:
            return await self._guarded(scope, receive, send_headers, request, path, method)
        finally:
            _request.reset(token)

    async def _guarded(self, scope, receive, send_headers, request, path, method):
        session = self.console.sessions.get(request.cookies.get(COOKIE))
        public = path == "/login" or path.startswith("/static/")
        if session is None and not public:
            if method == "GET" and "text/html" in request.headers.get("accept", ""):
                resp = RedirectResponse("/login?next=" + quote(path), status_code=303)
            else:
                resp = PlainTextResponse(_("log in first"), status_code=401)
            return await resp(scope, receive, send_headers)
        scope["aseanfl.session"] = session
        if method not in ("GET", "HEAD"):
            body, more = b"", True
            while more:
                message = await receive()
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > 2_000_000:
                    return await PlainTextResponse("request too large", status_code=413)(scope, receive, send_headers)
            kind = request.headers.get("content-type", "").split(";")[0].strip()
            fields = {k: v[0] for k, v in parse_qs(body.decode(errors="replace"), keep_blank_values=True).items()} \
                if kind == "application/x-www-form-urlencoded" else {}
            expected = session.csrf if session is not None else request.cookies.get(LOGIN_COOKIE, "")
            if not expected or not hmac.compare_digest(fields.get("csrf", ""), expected):
                return await PlainTextResponse(_("refused: the form's CSRF token is missing or wrong (reload the page)"),
                                               status_code=403)(scope, receive, send_headers)
            scope["aseanfl.form"] = fields
            sent = False

            async def replay():
                nonlocal sent
                if sent:
                    return await receive()
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}

            return await self._run(scope, replay, send_headers)
        return await self._run(scope, receive, send_headers)

    async def _run(self, scope, receive, send):
        """The page, or one line in the console's output and a plain 500 where it fails (no traceback)."""
        started = False

        async def watch(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as exc:  # noqa: BLE001 - one line for the operator, the page says what failed
            line = f"{scope['method']} {scope['path']} failed: {exc.__class__.__name__}: {exc}"
            print(f"{self.console.label()}: error: {line}", file=sys.stderr, flush=True)
            if not started:
                await PlainTextResponse(f"the console failed on this page ({line})", status_code=500)(scope, receive, send)


def local_time(t) -> str:
    """A timestamp as the consoles show it (the machine's local time), '' for none."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else ""


def loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve(app: FastAPI, console: Console, host: str, port: int, cert: Path | None, key: Path | None,
          say: Callable[[str], None] = print) -> None:
    """Serve until interrupted; ConsoleError where it must not start (no user, no TLS off loopback)."""
    import uvicorn

    if not read_users(console.users):
        raise ConsoleError(f"no console user yet ({console.users}); add one first: {console.add_user} NAME")
    if (cert is None) != (key is None):
        raise ConsoleError("give both --tls-cert and --tls-key, or neither")
    if not loopback(host) and cert is None:
        raise ConsoleError(f"listening on {host} (beyond this machine) needs TLS: give --tls-cert and --tls-key")
    for label, path in (("--tls-cert", cert), ("--tls-key", key)):
        if path is not None and not path.is_file():
            raise ConsoleError(f"{label}: file not found: {path}")
    import socket

    try:  # said in one line here, rather than by uvicorn's log
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as exc:
        raise ConsoleError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    console.secure = cert is not None
    scheme = "https" if cert else "http"
    say(_("{console}: {url} (log in as a console user; Ctrl-C stops it)", console=console.label(),
          url=f"{scheme}://{host}:{port}/"))
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            ssl_certfile=str(cert) if cert else None, ssl_keyfile=str(key) if key else None,
                            timeout_graceful_shutdown=3)  # an open browser tab does not hold a stop up
    server = uvicorn.Server(config)
    try:
        server.run()
    except (OSError, SystemExit) as exc:
        raise ConsoleError(f"cannot listen on {host}:{port}: {getattr(exc, 'strerror', None) or exc}") from None
