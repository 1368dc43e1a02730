"""``mipbits run`` for role ha / mn as a process (root, scripts/testbed's namespaces): what it leaves
behind after SIGTERM (nothing), what happens when the engine child or the parent dies, a start-up
error, SIGHUP, and ``mipbits status`` with the mobility part.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bits.io.iptables import ruleset_snapshot
from tests.netns import reap_stale_namespaces

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples" / "testbed"))

from walklib import Testbed  # noqa: E402

pytestmark = pytest.mark.netns

NETNS_PREFIX = f"mbn-{os.getpid()}-"


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    if os.geteuid() != 0 or not shutil.which("ip6tables"):
        pytest.fail("needs root and ip6tables (deselect with -m 'not netns')")
    reap_stale_namespaces("mbn-")
    run_dir = tmp_path_factory.mktemp("run")
    os.chmod(run_dir, 0o755)
    testbed = Testbed(NETNS_PREFIX, str(run_dir))
    try:
        testbed.up()
        testbed.render_configs()
        yield testbed
    finally:
        testbed.stop_all()
        testbed.down()


def snapshot(bed: Testbed, node: str) -> dict[str, str]:
    """Everything the node's mipbits may change: rules, routes, links, proxy ND, sysctls, firewall."""
    run = lambda *argv: bed.exec(node, *argv).stdout  # noqa: E731
    return {
        "rules": run("ip", "-6", "rule"),
        "routes": run("ip", "-6", "route", "show", "table", "all"),
        "addresses": run("ip", "-6", "-br", "addr"),
        "rules4": run("ip", "-4", "rule"),  # DSMIPv6: the IPv4 home address's source rule, routes
        "routes4": run("ip", "-4", "route", "show", "table", "all"),
        "addresses4": run("ip", "-4", "-br", "addr"),
        "links": run("ip", "-br", "link"),
        "proxy": run("ip", "-6", "neigh", "show", "proxy"),
        "sysctl": run("sysctl", "net.ipv6.conf.all.forwarding", "net.ipv6.conf.home.proxy_ndp", "net.ipv4.ip_forward"),
        "firewall": ruleset_snapshot(bed.ns(node)),
    }


def start(bed: Testbed, node: str, mode: str = "api") -> int:
    pid = bed.start_mipbits(node, mode)
    bed.wait_ready(node)
    return pid


def engine_pid(bed: Testbed, node: str) -> int:
    return int(bed.mobility(node)["engine_pid"])


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


@pytest.mark.parametrize("node", ["ha", "mn"])
def test_sigterm_leaves_nothing_behind(bed, node):
    before = snapshot(bed, node)
    pid = start(bed, node)
    child = engine_pid(bed, node)
    running = snapshot(bed, node)
    assert "mip6tnl" in running["links"] and "MIPBITS-MIP-IN" in running["firewall"]
    assert running["rules"] != before["rules"]  # policy rules while it runs
    assert "198.18.1.100" in (running["rules4"] if node == "mn" else running["routes4"])  # the IPv4 HoA
    bed.stop(f"mipbits-{node}")  # SIGTERM
    assert wait_gone(pid) and wait_gone(child)
    assert snapshot(bed, node) == before
    assert not os.path.exists(bed.socket(node)) and not os.path.exists(bed.socket(node) + ".mobility")
    log = bed.log(f"mipbits-{node}")
    assert "Traceback" not in log and "failed" not in log, log


def test_the_engine_dies_with_its_parent(tmp_path):
    """SIGKILL leaves no clean-up to anyone: the engine child must not stay behind (it gets
    SIGTERM from the kernel, PR_SET_PDEATHSIG). What remains is fail closed; a testbed of its own
    takes it away."""
    os.chmod(tmp_path, 0o755)
    scratch = Testbed(f"{NETNS_PREFIX}k-", str(tmp_path))
    try:
        scratch.up()
        scratch.render_configs()
        pid = start(scratch, "ha")
        child = engine_pid(scratch, "ha")
        os.kill(pid, signal.SIGKILL)
        assert wait_gone(child, 5)
    finally:
        scratch.stop_all()
        scratch.down()


def test_an_engine_that_exits_stops_the_node_cleanly(bed):
    before = snapshot(bed, "mn")
    pid = start(bed, "mn")
    os.kill(engine_pid(bed, "mn"), signal.SIGKILL)
    assert wait_gone(pid)
    assert "the engine (pid" in bed.log("mipbits-mn") and "exited" in bed.log("mipbits-mn")
    assert snapshot(bed, "mn") == before
    bed.stop("mipbits-mn")


def test_a_start_up_error_is_reported_and_undone(bed):
    before = snapshot(bed, "ha")
    bad = bed.run_dir / "config" / "ha-bad.toml"
    bad.write_text(bed.config("ha").read_text().replace('home_interface = "home"', 'home_interface = "nosuch"'))
    done = bed.exec("ha", sys.executable, "-m", "mipbits.cli", "run", "-c", str(bad), check=False, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "mipbits: error:" in done.stderr and "nosuch" in done.stderr
    assert snapshot(bed, "ha") == before


def test_status_shows_the_binding_update_list_and_sighup_reloads(bed):
    pid = start(bed, "mn")
    try:
        cli = [sys.executable, "-m", "mipbits.cli", "status", "-c", str(bed.config("mn"))]
        text = subprocess.run(cli, capture_output=True, text=True, check=True).stdout
        assert "mobility (mn, api mode" in text and "at home on home" in text and "BUL       home" in text
        as_json = json.loads(subprocess.run([*cli, "--json"], capture_output=True, text=True, check=True).stdout)
        assert as_json["mobility"]["bul"]["state"] == "home" and as_json["sas"]
        os.kill(pid, signal.SIGHUP)
        trace = Path(bed.run_dir / "mn" / "trace.jsonl")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            records = [json.loads(line) for line in trace.read_text().splitlines()]
            if {"reload"} <= {r["event"] for r in records if r.get("component") == "nfqueue"}:
                break
            time.sleep(0.1)
        events = {(r.get("component"), r["event"]) for r in records}
        assert ("mobility", "reload") in events and ("nfqueue", "reload") in events  # the engine reloaded too
    finally:
        bed.stop("mipbits-mn")
