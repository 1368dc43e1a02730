"""SPD: selectors (RFC 4301 section 4.4.1.1), ordering, default entry, cache, counters."""

from __future__ import annotations

import ipaddress
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bits.constants import Action, Direction, IpProto, Mode
from bits.errors import ConfigError
from bits.ip import PacketSelectors
from bits.spd import (
    AddressRange,
    IcmpRange,
    Level,
    PortRange,
    Spd,
    SpdEntry,
    TrafficSelector,
)

OUT, IN = Direction.OUT, Direction.IN
TCP, UDP, ICMP, ICMPV6, MH = 6, 17, 1, 58, 135
HOA, HA, CN = "2001:db8:1::100", "2001:db8:1::1", "2001:db8:9::9"


def ip(text: str) -> int:
    return int(ipaddress.ip_address(text))


def pkt(src: str, dst: str, proto: int = UDP, **kw: int | None) -> PacketSelectors:
    return PacketSelectors(ipaddress.ip_address(src).version, ip(src), ip(dst), proto, **kw)


def ts(local: str, remote: str, proto: int | None = None, **kw) -> TrafficSelector:
    return TrafficSelector(AddressRange.parse(local), AddressRange.parse(remote), proto, **kw)


def entry(name: str, direction: Direction, sel: TrafficSelector, action: Action = Action.BYPASS) -> SpdEntry:
    return SpdEntry(name, direction, sel, action)


