"""Skip XNNPACK preprocess passes that cannot match anything in a partition.

XNNPACK's preprocess runs 17 graph passes over every partition, and each one re-traces the
partition with fake tensors even when it has nothing to rewrite (batch norm, conv1d,
PReLU, upsample, max-pool, pad, concatenation, ...). On SmolLM2-135M that re-tracing is
most of the export time. `fast_passes()` drops, per partition, each pass whose anchor
operators do not occur in it; every other pass runs as before and in the same order.

The result is checked, not assumed: tests/test_export_run.py exports with and without it
and requires byte-identical programs. `EDGECTL_ALL_XNNPACK_PASSES=1` turns it off.
"""

from __future__ import annotations

import contextlib
import os

# pass class name -> substrings of operator names; the pass runs only if one occurs.
# Anchors read from executorch 1.4.1's backends/xnnpack/_passes (and the transforms they import).
ANCHORS = {
    "XNNPACKRemoveCloneOpsTransform": ("clone",),
    "DimOrderOpsRevertPass": ("dim_order",),
    "ConvertToUpsampleBilinear2d": ("upsample", "_unsafe_index"),
    "ConvertToSDPAPass": ("softmax",),
    "FuseBatchNormPass": ("batch_norm",),
    "DecomposeBatchNorm": ("batch_norm",),
    "FuseActivationPass": ("relu", "hardtanh"),
    "DecomposeConcatenate": ("aten.cat",),
    "RemoveGetItemPass": ("max_pool2d_with_indices", "aten.max.dim"),
    "InsertPadQDQPass": ("constant_pad_nd",),
    "Conv1dUnsqueezePass": ("convolution",),
    "PReLUReshapePass": ("prelu",),
    "RemoveRedundantCopyPass": ("_to_copy",),
}


def _op_names(ep) -> set[str]:
    return {str(getattr(n.target, "__name__", n.target)) for n in ep.graph_module.graph.nodes if n.op == "call_function"}


def needed(passes: list, ep) -> list:
    ops = " ".join(sorted(_op_names(ep)))
    return [p for p in passes if p.__name__ not in ANCHORS or any(a in ops for a in ANCHORS[p.__name__])]


@contextlib.contextmanager
def fast_passes():
    if os.environ.get("EDGECTL_ALL_XNNPACK_PASSES") == "1":
        yield
        return
    from executorch.backends.xnnpack._passes import XNNPACKPassManager

    original = XNNPACKPassManager.transform

    def transform(self):
        self.passes = needed(self.passes, self.exported_program)
        return original(self)

    XNNPACKPassManager.transform = transform
    try:
        yield
    finally:
        XNNPACKPassManager.transform = original


def infer_view_dims(gm):
    """Edge pass: a view whose new shape has exactly one symbolic size (the dynamic token
    count) gets -1 there instead, which means the same thing. XNNPACK takes such views
    (static reshape with one inferred dim) but refuses symbolic ones, so without this
    every reshape in attention breaks the layer into several delegate calls."""
    from torch.fx.passes.infra.pass_base import PassResult

    changed = False
    for node in gm.graph.nodes:
        if node.op != "call_function" or "view_copy" not in str(node.target):
            continue
        shape = list(node.args[1])
        symbolic = [i for i, d in enumerate(shape) if not isinstance(d, int)]
        if len(symbolic) == 1 and -1 not in shape:
            shape[symbolic[0]] = -1
            node.args = (node.args[0], shape, *node.args[2:])
            changed = True
    if changed:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return PassResult(gm, changed)
