"""Supabase project block (seed 002: SUPABASE_URL, SUPABASE_SERVICE_ROLE, bucket)."""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import SecretStr


class SupabaseProject(Block):
    _block_type_name = "camfleet Supabase Project"
    _block_type_slug = "camfleet-supabase-project"
    _description = "A Supabase project whose Storage bucket receives captures."

    url: str
    service_role_key: SecretStr
    bucket: str = "gxp-captures"

    def store(self):
        from camfleet.storage.supabase import SupabaseStore

        return SupabaseStore(self.url, self.service_role_key.get_secret_value(), self.bucket)
