"""The job token: every connection proves it (HMAC-SHA256 challenge-response
in the handshake), so that a stranger who knows the job id, a replayed
handshake or a rank holding another token cannot join a job nor change a
result; the launcher makes a token and never shows it; listening sockets
bind to the hostfile's addresses. Every process has a hard timeout and is
killed by the test that started it."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import socket
import stat
import struct
import subprocess
import sys
import threading
import time

import pytest

from conftest import HERE, result_of, run_ranks
from thunderlink.bindings import Options, ffi, lib
from thunderlink.config import from_env
from thunderlink.errors import ConfigError
from thunderlink.launch import free_ports

pytestmark = pytest.mark.multiproc
TEST_TIMEOUT_S = 120

PROG = os.path.join(HERE, "authprog.py")
HELLO = struct.Struct("<IHHQQIIIIIIQ32s")  # 88 bytes
ACK = struct.Struct("<IHHIIQ32s")  # 56 bytes
PROOF = struct.Struct("<IHH32s")  # 40 bytes
ACK_OK, ACK_AUTH_FAILED = 0, 7


# --------------------------------------------------------------------------- SHA-256 and HMAC


def c_sha256(data: bytes) -> bytes:
    out = ffi.new("uint8_t[32]")
    assert lib.tl_sha256(data, len(data), out) == 0
    return bytes(out)


def c_hmac(key: bytes, data: bytes) -> bytes:
    out = ffi.new("uint8_t[32]")
    assert lib.tl_hmac_sha256(key, len(key), data, len(data), out) == 0
    return bytes(out)


# RFC 4231, section 4: (key, data, HMAC-SHA256); case 5's output is truncated to 128 bits.
RFC4231 = [
    (b"\x0b" * 20, b"Hi There", "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"),
    (b"Jefe", b"what do ya want for nothing?", "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"),
    (b"\xaa" * 20, b"\xdd" * 50, "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe"),
    (bytes(range(1, 26)), b"\xcd" * 50, "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b"),
    (b"\x0c" * 20, b"Test With Truncation", "a3b6167473100ee06e0c796c2955552b"),
    (b"\xaa" * 131, b"Test Using Larger Than Block-Size Key - Hash Key First",
     "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"),
    (b"\xaa" * 131, b"This is a test using a larger than block-size key and a larger than block-size data. "
     b"The key needs to be hashed before being used by the HMAC algorithm.",
     "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2"),
]


@pytest.mark.parametrize("case", range(1, 8))
def test_hmac_sha256_matches_rfc4231(case):
    key, data, want = RFC4231[case - 1]
    assert c_hmac(key, data).hex()[: len(want)] == want


def test_sha256_matches_fips_180_examples_and_hashlib():
    assert c_sha256(b"abc").hex() == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert c_sha256(b"").hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert c_sha256(b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq").hex() == \
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
    # Every length around the block and padding boundaries, against hashlib.
    for n in list(range(0, 200)) + [1000, 4096, 100001]:
        data = bytes((i * 7 + n) & 0xFF for i in range(n))
        assert c_sha256(data) == hashlib.sha256(data).digest(), n
        assert c_hmac(data[:n % 150], data) == hmac.new(data[:n % 150], data, "sha256").digest(), n


# --------------------------------------------------------------------------- the token's plumbing


def test_the_token_never_shows_in_reprs_or_errors(tmp_path):
    secret = "correct horse battery staple"
    cfg = from_env({"THUNDERLINK_TOKEN": secret})
    assert cfg.token == secret and secret not in repr(cfg)
    opts = Options(token=secret, job_id=5)
    assert secret not in repr(opts) and "job_id=5" in repr(opts)
    o = opts.to_c()
    assert o.token_set == 1
    assert bytes(o.token_key) == hashlib.sha256(b"thunderlink job token\0" + secret.encode()).digest()
    assert Options().to_c().token_set == 0


def test_token_file_must_be_private(tmp_path):
    path = tmp_path / "token"
    path.write_text("s3cret-from-file\n")
    path.chmod(0o600)
    assert from_env({"THUNDERLINK_TOKEN_FILE": str(path)}).token == "s3cret-from-file"
    for mode in (0o640, 0o604, 0o644):
        path.chmod(mode)
        with pytest.raises(ConfigError) as e:
            from_env({"THUNDERLINK_TOKEN_FILE": str(path)})
        msg = str(e.value)
        assert f"mode {mode:04o}" in msg and "chmod 600" in msg and "s3cret" not in msg
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="set one"):
        from_env({"THUNDERLINK_TOKEN_FILE": str(path), "THUNDERLINK_TOKEN": "x"})
    empty = tmp_path / "empty"
    empty.write_text("\n")
    empty.chmod(0o600)
    with pytest.raises(ConfigError, match="holds no token"):
        from_env({"THUNDERLINK_TOKEN_FILE": str(empty)})
    with pytest.raises(ConfigError, match="cannot open"):
        from_env({"THUNDERLINK_TOKEN_FILE": str(tmp_path / "missing")})


# --------------------------------------------------------------------------- jobs


def _hostfile(tmp_path, ports, name="hosts.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"ranks": [{"addresses": [f"127.0.0.1:{p}"]} for p in ports]}))
    return str(path)


def _env(hostfile, rank, token=None, **extra):
    """A rank's environment, started directly (not by the launcher)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("THUNDERLINK_") or k == "THUNDERLINK_IBV_LIB"}  # rdma: softverbs
    env.update(THUNDERLINK_HOSTFILE=hostfile, THUNDERLINK_RANK=str(rank), THUNDERLINK_JOB_ID="4242", CT="20",
               THUNDERLINK_TIMEOUT="20")
    if token is not None:
        env["THUNDERLINK_TOKEN"] = token
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _connect_when_listening(port: int, within: float = 10.0) -> socket.socket:
    """A connection to a starting rank's port, dialled until it listens."""
    deadline = time.monotonic() + within
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=5)
        except OSError:
            assert time.monotonic() < deadline, f"nothing listens on port {port} after {within} s"
            time.sleep(0.05)


