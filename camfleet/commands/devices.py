"""`camfleet devices list|revoke|rotate|reinstate|assign` and `camfleet users ...`.

The administrator's side of seed 004: device tokens and user API keys are shown once,
when created, and stored only as keyed hashes (camfleet/tokens.py).
"""

from __future__ import annotations

import typer

devices_app = typer.Typer(
    help="Devices: list, revoke, reinstate, assign to a user, and rotate device tokens."
)
# What a camfleet agent (the Visant-compatible device client) reads its token from.
AGENT_TOKEN_SETTING = "CAMFLEET_DEVICE_TOKEN"  # noqa: S105 - a variable name
users_app = typer.Typer(help="Users of the device API and their API keys.")

_BLOCK = typer.Option(None, "--block", help="camfleet-postgres block name")
_SECRETS = typer.Option(None, "--secrets-block", help="camfleet-secrets block name")


def _dsn(block: str | None) -> str:
    from camfleet import resolve

    return resolve.database_url(block)


def _secret(block: str | None) -> bytes:
    from camfleet.settings import get_settings

    settings = get_settings()
    if not (block or settings.secrets_block) and settings.secret_key is not None:
        return settings.secret_key.get_secret_value().encode()
    from camfleet import resolve

    return resolve.secret_key(block)


def _connect(block: str | None):
    import psycopg2.extras

    from camfleet import db

    try:
        return db.connect(_dsn(block), cursor_factory=psycopg2.extras.RealDictCursor)
    except psycopg2.OperationalError as exc:
        # libpq's message names host and port, never the password.
        typer.echo(f"cannot reach the database: {str(exc).strip()}", err=True)
        raise typer.Exit(1) from None


@devices_app.command("list")
def list_devices(
    user: str = typer.Option(None, help="Only this user's devices"),
    kind: str = typer.Option(None, help="Only this kind (lifelog, esp32, visant, ...)"),
    block: str = _BLOCK,
) -> None:
    """Devices with their token state (never the token)."""
    from camfleet import db

    with _connect(block) as conn:
        rows = db.queries.devices_list(conn, user_id=user, kind=kind)
    id_only = 0
    for r in rows:
        state = "revoked" if r["revoked_at"] else ("active" if r["has_token"] else "unpaired")
        id_only += not r["has_token"] and not r["revoked_at"] and r["kind"] == "visant"
        seen = r["last_seen_at"].isoformat() if r["last_seen_at"] else "never"
        typer.echo(
            f"{r['device_id']}  {r['kind']:8} {state:9} user={r['user_id'] or '-'} "
            f"name={r['friendly_name'] or '-'} last_seen={seen}"
        )
    if id_only:  # issue 19: make the secure path the easy one
        typer.echo(
            f"{id_only} Visant device(s) without a token work only in device-id-only mode; "
            f"give each one: `camfleet devices rotate DEVICE`, then set "
            f"{AGENT_TOKEN_SETTING}=<token> on the device",
            err=True,
        )


@devices_app.command("revoke")
def revoke(device_id: str, block: str = _BLOCK) -> None:
    """Revoke a device's token: its next request gets 401."""
    from camfleet import db

    with _connect(block) as conn:
        row = db.queries.devices_revoke(conn, device_id=device_id)
    if row is None:
        typer.echo(f"no device {device_id}", err=True)
        raise typer.Exit(1)
    typer.echo(f"revoked {device_id} at {row['revoked_at'].isoformat()}")


@devices_app.command("rotate")
def rotate(device_id: str, block: str = _BLOCK, secrets_block: str = _SECRETS) -> None:
    """Issue a new device token (printed once); the old one stops working now."""
    from camfleet import db, tokens

    token = tokens.new_device_token()
    token_hash = tokens.hash_device_token(_secret(secrets_block), token)
    with _connect(block) as conn:
        row = db.queries.devices_set_token(conn, device_id=device_id, token_hash=token_hash)
        device = db.queries.devices_get(conn, device_id=device_id) if row is None else None
    if row is None and device is not None:  # revoked: rotation never lifts a revocation
        typer.echo(
            f"{device_id} is revoked: `camfleet devices reinstate {device_id}` first", err=True
        )
        raise typer.Exit(1)
    if row is None:
        typer.echo(f"no device {device_id}", err=True)
        raise typer.Exit(1)
    typer.echo(token)
    typer.echo("store this token on the device now: it is not shown again", err=True)
    typer.echo(
        f"a camfleet agent (Visant device) sends it when started with {AGENT_TOKEN_SETTING} "
        "set to this token (or --device-token); Lifelog devices get theirs by pairing",
        err=True,
    )


@devices_app.command("reinstate")
def reinstate(device_id: str, block: str = _BLOCK) -> None:
    """Lift a revocation. The device needs a new token afterwards (`rotate`)."""
    from camfleet import db

    with _connect(block) as conn:
        row = db.queries.devices_reinstate(conn, device_id=device_id)
    if row is None:
        typer.echo(f"no device {device_id}", err=True)
        raise typer.Exit(1)
    typer.echo(f"reinstated {device_id}; issue it a token: camfleet devices rotate {device_id}")


@devices_app.command("assign")
def assign(device_id: str, user_id: str, block: str = _BLOCK) -> None:
    """Give a device to a user: only its owner's API key reaches it over the API.

    Devices created by MQTT, edge or the CLI have no owner, and no user key reaches
    them until they are assigned.
    """
    from camfleet import db

    with _connect(block) as conn, conn.cursor() as cur:
        cur.execute("SELECT 1 FROM users WHERE user_id = %s", (user_id,))
        if cur.fetchone() is None:
            typer.echo(f"no user {user_id}: `camfleet users create-key {user_id}`", err=True)
            raise typer.Exit(1)
        row = db.queries.devices_assign(conn, device_id=device_id, user_id=user_id)
    if row is None:
        typer.echo(f"no device {device_id}", err=True)
        raise typer.Exit(1)
    typer.echo(f"assigned {device_id} to {user_id}")


@users_app.command("create-key")
def create_key(
    user_id: str,
    name: str = typer.Option(None, help="Display name when the user is new"),
    label: str = typer.Option(None, help="What this key is for"),
    block: str = _BLOCK,
    secrets_block: str = _SECRETS,
) -> None:
    """Create the user if needed and a new API key for it (printed once)."""
    from camfleet import db, tokens
    from camfleet.keys import BadName, safe_id

    try:
        safe_id(user_id, "user id")
    except BadName as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    key = tokens.new_user_key()
    key_hash = tokens.hash_user_key(_secret(secrets_block), key)
    with _connect(block) as conn:
        db.queries.devices_create_user(conn, user_id=user_id, name=name)
        db.queries.devices_create_user_key(conn, user_id=user_id, key_hash=key_hash, label=label)
    typer.echo(key)
    typer.echo(f"API key for {user_id}: use as 'Authorization: Bearer <key>'", err=True)


@users_app.command("revoke-keys")
def revoke_keys(user_id: str, block: str = _BLOCK) -> None:
    """Revoke every API key of a user."""
    from camfleet import db

    with _connect(block) as conn:
        db.queries.devices_revoke_user_keys(conn, user_id=user_id)
    typer.echo(f"revoked the API keys of {user_id}")


def register(app: typer.Typer, simulate: typer.Typer) -> None:
    app.add_typer(devices_app, name="devices")
    app.add_typer(users_app, name="users")
