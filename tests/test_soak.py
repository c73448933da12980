"""The soak's short form: bench/soak.py with 300 random collectives on 4
ranks (up to 1 MiB, every result checked, a split or two), and the ranks'
descriptors and threads flat from the first sample to the last. The full run
(10,000 operations up to 4 MiB, README figures) is `python bench/soak.py`."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.multiproc
TEST_TIMEOUT_S = 180

SOAK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "soak.py")


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_short_soak(transport, tmp_path):
    out = tmp_path / "soak.json"
    cp = subprocess.run([sys.executable, SOAK, "--ops", "300", "--max-bytes", "1M", "--every", "100",
                         "--split-rate", "0.01", "--transport", transport, "--timeout", "150",
                         "--json", str(out)], capture_output=True, text=True, timeout=170)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert "verdict: PASS" in cp.stdout, cp.stdout
    import json

    rep = json.loads(out.read_text())
    assert rep["problems"] == []
    for r in range(4):
        v = rep["results"][str(r)]
        assert v["ops"] == 300 and v["error"] is None, v
        assert len(rep["samples"][str(r)]) == 3
    # The splits ran (the seed is fixed: the same ones every time).
    assert rep["results"]["0"]["splits"] >= 1
