"""What the HTTP server checks before a route runs (pure ASGI middleware, in this order):

1. `Host` (DNS rebinding): when the server listens on a loopback address, a request whose Host header
   names another host is refused (403) — a web page on a rebinding domain cannot reach it.
2. The API key: when set, every route but `/health` needs `Authorization: Bearer <key>` (401).
3. The body's type: a POST body is read only as `application/json` (edits: or `multipart/form-data`),
   so a browser's cross-origin "simple" POST (text/plain, no preflight) is refused (415) unread.
4. The body's size: more than `max_body` bytes is refused (413) from its Content-Length before any of
   it is read, or, without one (chunked), as soon as the bytes read pass the limit; the body is never
   held whole past the limit. The body read is handed to the route as it came.

Every refusal is OpenAI's JSON error shape. Refusals of the image routes are counted (`count`).
CORS (browsers calling from another origin) is off unless origins are given: then starlette's
CORSMiddleware answers the preflights, outside this guard.
"""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.responses import JSONResponse

from .api import error_body
from .errors import BadRequest, Forbidden, PayloadTooLarge, ServeError, Unauthorized, UnsupportedMediaType

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")


def loopback_hosts(host: str) -> frozenset | None:
    """The Host names a server listening on `host` answers to, or None (any: it is reachable from other
    machines by names it cannot know)."""
    if host in LOOPBACK_NAMES or host.startswith("127."):
        return frozenset((*LOOPBACK_NAMES, host))
    return None


def _host_name(value: str | None) -> str:
    if not value:
        return ""
    value = value.strip().lower()
    if value.startswith("["):
        return value[: value.find("]") + 1]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class Guard:
    def __init__(self, app, *, max_body: int, api_key: str | None = None, hosts: frozenset | None = None,
                 count=None):
        self.app, self.max_body, self.api_key, self.hosts = app, max_body, api_key, hosts
        self.count = count or (lambda outcome: None)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        path, method = scope["path"], scope["method"]
        try:
            self._check(headers, path, method)
            if method in ("POST", "PUT", "PATCH"):
                receive = await self._read(headers, receive)
                if receive is None:
                    return  # the client went away while sending
        except ServeError as e:
            if method == "POST" and path.startswith("/v1/images/"):
                self.count(e.outcome)
            extra = {"WWW-Authenticate": "Bearer"} if isinstance(e, Unauthorized) else {}
            if isinstance(e, PayloadTooLarge):
                extra["Connection"] = "close"  # the rest of the body is not read: the connection cannot go on
            return await JSONResponse(error_body(str(e), e.kind, e.status), status_code=e.status,
                                      headers=extra)(scope, receive, send)
        return await self.app(scope, receive, send)

    def _check(self, headers: Headers, path: str, method: str) -> None:
        if self.hosts is not None and _host_name(headers.get("host")) not in self.hosts:
            raise Forbidden("this server answers requests for localhost only (the Host header names another host)")
        if self.api_key is not None and path != "/health":
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                raise Unauthorized("this server needs an API key: Authorization: Bearer <key>")
        if method in ("POST", "PUT", "PATCH"):
            media = headers.get("content-type", "").partition(";")[0].strip().lower()
            allowed = ("application/json", "multipart/form-data") if path == "/v1/images/edits" \
                else ("application/json",)
            if media not in allowed:
                raise UnsupportedMediaType(f"the body must be {' or '.join(allowed)}, not {media[:60] or 'untyped'}")

    async def _read(self, headers: Headers, receive):
        """The body read whole (at most max_body bytes), and a receive that hands it to the route."""
        length = headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit() or len(length) > 20:
                raise BadRequest("Content-Length must be a number of bytes")
            if int(length) > self.max_body:
                raise PayloadTooLarge(self._too_large(int(length)))
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > self.max_body:
                raise PayloadTooLarge(self._too_large(None))
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        return replay

    def _too_large(self, length: int | None) -> str:
        limit = f"this server's --max-body-mb {self.max_body / 2**20:g}"
        return f"the body is {length / 2**20:.1f} MiB, more than {limit}" if length is not None \
            else f"the body is larger than {limit}"
