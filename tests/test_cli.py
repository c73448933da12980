"""The `thunderlink` entry point and small helpers of its tools (no network, no root)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from thunderlink import cli
from thunderlink.bench.plot import size_label


def test_no_tool_is_a_usage_error(capsys):
    assert cli.main([]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("usage: thunderlink <tool>")


def test_help_and_unknown_tool(capsys):
    assert cli.main(["--help"]) == 0
    assert capsys.readouterr().out.startswith("usage:")
    assert cli.main(["frobnicate"]) == 2
    assert "unknown tool 'frobnicate'" in capsys.readouterr().err


def test_no_tool_from_the_console():
    p = subprocess.run([sys.executable, "-m", "thunderlink"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "usage: thunderlink" in p.stderr


@pytest.mark.parametrize("nbytes,label", [
    (1, "1 B"), (512, "512 B"), (1024, "1 KiB"), (1536, "1.5 KiB"), (2**18, "256 KiB"),
    (2**26, "64 MiB"), (2**30, "1 GiB"), (2**42, "4 TiB"), (2**50, "1024 TiB"),
])
def test_plot_size_labels(nbytes, label):
    assert size_label(nbytes) == label
