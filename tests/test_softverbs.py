"""The software ibverbs provider (thunderlink.testing.softverbs) on its own.

tests/softverbs_check.c is a verbs program of two processes (forked, joined
by a socketpair for QP numbers and keys) that loads the provider the way the
RDMA transport loads a verbs library: dlopen, dlsym of the exported verbs,
the data path through the context's op table as declared in ibv_abi.h. Each
scenario checks one behaviour of real verbs that the provider must model
(see softverbs.c's header comment); the program exits 0 only when both
ranks passed. The library is found the way a user finds it:
``python -m thunderlink.testing.softverbs --path``.
"""

import ctypes
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from thunderlink.testing.softverbs import ENV_VARS

pytestmark = pytest.mark.multiproc

HERE = os.path.dirname(os.path.abspath(__file__))
CHECK_SRC = os.path.join(HERE, "softverbs_check.c")
ABI_DIR = os.path.join(HERE, os.pardir, "src", "thunderlink", "csrc", "transport")
CC = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")

TEST_TIMEOUT_S = 120

SCENARIOS = [
    "rc_pingpong", "uc_pingpong", "write_imm", "bad_rkey", "bad_rkey_lkey", "use_after_dereg", "uc_drop", "rnr",
    "reuse", "usage_errors", "uc_only", "uc_only_device", "limits", "qp_limit", "early", "uc_wait", "channel", "jitter", "dead_peer_rc",
    "dead_peer_uc", "psn_rc", "psn_uc", "stranger", "rc_pingpong_jitter",
    "uc_drop_every", "rc_drop_every",
]

EXPORTS = [
    "ibv_get_device_list", "ibv_free_device_list", "ibv_get_device_name", "ibv_open_device", "ibv_close_device",
    "ibv_query_device", "ibv_query_port", "ibv_query_gid", "ibv_alloc_pd", "ibv_dealloc_pd", "ibv_reg_mr",
    "ibv_reg_mr_iova2", "ibv_dereg_mr", "ibv_create_comp_channel", "ibv_destroy_comp_channel", "ibv_create_cq",
    "ibv_destroy_cq", "ibv_get_cq_event", "ibv_ack_cq_events", "ibv_create_qp", "ibv_modify_qp", "ibv_query_qp",
    "ibv_destroy_qp", "ibv_wc_status_str",
]


