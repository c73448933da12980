"""State files: each cluster that is up is described by
``<state dir>/<name>.json`` (``/run/thunderlink/clusters`` unless
``$THUNDERLINK_CLUSTER_STATE_DIR`` says otherwise), so that another process
(``thunderlink cluster down``, ``list``, ``exec``) can find and remove it."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

from .cleanup import pid_alive
from .net import ClusterError, netns_list

STATE_DIR_ENV = "THUNDERLINK_CLUSTER_STATE_DIR"  # read through thunderlink.config
STATE_VERSION = 1


def state_dir() -> str:
    from ...config import cluster_state_dir

    return cluster_state_dir()


def path_of(name: str) -> str:
    return os.path.join(state_dir(), f"{name}.json")


def to_state(c) -> dict:
    """The state file's content for the cluster ``c``."""
    return {
        "version": STATE_VERSION,
        "name": c.name,
        "topology": c.topology,
        "hosts": [dataclasses.asdict(h) for h in c.hosts],
        "cables": [dataclasses.asdict(x) for x in c.cables],
        "switch_netns": c.switch_netns,
        "rate": c.rate,
        "mtu": c.mtu,
        "cables_per_link": c.cables_per_link,
        "base": c.base,
        "burst": c.burst,
        "latency": c.latency,
        "persistent": c.persistent,
        "owner_pid": c._owner_pid,
        "created_netns": list(c._created_netns) if c._created_netns else c.netns_names,
        "created_links": [list(x) for x in c._created_links],
        "created_at": time.time(),
    }


def write(c) -> None:
    """Write (atomically) the state file of ``c``; failing to is an error only for a persistent cluster."""
    path = path_of(c.name)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(to_state(c), f, indent=1)
        os.replace(tmp, path)
    except OSError as e:
        if c.persistent:
            raise ClusterError(f"cannot write cluster state file {path}: {e} "
                               f"(set ${STATE_DIR_ENV} to a writable directory)") from e


def remove(name: str) -> None:
    try:
        os.unlink(path_of(name))
    except OSError:
        pass


def read(name: str) -> dict:
    """The state of the cluster called ``name``."""
    path = path_of(name)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ClusterError(f"no cluster named {name!r} (no state file {path}); "
                           f"see `thunderlink cluster list`") from None
    except (OSError, ValueError) as e:
        raise ClusterError(f"cannot read cluster state {path}: {e}") from e


def list_clusters() -> list[dict]:
    """The recorded clusters (state files), each with 'owner_alive' and 'present' added."""
    d = state_dir()
    out = []
    try:
        names = sorted(os.listdir(d))
    except FileNotFoundError:
        return []
    existing = set(netns_list()) if shutil.which("ip") else set()
    for fn in names:
        if not fn.endswith(".json"):
            continue
        try:
            with open(os.path.join(d, fn)) as f:
                st = json.load(f)
        except (OSError, ValueError):
            continue
        st["owner_alive"] = pid_alive(int(st.get("owner_pid", -1)))
        st["present"] = [ns for ns in st.get("created_netns", []) if ns in existing]
        out.append(st)
    return out
