"""`edgectl device info TARGET`: what a device is and whether edgectl runs on it;
`edgectl device clean TARGET`: remove what edgectl sent there."""

from __future__ import annotations

from typing import Annotated

import typer

from edgectl.cli.app import JsonOpt, app

device_app = typer.Typer(
    help="Look at a device (a board or phone) before deploying to it, or remove what edgectl sent there.\n\n"
    "TARGET is ssh:\\[user@]host[:port]; ssh runs with your own ~/.ssh/config and keys "
    "(extra ssh options from EDGECTL_SSH_OPTS, e.g. \"-F ~/boards/ssh_config\").",
    no_args_is_help=True,
    rich_markup_mode="rich",
)
app.add_typer(device_app, name="device")


@device_app.command("info")
def info_cmd(
    target: Annotated[str, typer.Argument(help="ssh:\\[user@]host[:port] (adb:SERIAL is not supported yet).")],
    json_out: JsonOpt = False,
):
    """Print the device's CPU, memory, free disk, Python, edgectl and executorch versions,
    and whether edgectl's native shim loads there.

    Example: edgectl device info ssh:pi@raspberrypi.local
    """
    from edgectl.device.info import device_info
    from edgectl.device.target import parse_target
    from edgectl.util import ui
    from edgectl.util.version import __version__

    t = parse_target(target)
    facts = device_info(t)
    if facts.get("edgectl") != __version__:
        ui.warn(f"{t.name} has edgectl {facts.get('edgectl')}, this machine {__version__}: "
                ".pte files and shards may not match; install the same version on both")
    if json_out:
        ui.emit_json(facts)
        return
    shim = (("yes (prebuilt in its package)" if facts.get("native_shim_prebuilt") else "yes (compiled on the device)")
            if facts.get("native_shim") else f"no ({facts.get('native_why_not') or 'unknown'})")
    rows = [
        ("device", t.name),
        ("machine", facts.get("machine")),
        ("cpu", f"{facts.get('cpu') or 'unknown'}, {facts.get('cores')} cores"
                + (" (emulated: an Arm userland on an x86 kernel; its timings mean nothing)" if facts.get("emulated") else "")),
        ("memory", f"{facts.get('mem_available_mb')} MB available of {facts.get('mem_total_mb')} MB"),
        ("disk free", f"{facts.get('disk_free_gb')} GB (home)"),
        ("python", f"{facts.get('python')} ({facts.get('python_path')})"),
        ("edgectl", facts.get("edgectl")),
        ("executorch", facts.get("executorch") or "not installed"),
        ("native shim", shim),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        typer.echo(f"{k + ':':<{width + 1}} {v}")


@device_app.command("clean")
def clean_cmd(
    target: Annotated[str, typer.Argument(help="ssh:\\[user@]host[:port] or adb:SERIAL.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count what would go; remove nothing.")] = False,
    json_out: JsonOpt = False,
):
    """Remove what edgectl sent to a device: its content-addressed store and shard-set
    directories (~/.cache/edgectl/store and sets/ over ssh, /data/local/tmp/edgectl/store on a
    phone; the phone's llama_main stays). The next run sends what it needs again.

    Example: edgectl device clean ssh:pi@raspberrypi.local --dry-run
    """
    from edgectl.device.target import parse_target
    from edgectl.util import ui

    t = parse_target(target)
    if t.kind == "adb":
        from edgectl.device.adb import clean
    else:
        from edgectl.device.store import clean
    res = clean(t, dry_run)
    if json_out:
        ui.emit_json(res)
        return
    what = f"{res['files']} files" + (f", {res['sets']} shard sets" if res["sets"] else "")
    typer.echo(f"{'would remove' if dry_run else 'removed'} {res['bytes'] / 1e6:.1f} MB from {t.name}: {what}")
