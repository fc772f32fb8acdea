"""camfleet.db.Pool keeps its connections between transactions (a backend per
transaction cost PostgreSQL ~10 ms of CPU each) and drops them all when the server goes."""

from __future__ import annotations

import pytest

from camfleet import db


def backend_pid(pool: db.Pool) -> int:
    with pool.connection() as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        return cur.fetchone()[0]


def test_transactions_reuse_one_connection(database_url):
    pool = db.Pool(database_url, maxconn=4)
    try:
        assert len({backend_pid(pool) for _ in range(5)}) == 1
    finally:
        pool.close()


def test_a_dropped_server_connection_empties_the_idle_pool(database_url):
    pool = db.Pool(database_url, maxconn=4)
    try:
        first = backend_pid(pool)
        with db.transaction(database_url) as admin, admin.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(%s)", (first,))
        with pytest.raises(db.CONNECTION_ERRORS):
            backend_pid(pool)
        assert backend_pid(pool) != first  # a fresh connection, not another dead one
    finally:
        pool.close()
