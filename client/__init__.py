"""lookalike client: a Python library, CLI and load generator for the ImageSimilarity service."""

from client.library import (
    AsyncImageSimilarityClient,
    Clause,
    Cropped,
    DeadlineError,
    ImageId,
    ImageMatch,
    ImageSimilarityClient,
    InvalidArgumentError,
    LookalikeError,
    Match,
    Matches,
    NotFoundError,
    OverloadedError,
    Range,
    UnavailableError,
    any_of,
    in_range,
    none_of,
)

__all__ = ["AsyncImageSimilarityClient", "Clause", "Cropped", "DeadlineError", "ImageId", "ImageMatch",
           "ImageSimilarityClient", "InvalidArgumentError", "LookalikeError", "Match", "Matches", "NotFoundError",
           "OverloadedError", "Range", "UnavailableError", "any_of", "in_range", "none_of"]
