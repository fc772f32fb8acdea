"""The API's own SigV4 presigner gives botocore's exact URL, and its async HEAD agrees
with boto3 against the S3-compatible server (moto; which does not check signatures,
hence the byte-for-byte comparison with botocore rather than a signature check)."""

from __future__ import annotations

import asyncio
import hashlib
import socket
from datetime import UTC, datetime
from urllib.parse import parse_qs, urlsplit

import pytest

from camfleet.storage import StorageError, fast_s3
from camfleet.storage.fast_s3 import FastS3Presigner, ObjectReader
from camfleet.storage.s3 import S3Store

KEYS = [
    "devices/4b1f/2025/12/26/123-2025-12-26T10-15-30Z_000123.jpg",
    "devices/x/2025/01/01/1-a b.jpg",
    "devices/x/~a+b=c&d%.jpg",
]


@pytest.mark.parametrize(
    "prefix, endpoint, region",
    [
        ("", "http://127.0.0.1:9000", "us-east-1"),
        ("camfleet/objects", "http://127.0.0.1:9000", "eu-west-1"),
        ("", None, "us-east-1"),
        ("p", None, "ap-southeast-2"),
        ("", "http://[::1]:9000", "us-east-1"),  # an IPv6 literal endpoint
    ],
)
@pytest.mark.parametrize("key", KEYS)
def test_presigned_put_is_botocores_url(prefix, endpoint, region, key):
    store = S3Store(
        "camfleet-bucket", prefix, endpoint, region, access_key_id="AKIDEXAMPLE",
        secret_access_key="wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
    )  # fmt: skip
    expected = store.presigned_put(key, "image/jpeg", expires_in=300).url
    amz_date = parse_qs(urlsplit(expected).query)["X-Amz-Date"][0]
    at = datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    assert FastS3Presigner(store).url("PUT", key, 300, "image/jpeg", at) == expected


def test_head_matches_boto3(s3, bucket):
    store = S3Store(
        bucket, "", s3.endpoint_url, s3.region, access_key_id=s3.access_key,
        secret_access_key=s3.secret_key,
    )  # fmt: skip
    presigner = FastS3Presigner(store)
    store.put("devices/d/a.jpg", b"x" * 1234, "image/jpeg")
    s3.client().put_object(Bucket=bucket, Key="devices/d/b c.jpg", Body=b"y" * 10)

    async def heads():
        try:
            return [
                await presigner.head(k)
                for k in ("devices/d/a.jpg", "devices/d/b c.jpg", "devices/d/missing.jpg")
            ]
        finally:
            await presigner.aclose()

    a, b, missing = asyncio.run(heads())
    assert a == store.head("devices/d/a.jpg")
    assert (a.size, a.content_type) == (1234, "image/jpeg") and a.sha256
    assert b.size == 10
    assert missing is None and store.head("devices/d/missing.jpg") is None


def test_session_credentials_fall_back_to_boto3(monkeypatch):
    """Temporary credentials (from the environment, as on an AWS role) refresh inside
    boto3: the fast presigner refuses them rather than sign with a stale token."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKID")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SECRET")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token")
    store = S3Store("b", "", "http://127.0.0.1:9000", "us-east-1")
    with pytest.raises(ValueError):
        FastS3Presigner(store)
    monkeypatch.delenv("AWS_SESSION_TOKEN")
    assert FastS3Presigner(S3Store("b", "", "http://127.0.0.1:9000", "us-east-1")).region


def test_head_survives_a_storage_restart_and_reports_it_down():
    from camfleet.localsvc import S3Instance
    from camfleet.storage import StorageError

    with S3Instance() as server:
        bucket = server.create_bucket("presign-restart")
        store = S3Store(
            bucket, "", server.endpoint_url, server.region, server.access_key, server.secret_key
        )
        store.put("devices/d/a.jpg", b"abc")
        presigner = FastS3Presigner(store)

        async def head():
            return await presigner.head("devices/d/a.jpg")

        async def scenario():
            first = await head()
            # moto restarts empty on the same port: the pooled keep-alive connection is
            # dead; the client must notice and use a fresh one (answer: 404 -> None)
            await asyncio.to_thread(server.restart)
            await asyncio.to_thread(server.create_bucket, "presign-restart")
            second = await head()
            await asyncio.to_thread(server.kill)
            try:
                await head()
            except StorageError as exc:
                third = exc
            await presigner.aclose()
            return first, second, third

        first, second, third = asyncio.run(scenario())
        assert first.size == 3
        assert second is None
        assert "S3 HEAD failed" in str(third)


def test_endpoint_host_and_port_of_ipv6_and_named_hosts():
    v6 = fast_s3._Endpoint("http", "[::1]:9000")
    assert (v6.host, v6.port, v6.tls) == ("::1", 9000, False)
    named = fast_s3._Endpoint("https", "s3.example.org")
    assert (named.host, named.port, named.tls) == ("s3.example.org", 443, True)


def test_head_of_a_silent_store_times_out(monkeypatch):
    """A store that accepts the connection and never answers: the ingest gets a
    StorageError after HEAD_TIMEOUT_S, not a request hung forever."""
    monkeypatch.setattr(fast_s3, "HEAD_TIMEOUT_S", 0.5)
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        store = S3Store("b", "", f"http://127.0.0.1:{port}", "us-east-1", "AKID", "SECRET")
        presigner = FastS3Presigner(store)

        async def head():
            try:
                await presigner.head("devices/d/a.jpg")
            finally:
                await presigner.aclose()

        with pytest.raises(StorageError, match="TimeoutError"):
            asyncio.run(head())


def test_object_reader_hashes_what_is_stored(s3, bucket):
    """The signer's read-back: SHA-256 of the stored bytes, None when absent, no read of
    an object over the grant's limit."""
    store = S3Store(bucket, "pre", s3.endpoint_url, s3.region, s3.access_key, s3.secret_key)
    data = bytes(range(256)) * 400
    store.put("devices/d/a.jpg", data, "image/jpeg")
    reader = ObjectReader.for_store(store)
    try:
        assert reader.digest("devices/d/a.jpg") == (len(data), hashlib.sha256(data).hexdigest())
        assert reader.digest("devices/d/a.jpg", max_bytes=100) == (len(data), None)
        assert reader.digest("devices/d/missing.jpg") is None
        assert reader.digest("devices/d/a.jpg")[1] == hashlib.sha256(data).hexdigest()
    finally:
        reader.close()
