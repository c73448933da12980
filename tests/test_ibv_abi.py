"""Our ibverbs ABI header (csrc/transport/ibv_abi.h) against rdma-core's.

One probe program prints the size of every struct we declare, the offset of
every member we declare and the value of every constant we declare; it is
compiled once against our header and once against the system's
<infiniband/verbs.h>, and the two outputs must be identical. Runs wherever
libibverbs-dev (or another rdma-core header) is installed; skips, naming the
missing header, elsewhere.
"""

import os
import shutil
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ABI_DIR = os.path.join(HERE, os.pardir, "src", "thunderlink", "csrc", "transport")
CC = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")

TEST_TIMEOUT_S = 120

# struct -> the members ibv_abi.h declares by the rdma-core name.
MEMBERS = {
    "union ibv_gid": ["raw", "global.subnet_prefix", "global.interface_id"],
    "struct ibv_device": ["node_type", "transport_type", "name", "dev_name", "dev_path", "ibdev_path"],
    "struct ibv_device_attr": [
        "fw_ver", "node_guid", "sys_image_guid", "max_mr_size", "page_size_cap", "vendor_id",
        "vendor_part_id", "hw_ver", "max_qp", "max_qp_wr", "device_cap_flags", "max_sge", "max_sge_rd",
        "max_cq", "max_cqe", "max_mr", "max_pd", "max_qp_rd_atom", "max_ee_rd_atom", "max_res_rd_atom",
        "max_qp_init_rd_atom", "max_ee_init_rd_atom", "atomic_cap", "max_ee", "max_rdd", "max_mw",
        "max_raw_ipv6_qp", "max_raw_ethy_qp", "max_mcast_grp", "max_mcast_qp_attach",
        "max_total_mcast_qp_attach", "max_ah", "max_fmr", "max_map_per_fmr", "max_srq", "max_srq_wr",
        "max_srq_sge", "max_pkeys", "local_ca_ack_delay", "phys_port_cnt",
    ],
    "struct ibv_port_attr": [
        "state", "max_mtu", "active_mtu", "gid_tbl_len", "port_cap_flags", "max_msg_sz", "bad_pkey_cntr",
        "qkey_viol_cntr", "pkey_tbl_len", "lid", "sm_lid", "lmc", "max_vl_num", "sm_sl", "subnet_timeout",
        "init_type_reply", "active_width", "active_speed", "phys_state", "link_layer", "flags",
        "port_cap_flags2",
    ],
    "struct ibv_pd": ["context", "handle"],
    "struct ibv_mr": ["context", "pd", "addr", "length", "handle", "lkey", "rkey"],
    "struct ibv_wc": [
        "wr_id", "status", "opcode", "vendor_err", "byte_len", "imm_data", "invalidated_rkey", "qp_num",
        "src_qp", "wc_flags", "pkey_index", "slid", "sl", "dlid_path_bits",
    ],
    "struct ibv_comp_channel": ["context", "fd", "refcnt"],
    "struct ibv_cq": [
        "context", "channel", "cq_context", "handle", "cqe", "mutex", "cond", "comp_events_completed",
        "async_events_completed",
    ],
    "struct ibv_qp_cap": ["max_send_wr", "max_recv_wr", "max_send_sge", "max_recv_sge", "max_inline_data"],
    "struct ibv_qp_init_attr": ["qp_context", "send_cq", "recv_cq", "srq", "cap", "qp_type", "sq_sig_all"],
    "struct ibv_global_route": ["dgid", "flow_label", "sgid_index", "hop_limit", "traffic_class"],
    "struct ibv_ah_attr": ["grh", "dlid", "sl", "src_path_bits", "static_rate", "is_global", "port_num"],
    "struct ibv_qp_attr": [
        "qp_state", "cur_qp_state", "path_mtu", "path_mig_state", "qkey", "rq_psn", "sq_psn", "dest_qp_num",
        "qp_access_flags", "cap", "ah_attr", "alt_ah_attr", "pkey_index", "alt_pkey_index",
        "en_sqd_async_notify", "sq_draining", "max_rd_atomic", "max_dest_rd_atomic", "min_rnr_timer",
        "port_num", "timeout", "retry_cnt", "rnr_retry", "alt_port_num", "alt_timeout", "rate_limit",
    ],
    "struct ibv_qp": [
        "context", "qp_context", "pd", "send_cq", "recv_cq", "srq", "handle", "qp_num", "state", "qp_type",
        "mutex", "cond", "events_completed",
    ],
    "struct ibv_sge": ["addr", "length", "lkey"],
    "struct ibv_send_wr": [
        "wr_id", "next", "sg_list", "num_sge", "opcode", "send_flags", "imm_data", "invalidate_rkey",
        "wr.rdma.remote_addr", "wr.rdma.rkey", "wr.atomic.remote_addr", "wr.atomic.compare_add",
        "wr.atomic.swap", "wr.atomic.rkey", "wr.ud.ah", "wr.ud.remote_qpn", "wr.ud.remote_qkey",
        "qp_type.xrc.remote_srqn",
    ],
    "struct ibv_recv_wr": ["wr_id", "next", "sg_list", "num_sge"],
    "struct ibv_context_ops": ["poll_cq", "req_notify_cq", "post_send", "post_recv"],
    "struct ibv_context": ["device", "ops", "cmd_fd", "async_fd", "num_comp_vectors", "mutex", "abi_compat"],
}

