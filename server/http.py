"""JSON over HTTP beside gRPC: the same servicer, messages in protobuf's canonical JSON mapping, and the console."""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import ssl
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import Message

from lookalike.v1 import lookalike_pb2 as pb
from server.admission import Admission
from server.errors import Overloaded, ServingError, status_of
from server.openapi import CONSOLE_DIR, ROUTES, openapi_document
from server.servicer import ImageSimilarityServicer
from server.version import ServedVersion

log = logging.getLogger(__name__)
# grpc-gateway's mapping of gRPC status codes to HTTP statuses (runtime.HTTPStatusFromCode).
HTTP_STATUS = {
    grpc.StatusCode.OK: 200, grpc.StatusCode.CANCELLED: 499, grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409, grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400, grpc.StatusCode.ABORTED: 409, grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501, grpc.StatusCode.INTERNAL: 500, grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}
# A request larger than max_message_bytes is RESOURCE_EXHAUSTED, as gRPC answers it, but with HTTP's own status
# for it: 429 would tell a client to retry the same bytes later.
TOO_LARGE_STATUS = 413
# The gRPC wire's timeout header (grpc-gateway reads it too): an amount and a unit, e.g. 500m or 2S.
_TIMEOUT = re.compile(r"^(\d{1,8})([HMSmun])$")
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
_IMAGE_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
                ".gif": "image/gif", ".bmp": "image/bmp", ".tif": "image/tiff", ".tiff": "image/tiff"}
# Distinct values offered per attribute key by /v1/attributes (the most common first): enough for a console's list.
MAX_ATTRIBUTE_VALUES = 500
# Image ids listed by /v1/products/{product_id}/images, main first: as many as a match's group_size may list.
MAX_PRODUCT_IMAGES = 100
# JSON of more than this many bytes (a body, or an answer of that size on the wire) is parsed or written in a
# thread: a 32 MiB body takes a fifth of a second to parse, which the event loop (gRPC's too) must not wait for.
ON_LOOP_JSON_BYTES = 256 * 1024
# Those threads are the HTTP layer's own, not the default executor that loads and swaps versions: a flood of large
# bodies waits for these two (admission bounds how many wait) while a swap or a hide goes ahead.
JSON_THREADS = 2
# JSON carries bytes in base64, 4 characters for 3 bytes; what else a request holds beside its images (field names,
# quotes, numbers written out, e.g. a 4096-dimension vector query at ~15 characters a value) fits in this allowance.
JSON_ALLOWANCE_BYTES = 256 * 1024
# A body that stops arriving for this long is refused: DEADLINE_EXCEEDED, with HTTP's own status for it
# (grpc-gateway's 504 would blame a server upstream).
BODY_IDLE_S = 30.0
BODY_IDLE_STATUS = 408
# ...and so is one that arrives slower, on average, than this after its first BODY_IDLE_S: a byte now and then
# would otherwise keep the idle timer from firing and hold an admission place as long as the sender likes.
MIN_BODY_BYTES_PER_S = 64 * 1024
# Of the process's admission budget, the share that HTTP calls still reading their body may hold, so that slow
# uploads (each bounded by the two rules above) never leave gRPC's calls without a place.
MAX_READING_SHARE = 0.5
# gRPC's client-side message for a call past its deadline, which an HTTP caller gets too.
DEADLINE_MESSAGE = "Deadline Exceeded"


