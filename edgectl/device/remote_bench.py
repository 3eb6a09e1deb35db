"""`edgectl bench --device ssh:...`: the artifacts sent to the device, the same bench run
there, its JSON brought back with the device's facts (name, CPU, cores, memory, emulated).

The device's bench writes its JSON to a file in its cache (its table goes nowhere: the merged
table is drawn here), which is read back over ssh and removed. Its rows name the device's
paths; they are mapped back to the local artifacts by their store names.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

from edgectl.device.info import device_info
from edgectl.device.remote_run import Remote, remeasure_once, run_edgectl, send_artifact
from edgectl.device.ssh import run_ssh
from edgectl.device.target import Target
from edgectl.util import ui
from edgectl.util.errors import EdgectlError


def device_facts(target: Target) -> dict:
    """The row's `device` entry (bench/report.py's schema) from `device info`'s facts."""
    f = device_info(target, shim=False)
    mem = f.get("mem_total_mb")
    return {"name": target.name, "machine": f.get("machine"), "cpu": f.get("cpu"), "cores": f.get("cores"),
            "mem_total_bytes": mem * 2**20 if mem else None, "emulated": bool(f.get("emulated"))}


def bench_remote(target: Target, artifacts: list[Path], options: list, *, remeasure: bool,
                 files: dict[str, Path | None], drafts: list[Path] = ()) -> tuple[dict, dict]:
    """Run `edgectl bench` on the device over `artifacts` with `options` (its other flags, as
    strings); `files` are flags whose value is a local file to send first (--ppl, --plan-file).
    `drafts` (absolute) are draft artifacts named in `--draft`: sent too, and named there by
    their device paths. Shard sets are re-measured there first (once) when `remeasure`.
    Returns the device's report (its JSON, each row's `artifact` and `draft` the local paths)
    and the device's facts."""
    device = device_facts(target)
    if device["emulated"]:
        ui.warn(f"{target.name} is emulated (an Arm userland on an x86 kernel): its timings mean nothing")
    remote: dict[str, Path] = {}  # store name on the device -> local artifact
    args: list = ["bench"]
    for a in artifacts:
        r = send_artifact(target, a)
        remote[r.rstrip("/").rsplit("/", 1)[-1]] = a
        if a.is_dir() and remeasure:
            remeasure_once(target, r, a.name)
        args.append(r)
    for flag, path in files.items():
        if path is not None:
            args += [flag, send_artifact(target, path)]
    sent = {d: send_artifact(target, d) for d in drafts}  # Remote paths: "$HOME/..." for the device's shell
    options = _drafts_as_sent(options, sent)
    out = Remote(f"$HOME/.cache/edgectl/bench-{os.getpid()}-{os.urandom(4).hex()}.json")
    rc = run_edgectl(target, [*args, *options, "-o", out], stdout=io.StringIO())
    got = run_ssh(target, f'cat "{out}" && rm -f "{out}"')
    if got.returncode != 0:
        raise EdgectlError(f"`edgectl bench` on {target.name} exited {rc} and wrote no report")
    try:
        data = json.loads(got.stdout)
    except ValueError:
        raise EdgectlError(f"`edgectl bench` on {target.name} wrote a damaged report") from None
    back = {v.rstrip("/").rsplit("/", 1)[-1]: str(k) for k, v in sent.items()}  # store name -> local path
    for row in data.get("rows", []):
        name = row["artifact"].rstrip("/").rsplit("/", 1)[-1]
        row["artifact"] = str(remote.get(name, row["artifact"]))
        row["device"] = device
        opts = row.get("options") or {}
        if "draft" in opts:
            opts["draft"] = back.get(str(opts["draft"]).rstrip("/").rsplit("/", 1)[-1], opts["draft"])
    return data, device


def _drafts_as_sent(options: list, sent: dict[Path, Remote]) -> list:
    """`options` with each --draft spec that names a sent artifact replaced by its device path."""
    out = list(options)
    for i, flag in enumerate(out[:-1]):
        if flag == "--draft":
            specs = [s.strip() for s in str(out[i + 1]).split(",")]
            mapped = [sent.get(Path(s).resolve(), s) if Path(s).exists() else s for s in specs]
            if any(isinstance(m, Remote) for m in mapped):  # "$HOME/..." for the device's shell to expand
                if not all(isinstance(m, Remote) or re.fullmatch(r"[\w:.-]+", m) for m in mapped):
                    raise EdgectlError(f"--draft {out[i + 1]}: a spec the device's shell cannot take beside a sent draft")
                out[i + 1] = Remote(",".join(mapped))
    return out
