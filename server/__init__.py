"""lookalike server: gRPC Embed and FindSimilar with dynamic batching over the builder's artifacts."""
