"""Backends: the one list of what `export --backend` offers, each backend's partitioners,
and the delegate ids a program names.

A program names the backends it was delegated to (`BackendDelegate.id` in its
flatbuffer, `delegate_ids`). The runtime checks them before loading a program
(runtime/delegates.py), so a program for a phone's GPU or NPU is refused in one line
instead of failing deep inside `load_method`.

Nothing here imports torch or executorch at module level (the CLI's help text reads
`HELP`); the partitioners import their backend's Python packages when they are built.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgectl.util.errors import EdgectlError
from edgectl.util.native import _debug


@dataclass(frozen=True)
class Backend:
    name: str  # the --backend value
    label: str  # what it targets, for --backend's help
    delegate: str | None  # the backend id a program delegated to it carries; None: portable kernels only
    runs_on: str  # where such a program runs, for the refusal on a machine without that runtime
    schemes: tuple[str, ...] = ()  # the `--scheme`s it exports (xnnpack: edgectl's module forms; openvino: NNCF's)
    install: str | None = None  # what installs its ahead-of-time and runtime parts, when they are optional
    # static shapes, one token per call (prefill too): coreml's converter takes no
    # symbolic size (a SymInt partition input is a NotImplementedError; ExecuTorch's own
    # LLM export refuses dynamic shapes for coreml and qnn as well); ExecuTorch 1.4.1's
    # OpenVINO runtime never resizes a delegate's outputs, so a shorter call than the
    # largest would return the largest call's shape
    static: bool = False


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("xnnpack", "ARM/x86 CPUs", "XnnpackBackend", "ARM and x86 CPUs", schemes=("int8", "8da4w", "4w")),
    Backend("portable", "any CPU, ExecuTorch's portable kernels, no delegate", None, "any CPU"),
    Backend("openvino", "Intel CPUs/GPUs/NPUs; pip install 'edgectl[openvino]'", "OpenvinoBackend",
            "Intel CPUs, GPUs and NPUs, with OpenVINO's runtime", schemes=("int8",),
            install="pip install 'edgectl[openvino]'", static=True),
    Backend("vulkan", "Android/Linux GPUs", "VulkanBackend",
            "Android and Linux GPUs, with an ExecuTorch runtime built with its Vulkan backend"),
    Backend("coreml", "Apple devices, fp16", "CoreMLBackend",
            "iOS and macOS, with an ExecuTorch runtime built with its Core ML backend", static=True),
    Backend("qnn", "Qualcomm NPUs, needs Qualcomm's SDK", "QnnBackend",
            "Qualcomm Snapdragon NPUs, with Qualcomm's QNN libraries", static=True),
)}
NAMES: tuple[str, ...] = tuple(BACKENDS)
SHARDABLE: tuple[str, ...] = tuple(n for n, b in BACKENDS.items() if not b.static)  # a shard takes many tokens a call
HELP = ", ".join(f"{b.name} ({b.label})" for b in BACKENDS.values()) + "."


def get(name: str) -> Backend:
    if name not in BACKENDS:
        raise EdgectlError(f"unknown backend {name!r}", hint=f"choose one of: {', '.join(NAMES)}")
    return BACKENDS[name]


# -- partitioners -------------------------------------------------------------------------

def _xnnpack():
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    return [XnnpackPartitioner()]


def _vulkan():
    root = logging.getLogger().level
    from executorch.backends.vulkan.partitioner.vulkan_partitioner import VulkanPartitioner

    if not _debug():  # two of its modules set the root logger to INFO when imported
        logging.getLogger().setLevel(root)
    return [VulkanPartitioner()]


# coremltools 9.0's common::fuse_linear_bias folds `linear(x, W) + c` into the linear's
# bias; with one output feature and a scalar c (RMSNorm's mean(x^2) + eps, a 1-row linear
# here, model.RMSNorm) it indexes the scalar's empty shape: IndexError. Left out: it folds
# a constant added after a linear, and in these models that is only this eps.
COREML_SKIPPED_PASSES = ("common::fuse_linear_bias",)
# The program's runtime checks on the cache position (pos[0].item() in range: comparisons
# and _assert_scalar on a SymInt) stay outside Core ML: a partition that took them would
# take a SymInt input, which Core ML's converter refuses (NotImplementedError).
COREML_SKIPPED_OPS = ["_assert_scalar.default", "ge", "le", "gt", "lt", "eq", "ne"]


def _coreml():
    if not _debug():
        _quiet_coreml()
    import coremltools as ct
    from executorch.backends.apple.coreml.compiler import CoreMLBackend
    from executorch.backends.apple.coreml.partition import CoreMLPartitioner

    passes = [p for p in ct.PassPipeline.DEFAULT.passes if p not in COREML_SKIPPED_PASSES]
    # fp16 compute (Core ML's default, the precision Apple's Neural Engine runs)
    specs = CoreMLBackend.generate_compile_specs(compute_precision=ct.precision.FLOAT16, pass_names=passes)
    return [CoreMLPartitioner(compile_specs=specs, skip_ops_for_coreml_delegation=list(COREML_SKIPPED_OPS))]


def _quiet_coreml() -> None:
    """coremltools warns at import about versions it has not tested and the macOS-only
    parts it cannot load here, and draws progress bars for every partition; ExecuTorch's
    Core ML partitioner logs each op it skips, its compiler a warning per partition."""
    import functools

    os.environ.setdefault("ET_COREML_LOG_LEVEL", "ERROR")
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    from tqdm import tqdm

    import coremltools.converters.mil.frontend.torch.ops as ops
    import coremltools.converters.mil.mil.passes.pass_pipeline as pipeline

    ops._tqdm = functools.partial(tqdm, disable=True)
    pipeline.tqdm = functools.partial(tqdm, disable=True)


def _qnn():
    # executorch.backends.qualcomm, imported without QNN_SDK_ROOT on x86 Linux, downloads
    # Qualcomm's SDK from the network: never import it without one.
    root = os.environ.get("QNN_SDK_ROOT")
    if not root:
        raise EdgectlError("the qnn backend needs Qualcomm's AI Engine Direct (QNN) SDK: QNN_SDK_ROOT is not set",
                           hint="install the SDK and export QNN_SDK_ROOT=/path/to/qairt/<version>")
    if not Path(root).is_dir():
        raise EdgectlError(f"QNN_SDK_ROOT={root}: no such directory (the qnn backend needs Qualcomm's QNN SDK there)")
    if importlib.util.find_spec("cpuinfo") is None:
        raise EdgectlError("the qnn backend needs py-cpuinfo", hint="pip install py-cpuinfo")
    from executorch.backends.qualcomm.partition.qnn_partitioner import QnnPartitioner
    from executorch.backends.qualcomm.utils.utils import (
        generate_htp_compiler_spec,
        generate_qnn_executorch_compiler_spec,
        get_soc_to_chipset_map,
    )

    soc = os.environ.get("EDGECTL_QNN_SOC", "SM8650")
    chips = get_soc_to_chipset_map()
    if soc not in chips:
        raise EdgectlError(f"EDGECTL_QNN_SOC={soc}: not a chipset QNN knows", hint=f"one of: {', '.join(chips)}")
    specs = generate_qnn_executorch_compiler_spec(chips[soc], generate_htp_compiler_spec(use_fp16=True))
    return [QnnPartitioner(specs)]


def _openvino():
    from edgectl.backends import openvino as openvino_backend

    return openvino_backend.partitioners()


_PARTITIONERS: dict[str, Callable[[], list]] = {
    "xnnpack": _xnnpack, "portable": lambda: [], "openvino": _openvino, "vulkan": _vulkan, "coreml": _coreml,
    "qnn": _qnn,
}
assert set(_PARTITIONERS) == set(BACKENDS)


def partitioners(backend: str) -> list:
    """The partitioners `to_edge_transform_and_lower` takes for `backend` (an unknown name,
    or a backend whose ahead-of-time part is missing, is a one-line error)."""
    b = get(backend)
    try:
        return _PARTITIONERS[backend]()
    except ImportError as e:
        raise EdgectlError(f"the {backend} backend's ahead-of-time part is not installed ({e})",
                           hint=b.install) from e


# -- quantization inside the graph (backends whose kernels are not torchao's) ---------------

def graph_quantizer(backend: str, scheme) -> tuple[Callable, dict] | None:
    """(quantize(exported_program, example_args, dynamic_shapes) -> exported_program, the
    record for the program's metadata) when `backend` quantizes `scheme` in the graph
    (pt2e) instead of with edgectl's module forms; None where edgectl's own forms apply."""
    if scheme is None or scheme.is_identity or backend == "xnnpack":
        return None
    check_scheme(backend, scheme.linear)
    if scheme.embedding != "none":
        raise EdgectlError(f"--embedding {scheme.embedding} exports with --backend xnnpack only",
                           hint=f"{backend}'s int8 compresses the embedding with the other weights")
    from edgectl.backends import openvino as openvino_backend  # the one backend besides xnnpack that takes a --scheme

    return openvino_backend.quantize_int8, dict(openvino_backend.INT8_RECORD)


def check_scheme(backend: str, scheme: str | None) -> None:
    """A `--scheme` the backend cannot export is refused before any work."""
    b = get(backend)
    if scheme is not None and scheme not in b.schemes:
        where = [n.name for n in BACKENDS.values() if scheme in n.schemes]
        raise EdgectlError(f"--scheme {scheme} does not export to {backend}",
                           hint=f"{backend} takes {', '.join(b.schemes) or 'fp32 only'}; "
                                f"{scheme} exports with --backend {' or '.join(where)}")


# -- the runtime side ---------------------------------------------------------------------

def prepare_runtime() -> None:
    """What the runtime's backends need before they first run (OpenVINO: its library)."""
    from edgectl.backends import openvino as openvino_backend

    openvino_backend.prepare_runtime()


def delegate_ids(path: Path) -> set[str]:
    """The backend ids every delegate in the program at `path` names (empty: portable only)."""
    from edgectl.formats import ptefile

    program, _ = ptefile._program(path)
    return {d for plan in program.plans for d in plan.delegates}


def by_delegate(delegate: str) -> Backend | None:
    return next((b for b in BACKENDS.values() if b.delegate == delegate), None)
