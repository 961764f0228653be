"""Domain errors of the serving core and their one mapping to gRPC status codes."""

from __future__ import annotations

import grpc


class ServingError(Exception):
    code = grpc.StatusCode.INTERNAL


class InvalidArgument(ServingError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServingError):
    code = grpc.StatusCode.NOT_FOUND


class Overloaded(ServingError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(ServingError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(ServingError):
    code = grpc.StatusCode.UNAVAILABLE


# The longest refusal sent: a status message travels in the trailing metadata, which clients cap (gRPC's default 8 KiB,
# a character percent-encoded in up to 9 bytes); past it the client saw RESOURCE_EXHAUSTED instead of the refusal.
MAX_DETAIL_CHARS = 512


def status_of(error: BaseException) -> grpc.StatusCode:
    return error.code if isinstance(error, ServingError) else grpc.StatusCode.INTERNAL


def details_of(error: BaseException) -> str:
    """The refusal's message, its middle left out past MAX_DETAIL_CHARS (an id echoed from a request may be of any
    length): its beginning and its end, which say what was refused and why."""
    message = str(error)
    if len(message) <= MAX_DETAIL_CHARS:
        return message
    gap = f" ... [{len(message):,} characters in all] ... "
    head = (MAX_DETAIL_CHARS - len(gap)) // 2
    return f"{message[:head]}{gap}{message[len(message) - (MAX_DETAIL_CHARS - len(gap) - head):]}"
