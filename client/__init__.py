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
    UnavailableError,
    any_of,
    none_of,
)

__all__ = ["AsyncImageSimilarityClient", "Clause", "Cropped", "DeadlineError", "ImageId", "ImageMatch",
           "ImageSimilarityClient", "InvalidArgumentError", "LookalikeError", "Match", "Matches", "NotFoundError",
           "OverloadedError", "UnavailableError", "any_of", "none_of"]
