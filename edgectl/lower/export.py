"""Export stage: torch.export + ExecuTorch lowering to a self-contained `.pte`.

The program's `forward(tokens[1,T], pos[T], idx[N], k_caches..., v_caches...)` returns
`logits[1,N,vocab]`: prefill of a prompt chunk in one call, decode with T=1, and the KV
cache owned by the caller, who passes its whole [1, S, KV, D] buffers (a sliding layer's:
a ring of C = meta `kv_ring` slots, model_args.ring_len); the program writes the T new
entries into them in place and attends over positions < pos[0] + T (a sliding layer: its
window) (model.Transformer, as it is). Inputs are not copied into planned memory
(`alloc_graph_input=False`), so the caches are passed and written zero-copy.

Everything `run` needs travels in the `.pte` as constant methods: `edgectl_meta` (JSON:
architecture, max_seq_len, tokenizer config, chat template, quantization) and
`edgectl_tokenizer` (tokenizer.json), both as uint8 tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edgectl.util.version import __version__
from edgectl.formats import integrity
from edgectl.util.errors import EdgectlError
from edgectl.util.files import write_atomic
from edgectl.model_args import ring_len

Progress = Callable[[str], None]  # called with the name of each stage as it starts


@dataclass
class ExportResult:
    path: str
    bytes: int
    seconds: float
    cpu_seconds: float
    backend: str
    max_seq_len: int
    ops: dict = field(default_factory=dict)  # {"delegated": n, "non_delegated": {op: count}}
    interface: str = "edgectl"
    tokenizer: str | None = None  # stock interface: the tokenizer file written beside the .pte

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def partitioners(backend: str) -> list:
    """The backend's partitioners (the list of backends is backends.py's)."""
    from edgectl.backends import registry as backends

    _quiet_library_noise()  # the partitioners import torchao, which logs at import time
    return backends.partitioners(backend)


def _quiet_library_noise() -> None:
    """Keep known, harmless library chatter off the user's stderr (edgectl --debug shows all)."""
    import warnings

    from edgectl.util.env import quiet_import_logs

    if os.environ.get("EDGECTL_DEBUG") == "1":
        return
    quiet_import_logs()
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec.*")
    # the stock interface (stock.py): its KV-cache buffers are meant to start undefined,
    # and ExecuTorch's own custom-op registrations call a deprecated torch check
    warnings.filterwarnings("ignore", category=UserWarning, message="Mutation on a buffer in the model")
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*_check_is_size will be removed")


def lower(module, example_args: tuple, dynamic_shapes, backend: str, constant_methods: dict | None = None,
          progress: Progress | None = None, quantize_graph: Callable | None = None):
    """torch.export -> edge -> backend lowering -> ExecuTorch program. Returns (et_program, op counts).
    `quantize_graph(exported_program, example_args, dynamic_shapes)` quantizes the exported
    graph first (backends.graph_quantizer)."""
    from edgectl.lower.xnnpack_fast.shapes import delegate_modules_cached, shape_kernels

    with shape_kernels(), delegate_modules_cached():
        return _lower(module, example_args, dynamic_shapes, backend, constant_methods, progress, quantize_graph)


def _lower(module, example_args, dynamic_shapes, backend, constant_methods, progress, quantize_graph=None):
    import torch
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass

    from edgectl.util.native import library_prints_to_stderr
    from edgectl.lower.edge_passes import dedupe, infer_view_dims
    from edgectl.lower.xnnpack_fast.passes import fast_passes

    step = progress or (lambda s: None)
    _quiet_library_noise()
    step("torch.export")
    with torch.no_grad():
        ep = torch.export.export(
            module, example_args, dynamic_shapes=dynamic_shapes, strict=False,
            prefer_deferred_runtime_asserts_over_guards=True,
        )
    if quantize_graph is not None:
        step(f"quantizing ({backend})")
        ep = quantize_graph(ep, example_args, dynamic_shapes)
    step(f"lowering ({backend})")
    with fast_passes(), library_prints_to_stderr():
        edge = to_edge_transform_and_lower(
            ep,
            transform_passes=[infer_view_dims, dedupe] if backend == "xnnpack" else None,
            partitioner=partitioners(backend),
            compile_config=EdgeCompileConfig(_check_ir_validity=False),
            constant_methods=constant_methods,
        )
    drop_input_mutation_outputs(edge.exported_program())
    ops = op_counts(edge.exported_program().graph_module)
    step("to_executorch")
    prog = edge.to_executorch(
        ExecutorchBackendConfig(
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
            extract_delegate_segments=True,
        )
    )
    return prog, ops


