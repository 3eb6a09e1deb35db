"""The XNNPACK partitioner's bookkeeping made cheaper, and its per-partition preprocess shared with a forked process."""

from __future__ import annotations

import contextlib
import os


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _preprocess_forked(original):
    """XnnpackBackend.preprocess_multimethod with the partitions shared between this process
    and one forked child: each partition's preprocess (17 passes, then serialization) is
    independent of the others and reads only its own copy of its program, so half of them
    run in the child, whose results (bytes and named data, picklable) come back through a
    pipe in the original order. With fewer than two cores or partitions, no fork: the
    original. A child that fails is reported, and its share run here instead."""

    def preprocess_multimethod(cls, edge_programs, compile_specs):
        import pickle
        import sys

        jobs = [(m, i) for m, programs in edge_programs.items() for i in range(len(programs))]
        if len(jobs) < 2 or _usable_cores() < 2 or not hasattr(os, "fork"):
            return original.__func__(cls, edge_programs, compile_specs)
        size = {j: len(edge_programs[j[0]][j[1]].graph.nodes) for j in jobs}
        ordered = sorted(jobs, key=lambda j: -size[j])
        theirs = set(ordered[1::2])
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: its share, pickled into the pipe, then gone
            code = 0
            try:
                import torch

                os.close(r)
                torch.set_num_threads(1)
                try:
                    out = ("ok", {j: cls.preprocess(edge_programs[j[0]][j[1]], compile_specs[j[0]][j[1]]) for j in theirs})
                except BaseException as e:  # noqa: BLE001 - reported to the parent
                    out = ("error", f"{type(e).__name__}: {e}")
                with os.fdopen(w, "wb") as f:
                    pickle.dump(out, f, protocol=pickle.HIGHEST_PROTOCOL)
            except BaseException:  # noqa: BLE001
                code = 1
            finally:
                os._exit(code)
        os.close(w)
        results = {}
        try:
            for j in jobs:
                if j not in theirs:
                    results[j] = cls.preprocess(edge_programs[j[0]][j[1]], compile_specs[j[0]][j[1]])
            with os.fdopen(r, "rb") as f:
                try:
                    status, payload = pickle.load(f)
                except EOFError:
                    status, payload = "error", "the child exited without a result"
        finally:
            _, rc = os.waitpid(pid, 0)
        if status != "ok":
            print(f"note: preprocessing in a second process failed ({payload}); finishing here", file=sys.stderr)
            payload = {j: cls.preprocess(edge_programs[j[0]][j[1]], compile_specs[j[0]][j[1]]) for j in theirs}
        results.update(payload)
        return {m: [results[(m, i)] for i in range(len(programs))] for m, programs in edge_programs.items()}

    return classmethod(preprocess_multimethod)


@contextlib.contextmanager
def _partitions_sorted_in_place():
    """Cutting out each of the partitions (executorch's create_submodule_from_nodes) ends
    with torch's `legalize_graph`: a topological sort that copies every node of the whole
    graph into a new one, which then regenerates the graph module's Python code, once per
    partition. This sorts in the same order (the same algorithm, on the same nodes) by
    moving the nodes where they are, and regenerates the code once, after the last
    partition (`_create_partitions`); nothing in between runs that code."""
    import collections

    import executorch.exir.lowered_backend_module as L
    from executorch.exir.backend import backend_api as B
    from torch.fx.passes import tools_common

    legalize, create = L.legalize_graph, B._create_partitions
    if legalize is not tools_common.legalize_graph:
        yield  # not the function this replaces
        return

    def legalize_in_place(gm):
        import operator

        import torch

        # torch 2.13's PRIORITIZED_OPS in legalize_graph: these jump the queue
        first = {operator.add, operator.mul, operator.sub, operator.floordiv, operator.truediv, operator.mod,
                 operator.le, operator.lt, operator.ge, operator.gt, operator.eq, operator.ne,
                 torch.ops.aten.sym_constrain_range.default, torch.ops.aten.sym_constrain_range_for_size.default,
                 torch.ops.aten._assert_async.msg, torch.ops.aten.scalar_tensor.default,
                 torch.ops.aten._assert_scalar.default}
        nodes = list(gm.graph.nodes)
        indeg = dict.fromkeys(nodes, 0)
        for node in nodes:
            for user in node.users:
                indeg[user] += 1
        queue = collections.deque(n for n in nodes if indeg[n] == 0)
        order = []
        while queue:
            cur = queue.popleft()
            order.append(cur)
            for user in cur.users:
                indeg[user] -= 1
                if indeg[user] == 0:
                    if user.op == "call_function" and user.target in first:
                        queue.appendleft(user)
                    else:
                        queue.append(user)
        if len(order) < len(nodes):
            raise RuntimeError(f"Input graph has cycles, unable to add {[n for n in indeg if indeg[n] != 0]}")
        prev = gm.graph._root
        for node in order:
            if prev._next is not node:
                prev.append(node)
            prev = node
        return gm

    def create_partitions(tagged_graph_module, *args, **kwargs):
        out = create(tagged_graph_module, *args, **kwargs)
        tagged_graph_module.recompile()
        return out

    L.legalize_graph, B._create_partitions = legalize_in_place, create_partitions
    try:
        yield
    finally:
        L.legalize_graph, B._create_partitions = legalize, create


