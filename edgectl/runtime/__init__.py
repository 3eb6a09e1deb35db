"""Run stage: load a .pte or a shard set with ExecuTorch's runtime (no torch export code) and generate."""