@contextlib.contextmanager
def _procs():
    """Processes started in the block are killed when it ends."""
    started: list[subprocess.Popen] = []

    def start(env, argv=None):
        p = subprocess.Popen(argv or [sys.executable, PROG], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        started.append(p)
        return p

    try:
        yield start
    finally:
        for p in started:
            if p.poll() is None:
                p.kill()
            p.communicate()


def _result(p, who, timeout=40):
    out, err = p.communicate(timeout=timeout)
    return result_of(out + err, who), out + err


def test_ranks_with_the_same_token_connect(transport):
    """Two ranks holding the same token (set by the user) connect and all_sum right."""
    r = run_ranks(2, "", env={"THUNDERLINK_TOKEN": "same for both", "THUNDERLINK_TRANSPORT": transport},
                  argv=[sys.executable, PROG])
    assert r.status == 0, r.all_text()
    want = hashlib.sha256(b"same for both").hexdigest()
    for v in r.results():
        assert v["raised"] is None and v["sum"] == 3.0, v
        assert v["token_digest"] == want


def test_without_a_token_ranks_connect_as_before(tmp_path, transport):
    hf = _hostfile(tmp_path, free_ports(2))
    with _procs() as start:
        ps = [start(_env(hf, r, THUNDERLINK_TRANSPORT=transport)) for r in range(2)]
        for r, p in enumerate(ps):
            v, text = _result(p, f"rank {r}")
            assert v["raised"] is None and v["sum"] == 3.0, text
            assert "token_digest" not in v


@pytest.mark.parametrize("case", ["wrong token", "no token", "token only here"])
def test_a_rank_with_another_token_fails_on_both_sides(tmp_path, case):
    """Rank 1 holds another token (or none, or rank 0 has none): rank 1 fails
    at once saying authentication failed; rank 0 drops its connections, keeps
    waiting, and at its connect deadline says authentication failed, naming
    the address the refused connections came from. Neither message says where
    the tokens differ, nor shows a token."""
    hf = _hostfile(tmp_path, free_ports(2))
    tokens = {"wrong token": ("token-A", "token-B"), "no token": ("token-A", None),
              "token only here": (None, "token-B")}[case]
    with _procs() as start:
        t = time.monotonic()
        p0 = start(_env(hf, 0, tokens[0], CT=8))
        p1 = start(_env(hf, 1, tokens[1], CT=8))
        v1, text1 = _result(p1, "rank 1")
        t1 = time.monotonic() - t
        v0, text0 = _result(p0, "rank 0")
        t0 = time.monotonic() - t
    assert v1["raised"] == "ConfigError" and "authentication failed" in v1["message"], text1
    assert t1 < t0 - 3, (t1, t0)  # at once, not at a deadline
    assert v0["raised"] == "CollectiveTimeoutError", text0
    assert v0["message"].startswith("[thunderlink] rank 0: authentication failed: rank 1 never connected"), v0
    assert "did not prove this job's token" in v0["message"] and "127.0.0.1:" in v0["message"]
    assert "refused a connection" in text0 and "authentication failed" in text0
    assert 7.5 < t0 < 25, t0
    for msg in (v0["message"], v1["message"], text0, text1):
        assert "token-A" not in msg and "token-B" not in msg
        assert "byte" not in msg and "differ at" not in msg


@pytest.mark.parametrize("token", [None, "job secret"], ids=["no token", "token"])
def test_a_stranger_with_the_job_id_cannot_join_nor_change_the_result(tmp_path, token, transport):
    """A stranger who knows the job id (here: a thunderlink process started as
    rank 1 with THUNDERLINK_JOB_ID, contributing 1000) dials rank 0 before the
    real rank 1. Without a token it gets in and rank 0's all_sum is 1001: what
    the README says running without a token exposes. With a token, it is
    refused (it fails saying authentication failed, with no token or a guessed
    one), rank 0 keeps waiting, the real rank 1 gets in and the sum is 3."""
    hf = _hostfile(tmp_path, free_ports(2))
    with _procs() as start:
        p0 = start(_env(hf, 0, token, THUNDERLINK_TRANSPORT=transport, CT=60))
        if token is None:
            stranger = start(_env(hf, 1, None, VALUE=1000, THUNDERLINK_TRANSPORT=transport))
            v, text = _result(stranger, "the stranger")
            assert v["raised"] is None and v["sum"] == 1001.0, text
            v0, text0 = _result(p0, "rank 0")
            assert v0["sum"] == 1001.0, text0
            return
        for guess in (None, "guessed", "4242"):
            stranger = start(_env(hf, 1, guess, VALUE=1000, THUNDERLINK_TRANSPORT=transport, CT=5))
            v, text = _result(stranger, "the stranger")
            assert v["raised"] == "ConfigError" and "authentication failed" in v["message"], text
        assert p0.poll() is None, "a stranger ended rank 0"
        p1 = start(_env(hf, 1, token, THUNDERLINK_TRANSPORT=transport))
        v1, text1 = _result(p1, "rank 1")
        v0, text0 = _result(p0, "rank 0")
    assert v1["raised"] is None and v1["sum"] == 3.0, text1
    assert v0["raised"] is None and v0["sum"] == 3.0, text0
    assert text0.count("authentication failed") >= 3, text0  # each stranger's refusal was logged


class _Recorder:
    """A TCP proxy in front of rank 0's port that keeps what each client
    (rank 1) sends."""

    def __init__(self, target_port):
        self.target = target_port
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.sent: list[bytearray] = []
        self.stop = False
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self):
        self.sock.settimeout(0.2)
        while not self.stop:
            try:
                c, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            try:
                s = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                c.close()
                continue
            rec = bytearray()
            self.sent.append(rec)
            for a, b, r in ((c, s, rec), (s, c, None)):
                t = threading.Thread(target=self._pump, args=(a, b, r), daemon=True)
                t.start()
                self.threads.append(t)

    def _pump(self, a, b, rec):
        a.settimeout(0.2)
        while not self.stop:
            try:
                data = a.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                break
            if not data:
                break
            if rec is not None and len(rec) < 4096:
                rec += data
            try:
                b.sendall(data)
            except OSError:
                break
        for x in (a, b):
            with contextlib.suppress(OSError):
                x.shutdown(socket.SHUT_WR)

    def close(self):
        self.stop = True
        for t in self.threads:
            t.join(5)
        self.sock.close()


