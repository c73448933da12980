"""softverbs conformance: unmodified verbs programs over the real libibverbs.

Runs rdma-core's own tools (ibv_devices, ibv_devinfo, ibv_rc_pingpong,
ibv_uc_pingpong; perftest's ib_write_bw, ib_send_bw, ib_write_lat when
installed) and thunderlink's own all_sum (``thunderlink bench``) over the
real libibverbs.so.1 of an rdma-core build tree, with softverbs loaded by
that library as a provider plugin (provider.c next to this file). This is
evidence that softverbs behaves like real verbs for programs other than
ours; it says nothing about any hardware (see docs/hardware-checklist.md).

Usage (Linux, root: it needs a private mount namespace and mknod)::

    pip download --no-deps --no-binary pyverbs pyverbs==59.0   # 1 min; or any rdma-core tree
    tar xzf pyverbs-59.0.tar.gz
    python bench/rdma_conformance/conformance.py --rdma-core pyverbs-59.0/rdma-core --build-rdma-core

What it does, all under a work directory it removes at the end (--keep
keeps it): builds softverbs.c + provider.c into libsoftverbs-rdmav<N>.so
against the tree's private headers (N: the tree's provider ABI); writes a
fake sysfs tree with two devices, sv0 (127.0.0.1) and sv1 (127.0.0.2); then
re-runs itself under ``unshare --mount`` where /dev is a fresh tmpfs holding
null, zero, full, random, urandom, shm and /dev/infiniband/uverbs{0,1}
(character device 1:7, /dev/full, so that a verbs call libibverbs would send
to the kernel fails with ENOSPC rather than "succeeding" as a write to
/dev/null would); the host's /dev is never touched. Every tool runs with
SYSFS_PATH, RDMAV_DRIVERS, LD_LIBRARY_PATH and SOFTVERBS_DEVICES set, under
a hard timeout; a server/client pair is killed as a whole when either
overruns. The exit status is 0 when every case passed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
SOFTVERBS_C = os.path.join(REPO, "src", "thunderlink", "testing", "softverbs", "softverbs.c")
IBV_ABI_DIR = os.path.join(REPO, "src", "thunderlink", "csrc", "transport")

# name, IPv4: softverbs' GIDs are fe80::<ip> (index 0) and ::ffff:<ip> (1).
DEVICES = (("sv0", "127.0.0.1"), ("sv1", "127.0.0.2"))
CDEV = "1:7"  # /dev/full
GID_TBL_LEN = 4  # softverbs' port gid_tbl_len

RDMA_CORE_BUILD = ("cmake -S {tree} -B {tree}/build -GNinja -DNO_MAN_PAGES=1 -DNO_PYVERBS=1 && "
                   "ninja -C {tree}/build ibverbs bin/ibv_devices bin/ibv_devinfo bin/ibv_rc_pingpong "
                   "bin/ibv_uc_pingpong lib/libmlx5.so.1 lib/libefa.so.1 lib/librdmacm.so.1")
# libmlx5/libefa/librdmacm: Debian's perftest links them, and Debian's copies
# need libibverbs' private ABI of Debian's version; the tree's own are used.
# The distribution's pingpong (Debian's ibverbs-utils, built against its own
# libibverbs): run too, over the tree's library, when installed.
DISTRO_TOOLS = "/usr/bin"
TOOLS = ("ibv_devices", "ibv_devinfo", "ibv_rc_pingpong", "ibv_uc_pingpong")


class SetupError(Exception):
    """A precondition is missing; the message names it and the fix."""


# ---- arguments and checks ---------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python bench/rdma_conformance/conformance.py",
        description="Run unmodified verbs programs (rdma-core's ibv_*_pingpong, perftest) and thunderlink's "
                    "all_sum over the real libibverbs of an rdma-core build tree, with softverbs loaded as its "
                    "provider plugin. Linux, root.",
        epilog="rdma-core 59 comes with the pyverbs==59.0 sdist: pip download --no-deps --no-binary pyverbs "
               "pyverbs==59.0 (its rdma-core/ directory is the tree).")
    p.add_argument("--rdma-core", required=True, metavar="DIR",
                   help="an rdma-core source tree (with its CMake build in DIR/build, see --build-rdma-core)")
    p.add_argument("--build-rdma-core", action="store_true",
                   help="configure and build what is needed in DIR/build first (about 2 minutes on 2 cores)")
    p.add_argument("--iters", type=int, default=1000, help="pingpong iterations at 4 KiB (fewer at larger sizes)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds each tool (or server+client pair) may take")
    p.add_argument("--jitter-us", type=int, default=0, metavar="N",
                   help="run with SOFTVERBS_JITTER_US=N: completions of different queues reordered, as verbs allow")
    p.add_argument("--no-perftest", action="store_true", help="skip perftest even where ib_write_bw is installed")
    p.add_argument("--no-thunderlink", action="store_true", help="skip thunderlink's own all_sum")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON here")
    p.add_argument("--keep", action="store_true", help="keep the work directory (build, sysfs tree, logs)")
    p.add_argument("--inner", metavar="STATE", help=argparse.SUPPRESS)  # the part inside the namespace
    args = p.parse_args(argv)
    if args.iters < 1:
        p.error(f"--iters {args.iters}: expected a positive count")
    if not 0 <= args.jitter_us <= 1000000:
        p.error(f"--jitter-us {args.jitter_us}: expected 0..1000000 (microseconds)")
    if not args.timeout > 0:
        p.error(f"--timeout {args.timeout}: expected a positive number of seconds")
    return args


def pabi_version(build: str) -> int:
    """The provider ABI of the tree: its IBVERBS_PABI_VERSION (config.h)."""
    path = os.path.join(build, "include", "config.h")
    try:
        with open(path) as f:
            m = re.search(r"^#define IBVERBS_PABI_VERSION (\d+)$", f.read(), re.M)
    except OSError as e:
        raise SetupError(f"{path}: {e.strerror}: the tree is not configured; run with --build-rdma-core, or: "
                         + RDMA_CORE_BUILD.format(tree=os.path.dirname(build))) from None
    if not m:
        raise SetupError(f"{path} has no IBVERBS_PABI_VERSION: not an rdma-core build (rdma-core 17 or later)")
    return int(m.group(1))


def check_tree(tree: str, built: bool = True) -> dict:
    """The paths of the tree the run needs; SetupError naming what is
    missing and how to get it. built=False checks only the source tree."""
    tree = os.path.abspath(tree)
    if not os.path.isdir(tree):
        raise SetupError(f"--rdma-core {tree}: no such directory (an rdma-core source tree, e.g. the rdma-core/ "
                         "directory of the pyverbs==59.0 sdist)")
    if not os.path.isfile(os.path.join(tree, "libibverbs", "driver.h")):
        raise SetupError(f"--rdma-core {tree}: not an rdma-core source tree (no libibverbs/driver.h)")
    build = os.path.join(tree, "build")
    paths = {"tree": tree, "build": build, "lib": os.path.join(build, "lib"), "bin": os.path.join(build, "bin"),
             "include": os.path.join(build, "include")}
    if not built:
        return paths
    paths["pabi"] = pabi_version(build)
    missing = [p for p in [os.path.join(build, "lib", "libibverbs.so.1")] +
               [os.path.join(build, "bin", t) for t in TOOLS] if not os.path.exists(p)]
    if missing:
        raise SetupError(f"not built in {build}: {', '.join(missing)}; run with --build-rdma-core, or: "
                         + RDMA_CORE_BUILD.format(tree=tree))
    return paths


def check_host() -> None:
    if not sys.platform.startswith("linux"):
        raise SetupError("provider mode needs Linux (rdma-core's libibverbs, mount namespaces)")
    if os.geteuid() != 0:
        raise SetupError("needs root: it makes a private mount namespace (unshare -m) and device nodes (mknod) "
                         "there; the host's /dev is not touched")
    for tool in ("unshare", "mount", "mknod", "cc"):
        if not shutil.which(tool):
            raise SetupError(f"{tool} is not on PATH (util-linux, coreutils, a C compiler)")
    if not os.path.isfile(SOFTVERBS_C):
        raise SetupError(f"{SOFTVERBS_C} is missing: run this script from a thunderlink source checkout")


# ---- building ---------------------------------------------------------------

def run_logged(cmd, log: str, timeout: float, **kw) -> None:
    with open(log, "ab") as f:
        f.write(("$ " + " ".join(cmd) + "\n").encode())
        f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, **kw)
    if r.returncode != 0:
        with open(log, errors="replace") as f:
            tail = f.read()[-3000:]
        raise SetupError(f"{' '.join(cmd[:3])} ... failed (status {r.returncode}); the end of {log}:\n{tail}")


def build_rdma_core(tree: str, log: str) -> None:
    tree = os.path.abspath(tree)
    if not os.path.isfile(os.path.join(tree, "build", "build.ninja")):
        run_logged(["cmake", "-S", tree, "-B", os.path.join(tree, "build"), "-GNinja", "-DNO_MAN_PAGES=1",
                    "-DNO_PYVERBS=1"], log, 900)
    run_logged(["ninja", "-C", os.path.join(tree, "build"), "ibverbs"] + [f"bin/{t}" for t in TOOLS] +
               ["lib/libmlx5.so.1", "lib/libefa.so.1", "lib/librdmacm.so.1"], log, 1800)


def exported_verbs(source: str) -> list[str]:
    """The ibv_* functions softverbs.c exports (SV_EXPORT), in order."""
    with open(source) as f:
        text = f.read()
    names = re.findall(r"^SV_EXPORT\b[^(;]*?\b(ibv_\w+)\(", text, re.M)
    return list(dict.fromkeys(names))


def build_provider(paths: dict, work: str, log: str) -> str:
    """libsoftverbs-rdmav<N>.so in work; returns the RDMAV_DRIVERS prefix."""
    cc = os.environ.get("CC", "cc")
    renames = [f"-D{n}=svp_{n[4:]}" for n in exported_verbs(SOFTVERBS_C)]
    sv_o, prov_o = os.path.join(work, "softverbs.o"), os.path.join(work, "provider.o")
    run_logged([cc, "-std=gnu11", "-O2", "-g", "-fPIC", "-fvisibility=hidden", "-Wall", "-Werror", *renames,
                "-I", IBV_ABI_DIR, "-c", SOFTVERBS_C, "-o", sv_o], log, 300)
    run_logged([cc, "-std=gnu11", "-O2", "-g", "-fPIC", "-Wall", "-Werror", "-I", paths["include"],
                "-c", os.path.join(HERE, "provider.c"), "-o", prov_o], log, 300)
    vmap = os.path.join(work, "provider.map")
    with open(vmap, "w") as f:  # only the registration symbol leaves the library
        f.write("{ global: verbs_provider_*; local: *; };\n")
    prefix = os.path.join(work, "libsoftverbs")
    run_logged([cc, "-shared", "-o", f"{prefix}-rdmav{paths['pabi']}.so", prov_o, sv_o, "-L", paths["lib"],
                "-libverbs", "-pthread", f"-Wl,--version-script={vmap}", "-Wl,-z,defs"], log, 300)
    return prefix


# ---- the fake sysfs tree ------------------------------------------------------

def gid_text(raw: bytes) -> str:
    """A GID as sysfs prints it: 8 groups of 4 hex digits."""
    return ":".join(raw[i:i + 2].hex() for i in range(0, 16, 2))


def device_gids(ip: str) -> list[bytes]:
    a = socket.inet_aton(ip)
    return [b"\xfe\x80" + bytes(10) + a, bytes(10) + b"\xff\xff" + a] + [bytes(16)] * (GID_TBL_LEN - 2)


def node_guid(ip: str) -> str:
    """softverbs' node GUID (02:00:5e:00 then the IPv4 address), as sysfs
    prints one: 4 groups of 4 hex digits."""
    raw = b"\x02\x00\x5e\x00" + socket.inet_aton(ip)
    return ":".join(raw[i:i + 2].hex() for i in range(0, 8, 2))


def make_sysfs(root: str, devices=DEVICES) -> None:
    """What libibverbs reads when netlink has no RDMA: class/infiniband_verbs
    (abi_version, uverbsN/{ibdev,dev,abi_version}) and class/infiniband/<dev>
    (node_type, node_guid, ports/1/gids/N, ports/1/gid_attrs/types/N)."""
    def put(path, text):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text + "\n")

    uv = os.path.join(root, "class", "infiniband_verbs")
    put(os.path.join(uv, "abi_version"), "6")
    for i, (name, ip) in enumerate(devices):
        put(os.path.join(uv, f"uverbs{i}", "ibdev"), name)
        put(os.path.join(uv, f"uverbs{i}", "dev"), CDEV)
        put(os.path.join(uv, f"uverbs{i}", "abi_version"), "1")
        ib = os.path.join(root, "class", "infiniband", name)
        put(os.path.join(ib, "node_type"), "1: CA")
        put(os.path.join(ib, "node_guid"), node_guid(ip))
        for g, raw in enumerate(device_gids(ip)):
            put(os.path.join(ib, "ports", "1", "gids", str(g)), gid_text(raw))
            if any(raw):  # the kernel has no type for an empty entry
                put(os.path.join(ib, "ports", "1", "gid_attrs", "types", str(g)), "RoCE v2")


# ---- running tools, inside the namespace --------------------------------------

def make_dev(n_devices: int) -> None:
    """A fresh /dev (this mount namespace only)."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=755", "rdma-conf-dev", "/dev"], check=True)
    for name, major, minor in (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8),
                               ("urandom", 1, 9)):
        os.mknod(f"/dev/{name}", 0o666 | 0o020000, os.makedev(major, minor))
        os.chmod(f"/dev/{name}", 0o666)
    os.mkdir("/dev/shm")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=1777", "rdma-conf-shm", "/dev/shm"], check=True)
    os.mkdir("/dev/infiniband")
    major, minor = map(int, CDEV.split(":"))
    for i in range(n_devices):
        os.mknod(f"/dev/infiniband/uverbs{i}", 0o666 | 0o020000, os.makedev(major, minor))
        os.chmod(f"/dev/infiniband/uverbs{i}", 0o666)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        return True
        except OSError:
            pass
    return False