def drop_input_mutation_outputs(ep) -> None:
    """Make a program's writes into its inputs (a layer shard's KV caches) land in the
    caller's memory, with no copy. torch.export returns every mutated input as an extra
    output, which ExecuTorch emits as copies of the whole tensor (three per cache) and
    memory-plans, so the input is copied in as well. Without those outputs the in-place
    kernel (llama::update_cache) writes the input itself, and an input that is not memory
    planned (alloc_graph_input=False) is the caller's buffer."""
    from torch.export._remove_auto_functionalized_pass import unsafe_remove_auto_functionalized_pass
    from torch.export.graph_signature import OutputKind

    # Functionalization turned each in-place write into auto_functionalized. Where nothing
    # but the dropped output reads its result, dead-code elimination would drop the write
    # too: back to the in-place op first (to_executorch would do that anyway), which it
    # keeps for its side effect.
    unsafe_remove_auto_functionalized_pass(ep)
    specs = ep.graph_signature.output_specs
    keep = [i for i, spec in enumerate(specs) if spec.kind != OutputKind.USER_INPUT_MUTATION]
    if len(keep) == len(specs):
        return
    out = next(n for n in ep.graph.nodes if n.op == "output")
    out.args = (tuple(out.args[0][i] for i in keep),)
    specs[:] = [specs[i] for i in keep]
    ep.graph.eliminate_dead_code()
    ep.graph_module.recompile()


def op_counts(gm) -> dict:
    """Delegated calls vs operators left to the portable kernels, by name."""
    delegated, other = 0, Counter()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", str(node.target))
        if "call_delegate" in name:
            delegated += 1
        elif name != "getitem":
            other[name] += 1
    return {"delegated": delegated, "non_delegated": dict(other.most_common())}


def bytes_tensor(data: bytes):
    import torch

    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def metadata(ckpt, args, max_seq_len: int, backend: str, quantization: dict | None) -> dict:
    from edgectl.model import KV_LAYOUT

    tc = ckpt.tokenizer_config
    keep = ("bos_token", "eos_token", "add_bos_token", "chat_template")
    return {
        integrity.FIELD: integrity.PLACEHOLDER,  # first: the file's own sha256, written by integrity.seal
        "edgectl_version": __version__,
        "format": "edgectl-pte/1",
        "model": args.to_dict(),
        "max_seq_len": max_seq_len,
        "backend": backend,
        "quantization": quantization,
        "tokenizer_config": {k: tc[k] for k in keep if k in tc},
        "source": {"model": ckpt.source, "sha256": ckpt.content_hash()},
        "io": IO,
        "kv_layout": KV_LAYOUT,
    }


def constant_methods(meta: dict, tokenizer_json: str) -> dict:
    args = meta["model"]
    eos = args["eos_token_ids"]
    return {
        "edgectl_meta": bytes_tensor(json.dumps(meta).encode()),
        "edgectl_tokenizer": bytes_tensor(tokenizer_json.encode()),
        # The names ExecuTorch's own LLM runners read.
        "get_max_seq_len": meta["max_seq_len"],
        "get_vocab_size": args["vocab_size"],
        "get_bos_id": args["bos_token_id"] if args["bos_token_id"] is not None else -1,
        "get_eos_id": eos[0] if eos else -1,
        "get_n_layers": args["n_layers"],
    }


DEFAULT_PREFILL_CHUNK = 128
IO = ("forward(tokens[1,T], pos[T], idx[N], k_cache*L, v_cache*L) -> logits[1,N,V]; caches [1,S,KV,D] "
      "(a sliding layer's: a ring [1,C,KV,D], C = kv_ring), written in place")


def monolithic_example(model, chunk: int, table_input: bool):
    """Example inputs and dynamic dims of model.Transformer; with `table_input` the
    embedding table is an input.

    `chunk` bounds the tokens per call: memory planning reserves activations for the
    largest call (attention scores grow with chunk x max_seq_len), so the runtime feeds a longer
    prompt in chunks. Caches are whole [1, S, KV, D] buffers, a sliding layer's a ring of C slots
    sized for `chunk` (model_args.ring_len). A chunk of 1: static shapes, one token per call."""
    import torch
    from torch.export import Dim

    k_caches, v_caches = model.empty_caches(chunk)
    if chunk == 1:
        example = (torch.zeros(1, 1, dtype=torch.long), torch.arange(1), torch.arange(1), k_caches, v_caches)
        if table_input:
            example += (model.embed.embed_tokens.weight.detach().clone(),)
        return example, None
    T, N = Dim("T", min=1, max=chunk), Dim("N", min=1, max=chunk)
    # Example sizes 2 and 4: a dynamic dim must not be 1 in the example, and T, N must differ or export merges them
    example = (torch.zeros(1, 4, dtype=torch.long), torch.arange(4), torch.arange(2, 4), k_caches, v_caches)
    dynamic = ({1: T}, {0: T}, {0: N}, [None] * len(k_caches), [None] * len(v_caches))
    if table_input:
        example += (model.embed.embed_tokens.weight.detach().clone(),)
        dynamic += (None,)
    return example, dynamic


