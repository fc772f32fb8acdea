"""HTTP POST of one buffered file to its presigned POST, streamed from disk."""

from __future__ import annotations

from pathlib import Path

import httpx

from camfleet.protocol import edge_batch as eb

# Connect quickly or fail (the batch retries); allow a slow uplink per read/write.
HTTP_TIMEOUT = httpx.Timeout(30.0, connect=5.0)


class UploadExpired(RuntimeError):
    """The store refused the URL (expired or policy): ask the cloud for a new one."""


def http_client() -> httpx.Client:
    # Presigned URLs carry their own authorization; no proxies or netrc from the env.
    return httpx.Client(timeout=HTTP_TIMEOUT, trust_env=False)


def post_file(client: httpx.Client, upload: eb.Upload, buffer_dir: Path) -> None:
    """POST the file as multipart form data: the policy fields first, the file last.

    httpx reads the open file in chunks, so memory stays flat for any file size.
    Raises UploadExpired on a 4xx answer (a new URL is needed) and httpx errors or
    RuntimeError otherwise (retrying the same URL may work).
    """
    path = Path(buffer_dir) / eb.check_device_name(upload.name)
    with open(path, "rb") as f:
        response = client.post(
            upload.url,
            data=upload.fields,
            files={"file": (eb.key_name(upload.name), f, "application/octet-stream")},
        )
    if 200 <= response.status_code < 300:
        return
    if 400 <= response.status_code < 500:
        raise UploadExpired(f"store answered {response.status_code}")
    raise RuntimeError(f"store answered {response.status_code}")
