"""Device tokens, pairing codes and user API keys: generation and keyed hashing.

Only keyed hashes (HMAC-SHA256 with the server secret from `camfleet.resolve.secret_key`)
ever reach the database, so a leaked table gives an attacker nothing to replay and
nothing to brute-force offline without the secret. The clear value is shown once.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

DEVICE_TOKEN_PREFIX = "devtok_"  # noqa: S105 - the seed's token prefix, not a secret
USER_KEY_PREFIX = "cfuk_"  # camfleet user key; a distinct prefix makes leaks greppable

# 32 random bytes (256 bits): far beyond online guessing; URL-safe base64 -> 43 chars.
TOKEN_BYTES = 32

# Pairing codes are typed by a person or pasted into a captive portal, so they are short,
# but 8 symbols of a 32-letter alphabet are 40 bits: with a 10-minute lifetime and the
# activation attempt limits (services/api/ratelimit.py) guessing one is hopeless.
PAIRING_CODE_LEN = 8
# Crockford's base32 alphabet: no I, L, O, U, so nothing is misread when typed.
PAIRING_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"

# A token header longer than this is not one of ours; refuse before hashing.
MAX_TOKEN_LEN = 128

# Domain separation: the same secret keys several kinds of hashes.
_DEVICE_TOKEN = b"device-token\x00"
_PAIRING_CODE = b"pairing-code\x00"
_USER_KEY = b"user-key\x00"


def new_device_token() -> str:
    return DEVICE_TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


def new_user_key() -> str:
    return USER_KEY_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


def new_pairing_code() -> str:
    return "".join(secrets.choice(PAIRING_ALPHABET) for _ in range(PAIRING_CODE_LEN))


def normalize_pairing_code(code: str) -> str:
    """Uppercase, without spaces or dashes, with Crockford's look-alikes mapped."""
    code = code.strip().upper().replace("-", "").replace(" ", "")
    return code.translate(str.maketrans({"O": "0", "I": "1", "L": "1"}))


def _keyed(secret: bytes, domain: bytes, value: str) -> str:
    return hmac.new(secret, domain + value.encode(), hashlib.sha256).hexdigest()


def hash_device_token(secret: bytes, token: str) -> str:
    return _keyed(secret, _DEVICE_TOKEN, token)


def hash_pairing_code(secret: bytes, code: str) -> str:
    return _keyed(secret, _PAIRING_CODE, normalize_pairing_code(code))


def hash_user_key(secret: bytes, key: str) -> str:
    return _keyed(secret, _USER_KEY, key)


def plausible_token(value: str | None, prefix: str) -> bool:
    """Cheap shape check before any hashing or database work."""
    return bool(value) and len(value) <= MAX_TOKEN_LEN and value.startswith(prefix)
