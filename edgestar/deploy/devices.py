"""``--device`` values: where ``edgestar bench`` runs the models.

    local                        this machine
    ssh://[user@]host[:port]     an ARM Linux board (Raspberry Pi, ...) through the OpenSSH client;
                                 host may be a Host alias of your ssh config
    adb[:SERIAL]                 an Android phone through adb
    vela:CONFIG                  an Arm Ethos-U NPU, estimated by Vela (e.g. vela:ethos-u55-128)

Host and user names are checked against what OpenSSH itself accepts, so that no value can be
read as an ssh option (``-oProxyCommand=...``) or reach a shell.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from edgestar.errors import InputError

# A DNS name, an ssh config Host alias, or an IPv4 address; IPv6 goes in brackets: [::1].
_HOST = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,252})")
_IPV6 = re.compile(r"\[([0-9A-Fa-f:.]+(?:%[A-Za-z0-9]+)?)\]")
_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")
_SERIAL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_VELA = re.compile(r"[a-z][a-z0-9-]*")

KERNELS = ("xnnpack", "builtin")  # LiteRT's default delegate (XNNPACK), or its builtin kernels alone


@dataclass(frozen=True)
class Device:
    kind: str  # local, ssh, adb, vela
    host: str | None = None  # ssh: a host name, an address or a Host alias
    user: str | None = None
    port: int | None = None
    serial: str | None = None  # adb
    config: str | None = None  # vela accelerator configuration

    @property
    def name(self) -> str:
        """The device as the user wrote it, normalized: the key results are stored under."""
        if self.kind == "ssh":
            host = f"[{self.host}]" if ":" in self.host else self.host
            return ("ssh://" + (f"{self.user}@" if self.user else "") + host
                    + (f":{self.port}" if self.port else ""))
        if self.kind == "adb":
            return f"adb:{self.serial}" if self.serial else "adb"
        if self.kind == "vela":
            return f"vela:{self.config}"
        return "local"


def parse_device(value: str) -> Device:
    """Parse a ``--device`` value; a one-line :class:`InputError` says what is wrong."""
    text = (value or "").strip()
    if text == "local":
        return Device("local")
    if text.startswith("ssh://"):
        return _parse_ssh(text, value)
    if text == "adb" or text.startswith("adb:"):
        serial = text[4:] or None
        if serial is not None and not _SERIAL.fullmatch(serial):
            raise InputError(f"--device {value!r}: {serial!r} is not an adb serial "
                             "(letters, digits and . _ : - only)")
        return Device("adb", serial=serial)
    if text.startswith("vela:"):
        config = text[5:]
        if not _VELA.fullmatch(config):
            raise InputError(f"--device {value!r}: give a Vela accelerator configuration, "
                             "e.g. vela:ethos-u55-128")
        from edgestar.deploy.vela import check_accelerator

        check_accelerator(config)
        return Device("vela", config=config)
    raise InputError(f"--device {value!r} is not local, ssh://[user@]host[:port], adb[:SERIAL] "
                     "or vela:CONFIG")


def _parse_ssh(text: str, value: str) -> Device:
    rest = text[len("ssh://"):].rstrip("/")
    user = None
    if "@" in rest:
        user, rest = rest.rsplit("@", 1)
        if not _USER.fullmatch(user):
            raise InputError(f"--device {value!r}: {user!r} is not a valid user name")
    port = None
    ipv6 = _IPV6.match(rest)
    if ipv6:
        host, tail = ipv6.group(1), rest[ipv6.end():]
    else:
        host, _, port_text = rest.partition(":")
        tail = f":{port_text}" if port_text else ""
    if tail:
        if not re.fullmatch(r":[0-9]{1,5}", tail) or not 0 < int(tail[1:]) < 65536:
            raise InputError(f"--device {value!r}: port {tail[1:]!r} is not a number from 1 to 65535")
        port = int(tail[1:])
    if not ipv6 and not _HOST.fullmatch(host):
        raise InputError(f"--device {value!r}: {host!r} is not a host name "
                         "(letters, digits and . _ - only; IPv6 in brackets)")
    return Device("ssh", host=host, user=user, port=port)
