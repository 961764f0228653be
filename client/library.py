"""ImageSimilarityClient and its async twin: plain Python calls over the lookalike gRPC contract."""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import grpc
import numpy as np

from lookalike.v1 import lookalike_pb2 as pb
from lookalike.v1 import lookalike_pb2_grpc as pb_grpc

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # the server's default
SERVICE = "lookalike.v1.ImageSimilarity"
# gRPC's own retry, the policy every client loads from protos/lookalike/v1/service_config.json (`make protos`
# copies it into the package): UNAVAILABLE (a replica restarting or draining) and CANCELLED (a call cut by a
# worker's shutdown) are retried with jittered backoff, within the call's one deadline.
SERVICE_CONFIG = resources.files("lookalike.v1").joinpath("service_config.json").read_text()


class LookalikeError(Exception):
    """A call failed; `code` is the gRPC status code and the message is the server's."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.details = message


class InvalidArgumentError(LookalikeError):
    """The request was malformed: an undecodable image, k out of range, a bad vector."""


class NotFoundError(LookalikeError):
    """The item id is not in the served index."""


class OverloadedError(LookalikeError):
    """The server's queue is full (RESOURCE_EXHAUSTED): back off and retry."""


class DeadlineError(LookalikeError):
    """The call's deadline passed."""


class UnavailableError(LookalikeError):
    """No server answered, or it is shutting down (after gRPC's retries)."""


_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError, grpc.StatusCode.NOT_FOUND: NotFoundError,
           grpc.StatusCode.RESOURCE_EXHAUSTED: OverloadedError,
           grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineError, grpc.StatusCode.UNAVAILABLE: UnavailableError}


def _translate(error: grpc.RpcError) -> LookalikeError:
    code = error.code()
    return _ERRORS.get(code, LookalikeError)(code, error.details() or "")


@dataclass(frozen=True)
class ImageMatch:
    """One image of a matched product."""

    image_id: str
    distance: float
    score: float
    path: str
    role: str


@dataclass(frozen=True)
class Match:
    """A matched product (or, from a version built before products, an image) and its best image."""

    product_id: str
    image_id: str
    distance: float
    score: float
    path: str
    label: str
    images: tuple[ImageMatch, ...] = ()
    attributes: dict = field(default_factory=dict)

    @property
    def item_id(self) -> str:
        """The 0.1 name of image_id."""
        return self.image_id

    def to_dict(self) -> dict:
        out = {"product_id": self.product_id, "image_id": self.image_id, "score": self.score,
               "distance": self.distance, "path": self.path, "label": self.label}
        if self.images:
            out["images"] = [image.__dict__ for image in self.images]
        if self.attributes:
            out["attributes"] = dict(self.attributes)
        return out


class Matches(list):
    """Matches from the most to the least alike, with the index version, the availability version (which
    products were hidden) and the delta sequence (which products added since the build were searched) that
    answered. From recommend(), also the example ids the version did not hold (with ignore_missing)."""

    def __init__(self, matches: Iterable[Match], version: str, missing_product_ids: Sequence[str] = (),
                 missing_image_ids: Sequence[str] = (), availability_version: int = 0,
                 delta_sequence: int = 0) -> None:
        super().__init__(matches)
        self.version = version
        self.availability_version = availability_version
        self.delta_sequence = delta_sequence
        self.missing_product_ids = list(missing_product_ids)
        self.missing_image_ids = list(missing_image_ids)


@dataclass(frozen=True)
class Range:
    """Bounds on a number attribute: any of gt, gte, lt, lte (at least one); every bound given must hold."""

    gt: float | None = None
    gte: float | None = None
    lt: float | None = None
    lte: float | None = None


@dataclass(frozen=True)
class Clause:
    """One filter clause: the product's `key` attribute is one of `any_of`, or none of `none_of` (string keys), or
    lies in `range` (number keys)."""

    key: str
    any_of: tuple[str, ...] = ()
    none_of: tuple[str, ...] = ()
    range: Range | None = None


def any_of(key: str, *values: str) -> Clause:
    """A clause: the product's `key` is one of the values, e.g. any_of("color", "Black", "Navy")."""
    return Clause(key, any_of=tuple(values))


