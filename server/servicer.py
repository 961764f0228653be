"""The gRPC servicer: protobuf in, a call on the core, protobuf out, errors mapped in one place."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import replace

import grpc
import numpy as np

from lookalike.v1 import lookalike_pb2 as pb
from lookalike.v1 import lookalike_pb2_grpc as pb_grpc
from server.core import (
    AVERAGE_VECTOR,
    BEST_SCORE,
    SUM_SCORES,
    Examples,
    ProductResult,
    Query,
    QueryExpansion,
    SearchOptions,
    SimilarityCore,
)
from server.errors import ServingError, Unavailable, details_of, status_of
from server.filters import Clause, Filter, KeyInfo, Range
from server.metrics import ServerMetrics

log = logging.getLogger(__name__)
SERVER_VERSION = "0.1.0"


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _rpc(method):
    """Times the call, counts it by status code and turns domain errors into gRPC statuses."""
    name = method.__name__

    @functools.wraps(method)
    async def wrapper(self: ImageSimilarityServicer, request, context: grpc.aio.ServicerContext):
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return await method(self, request, context)
        except ServingError as error:
            code, refusal = status_of(error), details_of(error)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            if context.code() is None:
                code = grpc.StatusCode.INTERNAL
                log.exception("%s failed", name)
                await context.abort(code, "internal error; see the server log")
            raise
        finally:
            self.metrics.rpc_done(name, code.name, time.perf_counter() - started)
        # Aborted outside the except clause: the abort's exception would carry the error as its context, and with it
        # the frames of the request and the version they hold, which gRPC keeps past the call (in reference cycles): a
        # swap then waited for a collection to free the old version.
        await context.abort(code, refusal)

    return wrapper


def _query(request: pb.FindSimilarRequest | pb.Example, oneof: str = "query") -> Query:
    """The query or example; its region kept whatever it is set with (the core refuses one beside a non-image)."""
    query = _query_only(request, oneof)
    if not request.HasField("region"):  # most requests: no region message to read
        return query
    region = request.region
    return replace(query, region=(region.x_min, region.y_min, region.x_max, region.y_max))


def _query_only(request: pb.FindSimilarRequest | pb.Example, oneof: str) -> Query:
    which = request.WhichOneof(oneof)
    if which == "image":
        return Query(image=request.image)
    if which in ("image_id", "item_id"):  # item_id is the 0.1 name of an image id
        return Query(image_id=getattr(request, which))
    if which == "product_id":
        return Query(product_id=request.product_id)
    if which == "vector":
        return Query(vector=np.asarray(request.vector.values, np.float32))
    return Query()


_BOUNDS = ("gt", "gte", "lt", "lte")


def _clause(message: pb.Clause) -> Clause:
    """A range set without bounds stays a range (the core says it is empty)."""
    bounds = message.range
    range_ = Range(*(getattr(bounds, name) if bounds.HasField(name) else None for name in _BOUNDS)) \
        if message.HasField("range") else None
    return Clause(message.key, tuple(message.any_of), tuple(message.none_of), range_)


_NO_FILTER = Filter()


def _filter(message: pb.Filter) -> Filter:
    if not message.clauses and not message.exclude_product_ids:
        return _NO_FILTER  # most requests: nothing to copy out of the message
    return Filter(tuple(_clause(c) for c in message.clauses), tuple(message.exclude_product_ids))


def _attribute_info(info: KeyInfo) -> pb.AttributeInfo:
    return pb.AttributeInfo(key=info.key, kind=info.kind, product_count=info.product_count, min=info.min,
                            max=info.max)


@functools.lru_cache(maxsize=1024)
def _plain_options(k: int, exclude_query: bool | None, search_k: int, group_size: int, with_attributes: bool,
                   score_threshold: float | None, diversity: float, candidates: int) -> SearchOptions:
    """The SearchOptions of a request without a filter, made once per distinct fields: clients send the same few (a
    product page's k), and a frozen dataclass of ten fields costs more to make than the rest of a request's parsing."""
    return SearchOptions(k=k, exclude_query=exclude_query, search_k=search_k, group_size=group_size,
                         with_attributes=with_attributes, filter=_NO_FILTER, score_threshold=score_threshold,
                         diversity=diversity, candidates=candidates)


def _options(request: pb.FindSimilarRequest | pb.RecommendRequest,
             exclude_query: bool | None = False) -> SearchOptions:
    threshold = request.score_threshold if request.HasField("score_threshold") else None
    fields = (request.k, exclude_query, request.search_k, request.group_size, request.with_attributes, threshold,
              request.diversity, request.candidates)
    filter_ = _filter(request.filter) if request.HasField("filter") else _NO_FILTER
    if filter_ is _NO_FILTER:
        return _plain_options(*fields)
    k, exclude_query, search_k, group_size, with_attributes, threshold, diversity, candidates = fields
    return SearchOptions(k=k, exclude_query=exclude_query, search_k=search_k, group_size=group_size,
                         with_attributes=with_attributes, filter=filter_, score_threshold=threshold,
                         diversity=diversity, candidates=candidates)


_STRATEGIES = {pb.RECOMMEND_STRATEGY_UNSPECIFIED: AVERAGE_VECTOR, pb.RECOMMEND_STRATEGY_AVERAGE_VECTOR: AVERAGE_VECTOR,
               pb.RECOMMEND_STRATEGY_BEST_SCORE: BEST_SCORE, pb.RECOMMEND_STRATEGY_SUM_SCORES: SUM_SCORES}


def _examples(request: pb.RecommendRequest) -> Examples:
    return Examples(positive=tuple(_query(e, "example") for e in request.positive),
                    negative=tuple(_query(e, "example") for e in request.negative),
                    strategy=_STRATEGIES.get(request.strategy, f"unknown ({request.strategy})"),
                    ignore_missing=request.ignore_missing)


def _add_matches(matches, results: list[ProductResult]) -> None:
    """Each result added in place to a response's repeated field: a Match built apart would be copied in again."""
    add = matches.add
    for result in results:
        best = result.image
        match = add(item_id=best.image_id, image_id=best.image_id, product_id=result.product_id,
                    distance=best.distance, score=best.score, path=best.path, label=best.label)
        # Only when asked for (group_size, with_attributes): an empty list or map still costs a call each.
        if result.images:
            add_image = match.images.add
            for image in result.images:
                add_image(image_id=image.image_id, distance=image.distance, score=image.score, path=image.path,
                          role=image.role)
        if result.attributes:
            match.attributes.update(result.attributes)


class ImageSimilarityServicer(pb_grpc.ImageSimilarityServicer):
    """`core` is None while the first version loads: calls are then UNAVAILABLE, health NOT_SERVING."""

    def __init__(self, core: SimilarityCore | None, metrics: ServerMetrics) -> None:
        self._core = core
        self.metrics = metrics

    @property
    def core(self) -> SimilarityCore:
        if self._core is None:
            raise Unavailable("the server is loading its model; retry shortly")
        return self._core

    @core.setter
    def core(self, core: SimilarityCore) -> None:
        self._core = core

    @_rpc
    async def Embed(self, request: pb.EmbedRequest, context) -> pb.EmbedResponse:  # noqa: N802
        regions = [(r.x_min, r.y_min, r.x_max, r.y_max) for r in request.regions]
        vectors, version = await self.core.embed(list(request.images), _deadline(context), regions)
        return pb.EmbedResponse(vectors=[pb.Vector(values=v) for v in vectors], model_version=version)

    @_rpc
    async def FindSimilar(self, request: pb.FindSimilarRequest, context) -> pb.FindSimilarResponse:  # noqa: N802
        # Unset: None, the core's default (own product left out for id queries only), the same for every client.
        exclude_query = request.exclude_query if request.HasField("exclude_query") else None
        options = _options(request, exclude_query)
        if request.HasField("query_expansion"):
            expansion = request.query_expansion
            alpha = expansion.alpha if expansion.HasField("alpha") else None
            options = replace(options, query_expansion=QueryExpansion(alpha, expansion.results))
        found = await self.core.find_similar(_query(request), options, _deadline(context))
        response = pb.FindSimilarResponse(index_version=found.version, availability_version=found.availability_version,
                                          plan=found.plan, delta_sequence=found.delta_sequence)
        _add_matches(response.matches, found.results)
        return response

    @_rpc
    async def Recommend(self, request: pb.RecommendRequest, context) -> pb.RecommendResponse:  # noqa: N802
        found = await self.core.recommend(_examples(request), _options(request), _deadline(context))
        response = pb.RecommendResponse(index_version=found.version, availability_version=found.availability_version,
                                        missing_product_ids=found.missing_product_ids,
                                        missing_image_ids=found.missing_image_ids, plan=found.plan,
                                        delta_sequence=found.delta_sequence)
        _add_matches(response.matches, found.results)
        return response

    @_rpc
    async def GetInfo(self, request: pb.GetInfoRequest, context) -> pb.GetInfoResponse:  # noqa: N802
        version = self.core.version
        manifest = version.manifest
        config = self.core.config
        return pb.GetInfoResponse(
            version=version.name, backbone=manifest["backbone"], preprocessing=manifest["preprocessing"],
            head=manifest["head"], dimension=int(manifest["dimension"]), metric=manifest["metric"],
            item_count=len(version.index), image_count=len(version.index),
            product_count=version.catalogue.product_count if version.catalogue.has_products else 0,
            attribute_keys=version.catalogue.attribute_keys, search_k=version.search_k,
            n_trees=int(manifest["index"]["n_trees"]), recall_at_10=float(manifest["index"]["recall_at_10"]),
            input_size=int(manifest.get("input_size", 256)), max_k=config.max_k,
            max_images_per_request=config.max_images_per_request, server_version=SERVER_VERSION,
            hidden_product_count=self.core.hidden.count(version), availability_version=self.core.hidden.version,
            delta_sequence=version.delta_sequence,
            delta_product_count=0 if version.fresh is None else version.fresh.catalogue.product_count,
            delta_image_count=0 if version.fresh is None else version.fresh.rows,
            attributes=[_attribute_info(info) for info in version.catalogue.filters.describe()])