def kill_group(p: subprocess.Popen) -> None:
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    p.wait()


def run_one(cmd, env, timeout: float, log: str) -> tuple[int | None, str]:
    """(status or None when it overran and was killed, output)."""
    with open(log, "w+") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = p.wait(timeout)
        except subprocess.TimeoutExpired:
            rc = None
        kill_group(p)
        out.seek(0)
        return rc, out.read()


def run_pair(server, client, env, timeout: float, log: str, port: int) -> tuple[list, list]:
    """A server and its client (which connects to 127.0.0.1:port once the
    server listens); ([server status, client status], [outputs]). A status
    of None: killed at the deadline."""
    deadline = time.monotonic() + timeout
    files = [open(f"{log}.{side}", "w+") for side in ("server", "client")]
    procs = []
    try:
        procs.append(subprocess.Popen(server, stdout=files[0], stderr=subprocess.STDOUT, env=env,
                                      start_new_session=True))
        while not listening(port) and procs[0].poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if procs[0].poll() is None and listening(port):
            procs.append(subprocess.Popen(client, stdout=files[1], stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True))
        status = []
        for p in procs:
            try:
                status.append(p.wait(max(0.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                status.append(None)
        status += [None] * (2 - len(status))
    finally:
        for p in procs:
            kill_group(p)
        outs = []
        for f in files:
            f.seek(0)
            outs.append(f.read())
            f.close()
    return status, outs


def pingpong_numbers(text: str) -> dict:
    """What ibv_*_pingpong prints at the end."""
    out = {}
    m = re.search(r"(\d+) bytes in ([\d.]+) seconds = ([\d.]+) Mbit/sec", text)
    if m:
        out["Mbit_s"] = float(m.group(3))
    m = re.search(r"(\d+) iters in ([\d.]+) seconds = ([\d.]+) usec/iter", text)
    if m:
        out["iters"], out["usec_per_iter"] = int(m.group(1)), float(m.group(3))
    return out


def perftest_rows(text: str) -> list[dict]:
    """The result rows under perftest's #bytes header (bw or lat tests; one
    per size with -a)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("#bytes"):
            head = re.findall(r"#\S+|(?:[A-Za-z0-9.%]+ )?\w+\[[^\]]*\]", line)
            rows = []
            for row in lines[i + 1:]:
                vals = row.split()
                if not vals or not vals[0].isdigit():
                    break
                rows.append(dict(zip(head, vals)))
            return rows
    return []


def perftest_numbers(text: str) -> dict:
    """The first result row; with several (-a), their count and the last."""
    rows = perftest_rows(text)
    if len(rows) > 1:
        return {"rows": len(rows), "first": rows[0], "last": rows[-1]}
    return rows[0] if rows else {}


def inner(state_path: str) -> int:
    with open(state_path) as f:
        st = json.load(f)
    make_dev(len(DEVICES))
    env = dict(os.environ)
    for k in [k for k in env if k.startswith(("SOFTVERBS_", "THUNDERLINK_IBV", "RDMAV_", "IBV_"))]:
        del env[k]
    env.update(SYSFS_PATH=st["sysfs"], RDMAV_DRIVERS=st["prefix"], SOFTVERBS_DIR=st["svdir"],
               SOFTVERBS_DEVICES=",".join(f"{n}={ip}" for n, ip in DEVICES), SOFTVERBS_JITTER_US=str(st["jitter_us"]),
               LD_LIBRARY_PATH=":".join(filter(None, [st["lib"], env.get("LD_LIBRARY_PATH")])))
    binp, timeout, logs = st["bin"], st["timeout"], st["logs"]
    results = []

    def record(name, ok, numbers, why, text):
        results.append({"case": name, "ok": ok, "numbers": numbers, "why": why})
        print(f"{'PASS' if ok else 'FAIL'}  {name}  {json.dumps(numbers) if numbers else ''}"
              f"{'  ' + why if why else ''}", flush=True)
        if not ok:
            print("      " + "\n      ".join(text.strip().splitlines()[-15:]), flush=True)

    rc, out = run_one([f"{binp}/ibv_devices"], env, timeout, f"{logs}/ibv_devices.log")
    names = re.findall(r"^\s+(sv\d)\s+([0-9a-f]{16})$", out, re.M)
    record("ibv_devices", rc == 0 and [n for n, _ in names] == [n for n, _ in DEVICES], dict(names),
           "" if rc == 0 else f"status {rc}", out)

    rc, out = run_one([f"{binp}/ibv_devinfo", "-v"], env, timeout, f"{logs}/ibv_devinfo.log")
    want = ["hca_id:\tsv0", "hca_id:\tsv1", "PORT_ACTIVE", "link_layer:\t\tEthernet", "::ffff:127.0.0.1, RoCE v2",
            "::ffff:127.0.0.2, RoCE v2", "fw_ver:\t\t\t\tsoftverbs-1", "max_vl_num:\t\t1 (1)"]
    want += [f"node_guid:\t\t\t{node_guid(ip)}" for _, ip in DEVICES]  # as ibv_devices reads it from sysfs
    missing = [w for w in want if w not in out]
    record("ibv_devinfo -v", rc == 0 and not missing, {}, f"status {rc}" if rc else
           (f"missing: {missing}" if missing else ""), out)

    it = st["iters"]
    for tool in ("ibv_rc_pingpong", "ibv_uc_pingpong"):
        for size, iters, mtu in ((4096, it, 1024), (65536, max(1, it // 4), 1024), (1 << 20, max(1, it // 20), 4096)):
            port = free_port()
            common = ["-g", "1", "-s", str(size), "-n", str(iters), "-m", str(mtu), "-c", "-p", str(port)]
            name = f"{tool} -g 1 -s {size} -n {iters} -m {mtu} -c"
            status, outs = run_pair([f"{binp}/{tool}", "-d", "sv0", *common],
                                    [f"{binp}/{tool}", "-d", "sv1", *common, "127.0.0.1"],
                                    env, timeout, f"{logs}/{tool}-{size}", port)
            nums = pingpong_numbers(outs[1])
            ok = status == [0, 0] and nums.get("iters") == iters
            record(name, ok, nums, "" if ok else f"status server {status[0]}, client {status[1]}",
                   outs[0] + outs[1])

    # The same programs as built by the distribution against its own
    # libibverbs (the public ABI, IBVERBS_1.1, is what they link to).
    for tool in ("ibv_rc_pingpong", "ibv_uc_pingpong"):
        exe = os.path.join(st["distro_tools"], tool)
        if not os.path.exists(exe):
            continue
        port = free_port()
        common = ["-g", "1", "-s", "65536", "-n", str(max(1, it // 4)), "-c", "-p", str(port)]
        status, outs = run_pair([exe, "-d", "sv0", *common], [exe, "-d", "sv1", *common, "127.0.0.1"],
                                env, timeout, f"{logs}/distro-{tool}", port)
        nums = pingpong_numbers(outs[1])
        ok = status == [0, 0] and nums.get("iters") == max(1, it // 4)
        record(f"{exe} {' '.join(common[:-2])}", ok, nums,
               "" if ok else f"status server {status[0]}, client {status[1]}", outs[0] + outs[1])

    # RoCE: a connection without a GRH (pingpong without -g) must be refused
    # at RTR, as RoCE hardware refuses it, and both sides must end promptly.
    for tool in ("ibv_rc_pingpong", "ibv_uc_pingpong"):
        port = free_port()
        common = ["-s", "4096", "-n", "10", "-p", str(port)]
        status, outs = run_pair([f"{binp}/{tool}", "-d", "sv0", *common],
                                [f"{binp}/{tool}", "-d", "sv1", *common, "127.0.0.1"],
                                env, timeout, f"{logs}/{tool}-nogrh", port)
        refused = "Failed to modify QP to RTR" in outs[0] + outs[1]
        ok = None not in status and 0 not in status and refused
        record(f"{tool} without -g (no GRH on RoCE): refused at RTR", ok, {"status": status},
               "" if ok else ("overran the timeout" if None in status else f"status {status}, refused {refused}"),
               outs[0] + outs[1])

    if st["perftest"]:
        for tool, extra in (("ib_write_bw", ["-s", "65536", "-n", "1000"]),
                            ("ib_write_bw", ["-s", "1048576", "-n", "200"]),
                            ("ib_write_bw", ["-a", "-n", "100"]),  # 2 B to 8 MiB
                            ("ib_write_bw", ["-q", "4", "-s", "65536", "-n", "500"]),  # 4 QPs per side
                            ("ib_send_bw", ["-a", "-n", "100"]),
                            ("ib_send_bw", ["-b", "-s", "65536", "-n", "500"]),  # both directions at once
                            ("ib_send_bw", ["-s", "65536", "-n", "1000"]),
                            ("ib_send_bw", ["-c", "UC", "-s", "65536", "-n", "1000"]),
                            ("ib_write_lat", ["-s", "8", "-n", "1000"]),
                            ("ib_send_lat", ["-s", "8", "-n", "1000"])):
            port = free_port()
            common = ["-x", "1", "-p", str(port), "-F", *extra]
            name = f"{tool} {' '.join(extra)}"
            status, outs = run_pair([tool, "-d", "sv0", *common], [tool, "-d", "sv1", *common, "127.0.0.1"],
                                    env, timeout, f"{logs}/{tool}-{'_'.join(extra)}", port)
            nums = perftest_numbers(outs[1])
            # -a: every size from 2 B to 8 MiB (2^1..2^23)
            ok = status == [0, 0] and bool(nums) and ("-a" not in extra or nums.get("rows") == 23)
            record(name, ok, nums, "" if ok else f"status server {status[0]}, client {status[1]}", outs[0] + outs[1])

    if st["thunderlink"]:
        tl_env = dict(env, THUNDERLINK_IBV_LIB=os.path.join(st["lib"], "libibverbs.so.1"),
                      THUNDERLINK_CONNECT_TIMEOUT="20")
        cmd = [sys.executable, "-m", "thunderlink", "bench", "--transport", "rdma", "--op", "all_sum", "--inplace", "out",
               "--sizes", "8,4K,1M,16M", "--iters", "5", "--warmup", "1"]
        rc, out = run_one(cmd, tl_env, timeout, f"{logs}/thunderlink-bench.log")
        rows = {f[0]: " ".join(f) for f in (line.split() for line in out.splitlines())
                if f and f[0].isdigit() and len(f) > 3}
        ok = rc == 0 and "#wrong 0" in out and "rdma to rank 1" in out
        record("thunderlink bench --transport rdma --op all_sum (THUNDERLINK_IBV_LIB=<tree>/libibverbs.so.1)",
               ok, rows, "" if ok else f"status {rc}", out)
        # Reference, right after: the same over softverbs loaded directly
        # (the shim mode the test suite uses), for the ratio under this load.
        shim = subprocess.run([sys.executable, "-m", "thunderlink.testing.softverbs", "--path"],
                              capture_output=True, text=True)
        if shim.returncode == 0:
            rc, out = run_one(cmd, dict(tl_env, THUNDERLINK_IBV_LIB=shim.stdout.strip()), timeout,
                              f"{logs}/thunderlink-bench-shim.log")
            rows = {f[0]: " ".join(f) for f in (line.split() for line in out.splitlines())
                    if f and f[0].isdigit() and len(f) > 3}
            ok = rc == 0 and "#wrong 0" in out and "rdma to rank 1" in out
            record("reference: the same bench over softverbs directly (THUNDERLINK_IBV_LIB=softverbs)", ok, rows,
                   "" if ok else f"status {rc}", out)

    with open(st["results"], "w") as f:
        json.dump(results, f, indent=1)
    return 0 if all(r["ok"] for r in results) else 1


# ---- the outer run -----------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    if args.inner:
        return inner(args.inner)
    try:
        check_host()
        check_tree(args.rdma_core, built=not args.build_rdma_core)
    except SetupError as e:
        print(f"conformance: {e}", file=sys.stderr)
        return 2
    work = tempfile.mkdtemp(prefix="rdma-conf-", dir="/tmp")  # short: softverbs' socket paths live here
    logs = os.path.join(work, "logs")
    os.mkdir(logs)
    try:
        if args.build_rdma_core:
            print(f"building rdma-core in {os.path.abspath(args.rdma_core)}/build ...", flush=True)
            build_rdma_core(args.rdma_core, os.path.join(logs, "rdma-core-build.log"))
        paths = check_tree(args.rdma_core)
        prefix = build_provider(paths, work, os.path.join(logs, "provider-build.log"))
        sysfs = os.path.join(work, "sys")
        make_sysfs(sysfs)
        perftest = not args.no_perftest and shutil.which("ib_write_bw") is not None
        thunderlink = not args.no_thunderlink
        if thunderlink:
            probe = subprocess.run([sys.executable, "-c", "import thunderlink"], capture_output=True)
            thunderlink = probe.returncode == 0
        state = {"sysfs": sysfs, "prefix": prefix, "svdir": os.path.join(work, "sv"), "lib": paths["lib"],
                 "bin": paths["bin"], "timeout": args.timeout, "iters": args.iters, "logs": logs,
                 "perftest": perftest, "jitter_us": args.jitter_us, "distro_tools": DISTRO_TOOLS, "thunderlink": thunderlink, "results": os.path.join(work, "results.json")}
        with open(os.path.join(work, "state.json"), "w") as f:
            json.dump(state, f)
        print(f"rdma-core {paths['tree']} (provider ABI {paths['pabi']}), provider {prefix}-rdmav{paths['pabi']}.so")
        if not perftest:
            print("perftest: not run (" + ("--no-perftest" if args.no_perftest else "ib_write_bw not on PATH") + ")")
        if not thunderlink:
            print("thunderlink all_sum: not run (" + ("--no-thunderlink" if args.no_thunderlink else
                                                     f"{sys.executable} cannot import thunderlink") + ")")
        sys.stdout.flush()
        # Every case inside is bounded by --timeout; this bounds the whole.
        inner_cmd = ["unshare", "--mount", "--propagation", "private", "--", sys.executable,
                     os.path.abspath(__file__), "--rdma-core", paths["tree"], "--inner",
                     os.path.join(work, "state.json")]
        with subprocess.Popen(inner_cmd, start_new_session=True) as p:
            try:
                status = p.wait(args.timeout * 30 + 60)
            except subprocess.TimeoutExpired:
                kill_group(p)
                status = "killed at its deadline"
        try:
            with open(state["results"]) as f:
                results = json.load(f)
        except OSError:
            print(f"conformance: the run in the namespace ended ({status}) with no results "
                  f"(logs: {logs}{'' if args.keep else ', removed; rerun with --keep'})", file=sys.stderr)
            return 1
        passed = sum(r["ok"] for r in results)
        print(f"{passed} passed, {len(results) - passed} failed")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"rdma_core": paths["tree"], "pabi": paths["pabi"], "results": results}, f, indent=1)
        return 0 if passed == len(results) else 1
    except SetupError as e:
        print(f"conformance: {e}", file=sys.stderr)
        return 2
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
