"""A real OpenSSH server on 127.0.0.1 for the ``bench --device ssh://`` tests: this machine
plays the board. Throwaway host and user keys, ``authorized_keys`` and an ssh client config
(``Host`` aliases) in a temporary folder; nothing of the user's ``~/.ssh`` is read or changed.
"""
from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = "/usr/sbin/sshd"  # sshd re-executes itself and insists on an absolute path


@dataclass
class LoopbackSsh:
    folder: Path
    port: int
    config: Path  # ssh client config: Host "board" (works), "board-badkey" (refused key)
    process: subprocess.Popen

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def unavailable() -> str | None:
    """Why a loopback sshd cannot run here, or None."""
    if not os.path.exists(SSHD):
        return f"{SSHD} not installed (Debian: apt-get install openssh-server)"
    for tool in ("ssh", "scp", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (Debian: apt-get install openssh-client)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True,
                   capture_output=True)


def start(folder: Path) -> LoopbackSsh:
    """Start sshd on a free port; raises RuntimeError with sshd's own words if it won't run."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("host_key", "user_key", "stranger_key"):
        _keygen(folder / name)
    (folder / "authorized_keys").write_text((folder / "user_key.pub").read_text())
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation directory
    port = _free_port()
    (folder / "sshd_config").write_text(f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {folder}/host_key
PidFile {folder}/sshd.pid
AuthorizedKeysFile {folder}/authorized_keys
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
Subsystem sftp internal-sftp
LogLevel ERROR
""")
    host_pub = (folder / "host_key.pub").read_text().split()
    (folder / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    user = getpass.getuser()
    common = f"""\
  HostName 127.0.0.1
  Port {port}
  User {user}
  IdentitiesOnly yes
  UserKnownHostsFile {folder}/known_hosts
  GlobalKnownHostsFile /dev/null
  StrictHostKeyChecking yes
  LogLevel ERROR
"""
    config = folder / "ssh_config"
    config.write_text(f"Host board\n{common}  IdentityFile {folder}/user_key\n\n"
                      f"Host board-badkey\n{common}  IdentityFile {folder}/stranger_key\n")
    log = open(folder / "sshd.log", "w")  # a file, not a pipe nobody reads (a full pipe would block sshd)
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(folder / "sshd_config")],
                            stdout=subprocess.DEVNULL, stderr=log)
    log.close()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited: {(folder / 'sshd.log').read_text().strip()[-300:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError("sshd did not start listening within 15 s")
    server = LoopbackSsh(folder, port, config, proc)
    probe = subprocess.run(["ssh", "-F", str(config), "-o", "BatchMode=yes", "board", "true"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        server.stop()
        raise RuntimeError(f"ssh to the loopback sshd failed: {probe.stderr.strip()[-300:]}")
    return server