CONSTANTS = """
IBV_NODE_UNKNOWN IBV_NODE_CA IBV_NODE_SWITCH IBV_NODE_ROUTER IBV_NODE_RNIC IBV_NODE_USNIC
IBV_NODE_USNIC_UDP IBV_NODE_UNSPECIFIED
IBV_TRANSPORT_UNKNOWN IBV_TRANSPORT_IB IBV_TRANSPORT_IWARP IBV_TRANSPORT_USNIC IBV_TRANSPORT_USNIC_UDP
IBV_TRANSPORT_UNSPECIFIED
IBV_ATOMIC_NONE IBV_ATOMIC_HCA IBV_ATOMIC_GLOB IBV_SYSFS_NAME_MAX IBV_SYSFS_PATH_MAX
IBV_MTU_256 IBV_MTU_512 IBV_MTU_1024 IBV_MTU_2048 IBV_MTU_4096
IBV_PORT_NOP IBV_PORT_DOWN IBV_PORT_INIT IBV_PORT_ARMED IBV_PORT_ACTIVE IBV_PORT_ACTIVE_DEFER
IBV_LINK_LAYER_UNSPECIFIED IBV_LINK_LAYER_INFINIBAND IBV_LINK_LAYER_ETHERNET
IBV_ACCESS_LOCAL_WRITE IBV_ACCESS_REMOTE_WRITE IBV_ACCESS_REMOTE_READ IBV_ACCESS_REMOTE_ATOMIC
IBV_ACCESS_MW_BIND IBV_ACCESS_ZERO_BASED IBV_ACCESS_ON_DEMAND IBV_ACCESS_HUGETLB IBV_ACCESS_RELAXED_ORDERING
IBV_WC_SUCCESS IBV_WC_LOC_LEN_ERR IBV_WC_LOC_QP_OP_ERR IBV_WC_LOC_EEC_OP_ERR IBV_WC_LOC_PROT_ERR
IBV_WC_WR_FLUSH_ERR IBV_WC_MW_BIND_ERR IBV_WC_BAD_RESP_ERR IBV_WC_LOC_ACCESS_ERR IBV_WC_REM_INV_REQ_ERR
IBV_WC_REM_ACCESS_ERR IBV_WC_REM_OP_ERR IBV_WC_RETRY_EXC_ERR IBV_WC_RNR_RETRY_EXC_ERR
IBV_WC_LOC_RDD_VIOL_ERR IBV_WC_REM_INV_RD_REQ_ERR IBV_WC_REM_ABORT_ERR IBV_WC_INV_EECN_ERR
IBV_WC_INV_EEC_STATE_ERR IBV_WC_FATAL_ERR IBV_WC_RESP_TIMEOUT_ERR IBV_WC_GENERAL_ERR
IBV_WC_SEND IBV_WC_RDMA_WRITE IBV_WC_RDMA_READ IBV_WC_COMP_SWAP IBV_WC_FETCH_ADD IBV_WC_BIND_MW
IBV_WC_LOCAL_INV IBV_WC_TSO IBV_WC_RECV IBV_WC_RECV_RDMA_WITH_IMM IBV_WC_GRH IBV_WC_WITH_IMM
IBV_QPT_RC IBV_QPT_UC IBV_QPT_UD
IBV_QPS_RESET IBV_QPS_INIT IBV_QPS_RTR IBV_QPS_RTS IBV_QPS_SQD IBV_QPS_SQE IBV_QPS_ERR IBV_QPS_UNKNOWN
IBV_MIG_MIGRATED IBV_MIG_REARM IBV_MIG_ARMED
IBV_QP_STATE IBV_QP_CUR_STATE IBV_QP_EN_SQD_ASYNC_NOTIFY IBV_QP_ACCESS_FLAGS IBV_QP_PKEY_INDEX IBV_QP_PORT
IBV_QP_QKEY IBV_QP_AV IBV_QP_PATH_MTU IBV_QP_TIMEOUT IBV_QP_RETRY_CNT IBV_QP_RNR_RETRY IBV_QP_RQ_PSN
IBV_QP_MAX_QP_RD_ATOMIC IBV_QP_ALT_PATH IBV_QP_MIN_RNR_TIMER IBV_QP_SQ_PSN IBV_QP_MAX_DEST_RD_ATOMIC
IBV_QP_PATH_MIG_STATE IBV_QP_CAP IBV_QP_DEST_QPN IBV_QP_RATE_LIMIT
IBV_WR_RDMA_WRITE IBV_WR_RDMA_WRITE_WITH_IMM IBV_WR_SEND IBV_WR_SEND_WITH_IMM IBV_WR_RDMA_READ
IBV_WR_ATOMIC_CMP_AND_SWP IBV_WR_ATOMIC_FETCH_AND_ADD
IBV_SEND_FENCE IBV_SEND_SIGNALED IBV_SEND_SOLICITED IBV_SEND_INLINE
""".split()


