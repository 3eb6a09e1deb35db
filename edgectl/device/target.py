"""A device named on the command line: `ssh:[user@]host[:port]`, or `adb:SERIAL`."""

from __future__ import annotations

import re
from dataclasses import dataclass

from edgectl.util.errors import UsageError

FORMS = "ssh:[user@]host[:port] or adb:SERIAL"
_HOST = re.compile(r"^[A-Za-z0-9_.\-]+$")  # a name, an alias from ~/.ssh/config, an IPv4 address
_USER = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclass(frozen=True)
class Target:
    """Where a device is: `kind` "ssh" (host, optional user and port) or "adb" (serial)."""

    kind: str
    host: str = ""
    user: str | None = None
    port: int | None = None
    serial: str = ""

    @property
    def name(self) -> str:
        """How messages name the device: user@host:port, as given."""
        if self.kind == "adb":
            return f"adb:{self.serial}"
        s = f"{self.user}@{self.host}" if self.user else self.host
        return f"{s}:{self.port}" if self.port else s


def parse_target(text: str) -> Target:
    """`ssh:[user@]host[:port]` or `adb:SERIAL` -> Target; anything else is a UsageError."""
    kind, sep, rest = text.partition(":")
    if not sep or kind not in ("ssh", "adb") or not rest:
        raise UsageError(f"not a device target: {text!r}", hint=f"use {FORMS}, e.g. ssh:pi@raspberrypi.local")
    if kind == "adb":
        if any(c.isspace() for c in rest):
            raise UsageError(f"not an adb serial: {rest!r}", hint="see `adb devices`")
        return Target(kind="adb", serial=rest)
    user = None
    if "@" in rest:
        user, _, rest = rest.rpartition("@")
        if not _USER.match(user):
            raise UsageError(f"not a user name in {text!r}: {user!r}", hint=f"use {FORMS}")
    host, sep, port_text = rest.partition(":")
    port = None
    if sep:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise UsageError(f"not a port in {text!r}: {port_text!r}", hint="a port is 1-65535, e.g. ssh:pi@board:2222")
        port = int(port_text)
    if not host or not _HOST.match(host) or host.startswith("-"):
        raise UsageError(f"not a host in {text!r}: {host!r}", hint=f"use {FORMS}")
    return Target(kind="ssh", host=host, user=user, port=port)
