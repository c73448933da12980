"""The emulated cluster's hostfiles, now built as thunderlink.hosts.hostfile
objects, equal what the cluster wrote by hand before (tests/data/
cluster_hostfiles.json was written by that code, for a few topologies)."""

import json
import pathlib

import pytest

from thunderlink.hosts import hostfile
from thunderlink.testing import cluster as cl

CASES = json.loads((pathlib.Path(__file__).parent / "data" / "cluster_hostfiles.json").read_text())


def _cluster(spec):
    kw = dict(spec)
    n = kw.pop("hosts")
    kw["rates"] = {tuple(k): v for k, v in kw.pop("rates")} or None
    return cl.Cluster(n, **kw)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['cluster']['name']}-{c['port']}")
def test_hostfiles_equal_the_hand_written_ones(case, tmp_path):
    c = _cluster(case["cluster"])
    assert c.hostfile(case["port"]) == case["hostfile"]
    assert c.mlx_hostfile(case["port"]) == case["mlx_hostfile"]
    for mlx, want in ((False, case["hostfile"]), (True, case["mlx_hostfile"])):
        path = tmp_path / "hf.json"
        c.write_hostfile(str(path), case["port"], mlx=mlx)
        assert json.loads(path.read_text()) == want


@pytest.mark.parametrize("case", [c for c in CASES[::2] if c["cluster"]["hosts"] > 1],  # 1 host: no cables
                         ids=lambda c: c["cluster"]["name"])
def test_the_written_hostfile_reads_back_as_the_spec(case):
    """Its rates written as tc was told them read as the Gbit/s of the spec."""
    c = _cluster(case["cluster"])
    spec = c.hostfile_spec(case["port"])
    read = hostfile.parse(c.hostfile(case["port"]))
    assert [(r.host, r.extra, r.addresses) for r in read.ranks] == \
        [(r.host, r.extra, r.addresses) for r in spec.ranks]
