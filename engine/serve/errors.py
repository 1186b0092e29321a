"""The errors a request is answered with, and what their bodies may say.

`ServeError` and its subclasses: the HTTP status, OpenAI's error type, a one-line message, and the
outcome the answer is counted under (shardiff_requests_total{outcome}).

`clean`: the cause in words, never the machine's insides.

Messages that come from the ranks (an exception's first line, a collective library's report) can
carry heap addresses ("<object at 0x7f…>"), source paths with line numbers, and the addresses and
ports of the group's internal sockets. The full text goes to the server's log; `clean` gives the
client's copy: those three kinds of detail replaced by "…", and at most `MAX_MESSAGE` characters
(a request's own echoed value — a 4000-digit integer — included).
"""

from __future__ import annotations

import re

MAX_MESSAGE = 1000

_PATTERNS = (
    re.compile(r"0x[0-9a-fA-F]{4,}"),                                           # heap addresses
    re.compile(r"\[?(?:\d{1,3}\.){3}\d{1,3}\]?:\d+|\[[0-9a-fA-F:]*:[0-9a-fA-F:]*\]:\d+"),  # ip:port, [v6]:port
    re.compile(r"(?:\.\.?|~)?(?:/[\w.+-]+){2,}/?(?::\d+)?"),                   # /abs/path, ../rel/path
    re.compile(r"\b[\w.+-]+\.(?:py|pyx|cc|cpp|cu|c|h|hpp):\d+"),                # file.cc:123
)


def clean(message: str | None) -> str:
    """`message` fit for a client: one line, no addresses, source paths or ports; bounded."""
    if not message:
        return ""
    text = " ".join(str(message).split())
    for pattern in _PATTERNS:
        text = pattern.sub("…", text)
    if len(text) > MAX_MESSAGE:
        text = text[:MAX_MESSAGE - 1] + "…"
    return text


MAX_REQUEST_ID = 128
"""Characters of a request id: printable ASCII, no space and no "/" (it is a URL path segment)."""


class ServeError(Exception):
    """A request that is answered with an error: HTTP status, OpenAI-style type, one-line message, and
    the outcome it is counted under in shardiff_requests_total."""

    status = 500
    kind = "server_error"
    outcome = "exception"

    def __init__(self, message: str, *, retry_after: int | None = None, outcome: str | None = None):
        super().__init__(message)
        self.retry_after = retry_after
        if outcome is not None:
            self.outcome = outcome


class BadRequest(ServeError, ValueError):
    """A user mistake (the CLI's message): nothing ran, or the ranks refused it before their first collective."""

    status, kind, outcome = 400, "invalid_request_error", "rejected"


class Unauthorized(ServeError):
    status, kind, outcome = 401, "authentication_error", "unauthorized"


class Forbidden(ServeError):
    status, kind, outcome = 403, "permission_error", "forbidden"


class NotFound(ServeError):
    status, kind, outcome = 404, "not_found", "not_found"


class Conflict(ServeError):
    status, kind, outcome = 409, "conflict", "conflict"


class PayloadTooLarge(ServeError):
    status, kind, outcome = 413, "request_too_large", "too_large"


class UnsupportedMediaType(ServeError):
    status, kind, outcome = 415, "invalid_request_error", "unsupported_media_type"


class TooManyRequests(ServeError):
    status, kind, outcome = 429, "queue_full", "queue_full"


class Cancelled(ServeError):
    status, kind, outcome = 499, "cancelled", "cancelled"


class WorkerFailure(ServeError):
    """The model group failed during the request; `outcome` is the failure's kind (rank_died, …)."""

    status, kind = 500, "worker_failed"


class Unavailable(ServeError):
    status, kind, outcome = 503, "unavailable", "shutdown"


class DeadlineExceeded(ServeError):
    status, kind, outcome = 504, "deadline_exceeded", "deadline"


def check_request_id(request_id) -> str:
    """`request_id` if it is a valid id; BadRequest otherwise."""
    if (not isinstance(request_id, str) or not 1 <= len(request_id) <= MAX_REQUEST_ID
            or not all("!" <= c <= "~" for c in request_id) or "/" in request_id):
        raise BadRequest(f"request_id must be 1 to {MAX_REQUEST_ID} printable ASCII characters without spaces or "
                         "\"/\"")
    return request_id
