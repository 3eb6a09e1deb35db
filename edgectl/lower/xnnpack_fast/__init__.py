"""Faster ExecuTorch lowering for the graphs edgectl exports, with the same result.

1. `passes.fast_passes()`: skip XNNPACK preprocess passes that cannot match anything in a
   partition, and the whole-partition re-trace of those that found nothing to change
   (`_skip_idle_retraces`); decompose once, not three times, when every preserved node
   passes XNNPACK's filter (`_edge_manager`); run the aten-to-edge local rewrites in two
   re-traces instead of eight (`FUSED_EDGE_RUNS`); and, from partitioner.py, make the
   partitioner's bookkeeping cheaper (signature maps built once, dependencies as bitsets,
   cycle test as one mask test); share XNNPACK's per-partition preprocess with a forked
   process; and cut the partitions out with one topological sort in place each and one
   recompile.
2. `shapes.shape_kernels()`: shape-only (Meta) kernels for torchao's
   quantize/dequantize/choose_qparams ops, and shape-only fake-tensor answers for aten.linear.
3. `shapes.delegate_modules_cached()`: a delegate call's fake-tensor output comes from its
   partition's program, rebuilt as a module once, not at every re-trace, and run once per
   distinct input shape.

XNNPACK's preprocess runs 17 graph passes over every partition, and each one re-traces the
partition with fake tensors even when it has nothing to rewrite (batch norm, conv1d,
PReLU, upsample, max-pool, pad, concatenation, ...). On SmolLM2-135M that re-tracing is
most of the export time. `fast_passes()` drops, per partition, each pass whose anchor
operators do not occur in it; every other pass runs as before and in the same order.

torchao registers its quantization primitives as custom ops with no shape function, so
every time a graph is re-traced with fake tensors (decompositions, then each XNNPACK pass,
for every quantized linear) the whole Python implementation runs op by op on fake tensors:
a third of an 8da4w export. `shape_kernels()` gives them Meta kernels that compute only the
output shapes and dtypes, following torchao 0.18's own code.

All are checked, not assumed: tests/lower/test_export_run.py exports with and without them and
requires byte-identical programs once debug handles are held equal (the single
decomposition renumbers those profiling ids; nothing else changes). `EDGECTL_SLOW_EXPORT=1`
turns them off.

They patch private attributes of torch, ExecuTorch and torchao, so they are fenced
(fence.py): they apply only on the versions they were written against and checked on
(`WRITTEN_FOR`). On any other version export takes ExecuTorch's stock path, with one notice
(`enabled()`). The edge passes that change the program (edgectl/lower/edge_passes.py:
`infer_view_dims`, `dedupe`) are not speed-ups and always run.
"""
