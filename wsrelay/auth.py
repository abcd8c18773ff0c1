"""Relay keys: who may use the relay, and the key id their usage is billed to.

Keys are configured as the key itself or as ``sha256:<hex>``; both are held as SHA-256 digests and compared in
constant time, so a configured key never needs to sit in memory or in a file in the clear.
"""

import hashlib
import hmac


def digest(key):
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_id(key):
    """A stable, non-reversible name for a key, safe to log and store."""
    return digest(key)[:16]


def bearer_token(authorization):
    """The token of an ``Authorization: Bearer <token>`` header value, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


class KeyRing:
    """The configured relay keys.  Empty means passthrough: every client is let through with its own credential."""

    def __init__(self, keys=()):
        self._digests = []
        for key in keys:
            if key.startswith("sha256:"):
                self._digests.append(bytes.fromhex(key[len("sha256:"):].lower()))
            else:
                self._digests.append(hashlib.sha256(key.encode("utf-8")).digest())

    @property
    def enabled(self):
        return bool(self._digests)

    def check(self, token):
        """True when ``token`` is one of the keys.  Every configured digest is compared, whatever matches."""
        if token is None:
            return False
        candidate = hashlib.sha256(token.encode("utf-8")).digest()
        found = False
        for known in self._digests:
            found |= hmac.compare_digest(candidate, known)
        return found