def test_a_replayed_handshake_fails(tmp_path):
    """Rank 1's bytes of a real handshake (hello, then its proof of the token),
    recorded by a proxy in front of rank 0, are replayed to a new job with the
    same token, job id and ports: the new rank 0 answers with a fresh nonce,
    so the recorded proof is refused (verdict: authentication failed), the
    attempt is logged, and the job is not joined."""
    ports = free_ports(2)
    hf = _hostfile(tmp_path, ports)
    rec = _Recorder(ports[0])
    try:
        # Rank 1 reaches rank 0 through the proxy (its hostfile says so; the job id is set).
        hf1 = _hostfile(tmp_path, [rec.port, ports[1]], "hosts1.json")
        common = dict(THUNDERLINK_TRANSPORT="tcp", THUNDERLINK_CONNS=1)
        with _procs() as start:
            p0 = start(_env(hf, 0, "replay-token", **common))
            p1 = start(_env(hf1, 1, "replay-token", **common))
            for r, p in ((1, p1), (0, p0)):
                v, text = _result(p, f"rank {r}")
                assert v["raised"] is None and v["sum"] == 3.0, text
    finally:
        rec.close()
    assert rec.sent, "the proxy saw no connection"
    recorded = bytes(rec.sent[0])
    assert len(recorded) >= HELLO.size + PROOF.size
    hello, proof = recorded[:HELLO.size], recorded[HELLO.size:HELLO.size + PROOF.size]
    assert HELLO.unpack(hello)[2] == 1  # flags: it offered a token
    assert PROOF.unpack(proof)[0] == 0x46504C54
    with _procs() as start:
        p0 = start(_env(hf, 0, "replay-token", CT=4, **common))
        s = _connect_when_listening(ports[0])
        with s:
            s.settimeout(5)
            s.sendall(hello)
            ack = _recv_exactly(s, ACK.size)
            magic, _, status, _, _, _, nonce = ACK.unpack(ack)
            assert magic == 0x4B414C54 and status == ACK_OK
            assert nonce != b"\0" * 32
            s.sendall(proof)
            verdict = _recv_exactly(s, PROOF.size)
        assert PROOF.unpack(verdict)[2] == ACK_AUTH_FAILED and PROOF.unpack(verdict)[3] == b"\0" * 32
        v0, text0 = _result(p0, "rank 0")
    assert v0["raised"] == "CollectiveTimeoutError", text0
    assert "authentication failed" in v0["message"] and "did not prove" in v0["message"], v0
    assert "its proof of the job token is wrong" in text0