def _system_header():
    if CC is None:
        return None
    probe = subprocess.run([CC, "-E", "-x", "c", "-"], input="#include <infiniband/verbs.h>\n",
                           capture_output=True, text=True)
    return probe.returncode == 0


def _probe_source(system: bool) -> str:
    lines = ["#include <stdio.h>", "#include <stddef.h>"]
    lines.append("#include <infiniband/verbs.h>" if system else '#include "ibv_abi.h"')
    lines.append("int main(void) {")
    for struct, members in MEMBERS.items():
        lines.append(f'    printf("sizeof {struct} %zu\\n", sizeof({struct}));')
        lines.append(f'    printf("alignof {struct} %zu\\n", _Alignof({struct}));')
        for m in members:
            lines.append(f'    printf("offsetof {struct}.{m} %zu\\n", offsetof({struct}, {m}));')
            lines.append(f'    printf("sizeof {struct}.{m} %zu\\n", sizeof((({struct} *)0)->{m}));')
    for c in CONSTANTS:
        lines.append(f'    printf("value {c} %lld\\n", (long long)({c}));')
    # The ops slots by index, as the library's own static inlines reach them.
    for m in MEMBERS["struct ibv_context_ops"]:
        lines.append(f'    printf("slot {m} %zu\\n", offsetof(struct ibv_context_ops, {m}) / sizeof(void *));')
    lines.append("    return 0;\n}")
    return "\n".join(lines) + "\n"


def _run_probe(tmp_path, system: bool) -> list[str]:
    name = "sys" if system else "ours"
    src = tmp_path / f"probe_{name}.c"
    exe = tmp_path / f"probe_{name}"
    src.write_text(_probe_source(system))
    cc = subprocess.run([CC, "-std=gnu11", "-Wall", "-Werror", "-I", ABI_DIR, "-o", str(exe), str(src)],
                        capture_output=True, text=True, timeout=90)
    assert cc.returncode == 0, f"probe against {name} header does not compile:\n{cc.stderr}"
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=30, check=True)
    return out.stdout.splitlines()


@pytest.mark.skipif(CC is None, reason="no C compiler")
def test_header_compiles_on_its_own_with_strict_warnings(tmp_path):
    """ibv_abi.h needs nothing but libc, also as C++ and in pedantic C11."""
    src = tmp_path / "only.c"
    src.write_text('#include "ibv_abi.h"\nint tl_probe(struct ibv_qp *qp) { return ibv_post_send(qp, 0, 0); }\n')
    for args in (["-x", "c", "-std=c11"], ["-x", "c++", "-std=c++17"]):
        cc = subprocess.run([CC, *args, "-Wall", "-Wextra", "-Werror", "-c", "-I", ABI_DIR, "-o",
                             str(tmp_path / "only.o"), str(src)], capture_output=True, text=True, timeout=90)
        assert cc.returncode == 0, f"{args}: {cc.stderr}"


@pytest.mark.skipif(CC is None, reason="no C compiler")
def test_layout_matches_rdma_core(tmp_path):
    if not _system_header():
        pytest.skip("<infiniband/verbs.h> is not installed (Debian: apt-get install libibverbs-dev)")
    ours = _run_probe(tmp_path, system=False)
    theirs = _run_probe(tmp_path, system=True)
    assert len(ours) == len(theirs) > 400
    diff = [f"ours: {a}   rdma-core: {b}" for a, b in zip(ours, theirs) if a != b]
    assert not diff, "ibv_abi.h differs from <infiniband/verbs.h>:\n" + "\n".join(diff)
    # The data path dispatches through these slots of the provider's table.
    slots = {line.split()[1]: int(line.split()[2]) for line in ours if line.startswith("slot ")}
    assert slots == {"poll_cq": 11, "req_notify_cq": 12, "post_send": 25, "post_recv": 26}