SIGNATURE_MAPS = ("inputs_to_parameters", "inputs_to_buffers", "inputs_to_lifted_tensor_constants")


@contextlib.contextmanager
def _signature_maps_cached():
    """The partitioner asks, for every node, whether it is a parameter, buffer or constant;
    each question rebuilds the graph signature's name maps from all its inputs (quadratic
    in the model size). While partitioning, which changes no signature, build each once."""
    from torch.export.graph_signature import ExportGraphSignature

    originals = {name: getattr(ExportGraphSignature, name) for name in SIGNATURE_MAPS}
    cache: dict = {}

    def cached(name, prop):
        def get(self):
            key = (name, id(self), id(self.input_specs), len(self.input_specs))
            if key not in cache:
                cache[key] = (self, prop.fget(self))  # holds self: its id stays unique
            return cache[key][1]
        return property(get)

    for name, prop in originals.items():
        setattr(ExportGraphSignature, name, cached(name, prop))
    try:
        yield
    finally:
        for name, prop in originals.items():
            setattr(ExportGraphSignature, name, prop)


def _can_merge_partitions(self, p1, p2, partitions_by_id):
    """executorch 1.4.1's GroupBasedPartitioner._can_merge_partitions with its cycle test
    as one set operation: `any(n in combined for n in downstreams)` walks, in Python, the
    whole transitive downstream set of every external user, for every pair of partitions."""
    from torch.fx.passes.utils.fuser_utils import validate_partition

    combined = set(partitions_by_id[p1].nodes.keys()) | set(partitions_by_id[p2].nodes.keys())
    users = [user for node in combined for user in node.users if user not in combined]
    viewer = self.dependency_viewer
    if isinstance(viewer, _BitDependencyViewer):
        mask = viewer.mask(combined)
        if any(viewer.down[u] & mask for u in users if u in viewer.down):
            return False
    elif any(not combined.isdisjoint(viewer.downstreams_of(u)) for u in users):
        return False
    return validate_partition(list(combined))


class _BitDependencyViewer:
    """executorch's _DependencyViewer (every node's transitive users and inputs) with each
    set held as the bits of one Python int: building it unions sets of nodes for every
    edge, which on SmolLM2 is quadratic set work in Python; unions of ints are not."""

    def __init__(self, graph_module):
        nodes = list(graph_module.graph.nodes)
        self.index = {n: i for i, n in enumerate(nodes)}
        self.nodes = nodes
        self.down, self.up = {}, {}
        for node in reversed(nodes):
            bits = 0
            for user in node.users:
                bits |= (1 << self.index[user]) | self.down[user]
            self.down[node] = bits
        for node in nodes:
            bits = 0
            for arg in node.all_input_nodes:
                bits |= (1 << self.index[arg]) | self.up[arg]
            self.up[node] = bits

    def mask(self, nodes) -> int:
        bits = 0
        for n in nodes:
            if n in self.index:
                bits |= 1 << self.index[n]
        return bits

    def _nodes(self, bits: int) -> set:
        out, i = set(), 0
        while bits:
            if bits & 1:
                out.add(self.nodes[i])
            bits >>= 1
            i += 1
        return out

    def downstreams_of(self, node) -> set:
        return self._nodes(self.down.get(node, 0))

    def upstreams_of(self, node) -> set:
        return self._nodes(self.up.get(node, 0))