def max_body_bytes(max_message_bytes: int) -> int:
    """The largest JSON body that can hold a message of max_message_bytes: its bytes in base64, plus the allowance."""
    return -(-max_message_bytes // 3) * 4 + JSON_ALLOWANCE_BYTES


class HttpAbort(Exception):
    """An answer of a gRPC code, with grpc-gateway's HTTP status for it unless `status` says otherwise."""

    def __init__(self, code: grpc.StatusCode, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


class HttpContext:
    """What the servicer asks of a gRPC context (time_remaining, abort, code), for a call that came over HTTP."""

    def __init__(self, timeout_s: float | None) -> None:
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._code: grpc.StatusCode | None = None

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    async def abort(self, code: grpc.StatusCode, message: str) -> None:
        self._code = code
        raise HttpAbort(code, message)

    def code(self) -> grpc.StatusCode | None:
        return self._code


def parse_timeout(value: str | None) -> float | None:
    """The grpc-timeout header's seconds; None when absent. Malformed is INVALID_ARGUMENT."""
    if value is None:
        return None
    match = _TIMEOUT.match(value.strip())
    if match is None:
        raise HttpAbort(grpc.StatusCode.INVALID_ARGUMENT,
                        f"grpc-timeout {value!r} is not an amount and a unit (H, M, S, m, u, n), e.g. 500m")
    return int(match.group(1)) * _TIMEOUT_UNITS[match.group(2)]


def error_response(code: grpc.StatusCode, message: str, status: int | None = None) -> web.Response:
    return web.json_response({"code": code.name, "message": message},
                             status=status or HTTP_STATUS.get(code, 500))


class HttpApi:
    """The routes; every RPC goes through the gRPC servicer, so metrics, error mapping and admission are one code."""

    def __init__(self, servicer: ImageSimilarityServicer, max_message_bytes: int, admission: Admission,
                 ready: Callable[[], bool], catalogue_dir: Path | None = None,
                 body_idle_s: float = BODY_IDLE_S, min_body_bytes_per_s: float = MIN_BODY_BYTES_PER_S) -> None:
        self.servicer = servicer
        self.max_message_bytes = max_message_bytes
        # A body is read only up to what can hold a message gRPC would accept; the parsed message is then held to
        # the limit itself, exactly as gRPC holds it.
        self.max_body_bytes = max_body_bytes(max_message_bytes)
        self.admission = admission  # the process's one budget of calls, which the gRPC port draws from too
        self.ready = ready
        self.catalogue_dir = catalogue_dir
        self.body_idle_s = body_idle_s
        self.min_body_bytes_per_s = min_body_bytes_per_s
        self.max_reading = max(1, int(admission.limit * MAX_READING_SHARE))
        self.reading = 0  # HTTP calls reading their body now (on the event loop: no lock)
        self._json_pool = ThreadPoolExecutor(JSON_THREADS, thread_name_prefix="http-json")
        self._attributes: tuple[tuple[str, int], dict] | None = None
        self._openapi: dict | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes, middlewares=[self._errors])
        app.on_cleanup.append(self._close)
        for method, route in ROUTES.items():
            verb = "GET" if method == "GetInfo" else "POST"
            app.router.add_route(verb, route, self._rpc_handler(method))
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/v1/attributes", self.attributes)
        app.router.add_get("/v1/images/{image_id}", self.image)
        app.router.add_get("/v1/products/{product_id}/images", self.product_images)
        app.router.add_get("/openapi.json", self.openapi)
        app.router.add_get("/", self.console_index)
        app.router.add_static("/console/", CONSOLE_DIR, follow_symlinks=False)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except HttpAbort as error:
            return error_response(error.code, error.message, error.status)
        except ServingError as error:  # a route outside the servicer, e.g. while the model still loads
            return error_response(status_of(error), str(error))
        except web.HTTPRequestEntityTooLarge:
            return error_response(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  f"the request is larger than the server's limit of {self.max_message_bytes} "
                                  f"bytes ({self.max_body_bytes} bytes of JSON)", TOO_LARGE_STATUS)
        except web.HTTPException as error:
            if error.status < 400:
                raise
            code = {404: grpc.StatusCode.NOT_FOUND, 405: grpc.StatusCode.UNIMPLEMENTED}.get(
                error.status, grpc.StatusCode.INVALID_ARGUMENT)
            return error_response(code, error.reason, error.status)
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            return error_response(grpc.StatusCode.INTERNAL, "internal error; see the server log")

    def _rpc_handler(self, method: str):
        rpc = getattr(self.servicer, method)
        request_type = getattr(pb, pb.DESCRIPTOR.services_by_name["ImageSimilarity"].methods_by_name[method]
                               .input_type.name)

        async def handle(request: web.Request) -> web.Response:
            timeout_s = parse_timeout(request.headers.get("grpc-timeout"))
            _check_content_type(request)
            self.admission.enter("http")  # before the body is read, as gRPC's side admits before reading a message
            try:
                context = HttpContext(timeout_s)
                # As gRPC does at a call's deadline: the call is cancelled wherever it is (reading the body, waiting
                # for the model), gives back what it holds, and DEADLINE_EXCEEDED is the answer.
                async with asyncio.timeout(timeout_s):
                    message = await self._parse(request, request_type())
                    return await self._message_response(await rpc(message, context))
            except TimeoutError:
                if context.time_remaining() != 0.0:
                    raise
                raise HttpAbort(grpc.StatusCode.DEADLINE_EXCEEDED, DEADLINE_MESSAGE) from None
            finally:
                self.admission.leave()

        return handle

    async def _in_pool(self, function, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self._json_pool,
                                                                functools.partial(function, *args, **kwargs))

    async def _message_response(self, message: Message) -> web.Response:
        write = json_format.MessageToJson
        text = (write(message, indent=None) if message.ByteSize() <= ON_LOOP_JSON_BYTES
                else await self._in_pool(write, message, indent=None))
        return web.Response(text=text, content_type="application/json")

    async def _read_body(self, request: web.Request) -> bytes:
        """The body, up to max_body_bytes (413 beyond); each part within body_idle_s of the last, and the whole at
        min_body_bytes_per_s on average after its first body_idle_s (408 otherwise); while at most max_reading
        calls read theirs (429 beyond)."""
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            raise web.HTTPRequestEntityTooLarge(max_size=self.max_body_bytes, actual_size=request.content_length)
        if self.reading >= self.max_reading:
            self.admission.refused("http", "http_bodies")
            raise Overloaded(f"more than {self.max_reading} HTTP bodies arriving at once on this server process "
                             f"(half of --max-concurrent-rpcs); retry shortly")
        self.reading += 1
        try:
            return await self._read_parts(request)
        finally:
            self.reading -= 1

    async def _read_parts(self, request: web.Request) -> bytes:
        body = bytearray()
        started = time.monotonic()
        while True:
            # What the average rate allows for the next part, never more than the idle limit.
            allowed = started + self.body_idle_s + len(body) / self.min_body_bytes_per_s - time.monotonic()
            try:
                async with asyncio.timeout(max(0.0, min(self.body_idle_s, allowed))):
                    part = await request.content.readany()
            except TimeoutError:
                raise HttpAbort(grpc.StatusCode.DEADLINE_EXCEEDED, f"the body arrived too slowly: {len(body)} bytes "
                                f"in {time.monotonic() - started:.1f} s (a part at least every "
                                f"{self.body_idle_s:g} s, {self.min_body_bytes_per_s / 1024:g} KiB/s on average "
                                f"after the first {self.body_idle_s:g} s)", BODY_IDLE_STATUS) from None
            if not part:
                return bytes(body)
            body += part
            if len(body) > self.max_body_bytes:
                raise web.HTTPRequestEntityTooLarge(max_size=self.max_body_bytes, actual_size=len(body))

    async def _parse(self, request: web.Request, message: Message) -> Message:
        if request.method == "GET":
            return message
        body = await self._read_body(request)
        if not body.strip():
            return message
        try:
            if len(body) <= ON_LOOP_JSON_BYTES:
                json_format.Parse(body, message)
            else:
                await self._in_pool(json_format.Parse, body, message)
        except (json_format.ParseError, UnicodeDecodeError) as error:
            raise HttpAbort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"the body is not a {message.DESCRIPTOR.full_name} in JSON: {error}") from None
        if message.ByteSize() > self.max_message_bytes:
            # What gRPC answers for a message over max_receive_message_length.
            raise web.HTTPRequestEntityTooLarge(max_size=self.max_message_bytes, actual_size=message.ByteSize())
        return message

    async def healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, _request: web.Request) -> web.Response:
        if self.ready():
            return web.json_response({"status": "SERVING"})
        return web.json_response({"status": "NOT_SERVING"}, status=503)

    async def attributes(self, _request: web.Request) -> web.Response:
        """Each string attribute key's values among the served products (the version's and its deltas'), the most
        common first, and each number key's bounds, for the console's filters."""
        version = self.servicer.core.version
        key = (version.name, version.delta_sequence)
        if self._attributes is None or self._attributes[0] != key:
            self._attributes = (key, {"version": version.name, "deltaSequence": version.delta_sequence,
                                      **served_attributes(version)})
        return web.json_response(self._attributes[1])

    async def image(self, request: web.Request) -> web.StreamResponse:
        """A catalogue image by id: its path comes from the version's tables, never from the request."""
        image_id = request.match_info["image_id"]
        version = self.servicer.core.version
        fresh = version.fresh
        fresh_rows = fresh.catalogue.rows_of_image(image_id) if fresh is not None else []
        if len(fresh_rows):  # added by a delta: under the folder `add` read it from
            root = fresh.roots[int(fresh.row_root[fresh_rows[0]])].resolve()
            path = fresh.image_file(int(fresh_rows[0])).resolve()
        else:
            rows = version.catalogue.rows_of_image(image_id)
            if fresh is not None and fresh.superseded is not None:  # a replaced product's old images are gone
                rows = rows[~fresh.superseded[version.catalogue.row_product[rows]]]
            if len(rows) == 0:
                raise HttpAbort(grpc.StatusCode.NOT_FOUND, f"image {image_id!r} is not in version {version.name}")
            root = self._image_root(version.manifest)
            if root is None:
                raise HttpAbort(grpc.StatusCode.NOT_FOUND, f"version {version.name} records no catalogue root; "
                                                           "start the server with --catalogue DIR")
            path = (root / version.catalogue.paths[int(rows[0])]).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            raise HttpAbort(grpc.StatusCode.NOT_FOUND, f"the file of image {image_id!r} is not under {root}")
        return web.FileResponse(path, headers={
            "Content-Type": _IMAGE_TYPES.get(path.suffix.lower(), "application/octet-stream"),
            "Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"})

    async def product_images(self, request: web.Request) -> web.Response:
        """A served product's image ids, main first (its definition in the latest delta that holds it, else the
        version's), for the console to show a product query's picture and a result's other images."""
        product_id = request.match_info["product_id"]
        version = self.servicer.core.version
        fresh = version.fresh
        catalogue, row = version.catalogue, version.catalogue.product_row(product_id)
        if fresh is not None and (fresh_row := fresh.catalogue.product_row(product_id)) is not None:
            catalogue, row = fresh.catalogue, fresh_row
        if row is None:
            raise HttpAbort(grpc.StatusCode.NOT_FOUND, f"product {product_id!r} is not in version {version.name}")
        rows = catalogue.rows_of_product(row)
        return web.json_response({"productId": product_id, "version": version.name, "imageCount": len(rows),
                                  "images": [{"imageId": catalogue.image_ids[int(r)], "role": catalogue.roles[int(r)]}
                                             for r in rows[:MAX_PRODUCT_IMAGES]]})

    def _image_root(self, manifest: dict) -> Path | None:
        base = self.catalogue_dir or (Path(manifest["catalogue_root"]) if manifest.get("catalogue_root") else None)
        if base is None:
            return None
        return (base / manifest.get("image_folder", "small")).resolve()

    async def openapi(self, _request: web.Request) -> web.Response:
        if self._openapi is None:
            self._openapi = openapi_document()
        return web.json_response(self._openapi)

    async def console_index(self, _request: web.Request) -> web.FileResponse:
        return web.FileResponse(CONSOLE_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    async def _close(self, _app: web.Application) -> None:
        self._json_pool.shutdown(wait=False, cancel_futures=True)


def _check_content_type(request: web.Request) -> None:
    """A body is JSON: another declared type (a form, text/plain) is INVALID_ARGUMENT, the code grpc-gateway gives a
    body it cannot decode; no Content-Type at all is read as JSON, as grpc-gateway reads it."""
    if request.method == "POST" and "Content-Type" in request.headers and request.content_type != "application/json":
        raise HttpAbort(grpc.StatusCode.INVALID_ARGUMENT,
                        f"the body must be JSON (Content-Type: application/json), not {request.content_type!r}")


def served_attributes(version: ServedVersion) -> dict:
    """The string keys' values with their product counts and the number keys' bounds, over the products served:
    the version's, less those a delta replaced, and the deltas'."""
    filters, fresh = version.catalogue.filters, version.fresh
    superseded = fresh.superseded if fresh is not None else None
    values = {}
    for key in filters.string_keys:
        lists = filters.lists(key)
        counts = Counter(lists.value_counts())
        if superseded is not None:  # a replaced product's old value is no longer served
            gone = lists.codes[superseded]
            counts.subtract({lists.uniques[code]: int(n) for code, n in enumerate(np.bincount(gone[gone >= 0]))
                             if n})
        if fresh is not None:
            counts.update(fresh.catalogue.filters.lists(key).value_counts())
        ranked = sorted((v for v in counts if counts[v] > 0), key=lambda v: (-counts[v], v))[:MAX_ATTRIBUTE_VALUES]
        values[key] = [{"value": value, "products": counts[value]} for value in ranked]
    numbers = {}
    for key in filters.number_keys:
        held = filters.numbers(key).values
        if superseded is not None:
            held = held[~superseded]
        if fresh is not None:
            held = np.concatenate([held, fresh.catalogue.filters.numbers(key).values])
        held = held[~np.isnan(held)]
        numbers[key] = {"min": float(held.min()) if len(held) else None,
                        "max": float(held.max()) if len(held) else None, "products": len(held)}
    return {"attributes": values, "numbers": numbers}


def ssl_context(cert_file: Path, key_file: Path, client_ca_file: Path | None) -> ssl.SSLContext:
    """The gRPC port's TLS, for HTTPS: the same certificate, and with client_ca_file the same mTLS."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    if client_ca_file is not None:
        context.load_verify_locations(client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


async def start_http(api: HttpApi, host: str, port: int, ssl_context: ssl.SSLContext | None) -> web.AppRunner:
    """Listens with SO_REUSEPORT, as the gRPC port does, so the workers of --workers N share the port."""
    # The drain (grace_s) has already waited for requests when this runner is cleaned up: an HTTP request still
    # open then (a slow download or upload) gets a second, not aiohttp's default minute past the grace period.
    runner = web.AppRunner(api.app(), access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host.strip("[]"), port, ssl_context=ssl_context, reuse_port=True)
    await site.start()
    return runner


def bound_port(runner: web.AppRunner) -> int:
    return runner.addresses[0][1]