def _lib_path() -> str:
    out = subprocess.run([sys.executable, "-m", "thunderlink.testing.softverbs", "--path"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.fixture(scope="module")
def lib():
    return _lib_path()


@pytest.fixture(scope="module")
def check_prog(tmp_path_factory):
    if CC is None:
        pytest.skip("no C compiler")
    exe = tmp_path_factory.mktemp("softverbs") / "softverbs_check"
    cc = subprocess.run([CC, "-std=gnu11", "-O1", "-Wall", "-Werror", "-I", ABI_DIR, "-o", str(exe), CHECK_SRC,
                         "-ldl"], capture_output=True, text=True, timeout=120)
    assert cc.returncode == 0, cc.stderr
    return str(exe)


@pytest.fixture
def sock_dir():
    """A fresh directory for the QPs' sockets (short: socket names are
    limited to 108 bytes), removed afterwards."""
    d = tempfile.mkdtemp(prefix="svt", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _run(check_prog, lib, scenario, sock_dir, extra_env=None):
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env["SOFTVERBS_DIR"] = sock_dir
    env.update(extra_env or {})
    # the program kills its ranks after 40 s itself; this is the backstop
    r = subprocess.run([check_prog, lib, scenario], capture_output=True, text=True, timeout=90, env=env)
    text = r.stdout + r.stderr
    metrics = {}
    for line in r.stdout.splitlines():
        if line.startswith("METRIC "):
            _, name, value = line.split()
            metrics[name] = float(value)
    return r.returncode, text, metrics


def test_every_scenario_is_run(check_prog):
    listed = subprocess.run([check_prog, "--list"], capture_output=True, text=True, timeout=10).stdout.split()
    assert sorted(listed) == sorted(SCENARIOS)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenario(check_prog, lib, sock_dir, scenario):
    rc, text, metrics = _run(check_prog, lib, scenario, sock_dir)
    assert rc == 0, text
    assert f"{scenario} PASSED" in text
    if scenario == "dead_peer_rc":
        # timeout 10 (4.2 ms) x (retry_cnt 3 + 1): about 17 ms, well under 2 s
        assert metrics["rc_dead_peer_ms"] < 2000
    if scenario == "reuse":
        assert metrics["reuse_later_bytes"] == 65536
    if not scenario.startswith("dead_peer"):
        # every QP unlinked its socket when it was destroyed
        left = [os.path.join(dp, f) for dp, _, files in os.walk(sock_dir) for f in files]
        assert not left, left


def test_path_is_the_library_with_the_verbs(lib):
    assert os.path.isabs(lib) and os.path.isfile(lib)
    with open(lib, "rb") as f:
        magic = f.read(4)
    assert magic in (b"\x7fELF", b"\xcf\xfa\xed\xfe"), magic
    handle = ctypes.CDLL(lib)  # loading starts nothing: no thread before a QP
    for name in EXPORTS:
        assert hasattr(handle, name), name


def test_cli_help_and_misuse():
    run = lambda *a: subprocess.run([sys.executable, "-m", "thunderlink.testing.softverbs", *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=60)
    h = run("--help")
    assert h.returncode == 0 and "THUNDERLINK_IBV_LIB" in h.stdout and "SOFTVERBS_DEVICES" in h.stdout
    bare = run()
    assert bare.returncode == 2 and "--path" in bare.stdout


_DEVICES_PROG = r"""
import ctypes, json, os, sys
lib = ctypes.CDLL(sys.argv[1], use_errno=True)
lib.ibv_get_device_list.restype = ctypes.POINTER(ctypes.c_void_p)
lib.ibv_get_device_name.restype = ctypes.c_char_p
lib.ibv_get_device_name.argtypes = [ctypes.c_void_p]
lib.ibv_open_device.restype = ctypes.c_void_p
lib.ibv_open_device.argtypes = [ctypes.c_void_p]
lib.ibv_query_gid.argtypes = [ctypes.c_void_p, ctypes.c_uint8, ctypes.c_int, ctypes.c_char_p]
lib.ibv_close_device.argtypes = [ctypes.c_void_p]
n = ctypes.c_int(-1)
devs = lib.ibv_get_device_list(ctypes.byref(n))
if not devs:
    print(json.dumps({"errno": ctypes.get_errno()}))
    sys.exit(0)
out = {}
for i in range(n.value):
    ctx = lib.ibv_open_device(devs[i])
    gids = []
    for k in range(2):
        g = ctypes.create_string_buffer(16)
        assert lib.ibv_query_gid(ctx, 1, k, g) == 0
        gids.append(g.raw.hex())
    out[lib.ibv_get_device_name(devs[i]).decode()] = gids
    assert lib.ibv_close_device(ctx) == 0
print(json.dumps(out))
"""


def _devices(lib, sock_dir, **env):
    e = dict(os.environ, SOFTVERBS_DIR=sock_dir)
    e.pop("SOFTVERBS_DEVICES", None)
    e.update(env)
    r = subprocess.run([sys.executable, "-c", _DEVICES_PROG, lib], capture_output=True, text=True, timeout=60,
                       env=e)
    assert r.returncode == 0, r.stderr
    import json
    return json.loads(r.stdout), r.stderr


def test_default_devices_follow_the_hosts_ipv4_addresses(lib, sock_dir):
    import psutil

    devs, _ = _devices(lib, sock_dir)
    want = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs if a.family.name == "AF_INET"}
    up = {name for name, st in psutil.net_if_stats().items() if st.isup}
    have = {}
    for name, (g0, g1) in devs.items():
        assert name.startswith("sv_")
        assert g1[:24] == "00000000000000000000ffff" and g0[:4] == "fe80" and g0[-8:] == g1[-8:]
        have[".".join(str(int(g1[24 + 2 * i:26 + 2 * i], 16)) for i in range(4))] = name
    assert "127.0.0.1" in have and have["127.0.0.1"] == "sv_lo"
    assert set(have) <= want
    assert {a.address for n, addrs in psutil.net_if_addrs().items() if n in up for a in addrs
            if a.family.name == "AF_INET"} <= set(have)


def test_devices_from_the_environment(lib, sock_dir):
    devs, _ = _devices(lib, sock_dir, SOFTVERBS_DEVICES="tb0=169.254.1.2,tb1=169.254.2.2/uc")
    assert list(devs) == ["tb0", "tb1"]
    assert devs["tb0"][1] == "00000000000000000000ffff" + "a9fe0102"


@pytest.mark.parametrize("spec", ["tb0", "tb0=300.1.1.1", "tb0=1.2.3.4/rc", "a=1.1.1.1,a=1.1.1.2",
                                  "a=1.1.1.1,b=1.1.1.1", "bad-name=1.1.1.1"])
def test_a_malformed_device_list_is_an_error_that_says_why(lib, sock_dir, spec):
    res, err = _devices(lib, sock_dir, SOFTVERBS_DEVICES=spec)
    assert res == {"errno": 22}
    assert "SOFTVERBS_DEVICES" in err and "name=ipv4" in err


@pytest.mark.parametrize("var,value", [("SOFTVERBS_JITTER_US", "-1"), ("SOFTVERBS_MAX_QP", "1000"),
                                       ("SOFTVERBS_UC_NORECV", "hold"), ("SOFTVERBS_MAX_MR", "x")])
def test_a_malformed_setting_is_an_error_that_names_it(lib, sock_dir, var, value):
    res, err = _devices(lib, sock_dir, **{var: value})
    assert res == {"errno": 22}
    assert var in err
