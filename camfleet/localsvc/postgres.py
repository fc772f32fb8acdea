"""A private PostgreSQL cluster on a loopback port.

PostgreSQL refuses to run as root. When we are root the cluster is owned by, and
initdb/postgres run as, the `postgres` system user (Popen's user/group switch, the
same effect as `runuser -u postgres --` without an extra process between us and the
postmaster). Its data directory therefore lives in a temp directory with mode 0755
so that user can traverse to it.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import signal
import subprocess
from pathlib import Path

import psycopg2
from psycopg2 import sql

from ._base import LocalService, ServiceStartError, run_command

PG_SUPERUSER = "postgres"
# Unix socket paths are limited to 107 bytes; ".s.PGSQL.NNNNN" needs 15 of them.
_MAX_SOCKET_DIR_LEN = 90
# PostgreSQL identifiers are at most 63 bytes; we only accept plain lowercase names
# so a database name never needs quoting anywhere else either.
_DB_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def find_pg_bindir() -> Path:
    """Directory holding initdb and postgres: pg_config, the newest Debian layout, PATH."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            candidates.append(Path(out))
        except (subprocess.SubprocessError, OSError):
            pass

    def version_key(p: str) -> tuple[int, ...]:
        m = re.search(r"/postgresql/([\d.]+)/bin", p)
        return tuple(int(x) for x in m.group(1).split(".")) if m else (0,)

    candidates += [
        Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version_key)[::-1]
    ]
    on_path = shutil.which("postgres")
    if on_path:
        candidates.append(Path(os.path.realpath(on_path)).parent)
    for c in candidates:
        if (c / "postgres").is_file() and (c / "initdb").is_file():
            return c
    raise FileNotFoundError(
        "PostgreSQL server binaries (initdb, postgres) not found: "
        "install postgresql (apt-get install postgresql)"
    )


