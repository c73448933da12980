"""bench/rdma_conformance/conformance.py, the parts that run without an
rdma-core tree: argument and tree checks, the fake sysfs tree it writes, the
parsing of the tools' output, and that provider.c and softverbs.c agree on
the functions the build renames. The conformance run itself needs root and
an rdma-core build tree; it is a manual job (docs/hardware-checklist.md)."""

from __future__ import annotations

import importlib.util
import os
import re
import socket

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "..", "bench", "rdma_conformance", "conformance.py")
PROVIDER_C = os.path.join(HERE, "..", "bench", "rdma_conformance", "provider.c")

_spec = importlib.util.spec_from_file_location("rdma_conformance", SCRIPT)
conf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(conf)


@pytest.mark.parametrize("argv, words", [
    ([], "--rdma-core"),
    (["--rdma-core", "x", "--iters", "0"], "--iters 0"),
    (["--rdma-core", "x", "--timeout", "0"], "--timeout 0"),
    (["--rdma-core", "x", "--jitter-us", "-1"], "--jitter-us -1"),
])
def test_bad_arguments_are_named(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        conf.parse_args(argv)
    assert e.value.code == 2
    assert words in capsys.readouterr().err


def test_a_missing_tree_is_named(tmp_path):
    with pytest.raises(conf.SetupError, match="no such directory"):
        conf.check_tree(str(tmp_path / "nowhere"))


def test_a_directory_that_is_not_rdma_core_is_named(tmp_path):
    with pytest.raises(conf.SetupError, match=r"not an rdma-core source tree \(no libibverbs/driver.h\)"):
        conf.check_tree(str(tmp_path))


def test_an_unbuilt_tree_says_how_to_build_it(tmp_path):
    (tmp_path / "libibverbs").mkdir()
    (tmp_path / "libibverbs" / "driver.h").write_text("")
    assert conf.check_tree(str(tmp_path), built=False)["build"] == str(tmp_path / "build")
    with pytest.raises(conf.SetupError) as e:
        conf.check_tree(str(tmp_path))
    assert "--build-rdma-core" in str(e.value) and f"cmake -S {tmp_path} -B {tmp_path}/build" in str(e.value)
    (tmp_path / "build" / "include").mkdir(parents=True)
    (tmp_path / "build" / "include" / "config.h").write_text("#define IBVERBS_PABI_VERSION 59\n")
    with pytest.raises(conf.SetupError, match=r"not built in .*libibverbs\.so\.1.*ibv_rc_pingpong"):
        conf.check_tree(str(tmp_path))


def test_main_reports_setup_errors_with_status_2(tmp_path, capsys):
    assert conf.main(["--rdma-core", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith("conformance: ")


def test_every_function_provider_c_calls_is_renamed_from_softverbs():
    """provider.c calls softverbs.c's exports as svp_*: each must be one the
    build renames (an export softverbs.c no longer has is a link error
    there, found here without rdma-core)."""
    exported = set(conf.exported_verbs(conf.SOFTVERBS_C))
    with open(PROVIDER_C) as f:
        used = {f"ibv_{n}" for n in re.findall(r"\bsvp_(\w+)\(", f.read())}
    assert len(used) >= 10 and used <= exported, sorted(used - exported)


def _parse_sysfs_gid(text):
    """libibverbs' query_sysfs_gid: 8 groups of %hx at every 5th character."""
    raw = bytearray()
    for i in range(8):
        v = int(text[i * 5:i * 5 + 4], 16)
        raw += bytes([v >> 8, v & 0xFF])
    return bytes(raw)


def test_the_sysfs_tree_is_what_libibverbs_reads(tmp_path):
    conf.make_sysfs(str(tmp_path), (("sv0", "127.0.0.1"), ("tb_a", "169.254.0.2")))
    cls = tmp_path / "class"
    assert (cls / "infiniband_verbs" / "abi_version").read_text() == "6\n"
    for i, (name, ip) in enumerate((("sv0", "127.0.0.1"), ("tb_a", "169.254.0.2"))):
        uv = cls / "infiniband_verbs" / f"uverbs{i}"
        assert (uv / "ibdev").read_text() == name + "\n" and (uv / "dev").read_text() == conf.CDEV + "\n"
        port = cls / "infiniband" / name / "ports" / "1"
        a = socket.inet_aton(ip)
        assert _parse_sysfs_gid((port / "gids" / "0").read_text()) == b"\xfe\x80" + bytes(10) + a
        assert _parse_sysfs_gid((port / "gids" / "1").read_text()) == bytes(10) + b"\xff\xff" + a
        assert _parse_sysfs_gid((port / "gids" / "3").read_text()) == bytes(16)
        assert sorted(os.listdir(port / "gid_attrs" / "types")) == ["0", "1"]
        guid = (cls / "infiniband" / name / "node_guid").read_text().strip()
        assert bytes.fromhex(guid.replace(":", "")) == b"\x02\x00\x5e\x00" + a


def test_pingpong_and_perftest_output_is_parsed():
    pp = ("  local address:  LID 0x0000, QPN 0xe57be9, PSN 0xc259e7, GID ::ffff:127.0.0.2\n"
          "8192000 bytes in 0.07 seconds = 882.31 Mbit/sec\n1000 iters in 0.07 seconds = 74.28 usec/iter\n")
    assert conf.pingpong_numbers(pp) == {"Mbit_s": 882.31, "iters": 1000, "usec_per_iter": 74.28}
    assert conf.pingpong_numbers("Couldn't connect to remote QP\n") == {}
    bw = (" #bytes     #iterations    BW peak[MB/sec]    BW average[MB/sec]   MsgRate[Mpps]\n"
          " 65536      1000             2852.65            658.87 \t\t   0.010542\n")
    assert conf.perftest_numbers(bw) == {"#bytes": "65536", "#iterations": "1000", "BW peak[MB/sec]": "2852.65",
                                         "BW average[MB/sec]": "658.87", "MsgRate[Mpps]": "0.010542"}
    lat = (" #bytes #iterations    t_min[usec]    t_max[usec]  t_typical[usec]    t_avg[usec]    t_stdev[usec]   "
           "99% percentile[usec]   99.9% percentile[usec] \n"
           " 8       1000          22.44          11104.61      24.34    \t       300.46      \t1078.83\t\t6430.40 "
           "\t\t11104.61\n")
    sweep = bw.splitlines()[0] + "\n" + "".join(f" {1 << k}      100     1.0     1.0     0.1\n" for k in range(1, 24))
    got = conf.perftest_numbers(sweep + "-----\n")
    assert got["rows"] == 23 and got["first"]["#bytes"] == "2" and got["last"]["#bytes"] == "8388608"
    got = conf.perftest_numbers(lat)
    assert got["t_typical[usec]"] == "24.34" and got["99.9% percentile[usec]"] == "11104.61" and len(got) == 9
