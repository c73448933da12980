"""Emulated Thunderbolt clusters on one Linux box, built from network namespaces.

Each emulated host is a network namespace; each Thunderbolt "cable" is a veth
pair whose two ends live in the two hosts' namespaces and which carries its own
/30 IPv4 subnet, as on a real Mac Thunderbolt ring (MLX's tooling assigns a
192.168.x.y/30 per cable).  Cables can be rate-shaped with ``tbf``, given an MTU
up to 65520 (Linux thunderbolt-net's maximum), taken down and up mid-run, and
their byte counters read.  Non-neighbours are *not* routable (no forwarding, no
routes beyond the connected /30s), exactly like a real ring.

Everything created is recorded by name and removed again by :meth:`Cluster.down`
(idempotent), on ``with`` exit, at interpreter exit (``atexit``) and on
SIGTERM/SIGINT (handlers chain to whatever was installed before) -- the latter
two only in the process that created the cluster.  A cluster created from the
CLI (``thunderlink cluster up``) persists; it is described by a state file
``/run/thunderlink/clusters/<name>.json`` (directory overridable with
``$THUNDERLINK_CLUSTER_STATE_DIR``) so that ``thunderlink cluster down`` in
another process can remove it.  In-process clusters write a state file too (it
records the owner pid), so that leftovers of a SIGKILLed process can be removed
with ``thunderlink cluster down --all``.

Only the standard library is used, and of thunderlink its configuration (the
one reader of environment variables) and its hostfile classes.

One job per module:

* :mod:`.net`        ip/tc wrappers, rates and tbf shaping, :func:`available`
* :mod:`.cleanup`    removal at exit and on signals, killing what runs inside
* :mod:`.state`      state files, :func:`list_clusters`
* :mod:`.model`      :class:`Cluster`, :class:`Host`, :class:`Cable`, :class:`Address`
* :mod:`.probes`     reachability, counters, qdiscs, goodput
* :mod:`.hostfiles`  the cluster's hostfiles as :class:`thunderlink.hosts.hostfile.Hostfile`
* :mod:`.cli`        ``thunderlink cluster``
"""

from .cli import main
from .hostfiles import DEFAULT_PORT
from .model import DEFAULT_BASE, MAX_MTU, MIN_MTU, TOPOLOGIES, Address, Cable, Cluster, Host
from .net import DEFAULT_LATENCY, ClusterError, available, netns_list, parse_rate, tbf_params
from .state import STATE_DIR_ENV, STATE_VERSION, list_clusters, state_dir

__all__ = [
    "Address",
    "Cable",
    "Cluster",
    "ClusterError",
    "Host",
    "available",
    "list_clusters",
    "main",
    "parse_rate",
    "state_dir",
    "tbf_params",
]
