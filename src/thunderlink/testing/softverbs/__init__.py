"""softverbs: a software ibverbs provider for testing RDMA code without RDMA
hardware (see softverbs.c for what it models and enforces).

It is a plain shared library inside this package, built with the package and
never imported: a program dlopens it in place of libibverbs.so.1 or
librdma.dylib. thunderlink's RDMA transport takes it through the same path as
the real library::

    THUNDERLINK_IBV_LIB=$(python -m thunderlink.testing.softverbs --path) python prog.py

Devices and addressing: a device stands for one IPv4 address; its GID 0 is
fe80::<ipv4> and GID 1 ::ffff:<ipv4> (as Apple's ports publish once they
have an IPv4 address), port 1, link layer Ethernet, so a GRH is required.
Queue pairs are reached by (dgid, dest_qp_num) from any process on the
machine (loopback addresses: from the same network namespace only). Several
processes may share a device, as on real hardware; to give two processes
distinct devices, set SOFTVERBS_DEVICES differently in each, e.g.
SOFTVERBS_DEVICES=tb_a=169.254.0.1 for one and tb_b=169.254.0.2 for the
other (the addresses need not exist on the host). "name=ipv4/uc" makes one
device UC only, as Apple's are.

Environment read by the library (in each process that loads it):

  SOFTVERBS_DEVICES    name=ipv4[/uc],...  the devices this process sees
                       (default: one per IPv4 address of an interface that
                       is up, named sv_<ifname>; /uc makes one UC only)
  SOFTVERBS_UC_ONLY    1: every device offers UC queue pairs only (as Apple's)
  SOFTVERBS_JITTER_US  N: delay transmissions and completions by up to N us,
                       reordering completions across queues where verbs allow
  SOFTVERBS_MAX_MR     memory regions per device (default 100, as Apple's)
  SOFTVERBS_MAX_QP     queue pairs per device (default 10, as Apple's: the
                       next ibv_create_qp fails with EBUSY; at most 256)
  SOFTVERBS_UC_NORECV  drop (default, the IB spec) or wait: what a UC SEND or
                       WRITE_WITH_IMM that finds no posted receive meets
  SOFTVERBS_DROP_EVERY N: a lossy link: every Nth message a UC queue pair
                       transmits is lost (its sender still completes it
                       successfully, as UC does; later messages arrive). RC
                       queue pairs are unaffected (RC retransmits). 0: none
  SOFTVERBS_DROP_WRITES 1: count (and lose) RDMA writes only, so that a test
                       can lose a zero-copy write for sure
  SOFTVERBS_DROP_AFTER K: count the Nth from the Kth message of each queue
                       pair on (the first K always arrive: a set-up exchange)
  SOFTVERBS_DIR        directory of the queue pairs' sockets
                       (default /tmp/softverbs-<uid>)
  SOFTVERBS_SEED       seed of the jitter's random numbers
  SOFTVERBS_LOG        1: say on stderr why a message was dropped or failed;
                       2: also every message sent, received and completed
"""

from __future__ import annotations

import glob
import os

__all__ = ["path", "ENV_VARS"]

ENV_VARS = ("SOFTVERBS_DEVICES", "SOFTVERBS_UC_ONLY", "SOFTVERBS_JITTER_US", "SOFTVERBS_MAX_MR",
            "SOFTVERBS_MAX_QP", "SOFTVERBS_UC_NORECV", "SOFTVERBS_DROP_EVERY", "SOFTVERBS_DROP_AFTER",
            "SOFTVERBS_DROP_WRITES",
            "SOFTVERBS_DIR", "SOFTVERBS_SEED", "SOFTVERBS_LOG")


def path() -> str:
    """The absolute path of the provider library; FileNotFoundError when the
    package was installed without it (it is built by setup.py)."""
    here = os.path.dirname(os.path.abspath(__file__))
    found = sorted(glob.glob(os.path.join(here, "_softverbs*.so")) + glob.glob(os.path.join(here, "_softverbs*.dylib")))
    if not found:
        raise FileNotFoundError(
            f"the softverbs library is not in {here}: reinstall thunderlink from source "
            "(pip install --no-build-isolation .), which builds it")
    return found[0]
