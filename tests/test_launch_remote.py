"""The rank wrapper that `thunderlink launch` runs over ssh
(``python -m thunderlink.launch.remote``), run here directly with a pipe as
stdin, as ssh gives it one. Hard timeouts on every process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from thunderlink.launch import remote

MARKER = "thunderlink-ssh-started test"


def start(tmp_path, *argv, mode="exec"):
    path = tmp_path / "hf.json"
    p = subprocess.Popen([sys.executable, "-m", "thunderlink.launch.remote", str(path), '{"ranks": []}', mode,
                          MARKER, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, cwd=tmp_path)
    return p, path


def finish(p, timeout=30):
    """Wait for the wrapper with its stdin still open (its end would mean "stop")."""
    p.wait(timeout=timeout)
    out, err = p.stdout.read(), p.stderr.read()
    p.stdin.close()
    return out, err


def test_runs_the_program_with_the_hostfile_then_removes_it(tmp_path):
    code = "import os, sys; print(open(os.environ.get('HF', sys.argv[1])).read()); sys.exit(3)"
    p, path = start(tmp_path, "-c", code, str(tmp_path / "hf.json"), mode="python")
    out, err = finish(p)
    assert p.returncode == 3, err
    assert json.loads(out) == {"ranks": []} and err.splitlines()[0] == MARKER
    assert not path.exists()


def test_end_of_stdin_stops_the_program(tmp_path):
    p, path = start(tmp_path, "sleep", "60")
    assert p.stderr.readline().strip() == MARKER
    t = time.monotonic()
    p.stdin.close()
    p.wait(timeout=remote.GRACE + 10)
    assert p.returncode == 128 + 15 and time.monotonic() - t < remote.GRACE + 5
    assert not path.exists()


def test_an_existing_hostfile_is_never_overwritten(tmp_path):
    (tmp_path / "hf.json").write_text("theirs")
    p, _ = start(tmp_path, "true")
    _, err = finish(p)
    assert p.returncode == 71 and "cannot write the hostfile" in err
    assert (tmp_path / "hf.json").read_text() == "theirs"


def test_a_missing_program_is_127(tmp_path):
    p, path = start(tmp_path, "/nonexistent/program")
    _, err = finish(p)
    assert p.returncode == 127 and "cannot run /nonexistent/program" in err and not path.exists()


def test_the_working_directory_cannot_shadow_its_modules(tmp_path):
    (tmp_path / "select.py").write_text("raise SystemExit('shadowed')\n")
    p, _ = start(tmp_path, "true")
    _, err = finish(p)
    assert p.returncode == 0, err


def test_usage(capsys):
    assert remote.main([]) == 2
    assert "usage: python -m thunderlink.launch.remote" in capsys.readouterr().err


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="POSIX only")
def test_the_ssh_command_runs_the_module():
    from thunderlink.launch import ssh

    cmd = ssh.remote_command(argv=["prog.py"], is_script=True, env={}, hostfile_path="/tmp/x.json",
                             hostfile_text="{}", marker="m", cwd=None, python=None, default_python="python3")
    assert "-m thunderlink.launch.remote" in cmd and "import select" not in cmd
