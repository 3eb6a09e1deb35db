"""Run stage: load a .pte or a shard set with ExecuTorch's runtime library (numpy in and out, no torch) and generate."""
