"""SignalR connection tokens any node can check: no sticky sessions, no shared store.

``POST /negotiate`` on one node hands out a token; the client then opens its WebSocket with
``?id=<token>``, and HAProxy may send that socket to another node. The token is therefore not a
key into local memory but a short-lived statement signed with a secret every node of the cluster
shares (``--signalr-token-secret``): ``<expiry>.<nonce>.<signature>``, all URL-safe, because the
client appends it to the URL without encoding.

A token proves that this client passed admission on ``/negotiate`` shortly before; the socket
itself passes admission again (key, Origin, limits), so a replay within the lifetime gains
nothing a direct connection would not.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass

_SIG_BYTES = 18  # 144 bits of HMAC-SHA256, 24 URL-safe characters
_MAX_TOKEN_CHARS = 128


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def derive_secret(token_secret: str, deployment_key: str) -> bytes:
    """The signing secret: the configured one; else one derived from the deployment key (every node
    has it); else a fixed public value, with which tokens only prove their format and expiry."""
    material = token_secret or deployment_key
    return hmac.new(material.encode("utf-8"), b"cms-signalr-connection-token/1", hashlib.sha256).digest()


@dataclass(frozen=True, slots=True)
class IssuedConnection:
    connection_id: str
    connection_token: str


class ConnectionTokens:
    def __init__(self, secret: bytes, *, lifetime_seconds: float = 300.0) -> None:
        if not secret:
            raise ValueError("token secret must not be empty")
        self._secret = secret
        self.lifetime_seconds = lifetime_seconds

    def __repr__(self) -> str:
        return f"ConnectionTokens(lifetime={self.lifetime_seconds}s)"

    def _sign(self, body: str) -> str:
        return _b64(hmac.new(self._secret, body.encode("ascii"), hashlib.sha256).digest()[:_SIG_BYTES])

    def issue(self, now: float) -> IssuedConnection:
        expiry = int(now + self.lifetime_seconds)
        body = f"{expiry:x}.{_b64(secrets.token_bytes(12))}"
        token = f"{body}.{self._sign(body)}"
        return IssuedConnection(connection_id=_b64(secrets.token_bytes(16)), connection_token=token)

    def verify(self, token: str, now: float) -> bool:
        if not token or len(token) > _MAX_TOKEN_CHARS or not token.isascii():
            return False
        body, dot, signature = token.rpartition(".")
        if not dot:
            return False
        expiry_text, dot, _nonce = body.partition(".")
        if not dot:
            return False
        try:
            expiry = int(expiry_text, 16)
        except ValueError:
            return False
        if not hmac.compare_digest(self._sign(body), signature):
            return False
        return now <= expiry
