"""Login by token, sessions in a signed cookie, CSRF tokens and the Origin check.

Stateless: the session cookie is ``<session id>.<name>.<HMAC(token, id.name)>``,
so changing the token logs everybody out. The CSRF token of a session is
``HMAC(token, "csrf:" + id)``: forms carry it, and a POST without the right one
is refused (403), as is a POST whose Origin (or, without one, Referer) is not
this dashboard's. The cookie is HttpOnly and SameSite=Strict.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from urllib.parse import urlsplit

COOKIE = "pgjournal_dashboard"


def _mac(token: str, message: str) -> str:
    return hmac.new(token.encode(), message.encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Session:
    sid: str
    name: str

    def csrf(self, token: str) -> str:
        return _mac(token, "csrf:" + self.sid)


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _unb64(text: str) -> str:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()


def new_cookie(token: str, name: str) -> str:
    sid = secrets.token_hex(16)
    body = f"{sid}.{_b64(name)}"
    return f"{body}.{_mac(token, body)}"


def read_cookie(token: str | None, value: str | None) -> Session | None:
    if not token or not value or value.count(".") != 2:
        return None
    sid, name, mac = value.split(".")
    if not hmac.compare_digest(mac, _mac(token, f"{sid}.{name}")):
        return None
    try:
        return Session(sid, _unb64(name))
    except (ValueError, UnicodeDecodeError):
        return None


def token_matches(token: str | None, given: str) -> bool:
    return bool(token) and hmac.compare_digest(
        hashlib.sha256(given.encode()).digest(), hashlib.sha256(str(token).encode()).digest())


def same_origin(headers: dict[str, str], allowed: tuple[str, ...] = ()) -> bool:
    """Does the POST come from a page of this dashboard? Origin, else Referer,
    must name the host the request was sent to (any scheme: a TLS-terminating
    proxy in front turns https into http), or be one of ``allowed`` (origins
    such as ``https://ops.example.com``, for a proxy that rewrites Host). A
    request with neither header (not a browser) is left to the CSRF token."""
    origin = headers.get("origin")
    if origin is None:
        origin = headers.get("referer")
        if not origin:
            return True
    if origin == "null":
        return False
    parts = urlsplit(origin)
    if f"{parts.scheme}://{parts.netloc}" in allowed:
        return True
    return bool(parts.netloc) and parts.netloc.lower() == headers.get("host", "").lower()
