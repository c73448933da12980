"""The RDMA transport (ibverbs, dlopen): what only it has.

The collective and error tests run over RDMA too (their transport axis:
rdma and rdma-jitter, on the software provider thunderlink.testing.softverbs);
this file holds the library and device errors, the link reports, UC queue
pairs, the MLX path and the tools.
"""

import ctypes
import json
import os
import re
import subprocess
import sys

import pytest

import thunderlink
from conftest import HERE, use_softverbs
from thunderlink.bindings.comm import rdma_devices, transport_available
from thunderlink.config import from_env
from thunderlink.launch import free_ports

pytestmark = pytest.mark.multiproc

TEST_TIMEOUT_S = 240


def _real_libibverbs():
    try:
        ctypes.CDLL("libibverbs.so.1")
        return True
    except OSError:
        return False


def _hostfile(tmp_path, n):
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps({"ranks": [{"addresses": [f"127.0.0.1:{p}"]} for p in free_ports(n)]}))
    return str(path)


@pytest.fixture
def no_ibv_env(monkeypatch):
    for var in ("THUNDERLINK_IBV_LIB", "THUNDERLINK_IBV_DEVICE", "SOFTVERBS_JITTER_US", "SOFTVERBS_UC_ONLY"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.skipif(not _real_libibverbs(), reason="libibverbs.so.1 (Debian's libibverbs1) is not installed")
def test_real_libibverbs_without_a_device_is_a_clean_error(tmp_path, no_ibv_env):
    """The system's libibverbs on a machine without RDMA: unavailable, with
    the verbs error; THUNDERLINK_TRANSPORT=rdma is a ConfigError saying so,
    at once, before waiting for the peer (which never starts here)."""
    ok, why = transport_available("rdma")
    assert not ok and why, why
    assert "ibv_get_device_list" in why or "no RDMA device" in why, why
    ports, none = rdma_devices()
    assert ports == [] and none, (ports, none)
    env = {"THUNDERLINK_HOSTFILE": _hostfile(tmp_path, 2), "THUNDERLINK_RANK": "0",
           "THUNDERLINK_TRANSPORT": "rdma", "THUNDERLINK_CONNECT_TIMEOUT": "60"}
    with pytest.raises(thunderlink.ConfigError) as ei:
        thunderlink.connect(from_env(env))
    msg = str(ei.value)
    assert "THUNDERLINK_TRANSPORT=rdma" in msg and why in msg and "THUNDERLINK_TRANSPORT=auto" in msg, msg


def test_missing_library_fails_every_rank_with_a_config_error(ranks, no_ibv_env):
    r = ranks(2, "connect_only", None, env={"THUNDERLINK_TRANSPORT": "rdma",
                                             "THUNDERLINK_IBV_LIB": "/nonexistent/libibverbs.so.1"})
    assert r.status == 0, r.all_text()
    for v in r.values:
        assert v["raised"] == "ConfigError", v
        assert "cannot load /nonexistent/libibverbs.so.1 (THUNDERLINK_IBV_LIB)" in v["message"], v


def test_a_library_that_is_not_ibverbs_is_named(no_ibv_env, monkeypatch):
    monkeypatch.setenv("THUNDERLINK_IBV_LIB", "libc.so.6")
    ok, why = transport_available("rdma")
    assert not ok and "libc.so.6 does not export ibv_" in why and "not an ibverbs library" in why, why


def test_unknown_device_lists_the_devices(monkeypatch):
    use_softverbs(monkeypatch)
    monkeypatch.setenv("THUNDERLINK_IBV_DEVICE", "mlx5_9")
    ok, why = transport_available("rdma")
    assert not ok and "THUNDERLINK_IBV_DEVICE=mlx5_9: no such device (found: sv_" in why, why


def test_doctor_lists_the_devices(monkeypatch):
    use_softverbs(monkeypatch)
    ports, why = rdma_devices()
    assert ports and why == "", (ports, why)
    lo = next(p for p in ports if p["device"] == "sv_lo")
    assert lo["state"] == "active" and lo["port"] == 1 and lo["link_layer"] == "ethernet"
    assert lo["gid"].endswith("ffff:7f00:0001") and lo["gid_index"] >= 0, lo
    out = subprocess.run([sys.executable, "-m", "thunderlink", "doctor"], capture_output=True, text=True,
                         timeout=60, env=dict(os.environ))
    assert "RDMA DEVICE" in out.stdout and "sv_lo" in out.stdout and "active" in out.stdout, out.stdout + out.stderr
    assert "RDMA devices with an active port" in out.stdout, out.stdout


@pytest.mark.skipif(not _real_libibverbs(), reason="libibverbs.so.1 (Debian's libibverbs1) is not installed")
def test_doctor_says_why_there_is_no_rdma(no_ibv_env):
    out = subprocess.run([sys.executable, "-m", "thunderlink", "doctor"], capture_output=True, text=True,
                         timeout=60, env=dict(os.environ))
    assert "RDMA: none (libibverbs.so.1: ibv_get_device_list" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("uc", [False, True], ids=["rc", "uc"])
def test_links_counters_and_log_say_rdma(ranks, monkeypatch, uc):
    """Every link of a 3-rank job is RDMA, with its device, port and queue
    pair type in the log (RC; UC where the device has only UC, as Apple's);
    every payload byte went over it."""
    use_softverbs(monkeypatch)
    env = {"THUNDERLINK_TRANSPORT": "rdma", "THUNDERLINK_DEBUG": "info"}
    if uc:
        env["SOFTVERBS_UC_ONLY"] = "1"
    r = ranks(3, "links_report", None, env=env)
    assert r.status == 0, r.all_text()
    for rank, v in enumerate(r.values):
        assert v["links"] == {str(p): ["rdma", 2] for p in {0, 1, 2} - {rank}}, v
        sent, received = v["stats"]["bytes_sent_by"], v["stats"]["bytes_received_by"]
        assert sent["rdma"] == v["stats"]["bytes_sent"] > 0 and received["rdma"] == v["stats"]["bytes_received"] > 0
        text = r.text(rank)
        for p in {0, 1, 2} - {rank}:
            assert f"link to rank {p}: rdma on sv_" in text and ("(UC," if uc else "(RC,") in text, text


def test_uc_collectives_are_right_with_jitter(ranks, monkeypatch):
    """UC queue pairs (no retransmission: the transport's credits must never
    let a message find no receive, or it is lost) with completions delayed
    and reordered: every result exact."""
    use_softverbs(monkeypatch, jitter=True)
    cases = [[op, d, k, ip] for op in ("sum", "max") for d in ("float32", "int64", "bfloat16")
             for k in (1, 4097, 600001) for ip in (False, True)]
    r = ranks(3, "reductions", cases, env={"THUNDERLINK_TRANSPORT": "rdma", "SOFTVERBS_UC_ONLY": "1"}, timeout=200)
    assert r.status == 0, r.all_text()
    for v in r.values:
        assert all(x["err"] is None for x in v.values()), v
    assert len({json.dumps({k: x["hash"] for k, x in v.items()}, sort_keys=True) for v in r.values}) == 1


def test_bench_runs_over_rdma(monkeypatch):
    use_softverbs(monkeypatch)
    out = subprocess.run([sys.executable, "-m", "thunderlink", "bench", "--transport", "rdma", "--sizes", "8,4M",
                          "--iters", "5", "--warmup", "1", "--inplace", "out"],
                         capture_output=True, text=True, timeout=180, env=dict(os.environ))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "rdma to rank 1" in out.stdout and "#wrong 0" in out.stdout, out.stdout
    # 4M over 2 ranks runs the ring in 512K chunks: zero copy (THUNDERLINK_IBV_ZCOPY: 256K).
    zc = re.search(r"# rdma \(rank 0, whole run\): zero copy (\d+) writes sent", out.stdout)
    assert zc and int(zc.group(1)) > 0, out.stdout


def test_mlx_program_trains_over_rdma(monkeypatch):
    """An MLX data-parallel training run, started with `thunderlink launch`
    and THUNDERLINK_TRANSPORT=rdma: identical on every rank and equal to the
    single-process run; the links were RDMA."""
    pytest.importorskip("mlx.core")
    use_softverbs(monkeypatch)
    mlxprogs = os.path.join(HERE, "mlxprogs.py")
    out = subprocess.run([sys.executable, "-m", "thunderlink", "launch", "-n", "2",
                          "--env", "THUNDERLINK_TRANSPORT=rdma", "--env", "THUNDERLINK_DEBUG=info",
                          "--", sys.executable, mlxprogs, "training", "[null]"],
                         capture_output=True, text=True, timeout=200, env=dict(os.environ))
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    results = [json.loads(line.split("RESULT ", 1)[1]) for line in out.stdout.splitlines() if "RESULT " in line]
    assert len(results) == 2, text
    for v in results:
        assert v["identical"] and v["matches_single"], v
    assert "link to rank 1: rdma" in text and "link to rank 0: rdma" in text, text


# A lossy link (SOFTVERBS_DROP_EVERY: every Nth message a UC queue pair
# sends is lost, its sender completes it successfully). UC does not
# retransmit, so the transport must notice the missing message and fail every
# rank, naming it, well before THUNDERLINK_TIMEOUT; it must never hang or
# hand back a wrong sum. LOSS_TIMEOUT_S is the operation timeout the ranks
# run under; a failure must come within LOSS_BOUND_S of the failing
# collective's start (the transport's own limit is 1 s of a gap).
LOSS_TIMEOUT_S = 30
LOSS_BOUND_S = 10


def _lossy_env(uc, every, after):
    env = {"THUNDERLINK_TRANSPORT": "rdma", "THUNDERLINK_TIMEOUT": str(LOSS_TIMEOUT_S),
           "THUNDERLINK_HEARTBEAT": "0.5", "SOFTVERBS_DROP_EVERY": str(every), "SOFTVERBS_DROP_AFTER": str(after)}
    if uc:
        env["SOFTVERBS_UC_ONLY"] = "1"
    return env


@pytest.mark.parametrize("count,every,after", [(600001, 5, 40), (4, 3, 10), (4096, 50, 0)],
                         ids=["large", "small", "medium"])
def test_uc_message_loss_fails_every_rank_quickly(ranks, monkeypatch, count, every, after):
    """UC with messages lost: large all_sums (many messages: later ones
    arrive past the gap), small ones (one message each: the lost one may be
    the last the peer sends) and in between. Every rank raises a clear
    error naming the lost message, within LOSS_BOUND_S; no result is wrong."""
    use_softverbs(monkeypatch)
    r = ranks(3, "lossy_all_sums", [count, 400], env=_lossy_env(True, every, after), timeout=150)
    assert r.status == 0, r.all_text()
    for rank, v in enumerate(r.results()):
        assert v["wrong"] == 0, (rank, v)
        assert v["raised"] is not None and v["done"] < 400, (rank, v)
        assert v["seconds"] < LOSS_BOUND_S, (rank, v)
        msg = v["message"]
        assert "rdma to rank " in msg and "was lost" in msg and "UC queue pairs do not retransmit" in msg, (rank, msg)


def test_rc_is_unaffected_by_the_drop_setting(ranks, monkeypatch):
    """SOFTVERBS_DROP_EVERY models a lossy link, which RC hides by
    retransmitting: over RC queue pairs every collective completes, exact."""
    use_softverbs(monkeypatch)
    r = ranks(3, "lossy_all_sums", [600001, 20], env=_lossy_env(False, 3, 0), timeout=150)
    assert r.status == 0, r.all_text()
    for v in r.results():
        assert v == {"raised": None, "done": 20, "wrong": 0}, v


@pytest.mark.parametrize("var,value,words", [
    ("SOFTVERBS_MAX_QP", "3", "the device's queue pairs are used up: Apple's allow 10, and each link takes 2"),
    ("SOFTVERBS_MAX_MR", "1", "the device's memory regions are used up: Apple's allow about 100, and each link takes 1"),
], ids=["qp", "mr"])
def test_device_limits_are_a_clear_error_on_every_rank(ranks, monkeypatch, var, value, words):
    """More links than the device's queue pairs or memory regions allow
    (3 ranks sharing one device: a rank needs 4 QPs and 2 regions): every
    rank fails at connect with an error naming the limit, at once, no hang."""
    use_softverbs(monkeypatch)
    r = ranks(3, "connect_only", None, env={"THUNDERLINK_TRANSPORT": "rdma", var: value}, timeout=100)
    assert r.status == 0, r.all_text()
    for v in r.results():
        assert v["raised"] == "ConfigError" and words in v["message"], v


def test_a_buffer_overwritten_after_the_collective_returns_changes_nothing(ranks, monkeypatch):
    """Each rank reuses one input buffer and overwrites it as soon as
    all_sum returns, over UC with jitter (sends completing late): every
    result, on every rank, is the sum of what the buffers held during the
    call (the transport copies into its staging slots before it returns)."""
    use_softverbs(monkeypatch, jitter=True)
    r = ranks(3, "reuse_buffer", [600001, 12], env={"THUNDERLINK_TRANSPORT": "rdma", "SOFTVERBS_UC_ONLY": "1"},
              timeout=150)
    assert r.status == 0, r.all_text()
    for v in r.results():
        assert v == {"done": 12, "wrong": []}, v


def test_without_completion_channels_a_wait_sleeps(ranks, monkeypatch):
    """A provider without completion channels (the real libibverbs has none
    without a kernel driver; whether Apple's has them is not known): the
    transport polls its completion queues, and a rank that waits for a late
    peer backs off into short sleeps instead of burning its core (which, on a
    loaded host, also starves the peer it waits for)."""
    use_softverbs(monkeypatch)
    env = {"THUNDERLINK_TRANSPORT": "rdma", "SOFTVERBS_NO_COMP_CHANNEL": "1"}
    r = ranks(2, "cpu_while_waiting", 2.0, env=env)
    assert r.status == 0, r.all_text()
    v = r.values[0]
    assert all(x["right"] for x in r.values), r.values
    assert v["wall"] >= 1.5 and v["cpu"] < 0.35 * v["wall"], v
