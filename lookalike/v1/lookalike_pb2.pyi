from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RecommendStrategy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RECOMMEND_STRATEGY_UNSPECIFIED: _ClassVar[RecommendStrategy]
    RECOMMEND_STRATEGY_AVERAGE_VECTOR: _ClassVar[RecommendStrategy]
    RECOMMEND_STRATEGY_BEST_SCORE: _ClassVar[RecommendStrategy]
    RECOMMEND_STRATEGY_SUM_SCORES: _ClassVar[RecommendStrategy]
RECOMMEND_STRATEGY_UNSPECIFIED: RecommendStrategy
RECOMMEND_STRATEGY_AVERAGE_VECTOR: RecommendStrategy
RECOMMEND_STRATEGY_BEST_SCORE: RecommendStrategy
RECOMMEND_STRATEGY_SUM_SCORES: RecommendStrategy

class EmbedRequest(_message.Message):
    __slots__ = ("images", "regions")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    regions: _containers.RepeatedCompositeFieldContainer[Region]
    def __init__(self, images: _Optional[_Iterable[bytes]] = ..., regions: _Optional[_Iterable[_Union[Region, _Mapping]]] = ...) -> None: ...

class Region(_message.Message):
    __slots__ = ("x_min", "y_min", "x_max", "y_max")
    X_MIN_FIELD_NUMBER: _ClassVar[int]
    Y_MIN_FIELD_NUMBER: _ClassVar[int]
    X_MAX_FIELD_NUMBER: _ClassVar[int]
    Y_MAX_FIELD_NUMBER: _ClassVar[int]
    x_min: float
    y_min: float
    x_max: float
    y_max: float
    def __init__(self, x_min: _Optional[float] = ..., y_min: _Optional[float] = ..., x_max: _Optional[float] = ..., y_max: _Optional[float] = ...) -> None: ...