def _recv_exactly(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise AssertionError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def _capture_hello(tmp_path, env_extra):
    """The hello a real rank 1 sends (as a stranger could record it: it holds
    the options digest), caught by a listener posing as rank 0."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    port = srv.getsockname()[1]
    hf = _hostfile(tmp_path, [port, free_ports(1)[0]], "capture.json")
    with srv, _procs() as start:
        start(_env(hf, 1, None, CT=5, **env_extra))
        srv.settimeout(15)
        c, _ = srv.accept()
        with c:
            c.settimeout(10)
            return _recv_exactly(c, HELLO.size)


def test_a_forged_abort_frame_is_shown_escaped(tmp_path):
    """Without a token, a stranger with the job id completes the handshake as
    rank 1 and answers rank 0's all_sum with an abort frame whose text holds
    terminal escape codes: rank 0 fails, and its error shows them escaped."""
    # One connection per link: no heartbeat control connection to fake too.
    common = dict(THUNDERLINK_TRANSPORT="tcp", THUNDERLINK_CONNS=1, THUNDERLINK_HEARTBEAT=0)
    hello = _capture_hello(tmp_path, common)
    ports = free_ports(2)
    hf = _hostfile(tmp_path, ports)
    with _procs() as start:
        p0 = start(_env(hf, 0, None, **common))
        s = _connect_when_listening(ports[0])
        with s:
            s.settimeout(10)
            s.sendall(hello)
            ack = _recv_exactly(s, ACK.size)
            assert ACK.unpack(ack)[2] == ACK_OK
            text = b"owned \x1b[2J\x1b]0;pwned\x07 \xe2\x80\xae"
            frame = struct.pack("<IBBBBIIQII", 0x31464C54, 2, 0, 0xFF, 0xFF, 0, len(text), 0, 0, 0)
            s.sendall(frame + text)
            v0, out0 = _result(p0, "rank 0")
    assert v0["raised"] == "PeerLostError", out0
    msg = v0["message"]
    assert "rank 1 failed" in msg and "owned" in msg, msg
    for shown in (msg, out0):  # the message, and the raw output (logs on stderr)
        assert "\x1b" not in shown and "\x07" not in shown and "\u202e" not in shown, shown
    assert "\\x1b[2J" in msg, msg


# --------------------------------------------------------------------------- listening addresses


def _listening(port):
    """Local addresses (hex, as /proc/net/tcp{,6} writes them) listening on port."""
    found = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(name).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            addr, p = fields[1].split(":")
            if int(p, 16) == port and fields[3] == "0A":
                found.append(addr)
    return found


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads /proc/net/tcp (Linux)")
@pytest.mark.parametrize("listen_all", [False, True])
def test_listening_socket_binds_the_hostfile_address(tmp_path, listen_all):
    ports = free_ports(2)
    hf = _hostfile(tmp_path, ports)
    extra = {"CT": 3}
    if listen_all:
        extra["THUNDERLINK_LISTEN_ALL"] = 1
    with _procs() as start:
        p0 = start(_env(hf, 0, "t", **extra))
        deadline = time.monotonic() + 30
        while not _listening(ports[0]):
            assert time.monotonic() < deadline and p0.poll() is None, "rank 0 never listened"
            time.sleep(0.05)
        addrs = _listening(ports[0])
        _result(p0, "rank 0")
    assert addrs == (["00000000"] if listen_all else ["0100007F"]), addrs


# --------------------------------------------------------------------------- the launcher


def test_the_launcher_makes_a_token_and_never_shows_it(tmp_path):
    """`thunderlink launch -n 2`: both ranks get the same new 256-bit token,
    connect with it, and find it in no process's command line while they run;
    the launcher prints it nowhere."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("THUNDERLINK_TOKEN")}
    env.update(SCAN_CMDLINES="1", CT="20")
    # Each rank writes its token to token.<rank> (O_EXCL, mode 0600).
    script = tmp_path / "prog.py"
    script.write_text(
        "import os, runpy, sys\n"
        f"os.environ['TOKEN_OUT'] = {str(tmp_path)!r} + '/token.' + os.environ['THUNDERLINK_RANK']\n"
        f"sys.argv = [{PROG!r}]\n"
        f"runpy.run_path({PROG!r}, run_name='__main__')\n")
    p = subprocess.run([sys.executable, "-m", "thunderlink.launch", "-n", "2", "--timeout", "60", str(script)],
                       env=env, capture_output=True, text=True, timeout=90)
    assert p.returncode == 0, p.stdout + p.stderr
    tokens = [(tmp_path / f"token.{r}").read_text() for r in range(2)]
    assert tokens[0] == tokens[1] and len(tokens[0]) >= 43  # 32 random bytes, base64
    for r in range(2):
        assert stat.S_IMODE(os.stat(tmp_path / f"token.{r}").st_mode) == 0o600
        v = result_of("\n".join(x[4:] for x in p.stdout.splitlines() if x.startswith(f"[{r}] ")), f"rank {r}")
        assert v["raised"] is None and v["sum"] == 3.0, v
        assert v["token_in_cmdlines"] == [], v
        assert v["token_digest"] == hashlib.sha256(tokens[0].encode()).hexdigest()
    assert tokens[0] not in p.stdout + p.stderr
    # A second job gets another token.
    assert len({tokens[0], secrets_of_second_job(tmp_path, env, script)}) == 2


def secrets_of_second_job(tmp_path, env, script):
    for r in range(2):
        (tmp_path / f"token.{r}").unlink()
    p = subprocess.run([sys.executable, "-m", "thunderlink.launch", "-n", "2", "--timeout", "60", str(script)],
                       env=env, capture_output=True, text=True, timeout=90)
    assert p.returncode == 0, p.stdout + p.stderr
    return (tmp_path / "token.0").read_text()


def test_the_launcher_keeps_the_users_token(tmp_path):
    r = run_ranks(2, "", env={"THUNDERLINK_TOKEN": "users own"}, argv=[sys.executable, PROG])
    assert r.status == 0, r.all_text()
    for v in r.results():
        assert v["sum"] == 3.0 and v["token_digest"] == hashlib.sha256(b"users own").hexdigest()


def test_a_token_file_others_can_read_stops_the_launcher(tmp_path):
    path = tmp_path / "tok"
    path.write_text("file-secret\n")
    path.chmod(0o644)
    env = {k: v for k, v in os.environ.items() if not k.startswith("THUNDERLINK_TOKEN")}
    env["THUNDERLINK_TOKEN_FILE"] = str(path)
    p = subprocess.run([sys.executable, "-m", "thunderlink.launch", "-n", "2", "--", "true"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "chmod 600" in p.stderr and "file-secret" not in p.stderr, p.stderr
    path.chmod(0o600)
    r = run_ranks(2, "", env={"THUNDERLINK_TOKEN_FILE": str(path), "THUNDERLINK_TOKEN": ""},
                  argv=[sys.executable, PROG])
    assert r.status == 0, r.all_text()
    for v in r.results():
        assert v["sum"] == 3.0 and v["token_digest"] == hashlib.sha256(b"file-secret").hexdigest()


def test_ssh_ranks_get_the_token_on_stdin_not_on_the_command_line(tmp_path):
    """The plan for ssh ranks keeps the token (from the launcher's
    environment) off every command line and out of the plan's repr; SshJob
    writes it as the first line of the rank's stdin, where the remote wrapper
    reads it and hands it to the program in its environment (run here without
    ssh: the wrapper's command itself, with a pipe as stdin)."""
    from thunderlink.hosts.hostfile import load
    from thunderlink.launch.ssh import SshJob, plan_hostfile

    hfp = tmp_path / "hf.json"
    hfp.write_text(json.dumps({"ranks": [{"addresses": ["127.0.0.1:41000"]}, {"addresses": ["127.0.0.1:41001"]}]}))
    env = dict(os.environ, THUNDERLINK_TOKEN="ssh-secret-123", THUNDERLINK_TOKEN_FILE="/nonexistent")
    env.pop("THUNDERLINK_TOKEN_FILE")
    plan = plan_hostfile(load(str(hfp)), ["prog.py"], env=env, force_ssh=True, local_hostfile="/x.json")
    assert all(plan.remote) and plan.token == "ssh-secret-123"
    for cmd in plan.commands:
        assert not any("ssh-secret-123" in a for a in cmd), cmd
        assert "--token-on-stdin" in cmd[-1]
    assert "ssh-secret-123" not in repr(plan)
    # The wrapper, fed by SshJob as ssh would feed it.
    out = tmp_path / "child.json"
    code = ("import os, json, sys; json.dump({'token': os.environ.get('THUNDERLINK_TOKEN'), "
            "'file': os.environ.get('THUNDERLINK_TOKEN_FILE'), 'argv': open('/proc/self/cmdline','rb').read()"
            ".decode(errors='replace')}, open(sys.argv[1], 'w'))")
    wrapper = [sys.executable, "-m", "thunderlink.launch.remote", "--token-on-stdin", str(tmp_path / "h.json"),
               "{}", "python", "MARK", "-c", code, str(out)]
    wenv = {k: v for k, v in os.environ.items() if not k.startswith("THUNDERLINK_TOKEN")}
    wenv["THUNDERLINK_TOKEN_FILE"] = "/stale/path"  # the wrapper's token replaces it
    lines = []
    job = SshJob([wrapper], [wenv], remote=[True], token="ssh-secret-123", timeout=30,
                 on_line=lambda r, s, t: lines.append(t))
    res = job.run()
    assert res.status == 0, lines
    got = json.loads(out.read_text())
    assert got["token"] == "ssh-secret-123" and got["file"] is None
    assert "ssh-secret-123" not in got["argv"] and "ssh-secret-123" not in " ".join(wrapper)
    assert "MARK" in lines and not any("ssh-secret" in x for x in lines)


def test_the_wrapper_stops_without_a_token_line(tmp_path):
    """End of stdin before the token line: the wrapper runs nothing."""
    p = subprocess.run([sys.executable, "-m", "thunderlink.launch.remote", "--token-on-stdin",
                        str(tmp_path / "h.json"), "{}", "exec", "MARK", "touch", str(tmp_path / "ran")],
                       input="", capture_output=True, text=True, timeout=30)
    assert p.returncode == 71 and "did not receive the job's token" in p.stderr
    assert not (tmp_path / "ran").exists() and not (tmp_path / "h.json").exists()


# --------------------------------------------------------------------------- JACCL's coordinator


def _jaccl_ranks(tokens, timeouts, meanwhile=None):
    """Ranks 0 and 1 of a 2-rank JACCL device matrix (over lo) exchange their
    records through rank 0's coordinator, in threads; `meanwhile(port)` runs
    after rank 0 listens and before rank 1 starts. Returns (hostfiles, errors)."""
    from thunderlink.hosts import jaccl

    matrix = [[None, "rdma_lo"], ["rdma_lo", None]]
    port = free_ports(1)[0]
    coordinator = f"127.0.0.1:{port}"
    out, errors, held = [None, None], [None, None], [[], []]

    def rank(r):
        try:
            out[r] = jaccl.hostfile_from_matrix(matrix, r, coordinator, timeout=timeouts[r], hold=held[r],
                                                token=tokens[r])
        except Exception as e:  # noqa: BLE001 - returned
            errors[r] = e

    threads = [threading.Thread(target=rank, args=(r,), daemon=True) for r in (0, 1)]
    try:
        threads[0].start()
        deadline = time.monotonic() + 10
        while True:  # rank 0 listens
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.02)
        if meanwhile:
            meanwhile(port)
        threads[1].start()
        for t in threads:
            t.join(timeouts[0] + 10)
        assert not any(t.is_alive() for t in threads)
        return out, errors
    finally:
        for h in held:
            for s in h:
                s.close()


def test_jaccl_coordinator_drops_records_that_do_not_prove_the_token():
    """With a token, records sent to the JACCL coordinator carry an HMAC:
    a stranger's record for rank 1 (no MAC, or a wrong one, and a fake
    address) is refused and not kept; the real rank 1 then gets in and both
    ranks get its real address."""
    answers = []

    def strangers(port):
        fake = {"host": "evil", "addresses": [{"ip": "127.0.0.1", "port": 9, "facing": 0, "iface": "lo"}]}
        for mac in (None, "00" * 32):
            msg = {"rank": 1, "size": 2, "record": fake}
            if mac:
                msg["mac"] = mac
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(json.dumps(msg).encode() + b"\n")
                s.settimeout(5)
                answers.append(s.recv(4096))

    (hf0, hf1), errors = _jaccl_ranks(["jt", "jt"], [20, 20], strangers)
    assert errors == [None, None], errors
    assert [json.loads(a) for a in answers] == [{"refused": "authentication failed"}] * 2
    for hf in (hf0, hf1):
        assert [a.port for a in hf.ranks[1].addresses] != [9]
    assert [a.port for a in hf0.ranks[1].addresses] == [a.port for a in hf1.ranks[1].addresses]


@pytest.mark.parametrize("tokens", [("jt-secret-1", "jt-secret-2"), ("jt-secret-1", None), (None, "jt-secret-2")])
def test_jaccl_rank_with_another_token_is_told_authentication_failed(tokens):
    (_, _), errors = _jaccl_ranks(list(tokens), [3, 10])
    assert isinstance(errors[1], ConfigError) and "authentication failed" in str(errors[1]), errors
    for e in errors:
        assert e is None or not any(t and t in str(e) for t in tokens)
    if tokens[0] is not None:  # rank 0 waited for its deadline, and says why
        assert isinstance(errors[0], ConfigError) and "authentication failed" in str(errors[0]), errors
