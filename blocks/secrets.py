"""The server secret keying device-token hashes, pairing codes and local upload URLs."""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import SecretStr


class CamfleetSecrets(Block):
    _block_type_name = "camfleet Server Secrets"
    _block_type_slug = "camfleet-secrets"
    _description = "HMAC key for device tokens, pairing codes and signed upload URLs."

    secret_key: SecretStr