class Vector(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("vectors", "model_version")
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    vectors: _containers.RepeatedCompositeFieldContainer[Vector]
    model_version: str
    def __init__(self, vectors: _Optional[_Iterable[_Union[Vector, _Mapping]]] = ..., model_version: _Optional[str] = ...) -> None: ...

class FindSimilarRequest(_message.Message):
    __slots__ = ("image", "item_id", "vector", "image_id", "product_id", "k", "exclude_query", "search_k", "group_size", "with_attributes", "filter", "score_threshold", "diversity", "candidates", "region", "query_expansion")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_ID_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_QUERY_FIELD_NUMBER: _ClassVar[int]
    SEARCH_K_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    WITH_ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    SCORE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    DIVERSITY_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    QUERY_EXPANSION_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    item_id: str
    vector: Vector
    image_id: str
    product_id: str
    k: int
    exclude_query: bool
    search_k: int
    group_size: int
    with_attributes: bool
    filter: Filter
    score_threshold: float
    diversity: float
    candidates: int
    region: Region
    query_expansion: QueryExpansion
    def __init__(self, image: _Optional[bytes] = ..., item_id: _Optional[str] = ..., vector: _Optional[_Union[Vector, _Mapping]] = ..., image_id: _Optional[str] = ..., product_id: _Optional[str] = ..., k: _Optional[int] = ..., exclude_query: _Optional[bool] = ..., search_k: _Optional[int] = ..., group_size: _Optional[int] = ..., with_attributes: _Optional[bool] = ..., filter: _Optional[_Union[Filter, _Mapping]] = ..., score_threshold: _Optional[float] = ..., diversity: _Optional[float] = ..., candidates: _Optional[int] = ..., region: _Optional[_Union[Region, _Mapping]] = ..., query_expansion: _Optional[_Union[QueryExpansion, _Mapping]] = ...) -> None: ...

class QueryExpansion(_message.Message):
    __slots__ = ("alpha", "results")
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    alpha: float
    results: int
    def __init__(self, alpha: _Optional[float] = ..., results: _Optional[int] = ...) -> None: ...

class Filter(_message.Message):
    __slots__ = ("clauses", "exclude_product_ids")
    CLAUSES_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_PRODUCT_IDS_FIELD_NUMBER: _ClassVar[int]
    clauses: _containers.RepeatedCompositeFieldContainer[Clause]
    exclude_product_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, clauses: _Optional[_Iterable[_Union[Clause, _Mapping]]] = ..., exclude_product_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class Clause(_message.Message):
    __slots__ = ("key", "any_of", "none_of", "range")
    KEY_FIELD_NUMBER: _ClassVar[int]
    ANY_OF_FIELD_NUMBER: _ClassVar[int]
    NONE_OF_FIELD_NUMBER: _ClassVar[int]
    RANGE_FIELD_NUMBER: _ClassVar[int]
    key: str
    any_of: _containers.RepeatedScalarFieldContainer[str]
    none_of: _containers.RepeatedScalarFieldContainer[str]
    range: Range
    def __init__(self, key: _Optional[str] = ..., any_of: _Optional[_Iterable[str]] = ..., none_of: _Optional[_Iterable[str]] = ..., range: _Optional[_Union[Range, _Mapping]] = ...) -> None: ...

class Range(_message.Message):
    __slots__ = ("gt", "gte", "lt", "lte")
    GT_FIELD_NUMBER: _ClassVar[int]
    GTE_FIELD_NUMBER: _ClassVar[int]
    LT_FIELD_NUMBER: _ClassVar[int]
    LTE_FIELD_NUMBER: _ClassVar[int]
    gt: float
    gte: float
    lt: float
    lte: float
    def __init__(self, gt: _Optional[float] = ..., gte: _Optional[float] = ..., lt: _Optional[float] = ..., lte: _Optional[float] = ...) -> None: ...

class Example(_message.Message):
    __slots__ = ("product_id", "image_id", "vector", "image", "region")
    PRODUCT_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    product_id: str
    image_id: str
    vector: Vector
    image: bytes
    region: Region
    def __init__(self, product_id: _Optional[str] = ..., image_id: _Optional[str] = ..., vector: _Optional[_Union[Vector, _Mapping]] = ..., image: _Optional[bytes] = ..., region: _Optional[_Union[Region, _Mapping]] = ...) -> None: ...

class RecommendRequest(_message.Message):
    __slots__ = ("positive", "negative", "strategy", "k", "filter", "score_threshold", "ignore_missing", "search_k", "group_size", "with_attributes", "diversity", "candidates")
    POSITIVE_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    SCORE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    IGNORE_MISSING_FIELD_NUMBER: _ClassVar[int]
    SEARCH_K_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    WITH_ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    DIVERSITY_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    positive: _containers.RepeatedCompositeFieldContainer[Example]
    negative: _containers.RepeatedCompositeFieldContainer[Example]
    strategy: RecommendStrategy
    k: int
    filter: Filter
    score_threshold: float
    ignore_missing: bool
    search_k: int
    group_size: int
    with_attributes: bool
    diversity: float
    candidates: int
    def __init__(self, positive: _Optional[_Iterable[_Union[Example, _Mapping]]] = ..., negative: _Optional[_Iterable[_Union[Example, _Mapping]]] = ..., strategy: _Optional[_Union[RecommendStrategy, str]] = ..., k: _Optional[int] = ..., filter: _Optional[_Union[Filter, _Mapping]] = ..., score_threshold: _Optional[float] = ..., ignore_missing: _Optional[bool] = ..., search_k: _Optional[int] = ..., group_size: _Optional[int] = ..., with_attributes: _Optional[bool] = ..., diversity: _Optional[float] = ..., candidates: _Optional[int] = ...) -> None: ...

class RecommendResponse(_message.Message):
    __slots__ = ("matches", "index_version", "missing_product_ids", "missing_image_ids", "availability_version", "plan", "delta_sequence")
    MATCHES_FIELD_NUMBER: _ClassVar[int]
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    MISSING_PRODUCT_IDS_FIELD_NUMBER: _ClassVar[int]
    MISSING_IMAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    AVAILABILITY_VERSION_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    DELTA_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    matches: _containers.RepeatedCompositeFieldContainer[Match]
    index_version: str
    missing_product_ids: _containers.RepeatedScalarFieldContainer[str]
    missing_image_ids: _containers.RepeatedScalarFieldContainer[str]
    availability_version: int
    plan: str
    delta_sequence: int
    def __init__(self, matches: _Optional[_Iterable[_Union[Match, _Mapping]]] = ..., index_version: _Optional[str] = ..., missing_product_ids: _Optional[_Iterable[str]] = ..., missing_image_ids: _Optional[_Iterable[str]] = ..., availability_version: _Optional[int] = ..., plan: _Optional[str] = ..., delta_sequence: _Optional[int] = ...) -> None: ...

class Match(_message.Message):
    __slots__ = ("item_id", "distance", "score", "path", "label", "image_id", "product_id", "images", "attributes")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    DISTANCE_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    distance: float
    score: float
    path: str
    label: str
    image_id: str
    product_id: str
    images: _containers.RepeatedCompositeFieldContainer[ImageMatch]
    attributes: _containers.ScalarMap[str, str]
    def __init__(self, item_id: _Optional[str] = ..., distance: _Optional[float] = ..., score: _Optional[float] = ..., path: _Optional[str] = ..., label: _Optional[str] = ..., image_id: _Optional[str] = ..., product_id: _Optional[str] = ..., images: _Optional[_Iterable[_Union[ImageMatch, _Mapping]]] = ..., attributes: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ImageMatch(_message.Message):
    __slots__ = ("image_id", "distance", "score", "path", "role")
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    DISTANCE_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    distance: float
    score: float
    path: str
    role: str
    def __init__(self, image_id: _Optional[str] = ..., distance: _Optional[float] = ..., score: _Optional[float] = ..., path: _Optional[str] = ..., role: _Optional[str] = ...) -> None: ...

class FindSimilarResponse(_message.Message):
    __slots__ = ("matches", "index_version", "availability_version", "plan", "delta_sequence")
    MATCHES_FIELD_NUMBER: _ClassVar[int]
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    AVAILABILITY_VERSION_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    DELTA_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    matches: _containers.RepeatedCompositeFieldContainer[Match]
    index_version: str
    availability_version: int
    plan: str
    delta_sequence: int
    def __init__(self, matches: _Optional[_Iterable[_Union[Match, _Mapping]]] = ..., index_version: _Optional[str] = ..., availability_version: _Optional[int] = ..., plan: _Optional[str] = ..., delta_sequence: _Optional[int] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetInfoResponse(_message.Message):
    __slots__ = ("version", "backbone", "preprocessing", "head", "dimension", "metric", "item_count", "search_k", "n_trees", "recall_at_10", "input_size", "max_k", "max_images_per_request", "server_version", "image_count", "product_count", "attribute_keys", "hidden_product_count", "availability_version", "delta_sequence", "delta_product_count", "delta_image_count", "attributes")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    PREPROCESSING_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    ITEM_COUNT_FIELD_NUMBER: _ClassVar[int]
    SEARCH_K_FIELD_NUMBER: _ClassVar[int]
    N_TREES_FIELD_NUMBER: _ClassVar[int]
    RECALL_AT_10_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_K_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    IMAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_COUNT_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTE_KEYS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_PRODUCT_COUNT_FIELD_NUMBER: _ClassVar[int]
    AVAILABILITY_VERSION_FIELD_NUMBER: _ClassVar[int]
    DELTA_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    DELTA_PRODUCT_COUNT_FIELD_NUMBER: _ClassVar[int]
    DELTA_IMAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    version: str
    backbone: str
    preprocessing: str
    head: str
    dimension: int
    metric: str
    item_count: int
    search_k: int
    n_trees: int
    recall_at_10: float
    input_size: int
    max_k: int
    max_images_per_request: int
    server_version: str
    image_count: int
    product_count: int
    attribute_keys: _containers.RepeatedScalarFieldContainer[str]
    hidden_product_count: int
    availability_version: int
    delta_sequence: int
    delta_product_count: int
    delta_image_count: int
    attributes: _containers.RepeatedCompositeFieldContainer[AttributeInfo]
    def __init__(self, version: _Optional[str] = ..., backbone: _Optional[str] = ..., preprocessing: _Optional[str] = ..., head: _Optional[str] = ..., dimension: _Optional[int] = ..., metric: _Optional[str] = ..., item_count: _Optional[int] = ..., search_k: _Optional[int] = ..., n_trees: _Optional[int] = ..., recall_at_10: _Optional[float] = ..., input_size: _Optional[int] = ..., max_k: _Optional[int] = ..., max_images_per_request: _Optional[int] = ..., server_version: _Optional[str] = ..., image_count: _Optional[int] = ..., product_count: _Optional[int] = ..., attribute_keys: _Optional[_Iterable[str]] = ..., hidden_product_count: _Optional[int] = ..., availability_version: _Optional[int] = ..., delta_sequence: _Optional[int] = ..., delta_product_count: _Optional[int] = ..., delta_image_count: _Optional[int] = ..., attributes: _Optional[_Iterable[_Union[AttributeInfo, _Mapping]]] = ...) -> None: ...

class AttributeInfo(_message.Message):
    __slots__ = ("key", "kind", "product_count", "min", "max")
    KEY_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_COUNT_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    key: str
    kind: str
    product_count: int
    min: float
    max: float
    def __init__(self, key: _Optional[str] = ..., kind: _Optional[str] = ..., product_count: _Optional[int] = ..., min: _Optional[float] = ..., max: _Optional[float] = ...) -> None: ...