# --- address ranges ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "version", "first", "last", "shown"),
    [
        ("10.0.0.1", 4, ip("10.0.0.1"), ip("10.0.0.1"), "10.0.0.1"),
        ("10.0.0.0/8", 4, ip("10.0.0.0"), ip("10.255.255.255"), "10.0.0.0/8"),
        ("10.0.0.5-10.0.0.9", 4, ip("10.0.0.5"), ip("10.0.0.9"), "10.0.0.5-10.0.0.9"),
        ("2001:db8::/64", 6, ip("2001:db8::"), ip("2001:db8::ffff:ffff:ffff:ffff"), "2001:db8::/64"),
        ("2001:db8::1", 6, ip("2001:db8::1"), ip("2001:db8::1"), "2001:db8::1"),
        ("::/0", 6, 0, 2**128 - 1, "::/0"),
        ("0.0.0.0/0", 4, 0, 2**32 - 1, "0.0.0.0/0"),
        ("any6", 6, 0, 2**128 - 1, "::/0"),
        ("any4", 4, 0, 2**32 - 1, "0.0.0.0/0"),
        ("any", 0, 0, 2**128 - 1, "any"),
        ("2001:db8::4-2001:db8::7", 6, ip("2001:db8::4"), ip("2001:db8::7"), "2001:db8::4/126"),
    ],
)
def test_address_range_parse(text: str, version: int, first: int, last: int, shown: str) -> None:
    r = AddressRange.parse(text)
    assert (r.version, r.first, r.last) == (version, first, last)
    assert str(r) == shown
    assert AddressRange.parse(str(r)) == r


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("2001:db8::1/64", "host bits"),
        ("10.0.0.9-10.0.0.1", "empty"),
        ("10.0.0.1-2001:db8::1", "mixes IPv4 and IPv6"),
        ("10.0.0.256", "bad IP address"),
        ("banana", "bad IP address"),
        ("10.0.0.0/33", "bad prefix"),
    ],
)
def test_address_range_errors(text: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        AddressRange.parse(text)


def test_address_range_contains_checks_family() -> None:
    v4 = AddressRange.parse("0.0.0.0/0")
    assert v4.contains(4, ip("192.0.2.1"))
    # ::c000:201 has the same integer value as 192.0.2.1 but is IPv6
    assert not v4.contains(6, ip("192.0.2.1"))
    assert AddressRange.any().contains(6, ip("2001:db8::1")) and AddressRange.any().contains(4, 7)


# --- selector matching table ---------------------------------------------------------------------------

MATCH_TABLE = [
    # (selector, direction, packet, expected, why)
    (ts(HOA, HA), OUT, pkt(HOA, HA), True, "single addresses, local = src when outbound"),
    (ts(HOA, HA), IN, pkt(HOA, HA), False, "inbound: local is the destination"),
    (ts(HOA, HA), IN, pkt(HA, HOA), True, "inbound: remote is the source"),
    (ts("2001:db8:1::/64", "::/0"), OUT, pkt(HOA, CN), True, "prefix and any6"),
    (ts("2001:db8:1::/64", "::/0"), OUT, pkt("2001:db8:2::1", CN), False, "outside the prefix"),
    (ts("2001:db8:1::/64", "::/0"), OUT, pkt("10.0.0.1", "10.0.0.2"), False, "v6 selector, v4 packet"),
    (ts("0.0.0.0/0", "0.0.0.0/0"), OUT, pkt(HOA, CN), False, "v4 selector, v6 packet"),
    (ts("any", "any"), OUT, pkt("10.0.0.1", "10.0.0.2"), True, "any of any family, v4"),
    (ts("any", "any"), IN, pkt(HOA, CN), True, "any of any family, v6"),
    (ts("10.0.0.5-10.0.0.9", "any4"), OUT, pkt("10.0.0.5", "192.0.2.1"), True, "range, first"),
    (ts("10.0.0.5-10.0.0.9", "any4"), OUT, pkt("10.0.0.9", "192.0.2.1"), True, "range, last"),
    (ts("10.0.0.5-10.0.0.9", "any4"), OUT, pkt("10.0.0.10", "192.0.2.1"), False, "range, past last"),
    (ts("10.0.0.5-10.0.0.9", "any4"), OUT, pkt("10.0.0.4", "192.0.2.1"), False, "range, before first"),
    (ts("any6", "any6", TCP), OUT, pkt(HOA, CN, UDP, sport=1, dport=2), False, "protocol differs"),
    (ts("any6", "any6", TCP), OUT, pkt(HOA, CN, TCP, sport=1, dport=2), True, "protocol, any ports"),
    (ts("any6", "any6", TCP, remote_port=PortRange.single(80)), OUT,
     pkt(HOA, CN, TCP, sport=5000, dport=80), True, "remote port = dport outbound"),
    (ts("any6", "any6", TCP, remote_port=PortRange.single(80)), OUT,
     pkt(HOA, CN, TCP, sport=80, dport=5000), False, "outbound sport is the local port"),
    (ts("any6", "any6", TCP, remote_port=PortRange.single(80)), IN,
     pkt(CN, HOA, TCP, sport=80, dport=5000), True, "inbound: remote port = sport"),
    (ts("any6", "any6", UDP, local_port=PortRange(1000, 2000)), OUT,
     pkt(HOA, CN, UDP, sport=2000, dport=53), True, "local port range, top"),
    (ts("any6", "any6", UDP, local_port=PortRange(1000, 2000)), OUT,
     pkt(HOA, CN, UDP, sport=2001, dport=53), False, "local port range, above"),
    (ts("any6", "any6", UDP, local_port=PortRange(1000, 2000)), OUT,
     pkt(HOA, CN, UDP), False, "port selector, packet without ports (non-initial fragment)"),
    (ts("any6", "any6", UDP), OUT, pkt(HOA, CN, UDP), True, "ANY port matches an absent port"),
    (ts("any6", "any6", ICMPV6, icmp=IcmpRange.of(128)), OUT,
     pkt(HOA, CN, ICMPV6, icmp_type=128, icmp_code=0), True, "ICMPv6 type, any code"),
    (ts("any6", "any6", ICMPV6, icmp=IcmpRange.of(128)), OUT,
     pkt(HOA, CN, ICMPV6, icmp_type=129, icmp_code=0), False, "ICMPv6 other type"),
    (ts("any6", "any6", ICMPV6, icmp=IcmpRange.of(1, 3)), OUT,
     pkt(HOA, CN, ICMPV6, icmp_type=1, icmp_code=4), False, "ICMPv6 type and code, code differs"),
    (ts("any6", "any6", ICMPV6, icmp=IcmpRange.of(1, 0, 4)), OUT,
     pkt(HOA, CN, ICMPV6, icmp_type=1, icmp_code=4), True, "ICMPv6 code range"),
    (ts("any4", "any4", ICMP, icmp=IcmpRange.of(3, 4)), IN,
     pkt("192.0.2.1", "10.0.0.1", ICMP, icmp_type=3, icmp_code=4), True, "ICMPv4 type and code"),
    (ts("any6", "any6", ICMPV6, icmp=IcmpRange.of(146)), OUT,
     pkt(HOA, HA, ICMPV6), False, "ICMP type selector, type unavailable"),
    (ts(HOA, HA, MH, mh_type=5), OUT, pkt(HOA, HA, MH, mh_type=5), True, "MH type BU"),
    (ts(HOA, HA, MH, mh_type=5), OUT, pkt(HOA, HA, MH, mh_type=1), False, "MH type HoTI is not BU"),
    (ts(HOA, HA, MH, mh_type=5), OUT, pkt(HOA, HA, MH), False, "MH type unavailable"),
    (ts(HOA, HA, MH), OUT, pkt(HOA, HA, MH, mh_type=1), True, "MH, any type"),
    (ts(HOA, HA, MH, mh_type=6), IN, pkt(HA, HOA, MH, mh_type=6), True, "inbound BA"),
    (ts(HOA, "any6"), OUT, pkt(HOA, CN, 250), True, "any protocol"),
    (ts(HOA, "any6", 250), OUT, pkt(HOA, CN, 250), True, "protocol without further selectors"),
]


@pytest.mark.parametrize(("sel", "direction", "packet", "expected", "why"), MATCH_TABLE)
def test_selector_matching(
    sel: TrafficSelector, direction: Direction, packet: PacketSelectors, expected: bool, why: str
) -> None:
    spd = Spd([entry("e", direction, sel)])
    assert sel.matches(packet, direction == OUT) is expected, why
    assert (spd.lookup(direction, packet).name == "e") is expected, why


def test_icmp_range_is_the_rfc_16bit_test() -> None:
    # RFC 4301 4.4.1.1: (Ts*256)+Cs <= (t*256)+c <= (Te*256)+Ce
    r = IcmpRange(1 * 256 + 250, 2 * 256 + 3)
    assert r.contains(1, 255) and r.contains(2, 0) and r.contains(2, 3)
    assert not r.contains(1, 249) and not r.contains(2, 4)
    assert str(r) == "1,250-2,3"


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"local": "10.0.0.1", "remote": HA}, "mix IPv4 and IPv6"),
        ({"proto": ICMPV6, "local_port": PortRange.single(1)}, "port selectors need"),
        ({"proto": None, "remote_port": PortRange.single(1)}, "port selectors need"),
        ({"proto": TCP, "icmp": IcmpRange.of(1)}, "ICMP type selector needs"),
        ({"proto": UDP, "mh_type": 5}, "Mobility Header type selector needs"),
        ({"proto": MH, "mh_type": 256}, "MH type 256"),
        ({"proto": 256}, "out of range"),
    ],
)
def test_selector_validation(kwargs: dict, problem: str) -> None:
    local = kwargs.pop("local", HOA)
    remote = kwargs.pop("remote", HA)
    with pytest.raises(ConfigError, match=problem):
        ts(local, remote, **kwargs)


