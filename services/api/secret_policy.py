"""The server secret must be strong enough that nobody can guess it.

It keys the hashes of device tokens, pairing codes and user API keys, and signs local
upload URLs: with an empty or short secret anyone can compute a valid upload signature
and write any object. So the API refuses to start with a weak one, saying why (never
the secret itself).
"""

from __future__ import annotations

# 32 bytes is what `camfleet up` generates (secrets.token_urlsafe(32) is 43 characters)
# and what HMAC-SHA256 can use in full.
MIN_SECRET_BYTES = 32
# A long run of one or two characters ("aaaa...", "abababab...") is not a secret.
MIN_DISTINCT_CHARS = 8


class WeakSecret(RuntimeError):
    """The configured server secret is too weak to run with."""


def require_strong_secret(secret: bytes | str) -> bytes:
    """The secret as bytes; raises WeakSecret (message without the secret) if weak."""
    raw = secret.encode() if isinstance(secret, str) else bytes(secret)
    hint = "generate one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
    if len(raw.strip()) < MIN_SECRET_BYTES:
        raise WeakSecret(
            f"the server secret (CAMFLEET_SECRET_KEY or the camfleet-secrets block) is "
            f"{len(raw.strip())} bytes; at least {MIN_SECRET_BYTES} are required: {hint}"
        )
    if len(set(raw)) < MIN_DISTINCT_CHARS:
        raise WeakSecret(
            f"the server secret has fewer than {MIN_DISTINCT_CHARS} distinct characters; "
            f"use a random one: {hint}"
        )
    return raw
