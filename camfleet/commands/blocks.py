"""`camfleet blocks register|from-env`: credentials into Prefect Blocks."""

from __future__ import annotations

import typer

blocks_app = typer.Typer(help="Prefect Blocks holding every credential and endpoint.")


@blocks_app.command("register")
def register_types() -> None:
    """Register the block types with the Prefect server (= prefect block register -m blocks)."""
    import blocks

    for name in blocks.__all__:
        getattr(blocks, name).register_type_and_schema()
        typer.echo(f"registered {getattr(blocks, name).get_block_type_slug()}")


def blocks_from_env() -> dict[str, object]:
    """The blocks the environment describes, keyed by block type slug (nothing saved)."""
    import blocks
    from camfleet.settings import Settings

    s = Settings()
    found: dict[str, object] = {"camfleet-mqtt-broker": blocks.MqttBroker.from_env()}
    if s.database_url:
        found["camfleet-postgres"] = blocks.PostgresDatabase.from_env()
    if s.supabase_url and s.supabase_service_role:
        found["camfleet-supabase-project"] = blocks.SupabaseProject(
            url=s.supabase_url,
            service_role_key=s.supabase_service_role,
            bucket=s.supabase_storage_bucket,
        )
    if s.storage_url and s.storage_url.startswith("s3://"):
        from urllib.parse import parse_qs, urlparse

        u = urlparse(s.storage_url)
        q = {k: v[-1] for k, v in parse_qs(u.query).items()}
        found["camfleet-s3-bucket"] = blocks.S3Bucket(
            bucket=u.netloc,
            prefix=u.path.strip("/"),
            endpoint_url=q.get("endpoint_url") or s.s3_endpoint_url,
            region=q.get("region") or s.aws_region,
            access_key_id=s.aws_access_key_id,
            secret_access_key=s.aws_secret_access_key,
        )
    if s.secret_key:
        found["camfleet-secrets"] = blocks.CamfleetSecrets(secret_key=s.secret_key)
    return found


@blocks_app.command("from-env")
def from_env(
    name: str = typer.Option("default", help="Name to save each block under."),
    overwrite: bool = typer.Option(True, help="Replace blocks of the same name."),
) -> None:
    """Save blocks made from MQTT_*, DATABASE_URL, SUPABASE_*, STORAGE_URL, CAMFLEET_SECRET_KEY."""
    for slug, block in blocks_from_env().items():
        block.save(name, overwrite=overwrite)
        typer.echo(f"saved {slug}/{name}")


def register(app: typer.Typer, simulate: typer.Typer) -> None:
    app.add_typer(blocks_app, name="blocks")
