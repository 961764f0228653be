"""lookalike client: a Python library, CLI and load generator for the ImageSimilarity service."""

from client.library import (
    AsyncImageSimilarityClient,
    DeadlineError,
    ImageMatch,
    ImageSimilarityClient,
    InvalidArgumentError,
    LookalikeError,
    Match,
    Matches,
    NotFoundError,
    OverloadedError,
    UnavailableError,
)

__all__ = ["AsyncImageSimilarityClient", "DeadlineError", "ImageMatch", "ImageSimilarityClient", "InvalidArgumentError",
           "LookalikeError", "Match", "Matches", "NotFoundError", "OverloadedError", "UnavailableError"]