def test_bad_ranges() -> None:
    with pytest.raises(ConfigError):
        PortRange(10, 9)
    with pytest.raises(ConfigError):
        PortRange(0, 65536)
    with pytest.raises(ConfigError):
        IcmpRange.of(256)
    with pytest.raises(ConfigError):
        IcmpRange.of(1, 5, 4)
    with pytest.raises(ConfigError):
        AddressRange(5, 0, 0)


# --- entries ---------------------------------------------------------------------------------------------


def test_protect_entry_validation() -> None:
    sel = ts(HOA, HA)
    a, b = ipaddress.ip_address(HOA), ipaddress.ip_address(HA)
    with pytest.raises(ConfigError, match="needs a mode"):
        SpdEntry("x", OUT, sel, Action.PROTECT)
    with pytest.raises(ConfigError, match="both tunnel endpoints"):
        SpdEntry("x", OUT, sel, Action.PROTECT, Mode.TUNNEL, tunnel_src=a)
    with pytest.raises(ConfigError, match="no tunnel endpoints"):
        SpdEntry("x", OUT, sel, Action.PROTECT, Mode.TRANSPORT, tunnel_src=a, tunnel_dst=b)
    with pytest.raises(ConfigError, match="mix IPv4 and IPv6"):
        SpdEntry("x", OUT, sel, Action.PROTECT, Mode.TUNNEL, a, ipaddress.ip_address("10.0.0.1"))
    with pytest.raises(ConfigError, match="unique needs a reqid"):
        SpdEntry("x", OUT, sel, Action.PROTECT, Mode.TRANSPORT, level=Level.UNIQUE)
    with pytest.raises(ConfigError, match="only PROTECT"):
        SpdEntry("x", OUT, sel, Action.BYPASS, Mode.TRANSPORT)
    with pytest.raises(ConfigError, match="only PROTECT"):
        SpdEntry("x", OUT, sel, Action.DISCARD, reqid=0)