def tied_table_key(model) -> dict:
    """Where the runtime finds the tied matrix: XNNPACK stores an fp32 linear weight
    unchanged in named data, keyed by the sha256 of its bytes."""
    w = model.head.lm_head.weight.detach().contiguous()
    return {
        "key": hashlib.sha256(w.numpy().tobytes()).hexdigest(),
        "shape": list(w.shape),
        "dtype": "float32",
    }


def check_tied_table(path: Path, table: dict) -> None:
    from edgectl.formats.ptefile import named_data

    blobs = named_data(path)
    n = table["shape"][0] * table["shape"][1] * 4
    if table["key"] not in blobs or blobs[table["key"]][1] < n:
        raise EdgectlError(f"{path}: the output head was not stored where the runtime can share it as the embedding")


def quantize_by_plan(model, plan, group_size: int = 32) -> dict:
    """Give `model` (fp32, in memory) the per-shard precisions of a plan.Plan, in place:
    each layer shard's blocks get its precision's scheme (quantize_module on the Block),
    the head (and a tied embedding with it) the head shard's. The same schemes as
    `edgectl shard` (shard_build.scheme_for), so the monolithic program runs the mix the
    shard set would. Returns the quantization record for the program's metadata."""
    import dataclasses

    from edgectl.quant.scheme import EMBEDDING_FOR, QuantScheme, scheme_for
    from edgectl.quant.weights import quantize_module

    n = model.args.n_layers
    per_layer: dict[int, str] = {}
    head = None
    for c in plan.shards:
        if c.kind == "layers":
            for i in c.layers:
                if not 0 <= i < n:
                    raise EdgectlError(f"the plan names layer {i}; the model has {n}")
                per_layer[i] = c.precision
        elif c.kind == "head":
            head = c.precision
    if sorted(per_layer) != list(range(n)) or head is None:
        raise EdgectlError(f"the plan does not cover the model: layers {sorted(per_layer)} of {n}, head {head}",
                           hint="make the plan from a shard set of this model")
    record = {"format": "edgectl-plan-mix/1", "plan": {c.name: c.precision for c in plan.shards},
              "group_size": group_size, "parts": {}}
    # head + tied embedding first, while every linear is still a plain fp32 one
    if head != "fp32":
        emb = EMBEDDING_FOR.get(head, "none")
        record["parts"]["embedding"] = quantize_module(model, QuantScheme("fp32", group_size, emb, group_size))
        if not model.args.tie_embeddings:
            record["parts"]["head"] = quantize_module(model.head, dataclasses.replace(scheme_for(head, group_size), embedding="none"))
    for i in range(n):
        if per_layer[i] != "fp32":
            record["parts"][f"layers.{i}"] = quantize_module(model.layers[i], scheme_for(per_layer[i], group_size))
    return record


