"""lookalike.v1 generated stubs: do not edit, run make protos."""
