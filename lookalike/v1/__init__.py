"""Generated gRPC stubs for the lookalike contract (make protos)."""
