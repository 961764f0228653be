"""One budget of calls at once per process, which the gRPC port and the HTTP port both draw from."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc

from server.errors import Overloaded


class Admission:
    """At most `limit` calls at once, whichever protocol brought them; one more is refused at once (never queued),
    before its message is read, so the bytes buffered ahead of admission stay about limit x the message limit."""

    def __init__(self, limit: int, on_refused: Callable[[str, str], None] | None = None) -> None:
        if limit < 1:
            raise ValueError("the admission limit must be at least 1")
        self.limit = limit
        self.in_flight = 0
        self._on_refused = on_refused  # told (protocol, reason) of each call refused: the server counts them

    def refused(self, protocol: str, reason: str) -> None:
        """Says a call was refused before the servicer saw it (by this budget, or by a share of it)."""
        if self._on_refused is not None:
            self._on_refused(protocol, reason)

    def enter(self, protocol: str = "grpc") -> None:
        """Takes a place, or raises Overloaded (RESOURCE_EXHAUSTED)."""
        if self.in_flight >= self.limit:
            self.refused(protocol, "budget")
            raise Overloaded(f"more than {self.limit} calls at once on this server process (--max-concurrent-rpcs, "
                             "gRPC and HTTP together); retry shortly")
        self.in_flight += 1

    def leave(self, _done: object = None) -> None:
        self.in_flight -= 1


# Health checks and reflection take no place: a probe must learn the server's state however busy it is (HTTP's
# /healthz and /readyz take none either), and neither reads an image. grpc's own limiter counted them.
UNCOUNTED_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class AdmissionInterceptor(grpc.aio.ServerInterceptor):
    """gRPC's side of the budget, in place of the server's own maximum_concurrent_rpcs (which only gRPC's calls could
    draw from). It runs in the call's task before the request is read; the place is given back when that task ends,
    however it ends (answered, failed, cancelled by its deadline or by the client), as grpc's own limiter does."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission

    async def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(UNCOUNTED_SERVICES):
            return await continuation(handler_call_details)
        try:
            self.admission.enter()
        except Overloaded as error:
            return _refusal(str(error))
        asyncio.current_task().add_done_callback(self.admission.leave)
        return await continuation(handler_call_details)


def _refusal(message: str) -> grpc.RpcMethodHandler:
    """A handler that answers RESOURCE_EXHAUSTED without reading the request: a request-streaming one, whose
    messages are read only when iterated (to the client every method is the same HTTP/2 stream)."""

    async def refuse(_requests, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)

    return grpc.stream_unary_rpc_method_handler(refuse)