def none_of(key: str, *values: str) -> Clause:
    """A clause: the product's `key` is none of the values (products without the key pass)."""
    return Clause(key, none_of=tuple(values))


def in_range(key: str, *, gt: float | None = None, gte: float | None = None, lt: float | None = None,
             lte: float | None = None) -> Clause:
    """A clause: the product's number `key` lies in the range, e.g. in_range("item_weight_pounds", lt=2.5) (products
    without the key fail)."""
    return Clause(key, range=Range(gt, gte, lt, lte))


class ImageId(str):
    """A recommendation example that is a catalogue image id; a plain str example is a product id."""


STRATEGIES = {"average_vector": pb.RECOMMEND_STRATEGY_AVERAGE_VECTOR, "best_score": pb.RECOMMEND_STRATEGY_BEST_SCORE,
              "sum_scores": pb.RECOMMEND_STRATEGY_SUM_SCORES}


def image_bytes(image) -> bytes:
    """Accepts a path, encoded bytes or a PIL image; anything else is a mistake said at once."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if not data:
            raise ValueError("image bytes are empty")
        return data
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"no image file at {path}")
        return path.read_bytes()
    if hasattr(image, "save") and hasattr(image, "mode"):  # a PIL image, without importing PIL here
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    raise TypeError(f"an image must be a path, bytes or a PIL image, not {type(image).__name__}")


def _images_list(images) -> list[bytes]:
    if isinstance(images, (bytes, bytearray, str, os.PathLike)) or hasattr(images, "mode"):
        images = [images]
    return [image_bytes(image) for image in images]


def region_message(region) -> pb.Region:
    """A Region from (x_min, y_min, x_max, y_max), relative to the image's width and height, checked."""
    try:
        x_min, y_min, x_max, y_max = (float(v) for v in region)
    except (TypeError, ValueError):
        raise ValueError(f"a region is four numbers x_min, y_min, x_max, y_max, not {region!r}") from None
    if not all(0 <= v <= 1 for v in (x_min, y_min, x_max, y_max)):
        raise ValueError(f"region {region!r} is out of range: every coordinate is relative, in 0..1")
    if not (x_min < x_max and y_min < y_max):
        raise ValueError(f"region {region!r} is empty: x_min < x_max and y_min < y_max")
    return pb.Region(x_min=x_min, y_min=y_min, x_max=x_max, y_max=y_max)


def _embed_request(images, regions) -> pb.EmbedRequest:
    request = pb.EmbedRequest(images=_images_list(images))
    if regions is not None:
        regions = [region_message(region) for region in regions]
        if len(regions) != len(request.images):
            raise ValueError(f"{len(regions)} regions for {len(request.images)} images: give one per image")
        request.regions.extend(regions)
    return request


@dataclass(frozen=True)
class Cropped:
    """A recommendation example that is the part of an image (path, bytes or PIL) a relative region covers:
    Cropped("room.jpg", (0.1, 0.2, 0.6, 0.9))."""

    image: object
    region: tuple[float, float, float, float]


_QUERIES = ("image", "image_id", "product_id", "vector")


_BOUNDS = ("gt", "gte", "lt", "lte")


def _filter(filters, exclude_products: Iterable[str]) -> pb.Filter:
    """Clauses (any_of/none_of/in_range), or a mapping {key: value or values} meaning any_of, as a pb.Filter."""
    if isinstance(filters, Mapping):
        filters = [Clause(key, any_of=(values,) if isinstance(values, str) else tuple(values))
                   for key, values in filters.items()]
    message = pb.Filter(exclude_product_ids=[exclude_products] if isinstance(exclude_products, str)
                        else list(exclude_products))
    for clause in filters:
        if not isinstance(clause, Clause):
            raise TypeError(f"a filter is a list of any_of(...)/none_of(...)/in_range(...) clauses or a mapping, not "
                            f"{type(clause).__name__}")
        bounds = {} if clause.range is None else {name: float(getattr(clause.range, name)) for name in _BOUNDS
                                                  if getattr(clause.range, name) is not None}
        if [bool(clause.any_of), bool(clause.none_of), clause.range is not None].count(True) != 1:
            raise ValueError(f"the clause on {clause.key!r} needs any_of or none_of values or a range (one of them)")
        if clause.range is not None and (not bounds or any(v != v for v in bounds.values())):
            raise ValueError(f"the range on {clause.key!r} needs gt, gte, lt or lte, none of them NaN")
        added = message.clauses.add(key=clause.key, any_of=clause.any_of, none_of=clause.none_of)
        if clause.range is not None:
            added.range.CopyFrom(pb.Range(**bounds))
    return message