def test_accepts_cleartext() -> None:
    sel = ts(HOA, HA)
    assert SpdEntry("b", IN, sel, Action.BYPASS).accepts_cleartext
    assert not SpdEntry("d", IN, sel, Action.DISCARD).accepts_cleartext
    assert not SpdEntry("r", IN, sel, Action.PROTECT, Mode.TRANSPORT).accepts_cleartext
    assert SpdEntry("u", IN, sel, Action.PROTECT, Mode.TRANSPORT, level=Level.USE).accepts_cleartext


# --- ordering, default, cache, counters -------------------------------------------------------------------


def test_first_match_wins_in_configured_order() -> None:
    bu = SpdEntry("bu", OUT, ts(HOA, HA, MH, mh_type=5), Action.PROTECT, Mode.TRANSPORT)
    all_from_hoa = entry("payload", OUT, ts(HOA, "any6"), Action.DISCARD)
    spd = Spd([bu, all_from_hoa])
    assert spd.lookup(OUT, pkt(HOA, HA, MH, mh_type=5)).name == "bu"
    assert spd.lookup(OUT, pkt(HOA, HA, MH, mh_type=1)).name == "payload"
    reordered = Spd([all_from_hoa, bu])
    assert reordered.lookup(OUT, pkt(HOA, HA, MH, mh_type=5)).name == "payload"


def test_insert_before() -> None:
    spd = Spd([entry("wide", OUT, ts(HOA, "any6"))])
    spd.add(entry("narrow", OUT, ts(HOA, HA), Action.DISCARD), before="wide")
    assert [e.name for e in spd.entries(OUT)] == ["narrow", "wide"]
    assert spd.lookup(OUT, pkt(HOA, HA)).name == "narrow"
    with pytest.raises(ConfigError, match="no SPD entry named"):
        spd.add(entry("z", OUT, ts(HOA, HA)), before="nope")


def test_directions_are_separate() -> None:
    spd = Spd([entry("out-only", OUT, ts("any6", "any6"))])
    assert spd.lookup(OUT, pkt(HOA, CN)).name == "out-only"
    assert spd.lookup(IN, pkt(CN, HOA)).name == "default-in"
    assert spd.entries(IN) == ()