def export_pte(ckpt, out: Path, backend: str = "xnnpack", max_seq_len: int | None = None,
               progress: Progress | None = None, scheme=None, prefill_chunk: int | None = None,
               plan=None, plan_group_size: int = 32, calibration: Path | None = None,
               calibration_tokens: int = 1024, interface: str = "edgectl") -> ExportResult:
    """Export a checkpoint to one monolithic `.pte` at `out` (written atomically).
    `scheme` (a scheme.QuantScheme) quantizes an unquantized checkpoint in memory first
    (`calibration`: the text its smoothquant is calibrated on; None: built-in paragraph);
    `plan` (a plan.Plan) gives each layer and the head its own precision instead.
    `interface`: "edgectl" (the caller owns the KV cache, see the module docstring) or
    "stock" (ExecuTorch's stock runners' calling convention, stock.py; the tokenizer file
    they take is written beside `out`)."""
    from edgectl.backends import registry as backends
    from edgectl.quant.quant_modules import fuse_projections
    from edgectl.quant.quantize import check_shared_embedding, load_for_export, shared_embedding
    from edgectl.recipes import INTERFACES

    _quiet_library_noise()  # before torchao is imported

    t0, c0 = time.perf_counter(), time.process_time()
    step = progress or (lambda s: None)
    args = ckpt.args
    max_seq_len = max_seq_len or min(args.max_position_embeddings, 2048)
    if max_seq_len < 2:
        raise EdgectlError("--max-seq-len must be at least 2")
    chunk = min(prefill_chunk or DEFAULT_PREFILL_CHUNK, max_seq_len)
    partitioners(backend)  # an unknown backend or a missing part of one (qnn's SDK): one line, before any work
    if backends.get(backend).static:
        if prefill_chunk not in (None, 1) or interface == "stock":
            from edgectl.util.errors import UsageError

            raise UsageError(f"{backend} programs take one token per call (static shapes): "
                             f"no --prefill-chunk, no --interface stock")
        chunk = 1
    elif chunk < 2:
        raise EdgectlError("--prefill-chunk must be at least 2")
    if interface not in INTERFACES:
        raise EdgectlError(f"unknown interface {interface!r}", hint=f"choose one of: {', '.join(INTERFACES)}")
    step("loading weights")
    if plan is not None and (scheme is not None or ckpt.quantization is not None):
        from edgectl.util.errors import UsageError

        raise UsageError("--plan takes an unquantized model and no --scheme", hint="the plan sets each layer's precision")
    in_graph = backends.graph_quantizer(backend, scheme)  # a backend that quantizes in the graph: fp32 model first
    model, quant = load_for_export(ckpt, max_seq_len, None if in_graph else scheme, backend, step, calibration,
                                   calibration_tokens)
    if in_graph:
        quant = in_graph[1]
    if plan is not None:
        if backend != "xnnpack" and any(c.precision != "fp32" for c in plan.shards):
            raise EdgectlError(f"quantized precisions export with --backend xnnpack only, not {backend}")
        step("quantizing by plan")
        quant = quantize_by_plan(model, plan, plan_group_size)
    fuse_projections(model)
    if interface == "stock":
        return _export_stock(ckpt, model, quant, out, backend, max_seq_len, chunk, step, t0, c0)
    # A tied matrix is stored once: the head keeps it (delegated), and the program takes
    # the embedding table as an input that the runtime maps from the head's copy (for a
    # quantized one: the head's codes and scales, dequantized row by row in the program).
    qshare = shared_embedding(model) if args.tie_embeddings and backend == "xnnpack" else None
    share = args.tie_embeddings and backend == "xnnpack" and qshare is None
    example, dynamic = monolithic_example(model, chunk, table_input=share)
    if qshare:
        example += (qshare[0],)
        dynamic += ((None,) * len(qshare[0]),)
    meta = metadata(ckpt, args, max_seq_len, backend, quant)
    meta["prefill_chunk"] = chunk
    meta["kv_ring"] = ring_len(args, max_seq_len, chunk)  # a sliding layer's cache slots (None: no sliding layer)
    meta["embedding_input"] = tied_table_key(model) if share else (qshare[1] if qshare else None)
    program = model.eval()  # model.Transformer: the caches are inputs, written in place
    prog, ops = lower(program, example, dynamic, backend, constant_methods(meta, ckpt.tokenizer_json), step,
                      quantize_graph=in_graph[0] if in_graph else None)
    step("writing")

    def write(f):
        prog.write_to_file(f)
        f.flush()
        if share:
            check_tied_table(Path(f.name), meta["embedding_input"])
        if qshare:
            check_shared_embedding(Path(f.name), meta["embedding_input"])
        integrity.seal(f.name)  # last: the file's own checksum (edgectl/formats/integrity.py)

    size = write_atomic(out, write)
    return ExportResult(str(out), size, time.perf_counter() - t0, time.process_time() - c0, backend, max_seq_len, ops)


def _export_stock(ckpt, model, quant, out: Path, backend: str, max_seq_len: int, chunk: int, step, t0, c0) -> ExportResult:
    """The stock runners' form (stock.py): the cache and the embedding inside the program."""
    from edgectl.lower import stock

    meta = metadata(ckpt, model.args, max_seq_len, backend, quant)
    meta.update(prefill_chunk=chunk, interface="stock", io=stock.STOCK_IO, embedding_input=None, kv_layout=stock.KV_LAYOUT)
    methods = {**constant_methods(meta, ckpt.tokenizer_json), **stock.constant_methods(meta, chunk)}
    example, dynamic = stock.example(chunk)
    prog, ops = lower(stock.StockTransformer(model, max_seq_len).eval(), example, dynamic, backend, methods, step)
    step("writing")
    tok_path, tok = stock.tokenizer_file(ckpt, out)
    write_atomic(Path(tok_path), lambda f: f.write(tok))
    size = write_atomic(out, integrity.sealed(prog.write_to_file))
    return ExportResult(str(out), size, time.perf_counter() - t0, time.process_time() - c0, backend, max_seq_len, ops,
                        interface="stock", tokenizer=tok_path)
