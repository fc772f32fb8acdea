"""An S3-compatible HTTP server on a loopback port: moto's server mode, as a subprocess.

A subprocess (rather than moto's in-process ThreadedMotoServer) so it can be killed
and restarted like a real service. moto keeps everything in memory: a restart
(graceful or not) comes back on the same port with NO buckets and NO objects. That is
what "the object store was down" tests need; tests that need data across a restart
must re-create it.

moto does not authenticate: any access key/secret is accepted, and presigned URLs
are honoured even with a wrong signature or after they expire (checked with moto
5.2). Tests of "expired/forged URL is refused" cannot rely on this server; they must
check the URL our code produced (X-Amz-Expires, X-Amz-Credential) instead.
"""

from __future__ import annotations

import os
import sys
import urllib.request

from ._base import LocalService

ACCESS_KEY = "camfleet-test-access-key"
SECRET_KEY = "camfleet-test-secret-key"  # noqa: S105 - moto accepts any credentials
REGION = "us-east-1"


class S3Instance(LocalService):
    """moto S3 server on 127.0.0.1:port.

    Attributes: host, port, endpoint_url, access_key, secret_key, region, log_path.
    """

    name = "s3"
    start_timeout_s = 60.0

    def __init__(self, port: int | None = None):
        super().__init__(port=port)
        self.access_key = ACCESS_KEY
        self.secret_key = SECRET_KEY
        self.region = REGION

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        # The server must not pick up real credentials or proxies from our environment.
        for key in list(env):
            if key.startswith("AWS_") or key.lower() in ("http_proxy", "https_proxy"):
                del env[key]
        env["AWS_DEFAULT_REGION"] = self.region
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)]

    def _is_ready(self) -> bool:
        # moto answers /moto-api/ only once its Flask app is fully set up.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"{self.endpoint_url}/moto-api/", timeout=2) as resp:
            return resp.status == 200

    def client(self):
        """A boto3 S3 client for this server."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                retries={"max_attempts": 1},
            ),
        )

    def create_bucket(self, name: str) -> str:
        """Create bucket `name` (us-east-1 needs no location constraint); return the name."""
        self.client().create_bucket(Bucket=name)
        return name
