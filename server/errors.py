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


def status_of(error: BaseException) -> grpc.StatusCode:
    return error.code if isinstance(error, ServingError) else grpc.StatusCode.INTERNAL
