"""lookalike builder: from a folder of product photos to versioned, served-ready artifacts."""

__version__ = "0.1.0"
