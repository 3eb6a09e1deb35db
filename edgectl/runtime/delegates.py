"""Can this runtime run a program's delegates? Checked before the program loads, explained after a load fails.

The backends a `.pte` is delegated to are its delegate ids (backends.registry.delegate_ids,
read from the flatbuffer). Through the Python binding the runtime lists its registered
backends; through the native shim (no torch) it cannot, so a backend it lacks is named
after the load fails instead (missing_backend)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from edgectl.backends.registry import by_delegate, delegate_ids, prepare_runtime
from edgectl.util.errors import EdgectlError


def runtime_backends() -> tuple[set[str] | None, Callable[[str], bool]]:
    """(the backend ids this runtime registered, a check that one is usable here). Through
    the native shim (no Python binding, no torch) the runtime's registry cannot be listed:
    None, and the check is whether the backend's own library is present (OpenVINO's; the
    others need none), the load itself reporting a backend the runtime lacks."""
    prepare_runtime()
    from edgectl.runtime import _native

    if _native.load() is not None:
        from edgectl.backends import openvino as openvino_backend

        def usable(name: str) -> bool:
            if name != "OpenvinoBackend":
                return True
            lib = os.environ.get("OPENVINO_LIB_PATH") or openvino_backend.library()
            return bool(lib) and os.path.exists(lib)

        return None, usable
    from executorch.extension.pybindings import _portable_lib as lib

    registered = set(lib._get_registered_backend_names())
    available = getattr(lib, "_is_available", None)
    return registered, (lambda name: available(backend_name=name)) if available else (lambda name: True)


def check_runnable(path: Path) -> None:
    """Refuse, in one line and before loading it, a program delegated to a backend this
    machine's ExecuTorch runtime does not have, or has without its runtime library."""
    from edgectl.util.native import native_stderr_captured

    ids = delegate_ids(path)
    if not ids:
        return
    if "OpenvinoBackend" in ids:
        from edgectl.backends import openvino as openvino_backend

        openvino_backend.fp32()
    registered, usable = runtime_backends()
    for d in sorted(ids):
        b = by_delegate(d)
        where = f" (it runs on {b.runs_on})" if b else ""
        if registered is not None and d not in registered:
            raise EdgectlError(f"{path}: delegated to {d}, which this machine's ExecuTorch runtime does not have{where}")
        with native_stderr_captured():  # the runtime logs its library search
            ok = usable(d)
        if not ok:
            raise EdgectlError(f"{path}: delegated to {d}, whose runtime library this machine's ExecuTorch "
                               f"cannot load", hint=b.install if b and b.install else None)


def missing_backend(path: Path) -> EdgectlError | None:
    """After a load failed with NotFound: the one line naming the delegate this runtime
    lacks (through the native shim the runtime's backends cannot be listed beforehand, so
    check_runnable lets such a program through), or None when only XNNPACK is involved."""
    others = sorted(delegate_ids(path) - {"XnnpackBackend"})
    if not others:
        return None
    b = by_delegate(others[0])
    where = f" (it runs on {b.runs_on})" if b else ""
    return EdgectlError(f"{path}: delegated to {others[0]}, which this machine's ExecuTorch runtime does not have{where}")