def _set_options(request, k: int, group_size: int, filters, exclude_products, score_threshold,
                 diversity: float | None, candidates: int, score_bound: int = 1) -> None:
    """The options FindSimilar and Recommend share, checked before any call. Scores are in [-score_bound,
    score_bound]: 1 but for sum_scores (one per example)."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, not {k!r}")
    if not isinstance(group_size, int) or group_size < 0:
        raise ValueError(f"group_size must be a non-negative integer, not {group_size!r}")
    request.k, request.group_size = k, group_size
    request.filter.CopyFrom(_filter(filters, exclude_products))
    if score_threshold is not None:
        if not -score_bound <= float(score_threshold) <= score_bound:
            raise ValueError(f"score_threshold must be in {-score_bound}..{score_bound}, not {score_threshold!r}")
        request.score_threshold = float(score_threshold)
    if diversity is not None:  # unset: the plain ranking, as 0
        if not 0 <= float(diversity) <= 1:
            raise ValueError(f"diversity must be in 0..1, not {diversity!r}")
        request.diversity = float(diversity)
    if not isinstance(candidates, int) or candidates < 0:
        raise ValueError(f"candidates must be a non-negative integer (0: the server's default), not {candidates!r}")
    request.candidates = candidates


def query_expansion_message(value) -> pb.QueryExpansion | None:
    """None or False: no expansion; True: the server's defaults; a number: that alpha; (alpha, results): both, either
    None for the server's default. The server bounds them (alpha 0..10, results 1..50)."""
    if value is None or value is False:
        return None
    if value is True:
        return pb.QueryExpansion()
    if isinstance(value, (tuple, list)) and len(value) == 2:
        alpha, results = value
    else:
        alpha, results = value, None
    message = pb.QueryExpansion()
    if alpha is not None:
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 <= alpha < float("inf"):
            raise ValueError(f"query_expansion is True, an alpha >= 0 or (alpha, results), not {value!r}")
        message.alpha = float(alpha)
    if results is not None:
        if not isinstance(results, int) or isinstance(results, bool) or results < 0:
            raise ValueError(f"query_expansion's results must be a non-negative integer (0: the server's default), "
                             f"not {results!r}")
        message.results = results
    return message


def _example(value) -> pb.Example:
    """A product id (str), ImageId, image (path, bytes or PIL), Cropped image or vector (a sequence of numbers)."""
    if isinstance(value, Cropped):
        return pb.Example(image=image_bytes(value.image), region=region_message(value.region))
    if isinstance(value, ImageId):
        return pb.Example(image_id=str(value))
    if isinstance(value, str):
        if not value:
            raise ValueError("a product id example must be a non-empty string")
        return pb.Example(product_id=value)
    if isinstance(value, np.ndarray) or (isinstance(value, (list, tuple)) and value
                                         and all(isinstance(v, (int, float)) for v in value)):
        return pb.Example(vector=pb.Vector(values=np.asarray(value, np.float32).ravel().tolist()))
    return pb.Example(image=image_bytes(value))


