"""sshd inside the hosts of an emulated cluster (tests of ``thunderlink launch --hostfile``).

The hosts of :class:`thunderlink.testing.cluster.Cluster` are network
namespaces whose cables do not reach the root namespace, where the launcher
(and so its ssh clients) runs. :class:`SshdCluster` therefore adds one more
veth pair per host, a "management" link: its root end ``tls<tag><i>`` stays in
the root namespace, its other end ``ssh0`` goes into host i; the pair gets
its own /30 out of a random 10.x.y.0/24 that no root-namespace address or
route overlaps (root end .4i+1, host end .4i+2). sshd listens on the host end
only. The ranks themselves still talk over the cables (the hostfile lists the
cable addresses).

Everything is generated under ``workdir``: host key and user key (ssh-keygen),
authorized_keys, one sshd_config per host (ListenAddress, Port, HostKey,
AuthorizedKeysFile, PermitRootLogin prohibit-password, UsePAM no, StrictModes
no, PidFile, SetEnv HOME=<workdir>/home so that the login shell does not
run this machine's dotfiles), sshd logs, and a client configuration for ``ssh -F`` (identity,
port, no host-key checking, LogLevel ERROR).

``down()`` stops every sshd (they are started with ``cluster.run``, so
``cluster.down()`` would kill them too) and deletes the management veths
(deleting the root end removes the pair; removing the namespace does too).
The one thing not removed is ``/run/sshd``, sshd's privilege-separation
directory (compiled in; sshd refuses to start without it): it is created
when missing, as the openssh-server service does, and left in place because
any sshd on the machine may be using it.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

__all__ = ["SshdCluster", "sshd_path", "sshd_available"]

PRIVSEP_DIR = "/run/sshd"


def sshd_path() -> str | None:
    p = shutil.which("sshd")
    if p:
        return os.path.abspath(p)
    for cand in ("/usr/sbin/sshd", "/usr/local/sbin/sshd"):
        if os.access(cand, os.X_OK):
            return cand
    return None


def sshd_available() -> tuple[bool, str]:
    if sshd_path() is None:
        return False, "sshd is not installed (apt-get install -y openssh-server)"
    for tool in ("ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return False, f"{tool} is not on PATH (apt-get install -y openssh-client)"
    return True, "ok"


def _run(argv, *, check=True, timeout=20, **kw) -> subprocess.CompletedProcess:
    cp = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, **kw)
    if check and cp.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed (rc={cp.returncode}): {cp.stderr.strip()}")
    return cp


def _root_networks() -> list[ipaddress.IPv4Network]:
    nets = []
    cp = _run(["ip", "-4", "-j", "addr", "show"], check=False)
    for link in json.loads(cp.stdout or "[]"):
        for a in link.get("addr_info", []):
            nets.append(ipaddress.IPv4Network(f"{a['local']}/{a['prefixlen']}", strict=False))
    cp = _run(["ip", "-4", "-j", "route", "show"], check=False)
    for r in json.loads(cp.stdout or "[]"):
        dst = r.get("dst")
        if dst and dst != "default":
            nets.append(ipaddress.IPv4Network(dst if "/" in dst else f"{dst}/32", strict=False))
    return nets


def _pick_subnet() -> ipaddress.IPv4Network:
    used = _root_networks()
    rng = random.Random(secrets.randbits(64))
    for _ in range(200):
        net = ipaddress.IPv4Network(f"10.{rng.randint(200, 250)}.{rng.randint(0, 255)}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError("no free 10.200-250.x.0/24 subnet for the sshd management links")


class SshdCluster:
    """sshd in every host of an up ``cluster``, reachable from the root namespace."""

    def __init__(self, cluster, workdir, port: int = 2222, user: str = "root"):
        self.cluster = cluster
        self.workdir = Path(workdir)
        self.port = port
        self.user = user
        self.tag = secrets.token_hex(3)
        self.subnet: ipaddress.IPv4Network | None = None
        self.links: list[str] = []      # root-namespace ends of the veths we created
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self.addresses: list[str] = []  # host ends (where sshd listens)
        self.client_config = self.workdir / "ssh_config"
        self.user_key = self.workdir / "id_ed25519"

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> "SshdCluster":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> "SshdCluster":
        try:
            self._keys()
            self._links()
            self._start()
        except BaseException:
            self.down()
            raise
        return self

    def _keys(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host_key = self.workdir / "ssh_host_ed25519_key"
        for key in (self.host_key, self.user_key):
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "thunderlink-test", "-f", str(key)])
        self.home = self.workdir / "home"
        self.home.mkdir(exist_ok=True)
        self.authorized_keys = self.workdir / "authorized_keys"
        shutil.copy(f"{self.user_key}.pub", self.authorized_keys)
        self.client_config.write_text(
            "Host *\n"
            f"  User {self.user}\n"
            f"  Port {self.port}\n"
            f"  IdentityFile {self.user_key}\n"
            "  IdentitiesOnly yes\n"
            "  StrictHostKeyChecking no\n"
            "  UserKnownHostsFile /dev/null\n"
            "  GlobalKnownHostsFile /dev/null\n"
            "  PasswordAuthentication no\n"
            "  ControlMaster no\n"
            "  ControlPath none\n"
            "  LogLevel ERROR\n"
        )
        if not os.path.isdir(PRIVSEP_DIR):
            os.makedirs(PRIVSEP_DIR, mode=0o755, exist_ok=True)

    def _links(self) -> None:
        self.subnet = _pick_subnet()
        base = int(self.subnet.network_address)
        for i, h in enumerate(self.cluster.hosts):
            root_end = f"tls{self.tag}{i}"
            root_ip = str(ipaddress.IPv4Address(base + 4 * i + 1))
            host_ip = str(ipaddress.IPv4Address(base + 4 * i + 2))
            _run(["ip", "link", "add", root_end, "type", "veth", "peer", "name", "ssh0", "netns", h.netns])
            self.links.append(root_end)
            _run(["ip", "addr", "add", f"{root_ip}/30", "dev", root_end])
            _run(["ip", "link", "set", "dev", root_end, "up"])
            _run(["ip", "-n", h.netns, "addr", "add", f"{host_ip}/30", "dev", "ssh0"])
            _run(["ip", "-n", h.netns, "link", "set", "dev", "ssh0", "up"])
            self.addresses.append(host_ip)

    def _config(self, i: int) -> Path:
        cfg = self.workdir / f"sshd_config.h{i}"
        cfg.write_text(
            f"Port {self.port}\n"
            f"ListenAddress {self.addresses[i]}\n"
            f"HostKey {self.host_key}\n"
            f"PidFile {self.workdir / f'sshd.h{i}.pid'}\n"
            f"AuthorizedKeysFile {self.authorized_keys}\n"
            "PermitRootLogin prohibit-password\n"
            "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            "StrictModes no\n"
            "UseDNS no\n"
            "X11Forwarding no\n"
            "AllowTcpForwarding no\n"
            "PrintMotd no\n"
            "MaxStartups 100:30:200\n"
            "MaxSessions 100\n"
            "LogLevel INFO\n"
            # A home of our own: the login shell (bash sources ~/.bashrc for ssh
            # commands) must not run this machine's dotfiles -- e.g. `pyenv init`
            # (a rehash under a lock, that a killed session leaves stale).
            f"SetEnv HOME={self.home}\n"
        )
        return cfg

    def _start(self) -> None:
        sshd = sshd_path()
        for i in range(len(self.cluster.hosts)):
            cfg = self._config(i)
            check = _run([sshd, "-t", "-f", str(cfg)], check=False)
            if check.returncode != 0:
                raise RuntimeError(f"sshd -t -f {cfg}: {check.stderr.strip()}")
            log = self.workdir / f"sshd.h{i}.log"
            self.logs.append(log)
            with open(log, "wb") as f:
                p = self.cluster.run(i, [sshd, "-D", "-e", "-f", str(cfg)], stdin=subprocess.DEVNULL,
                                     stdout=f, stderr=subprocess.STDOUT)
            self.procs.append(p)
        deadline = time.monotonic() + 15
        for i, p in enumerate(self.procs):
            while not self._answers(self.addresses[i]):
                if p.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"sshd in {self.cluster.hosts[i].netns} did not start: "
                                       f"{self.logs[i].read_text(errors='replace')[-2000:]}")
                time.sleep(0.05)

    def _answers(self, ip: str) -> bool:
        try:
            with socket.create_connection((ip, self.port), timeout=1) as s:
                s.settimeout(2)
                return s.recv(8).startswith(b"SSH-")
        except OSError:
            return False

    def sessions(self) -> dict[str, list[int]]:
        """Processes in the hosts other than the sshd listeners (ssh sessions, ranks)."""
        listeners = {p.pid for p in self.procs}
        out = {}
        for h in self.cluster.hosts:
            cp = _run(["ip", "netns", "pids", h.netns], check=False)
            pids = [int(x) for x in cp.stdout.split() if x.isdigit() and int(x) not in listeners]
            if pids:
                out[h.netns] = pids
        return out

    def down(self, quiesce: float = 5.0) -> None:
        """Stop every sshd, delete the management links (idempotent). Sessions
        still ending (a stopped rank cleaning up) get ``quiesce`` seconds first."""
        end = time.monotonic() + quiesce
        while self.procs and self.sessions() and time.monotonic() < end:
            time.sleep(0.05)
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except OSError:
                    pass
        for p in self.procs:
            try:
                p.wait(3)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except OSError:
                    pass
                p.wait(3)
        self.procs.clear()
        for link in self.links:
            # gone already if its namespace was removed first
            _run(["ip", "link", "del", "dev", link], check=False)
        self.links.clear()

    # ------------------------------------------------------------------ for the tests

    @property
    def ssh_options(self) -> list[str]:
        return ["-F", str(self.client_config)]

    def dest(self, i: int) -> str:
        return f"{self.user}@{self.addresses[i]}"

    def hostfile(self, port: int) -> dict:
        """The cluster's thunderlink hostfile (cable addresses) with "ssh" set to each host's sshd."""
        hf = self.cluster.hostfile(port)
        for i, r in enumerate(hf["ranks"]):
            r["ssh"] = self.dest(i)
        return hf

    def leftover_links(self) -> list[str]:
        cp = _run(["ip", "-j", "link", "show"], check=False)
        names = {x["ifname"] for x in json.loads(cp.stdout or "[]")}
        return sorted(n for n in names if n.startswith(f"tls{self.tag}"))
