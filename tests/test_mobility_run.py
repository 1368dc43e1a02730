"""The mobility node without a kernel: ``[mn]`` / ``[ha]`` configuration, the order of steps in
``mobility.node`` (routes, tunnel module, sends) with fakes that log every call, an MN and an HA
wired together in memory over Mobility Header bytes for the whole walk, the home-link routes'
commands, the trace records and ``mipbits status`` rendering.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import socket
import struct
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import pytest

from bits.errors import ConfigError
from bits.io.tracefile import TraceSettings
from bits.trace import TraceLevel
from mipbits.mobility_run import MobilityTrace, mobility_settings, mtu_plan, render_mobility_status
from mipbits.nodeconfig import load_node_config
from mobility.binding import BindingCache, HomeAgentConfig
from mobility.bul import BindingUpdateList, MnState, MobileNodeConfig
from mobility.constants import BaStatus, BuFlag
from mobility.io.homelink import HaHomeLink, MnHomeLink
from mobility.io.netlink import RTM_NEWADDR, LinkEvent, NetState, locate, parse_messages
from mobility.io.netlink import Location as NetLocation
from mobility.io.routes import MnRoutes, RoutesError
from mobility.mh import BindingAck, BindingUpdate, pull_mh, push_mh
from mobility.node import HomeAgent, Location, MobileNode
from bits.ip import push_ipv6_header
from mobility.options import (
    AlternateCareOfAddress,
    Ipv4AddressAck,
    Ipv4CareOfAddress,
    Ipv4HomeAddress,
    NatDetection,
    find_option,
)
from mobility.tunnel import BindingTable, HaTunnel, HeuristicClassifier, Kind, MnTunnel, Reason, TunnelTrace
from mobility.tunnel import ClassifyMode

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "testbed"
A = ipaddress.IPv6Address
HOA, HA = A("2001:db8:1::100"), A("2001:db8:1::1")
COA1, COA2 = A("2001:db8:a1::ff:fe00:a1"), A("2001:db8:a2::ff:fe00:a2")


# --- configuration ------------------------------------------------------------------------------------------


def _node(tmp_path: Path, role: str, section: str, extra: str = "") -> Path:
    shutil.copy(EXAMPLES / f"{role}.setkey", tmp_path / f"{role}.setkey")
    (tmp_path / f"{role}.setkey").chmod(0o600)
    path = tmp_path / f"{role}.toml"
    path.write_text(f'[node]\nname = "{role}"\nrole = "{role}"\n[ipsec]\nsa_file = "{role}.setkey"\n'
                    f'state_dir = "{tmp_path}/state"\n{extra}\n[{role}]\n{section}\n')
    return path


MN_OK = ('hoa = "2001:db8:1::100"\nhome_agent = "2001:db8:1::1"\nhome_prefix = "2001:db8:1::/64"\n'
         'interfaces = ["home", "v1"]\n')
HA_OK = 'address = "2001:db8:1::1"\nhome_prefix = "2001:db8:1::/64"\nhome_interface = "home"\n'


@pytest.fixture()
def examples(tmp_path):
    """A copy of examples/testbed as installed: git keeps no file modes, key files must be 0600."""
    dst = tmp_path / "examples"
    shutil.copytree(EXAMPLES, dst)
    for key_file in dst.glob("*.setkey"):
        key_file.chmod(0o600)
    return dst


def test_the_testbed_examples_parse(examples):
    mn = mobility_settings(load_node_config(examples / "mn.toml"))
    assert (mn.hoa, mn.ha, mn.interfaces, mn.lifetime, mn.mode) == (
        HOA, HA, ("home", "v1", "v2", "v4nat", "v4pub"), 60, "api")
    assert (str(mn.ha_ipv4), str(mn.ipv4_hoa), mn.dsmipv6, mn.ipv4_home) == ("198.51.100.2", "198.18.1.100", True, True)
    ha = mobility_settings(load_node_config(examples / "ha.toml"))
    assert (ha.address, ha.home_interface, ha.mobile_nodes, ha.hook_queue) == (HA, "home", (HOA,), 7)
    assert str(ha.ipv4_address) == "198.51.100.2" and ha.nat_refresh_time == 110 and ha.ipv4_home
    assert [(str(h), str(a)) for h, a in ha.ipv4_static] == [(str(HOA), "198.18.1.100")]
    assert mtu_plan(load_node_config(examples / "mn.toml"), mn).device_mtu == 1500 - 28  # IPv4 + UDP reserved


def test_mode_from_the_command_line_wins(tmp_path):
    cfg = load_node_config(_node(tmp_path, "mn", MN_OK + 'mode = "api"'))
    assert mobility_settings(cfg, "heuristic").mode == "heuristic"
    assert mobility_settings(cfg).mode == "api"


@pytest.mark.parametrize("role,section,key,problem", [
    ("mn", 'hoa = "2001:db8:1::100"\nhome_agent = "2001:db8:1::1"\nhome_prefix = "2001:db8:1::/64"\n',
     "interfaces", "missing"),
    ("mn", MN_OK.replace('"2001:db8:1::100"', '"2001:db8:1::1000:zz"'), "hoa", "not an IPv6 address"),
    ("mn", MN_OK.replace('hoa = "2001:db8:1::100"', 'hoa = "2001:db8:9::100"'), "hoa", "not on the home prefix"),
    ("mn", MN_OK.replace('"2001:db8:1::1"\n', '"2001:db8:1::100"\n'), "home_agent", "cannot have the home address"),
    ("mn", MN_OK.replace('["home", "v1"]', "[]"), "interfaces", "at least one"),
    ("mn", MN_OK.replace('["home", "v1"]', '["home", "bad name"]'), "interfaces", "bad interface name"),
    ("mn", MN_OK + 'mode = "guess"', "mode", "api, heuristic"),
    ("mn", MN_OK + "hook_queue = 1", "hook_queue", "the engine's"),
    ("mn", MN_OK + "lifetime = 2", "lifetime", "must be 4..262140"),
    ("mn", MN_OK + "lifetime = true", "lifetime", "must be an integer or a number"),
    ("mn", MN_OK + 'colour = "blue"', "colour", "unknown key"),
    ("ha", HA_OK.replace('"home"', '"lo"'), "home_interface", "bad interface name"),
    ("ha", HA_OK + 'mobile_nodes = ["2001:db8:2::100"]', "mobile_nodes", "not on the home prefix"),
    ("ha", HA_OK + "table = 254", "table", "must be 1..252"),
    ("ha", HA_OK.replace('home_prefix = "2001:db8:1::/64"', 'home_prefix = "2001:db8:1::1/64"'), "home_prefix",
     "not an IPv6 prefix"),
    # DSMIPv6
    ("mn", MN_OK + 'ipv4_hoa = "0.0.0.0"', "ipv4_hoa", "needs home_agent_ipv4"),
    ("mn", MN_OK + 'home_agent_ipv4 = "2001:db8::1"', "home_agent_ipv4", "not an IPv4 address"),
    ("mn", MN_OK + 'home_agent_ipv4 = "224.0.0.1"', "home_agent_ipv4", "not a unicast address"),
    ("mn", MN_OK + 'home_agent_ipv4 = "198.51.100.2"\nipv4_hoa = "255.255.255.255"', "ipv4_hoa", "not a unicast"),
    ("mn", MN_OK + 'home_agent_ipv4 = "198.51.100.2"\nudp_port = 70000', "udp_port", "must be 0..65535"),
    ("mn", MN_OK + 'home_agent_ipv4 = "198.51.100.2"\nforce_udp = 1', "force_udp", "true or false"),
    ("ha", HA_OK + "nat_refresh_time = 5", "nat_refresh_time", "needs ipv4_address"),
    ("ha", HA_OK + 'ipv4_address = "198.51.100.2"\nipv4_pool = ["10.0.0.1", "x"]', "ipv4_pool", "not an IPv4"),
    ("ha", HA_OK + 'ipv4_address = "198.51.100.2"\nipv4_static = { "2001:db8:2::1" = "10.0.0.1" }', "ipv4_static",
     "not on the home prefix"),
    ("ha", HA_OK + 'ipv4_address = "198.51.100.2"\nipv4_static = { "2001:db8:1::100" = "10.0.0.1" }\n'
     'ipv4_pool = ["10.0.0.1"]', "ipv4_pool", "listed twice"),
    ("ha", HA_OK + 'ipv4_address = "198.51.100.2"\nnat_refresh_time = 0', "nat_refresh_time", "must be 1..65534"),
])
def test_configuration_errors_name_file_section_and_key(tmp_path, role, section, key, problem):
    path = _node(tmp_path, role, section)
    with pytest.raises(ConfigError) as err:
        mobility_settings(load_node_config(path))
    assert str(err.value).startswith(f"{path}: [{role}] {key}: "), str(err.value)
    assert problem in str(err.value)


def test_a_missing_section_is_an_error(tmp_path):
    path = tmp_path / "mn.toml"
    path.write_text('[node]\nname = "mn"\nrole = "mn"\n')
    with pytest.raises(ConfigError, match=r"mn.toml: \[mn\]: missing section"):
        mobility_settings(load_node_config(path))


def test_mtu_plan_follows_the_payload_transform(tmp_path, examples):
    cfg = load_node_config(examples / "mn.toml")
    assert mtu_plan(cfg, mobility_settings(cfg)).inner_mtu == 1398  # AES-GCM, DSMIPv6 (docs/dsmipv6.md)
    ipv6_only = load_node_config(_node(tmp_path, "mn", MN_OK))
    assert mtu_plan(ipv6_only, mobility_settings(ipv6_only)).inner_mtu == 1402  # AES-GCM (docs/tunnel.md)
    text = (EXAMPLES / "mn.setkey").read_text().replace(
        "esp 0x1007 -m tunnel -u 7\n    -E aes-gcm-16 0x771de3a556ef9ae7d7ec6ff10404ee3443ce64bd",
        "esp 0x1007 -m tunnel -u 7 -E aes-cbc 0x" + "11" * 16 + " -A hmac-sha256 0x" + "22" * 32)
    path = _node(tmp_path, "mn", MN_OK + "path_mtu = 1500")
    (tmp_path / "mn.setkey").write_text(text)
    cbc = load_node_config(path)
    assert mtu_plan(cbc, mobility_settings(cbc)).inner_mtu == 1390  # the largest overhead wins
    small = load_node_config(_node(tmp_path, "mn", MN_OK + "path_mtu = 1300"))
    with pytest.raises(ConfigError, match=r"\[mn\] path_mtu: 1300 leaves .* less than IPv6's 1280"):
        mtu_plan(small, mobility_settings(small))


# --- fakes -------------------------------------------------------------------------------------------------


class Log(list):
    """Every call of every fake, in order: ordering is what these tests check."""

    def index_of(self, name: str, start: int = 0) -> int:
        return next(i for i, entry in enumerate(self) if i >= start and entry[0] == name)


class FakeMnRoutes:
    def __init__(self, log: Log) -> None:
        self.log = log

    def away(self, hoa, ha, iface, gateway, inner_mtu):
        self.log.append(("routes.away", hoa, ha, iface, gateway, inner_mtu))

    def away_ipv4(self, hoa, ha, inner_mtu):
        self.log.append(("routes.away_ipv4", hoa, ha, inner_mtu))

    def ipv4_home(self, addr, inner_mtu):
        self.log.append(("routes.ipv4_home", addr, inner_mtu))

    def home(self):
        self.log.append(("routes.home",))


class FakeMnHome:
    def __init__(self, log: Log) -> None:
        self.log = log

    def enter(self, iface, gateway, mtu):
        self.log.append(("home.enter", iface, gateway, mtu))

    def leave(self):
        self.log.append(("home.leave",))

    def announce(self, iface, address):
        self.log.append(("announce", iface, A(address)))


class FakeHaRoutes:
    def __init__(self, log: Log) -> None:
        self.log = log

    def apply(self, events):
        self.log.append(("routes.apply", [type(e).__name__ for e in events]))


class FakeHaHome:
    def __init__(self, log: Log) -> None:
        self.log = log
        self.served: set[A] = set()

    def serve(self, hoa):
        self.served.add(A(hoa))
        self.log.append(("home.serve", A(hoa)))

    def arrived(self, hoa):
        self.log.append(("home.arrived", A(hoa)))

    def serve_ipv4(self, hoa4):
        self.log.append(("home.serve_ipv4", ipaddress.IPv4Address(hoa4)))

    def release_ipv4(self, hoa4):
        self.log.append(("home.release_ipv4", ipaddress.IPv4Address(hoa4)))


def _mn(log: Log, seq: int = 100) -> MobileNode:
    bul = BindingUpdateList(MobileNodeConfig(hoa=HOA, ha=HA, lifetime=60, home_prefix="2001:db8:1::/64"),
                            rand=lambda n: seq.to_bytes(n, "big"))
    tunnel = MnTunnel(HOA, HA, HeuristicClassifier())

    def send(msg, dst, src):
        log.append(("send", msg, dst, src, tunnel.expecting, tunnel.at_home))

    return MobileNode(bul, tunnel, FakeMnRoutes(log), FakeMnHome(log), send, inner_mtu=1402,
                      trace=lambda ev, f: log.append(("trace", ev, dict(f))))


def _ha(log: Log) -> HomeAgent:
    table = BindingTable()
    tunnel = HaTunnel(HA, table, HeuristicClassifier())

    def send(msg, dst, src):
        log.append(("send", msg, dst, src, set(tunnel.expecting)))

    return HomeAgent(BindingCache(HomeAgentConfig(home_prefixes=("2001:db8:1::/64",))), table, tunnel,
                     FakeHaRoutes(log), FakeHaHome(log), send, address=HA, mobile_nodes=[HOA],
                     trace=lambda ev, f: log.append(("trace", ev, dict(f))))


def _sent(log: Log) -> list[tuple]:
    return [e for e in log if e[0] == "send"]


def _ack(status: int, seq: int, lifetime: int = 15) -> BindingAck:
    return BindingAck(status, seq=seq, lifetime=lifetime)


def _bu(seq: int, coa: A, lifetime: int = 15) -> BindingUpdate:
    return BindingUpdate(seq, BuFlag.A | BuFlag.H, lifetime, (AlternateCareOfAddress(coa),))


# --- the mobile node ------------------------------------------------------------------------------------------


def test_mn_away_routes_first_then_the_bu_announced_to_the_tunnel():
    log = Log()
    mn = _mn(log)
    mn.moved(Location("away", "v1", COA1, "fe80::1"), 10.0)
    assert log.index_of("home.leave") < log.index_of("routes.away") < log.index_of("announce") < log.index_of("send")
    assert log[log.index_of("routes.away")][1:] == (str(HOA), str(HA), "v1", "fe80::1", 1402)
    assert log[log.index_of("announce")][1:] == ("v1", COA1)  # the CoA on the new link (RFC 4861 7.2.6)
    (_, bu, dst, src, expecting, at_home), = _sent(log)
    assert (dst, src, expecting, at_home) == (HA, HOA, True, False)  # expect_binding_update just before
    assert bu.seq == 100 and find_option(bu.options, AlternateCareOfAddress).coa == COA1
    assert mn.tunnel.pending == COA1.packed and mn.tunnel.coa is None  # data waits for the BA (Req #3)


def test_mn_accepted_ba_moves_the_data_and_is_remembered():
    log = Log()
    mn = _mn(log)
    mn.moved(Location("away", "v1", COA1, "fe80::1"), 10.0)
    mn.received(_ack(0, 100), HA, HOA, 10.025)
    assert mn.tunnel.coa == COA1.packed and mn.tunnel.pending is None
    assert mn.bul.state is MnState.BOUND
    (h,) = mn.history
    assert (h["kind"], h["coa"], h["seq"], h["status"], h["bus"]) == ("move", str(COA1), 100, 0, 1)
    assert h["bu_to_ba"] == pytest.approx(0.025) and h["move_to_ba"] == pytest.approx(0.025)
    events = [e[1] for e in log if e[0] == "trace"]
    assert events.index("bu-sent") < events.index("ba-received") < events.index("registered")


def test_mn_new_coa_keeps_data_on_the_old_one_until_the_ba():
    log = Log()
    mn = _mn(log)
    mn.moved(Location("away", "v1", COA1, "fe80::1"), 10.0)
    mn.received(_ack(0, 100), HA, HOA, 10.02)
    mn.moved(Location("away", "v2", COA2, "fe80::1"), 12.0)
    assert (mn.tunnel.coa, mn.tunnel.pending) == (COA1.packed, COA2.packed)
    mn.received(_ack(0, 101), HA, HOA, 12.01)
    assert (mn.tunnel.coa, mn.tunnel.pending, mn.tunnel.previous) == (COA2.packed, None, COA1.packed)
    assert [h["coa"] for h in mn.history] == [str(COA1), str(COA2)]


def test_mn_returning_home_routes_home_before_the_deregistration():
    log = Log()
    mn = _mn(log)
    mn.moved(Location("away", "v1", COA1, "fe80::1"), 10.0)
    mn.received(_ack(0, 100), HA, HOA, 10.02)
    log.clear()
    mn.moved(Location("home", "home", None, "fe80::1"), 20.0)
    assert log.index_of("routes.home") < log.index_of("home.enter") < log.index_of("send")
    assert log[log.index_of("home.enter")][1:] == ("home", "fe80::1", 1402)
    (_, bu, dst, src, expecting, at_home), = _sent(log)
    assert bu.lifetime == 0 and find_option(bu.options, AlternateCareOfAddress).coa == HOA
    assert not expecting  # no expect_binding_update: the BU leaves by the home link, unchanged
    assert ("announce", "home", HOA) not in log  # not before the BA (RFC 6275 11.5.5)
    mn.received(_ack(0, 101, 0), HA, HOA, 20.01)
    assert mn.tunnel.at_home and mn.bul.state is MnState.HOME
    assert mn.history[-1]["kind"] == "deregister"
    assert log[-1][:2] == ("trace", "returned-home") and ("announce", "home", HOA) in log


def test_mn_home_without_a_gateway_uses_the_home_agent():
    log = Log()
    mn = _mn(log)
    mn.moved(Location("home", "home", None, None), 1.0)
    assert ("home.enter", "home", str(HA), 1402) in log
    assert not _sent(log)  # it was home already: no de-registration


def test_mn_detached_and_unchanged_locations_do_nothing():
    log = Log()
    mn = _mn(log)
    mn.moved(Location("away", "v1", COA1, "fe80::1"), 1.0)
    n = len(log)
    mn.moved(Location("away", "v1", COA1, "fe80::2"), 1.5)  # same link and address: not a movement
    mn.moved(Location("detached"), 2.0)
    assert [e[0] for e in log[n:]] == ["trace"]  # only the movement to "detached" is traced
    assert mn.location.kind == "detached"


def test_mn_ignores_messages_not_from_its_home_agent():
    log = Log()
    mn = _mn(log)
    mn.moved(Location("away", "v1", COA1, "fe80::1"), 1.0)
    mn.received(_ack(0, 100), A("2001:db8:1::2"), HOA, 1.01)
    assert mn.bul.state is MnState.REGISTERING and mn.counters["mh_ignored"] == 1


def test_mn_retransmissions_count_in_one_attempt():
    log = Log()
    mn = _mn(log)
    mn.moved(Location("away", "v1", COA1, "fe80::1"), 0.0)
    mn.handle_timer(mn.next_timer())  # 1.5 s: InitialBindackTimeoutFirstReg
    sent = _sent(log)
    assert [s[1].seq for s in sent] == [100, 101] and all(s[4] for s in sent)  # each one announced
    mn.received(_ack(0, 101), HA, HOA, 1.6)
    h = mn.history[-1]
    assert h["bus"] == 2 and h["bu_to_ba"] == pytest.approx(1.6) and h["last_bu_to_ba"] == pytest.approx(0.1)


# --- the home agent -------------------------------------------------------------------------------------------


def test_ha_start_serves_the_configured_nodes_at_home():
    log = Log()
    ha = _ha(log)
    ha.start()
    assert log == [("home.serve", HOA)]
    assert ha.table.lookup(HOA.packed) == HOA.packed  # forwarded packets re-sent to the engine
    assert ha.status(0.0)["at_home"] == [str(HOA)]


def test_ha_registration_updates_table_and_routes_before_the_ba():
    log = Log()
    ha = _ha(log)
    ha.start()
    log.clear()
    ha.received(_bu(7, COA1), HOA, HA, 5.0)
    assert log.index_of("routes.apply") < log.index_of("send")
    assert log[log.index_of("routes.apply")][1] == ["BindingCreated"]
    (_, ack, dst, src, expecting), = _sent(log)
    assert (ack.status, ack.seq, dst, src) == (0, 7, HOA, HA)
    assert expecting == {HOA.packed}  # expect_binding_ack before the send
    assert ha.tunnel._ba_dst[HOA.packed] == COA1.packed
    assert ha.table.lookup(HOA.packed) == COA1.packed
    assert ha.status(5.0)["at_home"] == []


def test_ha_deregistration_brings_the_node_home_before_the_ba():
    log = Log()
    ha = _ha(log)
    ha.start()
    ha.received(_bu(7, COA1), HOA, HA, 5.0)
    ha.tunnel.expecting.clear()  # its BA went through the tunnel module
    log.clear()
    ha.received(_bu(8, HOA, lifetime=0), HOA, HA, 9.0)
    apply_at, arrived_at, send_at = log.index_of("routes.apply"), log.index_of("home.arrived"), log.index_of("send")
    assert apply_at < arrived_at < send_at  # unbound, stale neighbour entry gone, then the BA
    assert log[apply_at][1] == ["BindingDeleted"]
    (_, ack, dst, _, expecting), = _sent(log)
    assert ack.status == 0 and dst == HOA and not expecting  # a local packet by the home link
    assert ha.table.lookup(HOA.packed) == HOA.packed


def test_ha_serves_a_node_it_was_not_configured_with_from_its_first_binding():
    log = Log()
    other = A("2001:db8:1::200")
    ha = _ha(log)
    ha.received(_bu(1, COA2), other, HA, 1.0)
    assert ("home.serve", other) in log and ha.table.lookup(other.packed) == COA2.packed


def test_ha_old_sequence_number_gets_135_and_changes_nothing():
    log = Log()
    ha = _ha(log)
    ha.received(_bu(7, COA1), HOA, HA, 5.0)
    before = ha.cache.entry(HOA)
    log.clear()
    ha.received(_bu(3, COA2), HOA, HA, 6.0)
    (_, ack, *_), = _sent(log)
    assert (ack.status, ack.seq) == (BaStatus.SEQ_OUT_OF_WINDOW, 7)  # the last accepted number
    assert ha.cache.entry(HOA) == before and ha.table.lookup(HOA.packed) == COA1.packed


def test_ha_expired_binding_brings_the_node_home():
    log = Log()
    ha = _ha(log)
    ha.received(_bu(7, COA1, lifetime=2), HOA, HA, 5.0)
    log.clear()
    ha.handle_timer(ha.next_timer())
    assert log[0] == ("routes.apply", ["BindingDeleted"])
    assert ("home.arrived", HOA) not in log  # expired: nobody came home
    assert ha.table.lookup(HOA.packed) == HOA.packed
    assert any(e[0] == "trace" and e[1] == "binding-deleted" for e in log)


def test_ha_ignores_other_messages():
    log = Log()
    ha = _ha(log)
    ha.received(_ack(0, 1), HOA, HA, 1.0)
    assert not _sent(log) and ha.counters["mh_ignored"] == 1


# --- DSMIPv6: IPv4 care-of addresses, UDP 4191, the IPv4 home address ------------------------------------------

HA4, PRIV, NAT = ipaddress.IPv4Address("198.51.100.2"), ipaddress.IPv4Address("192.168.1.100"), "100.64.0.2"
HOA4 = ipaddress.IPv4Address("198.18.1.100")


def _mn4(log: Log, seq: int = 100) -> MobileNode:
    bul = BindingUpdateList(MobileNodeConfig(hoa=HOA, ha=HA, lifetime=60, home_prefix="2001:db8:1::/64", ha_ipv4=HA4,
                                             ipv4_hoa=ipaddress.IPv4Address("0.0.0.0")),
                            rand=lambda n: seq.to_bytes(n, "big"))
    tunnel = MnTunnel(HOA, HA, HeuristicClassifier(), ha_ipv4=HA4)

    def send(msg, dst, src):
        log.append(("send", msg, dst, src, tunnel.expecting, tunnel.pending))

    return MobileNode(bul, tunnel, FakeMnRoutes(log), FakeMnHome(log), send, inner_mtu=1398,
                      trace=lambda ev, f: log.append(("trace", ev, dict(f))))


def _ha4(log: Log, static: bool = True) -> HomeAgent:
    table = BindingTable()
    tunnel = HaTunnel(HA, table, HeuristicClassifier())
    cfg = HomeAgentConfig(home_prefixes=("2001:db8:1::/64",), ipv4_static={HOA: HOA4} if static else {},
                          ipv4_pool=() if static else (HOA4,), nat_refresh_time=110)

    def send(msg, dst, src):
        log.append(("send", msg, dst, src, dict(tunnel._ba_dst)))

    return HomeAgent(BindingCache(cfg), table, tunnel, FakeHaRoutes(log), FakeHaHome(log), send, address=HA,
                     mobile_nodes=[HOA], trace=lambda ev, f: log.append(("trace", ev, dict(f))),
                     ipv4_static={HOA: HOA4} if static else None)


def _bu4(seq: int, coa: ipaddress.IPv4Address, lifetime: int = 15) -> BindingUpdate:
    return BindingUpdate(seq, BuFlag.A | BuFlag.H, lifetime,
                         (Ipv4CareOfAddress(coa), Ipv4HomeAddress(ipaddress.IPv4Address("0.0.0.0"))))


def test_movement_detection_sees_ipv4_only_and_dual_stack_links():
    def addr(index, text, plen=24):
        a = ipaddress.ip_address(text)
        family = socket.AF_INET if a.version == 4 else socket.AF_INET6
        body = struct.pack("=BBBBI", family, plen, 0, 0, index)
        attr = struct.pack("=HH", 4 + len(a.packed), 2 if a.version == 4 else 1) + a.packed
        return struct.pack("=IHHII", 16 + len(body) + len(attr), RTM_NEWADDR, 0, 0, 0) + body + attr

    data = addr(3, "192.168.1.100") + addr(4, "203.0.113.100") + addr(4, "2001:db8:a4::1", 64) + addr(4, "fe80::1", 64)
    assert [e.address for e in parse_messages(data)] == [A("2001:db8:a4::1"), A("fe80::1")]  # IPv4 unasked
    state = NetState()
    state.apply([LinkEvent(2, "home", False), LinkEvent(3, "v4nat", True), LinkEvent(4, "dual", True),
                 *parse_messages(data, ipv4=True)])
    assert locate(state, ["home", "v4nat", "dual"], "2001:db8:1::/64") == NetLocation(
        "away", "v4nat", ipaddress.IPv4Address("192.168.1.100"))  # IPv4 only: an IPv4 CoA
    assert locate(state, ["dual", "v4nat"], "2001:db8:1::/64") == NetLocation(
        "away", "dual", A("2001:db8:a4::1"), ipaddress.IPv4Address("203.0.113.100"))  # both (RFC 5555 4.4.1)


def test_mn_ipv4_only_link_routes_then_the_bu_in_udp_announced():
    log = Log()
    mn = _mn4(log)
    mn.moved(Location("away", "v4nat", PRIV, "192.168.1.1"), 10.0)
    assert log.index_of("home.leave") < log.index_of("routes.away_ipv4") < log.index_of("send")
    assert log[log.index_of("routes.away_ipv4")][1:] == (str(HOA), str(HA), 1398)
    assert not any(e[0] in ("routes.away", "announce") for e in log)  # no IPv6 on that link
    (_, bu, dst, src, expecting, pending), = _sent(log)
    assert (dst, src, expecting, pending) == (HA, HOA, True, PRIV.packed)  # the BU from the HoA, via the new CoA
    assert find_option(bu.options, Ipv4CareOfAddress).coa == PRIV
    (sent,) = [e[2] for e in log if e[0] == "trace" and e[1] == "bu-sent"]
    assert sent["outer"] == f"udp {PRIV} -> {HA4}:4191"
    assert mn.history == deque() and mn.counters["bu_sent_udp"] == 1


def test_mn_ba_with_nat_detection_moves_data_into_udp_and_configures_the_ipv4_hoa():
    log = Log()
    mn = _mn4(log)
    mn.moved(Location("away", "v4nat", PRIV, "192.168.1.1"), 10.0)
    ba = BindingAck(0, seq=100, lifetime=15, options=(NatDetection(False, 110), Ipv4AddressAck(0, 32, HOA4)))
    mn.received(ba, HA, HOA, 10.02)
    assert mn.tunnel.coa == PRIV.packed and mn.tunnel.udp_encap  # NAT: data in UDP (Req #3: only now)
    assert ("routes.ipv4_home", str(HOA4), 1398) in log and mn.ipv4_hoa == HOA4
    (h,) = mn.history
    assert (h["coa"], h["nat_detected"], h["udp_encap"], h["keepalive"]) == (str(PRIV), True, True, 110)
    (reg,) = [e[2] for e in log if e[0] == "trace" and e[1] == "registered"]
    assert reg["nat"] and "NAT detected: data in UDP" in reg["detail"]
    st = mn.status(10.1)
    assert st["ipv4_hoa"] == str(HOA4) and st["bul"]["binding"]["nat_detected"]


def test_mn_static_ipv4_hoa_is_configured_from_the_start():
    log = Log()
    mn = _mn4(log)
    mn.start_ipv4_home(HOA4)
    assert log == [("routes.ipv4_home", str(HOA4), 1398)]


def test_ha_bu_from_udp_gets_its_record_and_the_ba_goes_back_in_udp():
    log = Log()
    ha = _ha4(log)
    ha.start()
    assert ("home.serve_ipv4", HOA4) in log and ha.table.home_of(HOA4.packed) == HOA.packed
    # Req #4 before IPsec: the datagram's outer endpoint recorded (the IPv6 packet inside is ESP)
    esp = push_ipv6_header(HOA.packed, HA.packed, 50, 24) + (0x1001).to_bytes(4, "big") + (9).to_bytes(4, "big") + bytes(16)
    assert ha.tunnel.inbound_udp(esp, NAT, 41000, 5.0) == esp
    log.clear()
    ha.received(_bu4(9, PRIV), HOA, HA, 5.01)  # ... after IPsec: the authenticated BU claims it
    entry = ha.cache.lookup(HOA)
    assert (str(entry.udp_source.address), entry.udp_source.port, entry.nat_detected) == (NAT, 41000, True)
    assert log.index_of("routes.apply") < log.index_of("send")
    (_, ack, dst, _, ba_dst), = _sent(log)
    assert ack.status == 0 and dst == HOA and ba_dst[HOA.packed].text() == f"udp {NAT}:41000"
    assert ha.table.lookup(HOA.packed).text() == f"udp {NAT}:41000"  # data to the NAT's address and port
    (received,) = [e[2] for e in log if e[0] == "trace" and e[1] == "bu-received"]
    assert received["outer"] == f"udp {NAT}:41000" and "(NAT)" in received["detail"]
    (b,) = ha.status(5.1)["bindings"]
    assert (b["udp_source"], b["nat_detected"], b["ipv4_hoa"]) == (f"{NAT}:41000", True, str(HOA4))


def test_ha_udp_bu_without_a_record_is_answered_174_where_nobody_hears():
    log = Log()
    ha = _ha4(log)
    ha.received(_bu4(9, PRIV), HOA, HA, 5.0)  # no datagram recorded: no outer address, no binding
    assert ha.cache.lookup(HOA) is None
    (_, ack, dst, _, ba_dst), = _sent(log)
    assert ack.status == BaStatus.INVALID_COA and not ba_dst  # 174, and no UDP path to send it on


def test_ha_static_ipv4_hoa_stays_served_at_home_a_pool_one_does_not():
    for static in (True, False):
        log = Log()
        ha = _ha4(log, static=static)
        ha.start()
        esp = push_ipv6_header(HOA.packed, HA.packed, 50, 24) + (0x1001).to_bytes(4, "big") + bytes(20)
        ha.tunnel.inbound_udp(esp, str(PRIV), 41000, 5.0)
        ha.received(_bu4(9, PRIV), HOA, HA, 5.01)
        assert ha.table.home_of(HOA4.packed) == HOA.packed
        log.clear()
        ha.received(_bu(10, HOA, lifetime=0), HOA, HA, 9.0)  # de-registration
        assert (ha.table.home_of(HOA4.packed) == HOA.packed) is static
        assert (("home.release_ipv4", HOA4) in log) is not static


# --- MN and HA wired together in memory ------------------------------------------------------------------------


class Wire:
    """The MN's and the HA's MH sockets joined by bytes (push_mh -> pull_mh), no IPsec: the order of
    steps and the states of both tunnel modules during the walk."""

    def __init__(self) -> None:
        self.log = Log()
        self.now = 0.0
        self.queue: list[tuple[str, bytes, A, A]] = []
        self.mn = _mn(self.log, seq=500)
        self.ha = _ha(Log())
        self.mn.send = lambda msg, dst, src: self.queue.append(("ha", push_mh(msg, src, dst), src, dst))
        self.ha.send = lambda msg, dst, src: self.queue.append(("mn", push_mh(msg, src, dst), src, dst))
        self.ha.start()

    def deliver(self) -> None:
        while self.queue:
            to, data, src, dst = self.queue.pop(0)
            self.now += 0.01
            (self.ha if to == "ha" else self.mn).received(pull_mh(data), src, dst, self.now)

    def move(self, where: Location) -> None:
        self.now += 1.0
        self.mn.moved(where, self.now)
        self.deliver()


def test_the_walk_in_memory():
    w = Wire()
    w.move(Location("home", "home", None, "fe80::1"))
    for loc, coa in ((Location("away", "v1", COA1, "fe80::1"), COA1), (Location("away", "v2", COA2, "fe80::1"), COA2),
                     (Location("away", "v1", COA1, "fe80::1"), COA1)):
        w.move(loc)
        assert w.mn.tunnel.coa == coa.packed and w.mn.tunnel.state.value == "registered"
        assert w.ha.table.lookup(HOA.packed) == coa.packed  # Req #1: the HA tunnels to the current CoA
        assert w.ha.cache.lookup(HOA).coa == coa
    w.move(Location("home", "home", None, "fe80::1"))
    assert w.mn.tunnel.at_home and w.ha.table.lookup(HOA.packed) == HOA.packed
    assert [(h["kind"], h["status"]) for h in w.mn.history] == [("move", 0)] * 3 + [("deregister", 0)]
    assert [h["seq"] for h in w.mn.history] == [500, 501, 502, 503]


# --- status rendering and trace records -----------------------------------------------------------------------------


def test_render_mn_and_ha_status():
    w = Wire()
    w.move(Location("away", "v1", COA1, "fe80::1"))
    mn = render_mobility_status({**w.mn.status(w.now), "mode": "api", "pid": 1,
                                 "mtu": {"path": 1500, "device": 1476, "inner": 1402}})
    assert "away on v1, CoA 2001:db8:a1::ff:fe00:a1 via fe80::1" in mn
    assert "BUL       bound" in mn and "move       CoA 2001:db8:a1::ff:fe00:a1" in mn
    assert "inside the tunnel 1402" in mn
    ha = render_mobility_status({**w.ha.status(w.now), "mode": "heuristic", "pid": 2})
    assert "(ha, heuristic mode, pid 2)" in ha
    assert "2001:db8:1::100 -> 2001:db8:a1::ff:fe00:a1  seq 500  valid  lifetime 60 s" in ha
    assert "status 0 x1" in ha and "at home: -" in ha
    assert "not available (no control socket)" in render_mobility_status({"error": "no control socket"})
    json.dumps(w.mn.status(w.now)), json.dumps(w.ha.status(w.now))  # JSON-able, as the control socket needs


def _trace(tmp_path: Path, level: TraceLevel) -> tuple[MobilityTrace, Path]:
    path = tmp_path / "trace.jsonl"
    return MobilityTrace(TraceSettings(str(path), level)), path


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_trace_records_are_the_engines_format(tmp_path):
    data = TunnelTrace("out", ClassifyMode.API, Kind.DATA, Reason.API_OTHER_SPI, 0x1007, HOA.packed, COA1.packed)
    signal = TunnelTrace("out", ClassifyMode.API, Kind.SIGNAL, Reason.API_SIGNAL_SPI, 0x1001, HOA.packed, COA1.packed)
    trace, path = _trace(tmp_path, TraceLevel.DROPS)
    trace.control("bu-sent", {"seq": 5, "coa": str(COA1)})
    trace.tunnel(data)  # data: only at level "all"
    trace.tunnel(signal)
    trace.close()
    bu, sig = _records(path)
    assert bu["component"] == "mobility" and bu["event"] == "bu-sent" and bu["seq"] == 5 and bu["time"] > 0
    assert (sig["event"], sig["spi"], sig["mode"], sig["kind"], sig["why"], sig["coa"]) == (
        "tunnel", 0x1001, "api", "signal", "api-signal-spi", str(COA1))
    trace, path = _trace(tmp_path / "all", TraceLevel.ALL)
    trace.tunnel(data)
    trace.close()
    assert [r["kind"] for r in _records(path)] == ["data"]
    trace, path = _trace(tmp_path / "off", TraceLevel.OFF)
    trace.control("bu-sent", {})
    trace.close()
    assert not trace.on and not path.exists()


def test_trace_records_carry_the_outer_path_decap_only_at_all(tmp_path):
    bu = TunnelTrace("out", ClassifyMode.HEURISTIC, Kind.SIGNAL, Reason.DIFFERS_FROM_DATA, 0x1001, HOA.packed,
                     PRIV.packed, outer=f"udp {HA4}:4191")
    commit = TunnelTrace("in", ClassifyMode.API, Kind.COMMIT, Reason.RECORD_SEQ, 0x1001, HOA.packed, PRIV.packed,
                         outer=f"udp {NAT}:41000")
    decap = TunnelTrace("in", ClassifyMode.API, Kind.DECAP, None, 0x1008, HOA.packed, PRIV.packed, outer="udp x:4191")
    trace, path = _trace(tmp_path, TraceLevel.DROPS)
    for t in (bu, decap, commit):
        trace.tunnel(t)
    trace.close()
    a, b = _records(path)  # the per-packet decapsulation only at level "all"
    assert (a["kind"], a["mode"], a["why"], a["coa"], a["outer"], a["spi"]) == (
        "signal", "heuristic", "differs-from-data", str(PRIV), f"udp {HA4}:4191", 0x1001)
    assert (b["kind"], b["why"], b["outer"]) == ("commit", "record-seq", f"udp {NAT}:41000")
    assert f"outer udp {NAT}:41000" in b["detail"]


# --- home-link routes -----------------------------------------------------------------------------------------


class Runner:
    def __init__(self, fail: Sequence[str] = ()) -> None:
        self.commands: list[str] = []
        self.fail = fail

    def __call__(self, argv: Sequence[str], stdin: str | None = None) -> str:
        cmd = " ".join(argv)
        self.commands.append(cmd)
        if any(cmd.startswith(f) for f in self.fail):
            raise RoutesError(f"{cmd} failed")
        return "0\n" if argv[0] == "sysctl" else ""


def test_ha_home_link_rules_send_forwarded_packets_into_the_tunnel():
    run = Runner(fail=("ip -6 neigh del",))
    home = HaHomeLink("mip6tnl", "home", run)
    home.setup()
    home.serve(HOA)
    home.serve(HOA)  # idempotent
    home.arrived(HOA)  # no neighbour entry: not an error
    assert run.commands == [
        "ip -6 route replace default dev mip6tnl table 202",
        "ip -6 rule add pref 1000 iif lo to 2001:db8:1::100/128 lookup main",
        "ip -6 rule add pref 1001 to 2001:db8:1::100/128 lookup 202",
        "ip -6 neigh del 2001:db8:1::100 dev home",
    ]
    run.commands.clear()
    home.cleanup()
    assert run.commands == [
        "ip -6 rule del pref 1001 to 2001:db8:1::100/128 lookup 202",
        "ip -6 rule del pref 1000 iif lo to 2001:db8:1::100/128 lookup main",
        "ip -6 route del default dev mip6tnl table 202",
    ]


def test_ha_ipv4_home_address_routes_have_the_inner_mtu():
    run = Runner()
    home = HaHomeLink("mip6tnl", "home", run, inner_mtu=1398)
    home.serve_ipv4(HOA4)
    home.serve_ipv4(HOA4)  # idempotent
    home.release_ipv4(HOA4)
    assert run.commands == ["ip -4 route replace 198.18.1.100/32 dev mip6tnl mtu 1398",
                            "ip -4 route del 198.18.1.100/32 dev mip6tnl"]


def test_mn_routes_on_an_ipv4_link_and_for_the_ipv4_home_address():
    run = Runner()
    routes = MnRoutes("mip6tnl", run)
    routes.away_ipv4(str(HOA), str(HA), 1398)
    routes.ipv4_home(str(HOA4), 1398)
    routes.ipv4_home(str(HOA4), 1398)  # idempotent
    assert run.commands == [
        "ip -6 addr add 2001:db8:1::100/128 dev mip6tnl nodad",
        "ip -6 route replace 2001:db8:1::1/128 dev mip6tnl",
        "ip -6 route replace default dev mip6tnl metric 1 mtu 1398",
        "ip -6 route replace unreachable default table 201",  # an old IPv6 CoA's data: no path here
        "ip -4 addr add 198.18.1.100/32 dev mip6tnl",
        "ip -4 route replace default dev mip6tnl table 203 mtu 1398",
        "ip -4 rule add pref 1000 from 198.18.1.100/32 lookup 203",
    ]
    run.commands.clear()
    routes.away(str(HOA), str(HA), "v1", "fe80::1", 1398)  # back on an IPv6 link: only the link route
    routes.home()  # the IPv4 home address stays (the tunnel SA runs at home too)
    assert run.commands == [
        "ip -6 route del unreachable default table 201",
        "ip -6 route replace default via fe80::1 dev v1 table 201",
        "ip -6 route del default via fe80::1 dev v1 table 201",
        "ip -6 route del default dev mip6tnl metric 1",
        "ip -6 route del 2001:db8:1::1/128 dev mip6tnl",
        "ip -6 addr del 2001:db8:1::100/128 dev mip6tnl",
    ]


def test_mn_home_link_route_survives_a_vanished_link():
    run = Runner(fail=("ip -6 route del",))
    home = MnHomeLink(run)
    home.enter("home", "fe80::1", 1402)
    home.leave()  # the link went down and took the route: not an error
    home.leave()
    assert run.commands == ["ip -6 route replace default via fe80::1 dev home metric 1 mtu 1402",
                            "ip -6 route del default via fe80::1 dev home metric 1"]