def _recommend_request(positive, negative, strategy: str, k: int, filters, exclude_products, score_threshold,
                       ignore_missing: bool, group_size: int, with_attributes: bool, search_k: int,
                       diversity: float | None = None, candidates: int = 0) -> pb.RecommendRequest:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, not {strategy!r}")
    single = (str, bytes, os.PathLike, np.ndarray, Cropped)
    positive, negative = ([value] if isinstance(value, single) else list(value) for value in (positive, negative))
    if not positive and not negative:
        raise ValueError("recommend needs at least one positive (or, with best_score or sum_scores, negative) example")
    request = pb.RecommendRequest(positive=[_example(e) for e in positive], negative=[_example(e) for e in negative],
                                  strategy=STRATEGIES[strategy], ignore_missing=ignore_missing, search_k=search_k,
                                  with_attributes=with_attributes)
    bound = len(positive) + len(negative) if strategy == "sum_scores" else 1
    _set_options(request, k, group_size, filters, exclude_products, score_threshold, diversity, candidates, bound)
    return request


def _similar_request(image=None, image_id: str | None = None, product_id: str | None = None, vector=None,
                     item_id: str | None = None, k: int = 10, exclude_query: bool | None = None, search_k: int = 0,
                     group_size: int = 0, with_attributes: bool = False, filters=(), exclude_products=(),
                     score_threshold: float | None = None, diversity: float | None = None,
                     candidates: int = 0, region=None, query_expansion=None) -> pb.FindSimilarRequest:
    if item_id is not None:  # the 0.1 name of image_id
        if image_id is not None:
            raise ValueError("item_id is the old name of image_id: give one of them")
        image_id = item_id
    given = [name for name, value in zip(_QUERIES, (image, image_id, product_id, vector), strict=True)
             if value is not None]
    if len(given) != 1:
        raise ValueError(f"find_similar takes exactly one of image, image_id=, product_id= or vector= "
                         f"(got {', '.join(given) or 'none'})")
    request = pb.FindSimilarRequest(search_k=search_k, with_attributes=with_attributes)
    if exclude_query is not None:  # unset: the server decides, the same for every client
        request.exclude_query = bool(exclude_query)
    _set_options(request, k, group_size, filters, exclude_products, score_threshold, diversity, candidates)
    if region is not None and image is None:
        raise ValueError("region applies to an image query only")
    expansion = query_expansion_message(query_expansion)
    if expansion is not None:
        if image is None and vector is None:
            raise ValueError("query_expansion applies to an image or vector query only")
        request.query_expansion.CopyFrom(expansion)
    if image is not None:
        request.image = image_bytes(image)
        if region is not None:
            request.region.CopyFrom(region_message(region))
    elif vector is not None:
        request.vector.values.extend(np.asarray(vector, dtype=np.float32).ravel().tolist())
    else:
        name, value = ("image_id", image_id) if image_id is not None else ("product_id", product_id)
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty string")
        setattr(request, name, value)
    return request


def _matches(response: pb.FindSimilarResponse | pb.RecommendResponse) -> Matches:
    missing = ((response.missing_product_ids, response.missing_image_ids)
               if isinstance(response, pb.RecommendResponse) else ((), ()))
    return Matches((Match(m.product_id, m.image_id or m.item_id, m.distance, m.score, m.path, m.label,
                          tuple(ImageMatch(i.image_id, i.distance, i.score, i.path, i.role) for i in m.images),
                          dict(m.attributes))
                    for m in response.matches), response.index_version, *missing,
                   availability_version=response.availability_version, delta_sequence=response.delta_sequence)


def _vectors(response: pb.EmbedResponse) -> np.ndarray:
    return np.asarray([list(v.values) for v in response.vectors], dtype=np.float32)


def _info(response: pb.GetInfoResponse) -> dict:
    """Every field as a plain Python value (repeated fields as lists; attributes as dicts with min and max for a
    number key)."""
    info = {field.name: (list(value) if field.is_repeated else value)
            for field in response.DESCRIPTOR.fields for value in [getattr(response, field.name)]}
    info["attributes"] = [{"key": a.key, "kind": a.kind, "product_count": a.product_count,
                           **({"min": a.min, "max": a.max} if a.HasField("min") else {})}
                          for a in response.attributes]
    return info


def _channel_options(max_message_bytes: int) -> list[tuple[str, object]]:
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.enable_retries", 1), ("grpc.service_config", SERVICE_CONFIG),
            # gRPC retries only a request it kept, by default up to 256 KiB: a photo is kept whole.
            ("grpc.per_rpc_retry_buffer_size", max_message_bytes)]


