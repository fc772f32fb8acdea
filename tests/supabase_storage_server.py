"""A small HTTP server speaking Supabase Storage's REST contract, for tests.

Supabase's own storage server cannot run on this machine (it needs its PostgreSQL
schema, an S3 backend and a JWT issuer), so the Supabase backend is tested against
this stand-in: the same routes, headers and JSON bodies the `supabase`/`storage3`
client sends and expects, with the service-role key checked on every request.
"""

from __future__ import annotations

import json
import secrets
import threading

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from camfleet.localsvc import free_port


class SupabaseStorageServer:
    def __init__(self, service_role_key: str) -> None:
        self.key = service_role_key
        self.objects: dict[tuple[str, str], dict] = {}
        self.upload_tokens: dict[str, tuple[str, str]] = {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = Starlette(
            routes=[
                Route("/storage/v1/object/info/{bucket}/{path:path}", self.info, methods=["GET"]),
                Route("/storage/v1/object/list/{bucket}", self.list, methods=["POST"]),
                Route(
                    "/storage/v1/object/upload/sign/{bucket}/{path:path}",
                    self.signed_upload,
                    methods=["POST", "PUT"],
                ),
                Route("/storage/v1/object/{bucket}", self.remove, methods=["DELETE"]),
                Route(
                    "/storage/v1/object/{bucket}/{path:path}",
                    self.object,
                    methods=["GET", "POST", "PUT"],
                ),
            ]
        )
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self):
        self._thread.start()
        while not self._server.started:
            threading.Event().wait(0.02)
        return self

    def __exit__(self, *exc):
        self._server.should_exit = True
        self._thread.join(timeout=5)

    def _authorised(self, request: Request) -> bool:
        return request.headers.get("authorization") == f"Bearer {self.key}"

    @staticmethod
    def _error(status: int, message: str) -> JSONResponse:
        return JSONResponse(
            {
                "statusCode": str(status),
                "error": "not_found" if status == 404 else "error",
                "message": message,
            },
            status_code=status,
        )

    async def object(self, request: Request):
        if not self._authorised(request):
            return self._error(403, "invalid signature")
        bucket, path = request.path_params["bucket"], request.path_params["path"]
        if request.method == "GET":
            obj = self.objects.get((bucket, path))
            if obj is None:
                return self._error(404, "Object not found")
            return Response(obj["data"], media_type=obj["content_type"])
        form = await request.form()
        upload = form["file"]
        data = await upload.read()
        if (bucket, path) in self.objects and request.headers.get("x-upsert") != "true":
            return self._error(409, "The resource already exists")
        meta = json.loads(form.get("metadata") or "{}")
        self.objects[(bucket, path)] = {
            "data": data,
            "content_type": upload.content_type,
            "metadata": meta,
        }
        return JSONResponse({"Key": f"{bucket}/{path}", "Id": secrets.token_hex(8)})

    async def info(self, request: Request):
        if not self._authorised(request):
            return self._error(403, "invalid signature")
        obj = self.objects.get((request.path_params["bucket"], request.path_params["path"]))
        if obj is None:
            return self._error(404, "Object not found")
        return JSONResponse(
            {
                "name": request.path_params["path"],
                "size": len(obj["data"]),
                "content_type": obj["content_type"],
                "metadata": obj["metadata"],
            }
        )

    async def list(self, request: Request):
        if not self._authorised(request):
            return self._error(403, "invalid signature")
        body = await request.json()
        bucket, folder = request.path_params["bucket"], body.get("prefix", "").strip("/")
        out = []
        for (b, path), obj in sorted(self.objects.items()):
            parent, _, name = path.rpartition("/")
            if b == bucket and parent == folder and name.startswith(body.get("search", "")):
                out.append({"id": path, "name": name, "metadata": {"size": len(obj["data"])}})
        return JSONResponse(out)

    async def remove(self, request: Request):
        if not self._authorised(request):
            return self._error(403, "invalid signature")
        bucket = request.path_params["bucket"]
        body = await request.json()
        for path in body["prefixes"]:
            self.objects.pop((bucket, path), None)
        return JSONResponse([{"name": p} for p in body["prefixes"]])

    async def signed_upload(self, request: Request):
        bucket, path = request.path_params["bucket"], request.path_params["path"]
        if request.method == "POST":
            if not self._authorised(request):
                return self._error(403, "invalid signature")
            token = secrets.token_urlsafe(16)
            self.upload_tokens[token] = (bucket, path)
            return JSONResponse({"url": f"/object/upload/sign/{bucket}/{path}?token={token}"})
        if self.upload_tokens.get(request.query_params.get("token", "")) != (bucket, path):
            return self._error(403, "invalid upload token")
        data = await request.body()
        self.objects[(bucket, path)] = {
            "data": data,
            "content_type": request.headers.get("content-type"),
            "metadata": {},
        }
        return JSONResponse({"Key": f"{bucket}/{path}"})