class PostgresInstance(LocalService):
    """PostgreSQL on 127.0.0.1:port, trust authentication, superuser `postgres`.

    data_dir: reuse (or create) a cluster there, e.g. for `camfleet up`; by default a
    fresh cluster in a temp directory, removed on close(). fast=True turns off fsync,
    synchronous_commit and full_page_writes (tests only: a crash can lose data).

    Attributes: host, port, dsn, data_dir, bindir, log_path.
    """

    name = "postgres"
    start_timeout_s = 60.0
    # SIGINT is PostgreSQL's "fast shutdown": roll back sessions, checkpoint, exit.
    # Sent to the postmaster only; it stops its own children.
    stop_signal = signal.SIGINT
    stop_signal_group = False

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        port: int | None = None,
        fast: bool = False,
        user: str = PG_SUPERUSER,
    ):
        super().__init__(port=port)
        # The temp work dir holds the log and (by default) the cluster; the run-as
        # user must be able to traverse it (not list it: 0711).
        os.chmod(self.workdir, 0o711)  # noqa: S103
        self.data_dir = Path(data_dir).resolve() if data_dir is not None else self.workdir / "data"
        self.fast = fast
        self.user = user
        self.bindir = find_pg_bindir()
        self._run_as = self._resolve_run_as()
        if len(str(self.data_dir)) <= _MAX_SOCKET_DIR_LEN:
            self.socket_dir = self.data_dir
        else:
            self.socket_dir = self.workdir / "sock"

    @property
    def dsn(self) -> str:
        return self.dsn_for("postgres")

    def dsn_for(self, dbname: str) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname}"

    # ---- running as the postgres user when root ------------------------------------

    def _resolve_run_as(self) -> pwd.struct_passwd | None:
        if os.geteuid() != 0:
            return None
        try:
            return pwd.getpwnam("postgres")
        except KeyError:
            raise ServiceStartError(
                "running as root, and PostgreSQL refuses to run as root, but there is no "
                "`postgres` system user to run it as (install postgresql or useradd postgres)"
            ) from None

    def _popen_user(self) -> dict[str, object]:
        if self._run_as is None:
            return {}
        return {"user": self._run_as.pw_uid, "group": self._run_as.pw_gid, "extra_groups": []}

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C.UTF-8"
        if self._run_as is not None:
            env["HOME"] = self._run_as.pw_dir
            env["USER"] = env["LOGNAME"] = self._run_as.pw_name
        return env

    def _check_traversable(self, path: Path) -> None:
        """The postgres user must be able to reach data_dir through every parent."""
        assert self._run_as is not None
        uid, gid = self._run_as.pw_uid, self._run_as.pw_gid
        for parent in path.parents:
            st = parent.stat()
            ok = (
                st.st_mode & 0o001
                or (st.st_uid == uid and st.st_mode & 0o100)
                or (st.st_gid == gid and st.st_mode & 0o010)
            )
            if not ok:
                raise ServiceStartError(
                    f"the postgres user cannot traverse {parent} (mode {oct(st.st_mode & 0o777)})"
                    f" to reach {path}: chmod o+x it or choose another data_dir"
                )

    # ---- lifecycle hooks -----------------------------------------------------------

    def _prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        if self._run_as is not None:
            self._check_traversable(self.data_dir)
            for d in {self.data_dir, self.socket_dir}:
                os.chown(d, self._run_as.pw_uid, self._run_as.pw_gid)
        os.chmod(self.data_dir, 0o700)
        if (self.data_dir / "PG_VERSION").exists():
            return  # an initialised cluster: reuse it
        args = [
            str(self.bindir / "initdb"),
            "-D",
            str(self.data_dir),
            "-U",
            self.user,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C.UTF-8",
        ]
        if self.fast:
            args.append("--no-sync")
        result = subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=120,
            env=self._env(),
            cwd=self.workdir,
            check=False,
            **self._popen_user(),  # type: ignore[arg-type]
        )
        with open(self.log_path, "a") as log:
            log.write(result.stdout + result.stderr)
        if result.returncode != 0:
            raise ServiceStartError(
                f"initdb failed with code {result.returncode}:\n{result.stdout}{result.stderr}"
            )

    def _command(self) -> list[str]:
        args = [
            str(self.bindir / "postgres"),
            "-D",
            str(self.data_dir),
            "-c",
            f"listen_addresses={self.host}",
            "-c",
            f"port={self.port}",
            "-c",
            f"unix_socket_directories={self.socket_dir}",
            "-c",
            "logging_collector=off",
        ]
        if self.fast:
            for setting in ("fsync=off", "synchronous_commit=off", "full_page_writes=off"):
                args += ["-c", setting]
        return args

    def _is_ready(self) -> bool:
        pg_isready = self.bindir / "pg_isready"
        if pg_isready.is_file():
            result = subprocess.run(
                [str(pg_isready), "-q", "-h", self.host, "-p", str(self.port), "-t", "1"],
                timeout=5,
                check=False,
                env=self._env(),
            )
            if result.returncode != 0:
                return False
        # pg_isready says "accepting connections"; a real login proves trust auth works.
        conn = psycopg2.connect(self.dsn, connect_timeout=2)
        conn.close()
        return True

    # ---- databases -----------------------------------------------------------------

    def _admin(self, statement: sql.Composable) -> None:
        conn = psycopg2.connect(self.dsn, connect_timeout=10)
        try:
            conn.autocommit = True  # CREATE/DROP DATABASE cannot run in a transaction
            with conn.cursor() as cur:
                cur.execute(statement)
        finally:
            conn.close()

    @staticmethod
    def _check_name(name: str) -> str:
        if not _DB_NAME_RE.match(name):
            raise ValueError(f"database name must match {_DB_NAME_RE.pattern}: {name!r}")
        return name

    def create_database(self, name: str, template: str | None = None) -> str:
        """Create database `name` (optionally as a copy of `template`); return its DSN.

        Copying a template needs no other session connected to the template.
        """
        stmt = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self._check_name(name)))
        if template is not None:
            stmt = sql.SQL("{} TEMPLATE {}").format(
                stmt, sql.Identifier(self._check_name(template))
            )
        self._admin(stmt)
        return self.dsn_for(name)

    def drop_database(self, name: str) -> None:
        """Drop database `name` if it exists, disconnecting its sessions (PG 13+)."""
        self._admin(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(self._check_name(name))
            )
        )

    def psql(self, *args: str, dbname: str = "postgres", timeout: float = 60.0) -> str:
        """Run psql against this instance and return its stdout."""
        return run_command(
            [str(self.bindir / "psql"), "-X", "-v", "ON_ERROR_STOP=1", self.dsn_for(dbname), *args],
            timeout=timeout,
        ).stdout