def test_default_entry_is_discard_unless_configured() -> None:
    spd = Spd()
    d = spd.lookup(OUT, pkt(HOA, CN))
    assert (d.name, d.action) == ("default-out", Action.DISCARD)
    assert spd.lookup(IN, pkt(CN, HOA)).action == Action.DISCARD
    spd.set_default(IN, Action.BYPASS)
    assert spd.lookup(IN, pkt(CN, HOA)).action == Action.BYPASS
    assert spd.lookup(OUT, pkt(HOA, CN)).action == Action.DISCARD
    with pytest.raises(ConfigError, match="DISCARD or BYPASS"):
        spd.set_default(OUT, Action.PROTECT)
    assert Spd(default_out=Action.BYPASS).default(OUT).action == Action.BYPASS


def test_cache_is_invalidated_by_every_change() -> None:
    spd = Spd()
    p = pkt(HOA, CN)
    assert spd.lookup(OUT, p).name == "default-out"
    assert spd.lookup(OUT, p).name == "default-out"  # now cached
    assert spd.cache_hits == 1
    spd.add(entry("allow", OUT, ts(HOA, "any6")))
    assert spd.lookup(OUT, p).name == "allow"
    spd.add(entry("deny", OUT, ts(HOA, CN), Action.DISCARD), before="allow")
    assert spd.lookup(OUT, p).name == "deny"
    spd.remove("deny")
    assert spd.lookup(OUT, p).name == "allow"
    spd.clear()
    assert spd.lookup(OUT, p).name == "default-out"
    spd.set_default(OUT, Action.BYPASS)
    assert spd.lookup(OUT, p).action == Action.BYPASS


def test_generation_changes_with_the_spd() -> None:
    spd = Spd()
    g0 = spd.generation
    spd.add(entry("a", OUT, ts(HOA, CN)))
    g1 = spd.generation
    spd.remove("a")
    assert g0 < g1 < spd.generation


def test_cache_is_bounded() -> None:
    spd = Spd([entry("udp", OUT, ts("any6", "any6", UDP))], cache_size=8)
    for port in range(100):
        assert spd.lookup(OUT, pkt(HOA, CN, UDP, sport=port, dport=53)).name == "udp"
        assert len(spd._caches[OUT]) <= 8
    assert spd.stats("udp").hits == 100


def test_hit_counters_per_entry_count_cached_hits_too() -> None:
    spd = Spd([entry("a", OUT, ts(HOA, HA)), entry("b", OUT, ts(HOA, "any6"))])
    for _ in range(3):
        spd.lookup(OUT, pkt(HOA, HA))
    spd.lookup(OUT, pkt(HOA, CN))
    spd.lookup(OUT, pkt(CN, HOA))
    assert (spd.stats("a").hits, spd.stats("b").hits, spd.stats("default-out").hits) == (3, 1, 1)
    assert spd.cache_hits == 2 and spd.cache_misses == 3
    with pytest.raises(ConfigError):
        spd.stats("nope")


def test_duplicate_names_are_refused() -> None:
    spd = Spd([entry("a", OUT, ts(HOA, HA))])
    with pytest.raises(ConfigError, match="duplicate"):
        spd.add(entry("a", IN, ts(HOA, HA)))
    with pytest.raises(ConfigError, match="duplicate"):
        spd.add(entry("default-in", IN, ts(HOA, HA)))