def _credentials(root_ca, client_cert, client_key):
    if root_ca is None and client_cert is None:
        return None
    if (client_cert is None) != (client_key is None):
        raise ValueError("client_cert and client_key go together (mTLS)")
    read = lambda p: None if p is None else Path(p).read_bytes()  # noqa: E731
    return grpc.ssl_channel_credentials(read(root_ca), read(client_key), read(client_cert))


def _check_address(address: str) -> str:
    if not isinstance(address, str) or ":" not in address:
        raise ValueError(f"address must look like 'host:port', not {address!r}")
    return address


class _Base:
    def __init__(self, address: str, timeout_s: float, root_ca, client_cert, client_key,
                 max_message_bytes: int) -> None:
        self.address = _check_address(address)
        self.timeout_s = timeout_s
        self._options = _channel_options(max_message_bytes)
        self._credentials = _credentials(root_ca, client_cert, client_key)


class ImageSimilarityClient(_Base):
    """Blocking client: `ImageSimilarityClient("127.0.0.1:50051").find_similar(image="shoe.jpg")`."""

    def __init__(self, address: str, timeout_s: float = DEFAULT_TIMEOUT_S, root_ca=None, client_cert=None,
                 client_key=None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        super().__init__(address, timeout_s, root_ca, client_cert, client_key, max_message_bytes)
        self._channel = (grpc.secure_channel(address, self._credentials, self._options) if self._credentials
                         else grpc.insecure_channel(address, self._options))
        self._stub = pb_grpc.ImageSimilarityStub(self._channel)

    def _call(self, method, request, timeout_s: float | None):
        try:
            return method(request, timeout=timeout_s or self.timeout_s)
        except grpc.RpcError as error:
            raise _translate(error) from None

    def embed(self, images: Sequence | object, timeout_s: float | None = None, regions=None) -> np.ndarray:
        """Unit vectors [N, D] for one image or a list of paths, bytes or PIL images; `regions`, one
        (x_min, y_min, x_max, y_max) per image relative to its size, embeds those parts only."""
        return _vectors(self._call(self._stub.Embed, _embed_request(images, regions), timeout_s))

    def find_similar(self, image=None, *, image_id: str | None = None, product_id: str | None = None, vector=None,
                     k: int = 10, exclude_query: bool | None = None, group_size: int = 0,
                     with_attributes: bool = False, filters=(), exclude_products: Iterable[str] = (),
                     score_threshold: float | None = None, search_k: int = 0, item_id: str | None = None,
                     diversity: float | None = None, candidates: int = 0, region=None, query_expansion=None,
                     timeout_s: float | None = None) -> Matches:
        """The k catalogue products most like an image (path, bytes, PIL), a catalogue image, a product or a
        vector. `exclude_query`: None (the default) lets the server decide, as for every client: the query's
        own product is left out of an image_id or product_id query and kept for a photo or vector; True or
        False asks for one. `filters`: [any_of(key, ...), none_of(key, ...), in_range(key, lt=...)] (all must
        hold) or {key: values}. `diversity` in 0..1 (None or 0: the plain ranking) has MMR choose the k among the
        `candidates` most relevant products (0: the server's default, 4 x k within its bounds). `region` (x_min,
        y_min, x_max, y_max), relative to the image's size, searches with that part of an image query only.
        `query_expansion` (image and vector queries): True for the server's defaults, an alpha, or (alpha,
        results) averages the query with its `results` most similar products weighted by score^alpha, then
        searches with that; None, the default, searches with the query alone. `item_id` is the 0.1 name of
        image_id."""
        request = _similar_request(image, image_id, product_id, vector, item_id, k, exclude_query, search_k,
                                   group_size, with_attributes, filters, exclude_products, score_threshold,
                                   diversity, candidates, region, query_expansion)
        return _matches(self._call(self._stub.FindSimilar, request, timeout_s))

    def recommend(self, positive=(), negative=(), *, strategy: str = "average_vector", k: int = 10, filters=(),
                  exclude_products: Iterable[str] = (), score_threshold: float | None = None,
                  ignore_missing: bool = False, group_size: int = 0, with_attributes: bool = False,
                  search_k: int = 0, diversity: float | None = None, candidates: int = 0,
                  timeout_s: float | None = None) -> Matches:
        """The k products most like the positive examples and least like the negative ones. An example is a
        product id (str), an ImageId, an image (path, bytes, PIL), a Cropped image or a vector; strategy
        average_vector, best_score or sum_scores (a sum of similarities: its scores and threshold span
        -(P + N)..P + N). With ignore_missing, unknown ids are left out and listed on the result. `diversity`
        and `candidates` as in find_similar."""
        request = _recommend_request(positive, negative, strategy, k, filters, exclude_products, score_threshold,
                                     ignore_missing, group_size, with_attributes, search_k, diversity, candidates)
        return _matches(self._call(self._stub.Recommend, request, timeout_s))

    def info(self, timeout_s: float | None = None) -> dict:
        return _info(self._call(self._stub.GetInfo, pb.GetInfoRequest(), timeout_s))

    def health(self, timeout_s: float | None = None) -> str:
        """SERVING, NOT_SERVING or UNKNOWN, from grpc.health.v1."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channel)
        response = self._call(stub.Check, health_pb2.HealthCheckRequest(service=SERVICE), timeout_s)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ImageSimilarityClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncImageSimilarityClient(_Base):
    """The asyncio twin: the same methods, awaited."""

    def __init__(self, address: str, timeout_s: float = DEFAULT_TIMEOUT_S, root_ca=None, client_cert=None,
                 client_key=None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        super().__init__(address, timeout_s, root_ca, client_cert, client_key, max_message_bytes)
        self._channel = (grpc.aio.secure_channel(address, self._credentials, self._options) if self._credentials
                         else grpc.aio.insecure_channel(address, self._options))
        self._stub = pb_grpc.ImageSimilarityStub(self._channel)

    async def _call(self, method, request, timeout_s: float | None):
        try:
            return await method(request, timeout=timeout_s or self.timeout_s)
        except grpc.RpcError as error:
            raise _translate(error) from None

    async def embed(self, images, timeout_s: float | None = None, regions=None) -> np.ndarray:
        return _vectors(await self._call(self._stub.Embed, _embed_request(images, regions), timeout_s))

    async def find_similar(self, image=None, *, image_id: str | None = None, product_id: str | None = None,
                           vector=None, k: int = 10, exclude_query: bool | None = None, group_size: int = 0,
                           with_attributes: bool = False, filters=(), exclude_products: Iterable[str] = (),
                           score_threshold: float | None = None, search_k: int = 0, item_id: str | None = None,
                           diversity: float | None = None, candidates: int = 0, region=None,
                           query_expansion=None, timeout_s: float | None = None) -> Matches:
        request = _similar_request(image, image_id, product_id, vector, item_id, k, exclude_query, search_k,
                                   group_size, with_attributes, filters, exclude_products, score_threshold,
                                   diversity, candidates, region, query_expansion)
        return _matches(await self._call(self._stub.FindSimilar, request, timeout_s))

    async def recommend(self, positive=(), negative=(), *, strategy: str = "average_vector", k: int = 10,
                        filters=(), exclude_products: Iterable[str] = (), score_threshold: float | None = None,
                        ignore_missing: bool = False, group_size: int = 0, with_attributes: bool = False,
                        search_k: int = 0, diversity: float | None = None, candidates: int = 0,
                        timeout_s: float | None = None) -> Matches:
        request = _recommend_request(positive, negative, strategy, k, filters, exclude_products, score_threshold,
                                     ignore_missing, group_size, with_attributes, search_k, diversity, candidates)
        return _matches(await self._call(self._stub.Recommend, request, timeout_s))

    async def info(self, timeout_s: float | None = None) -> dict:
        return _info(await self._call(self._stub.GetInfo, pb.GetInfoRequest(), timeout_s))

    async def health(self, timeout_s: float | None = None) -> str:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channel)
        response = await self._call(stub.Check, health_pb2.HealthCheckRequest(service=SERVICE), timeout_s)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncImageSimilarityClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
