"""Edge graph passes every export runs (public torch.fx API, not fenced): they change the program, not how it is made."""

from __future__ import annotations


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


# Pure operators whose duplicates (same target, same inputs, same arguments) can be merged.
PURE = ("view_copy", "linear", "permute_copy", "mm.default", "addmm", "mul.Tensor", "add.Tensor", "rsqrt")


def dedupe(gm):
    """Edge pass: merge repeated pure computations on the same inputs (in place). The one
    that matters: the per-group input sums of asymmetric 4-bit linears that share an input
    (q/k/v, gate/up), which would otherwise be computed once per linear."""
    from torch.fx.passes.infra.pass_base import PassResult

    seen, removed = {}, 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not any(p in str(node.target) for p in PURE):
            continue
        key = (node.target, repr(node.args), repr(sorted(node.kwargs.items())))
        first = seen.get(key)
        if first is None:
            seen[key] = node
            continue
        node.replace_all_uses_with(first)
        gm.graph.erase_node(node)
        removed += 1
    if removed:
        gm.recompile()
    return PassResult(gm, bool(removed))