def test_to_dict_renders_to_json() -> None:
    protect = SpdEntry(
        "t", OUT, ts(HOA, "any6"), Action.PROTECT, Mode.TUNNEL,
        ipaddress.ip_address("2001:db8:f::100"), ipaddress.ip_address(HA), Level.UNIQUE, reqid=7,
    )
    spd = Spd([protect, entry("icmp", IN, ts("any6", "any6", ICMPV6, icmp=IcmpRange.of(1, 4)))])
    spd.lookup(OUT, pkt(HOA, CN))
    d = json.loads(json.dumps(spd.to_dict()))
    first = d["out"][0]
    assert first["name"] == "t" and first["hits"] == 1 and first["reqid"] == 7
    assert first["tunnel_src"] == "2001:db8:f::100" and first["mode"] == "tunnel"
    assert d["in"][0]["selector"] == {"local": "::/0", "remote": "::/0", "proto": 58, "icmp": "1,4"}
    assert d["out"][-1]["name"] == "default-out"
    assert "esp/tunnel/2001:db8:f::100-2001:db8:1::1/unique:7" in str(protect)


# --- property: the cached lookup is the plain first-match scan ------------------------------------------

_addrs = st.sampled_from(["2001:db8::1", "2001:db8::2", "2001:db8:1::5", "10.0.0.1", "10.0.0.2"])
_ranges = st.sampled_from(["any", "any6", "any4", "2001:db8::/64", "2001:db8::1", "10.0.0.0/31", "10.0.0.2"])


@st.composite
def _selectors(draw: st.DrawFn) -> TrafficSelector | None:
    local, remote = AddressRange.parse(draw(_ranges)), AddressRange.parse(draw(_ranges))
    if local.version and remote.version and local.version != remote.version:
        return None
    proto = draw(st.sampled_from([None, UDP, ICMPV6, MH]))
    kw: dict = {}
    if proto == UDP:
        kw["local_port"] = draw(st.sampled_from([PortRange.ANY, PortRange(1, 2)]))
    elif proto == ICMPV6:
        kw["icmp"] = draw(st.sampled_from([IcmpRange(), IcmpRange.of(1), IcmpRange.of(1, 1)]))
    elif proto == MH:
        kw["mh_type"] = draw(st.sampled_from([None, 5, 6]))
    return TrafficSelector(local, remote, proto, **kw)


@st.composite
def _packets(draw: st.DrawFn) -> PacketSelectors:
    src, dst = draw(_addrs), draw(_addrs)
    if ":" in src and ":" not in dst:
        dst = "2001:db8::9"
    if ":" not in src and ":" in dst:
        dst = "10.0.0.9"
    proto = draw(st.sampled_from([UDP, ICMPV6, MH, TCP]))
    if proto == UDP:
        return pkt(src, dst, UDP, sport=draw(st.integers(0, 3)), dport=draw(st.integers(0, 3)))
    if proto == ICMPV6:
        return pkt(src, dst, ICMPV6, icmp_type=draw(st.integers(0, 2)), icmp_code=draw(st.integers(0, 2)))
    if proto == MH:
        return pkt(src, dst, MH, mh_type=draw(st.integers(4, 6)))
    return pkt(src, dst, TCP)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(_selectors(), st.sampled_from([IN, OUT])), max_size=8),
    st.lists(st.tuples(_packets(), st.sampled_from([IN, OUT])), max_size=20),
)
def test_lookup_is_first_match(
    spec: list[tuple[TrafficSelector | None, Direction]], packets: list[tuple[PacketSelectors, Direction]]
) -> None:
    entries = [entry(f"e{i}", d, s) for i, (s, d) in enumerate(spec) if s is not None]
    spd = Spd(entries, cache_size=4)
    for _round in range(2):  # the second round is served mostly from the cache
        for p, d in packets:
            expected = next(
                (e.name for e in entries if e.direction == d and e.selector.matches(p, d == OUT)),
                f"default-{d.value}",
            )
            assert spd.lookup(d, p).name == expected
    assert sum(spd.stats(n).hits for n in [e.name for e in entries] + ["default-in", "default-out"]) == 2 * len(packets)


def test_ipproto_enum_values_are_accepted() -> None:
    sel = TrafficSelector(AddressRange.any(6), AddressRange.any(6), IpProto.MH, mh_type=5)
    assert sel.matches(pkt(HOA, HA, MH, mh_type=5), True)
    assert sel.to_dict()["proto"] == 135
