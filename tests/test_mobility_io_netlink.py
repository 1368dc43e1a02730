"""rtnetlink parsing and movement detection (mobility/io/netlink.py): synthesised messages, the
current namespace's real dump, and ``locate`` over address/link states."""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mobility.io.netlink import (
    IFA_F_DEPRECATED,
    IFA_F_TENTATIVE,
    IFF_LOWER_UP,
    IFF_RUNNING,
    IFF_UP,
    NLMSG_DONE,
    NLMSG_ERROR,
    RT_SCOPE_UNIVERSE,
    RTM_DELADDR,
    RTM_DELLINK,
    RTM_NEWADDR,
    RTM_NEWLINK,
    AddressEvent,
    LinkEvent,
    NetlinkError,
    NetlinkParseError,
    NetState,
    dump,
    locate,
    parse_messages,
)

HOME = ipaddress.IPv6Network("2001:db8:1::/64")
A = ipaddress.IPv6Address


def rtattr(rtype: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, rtype) + payload + bytes(-length % 4)


def nlmsg(mtype: int, body: bytes, seq: int = 0) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), mtype, 0, seq, 0) + body + bytes(-len(body) % 4)


def link_msg(index: int, name: str, flags: int, mtype: int = RTM_NEWLINK) -> bytes:
    body = struct.pack("=BxHiII", 0, 1, index, flags, 0xFFFFFFFF) + rtattr(3, name.encode() + b"\0")
    return nlmsg(mtype, body)


def addr_msg(index: int, addr: str, flags: int = 0, scope: int = RT_SCOPE_UNIVERSE,
             mtype: int = RTM_NEWADDR, family: int = socket.AF_INET6, big_flags: int | None = None) -> bytes:
    raw = ipaddress.ip_address(addr).packed
    body = struct.pack("=BBBBI", family, 64, flags & 0xFF, scope, index) + rtattr(1, raw)
    if big_flags is not None:
        body += rtattr(8, struct.pack("=I", big_flags))
    return nlmsg(mtype, body)


def test_link_messages():
    data = link_msg(2, "eth0", IFF_UP | IFF_RUNNING) + link_msg(3, "eth1", IFF_UP) + \
        link_msg(4, "wlan0", IFF_UP | IFF_LOWER_UP) + link_msg(2, "eth0", 0, RTM_DELLINK)
    assert parse_messages(data) == [
        LinkEvent(2, "eth0", True), LinkEvent(3, "eth1", False), LinkEvent(4, "wlan0", True),
        LinkEvent(2, "eth0", False, removed=True),
    ]


def test_address_messages_ipv4_skipped_32bit_flags_win():
    data = (addr_msg(2, "2001:db8:f::100") + addr_msg(2, "192.0.2.1", family=socket.AF_INET)
            + addr_msg(3, "2001:db8:e::1", flags=0, big_flags=IFA_F_TENTATIVE | 0x100)
            + addr_msg(2, "2001:db8:f::100", mtype=RTM_DELADDR))
    assert parse_messages(data) == [
        AddressEvent(2, A("2001:db8:f::100"), 64, 0, 0),
        AddressEvent(3, A("2001:db8:e::1"), 64, IFA_F_TENTATIVE | 0x100, 0),
        AddressEvent(2, A("2001:db8:f::100"), 64, 0, 0, removed=True),
    ]


def test_done_and_ack_are_skipped_errors_raise():
    assert parse_messages(nlmsg(NLMSG_DONE, b"\0\0\0\0") + nlmsg(NLMSG_ERROR, bytes(20))) == []
    with pytest.raises(NetlinkError) as err:
        parse_messages(nlmsg(NLMSG_ERROR, struct.pack("=i", -1) + bytes(16)))
    assert err.value.errno == 1


def test_truncated_messages_raise_parse_error():
    good = addr_msg(2, "2001:db8:f::100")
    beyond = good[:-4]  # the header still claims the full length
    short_body = nlmsg(RTM_NEWADDR, b"\x0a\x40\x00\x00")  # ifaddrmsg cut to 4 octets
    bad_attr = nlmsg(RTM_NEWADDR, struct.pack("=BBBBI", 10, 64, 0, 0, 2) + struct.pack("=HH", 40, 1) + bytes(16))
    no_addr = nlmsg(RTM_NEWADDR, struct.pack("=BBBBI", 10, 64, 0, 0, 2))
    short_link = nlmsg(RTM_NEWLINK, bytes(8))
    tiny_length = struct.pack("=IHHII", 8, RTM_NEWADDR, 0, 0, 0)
    for data in (beyond, short_body, bad_attr, no_addr, short_link, tiny_length):
        with pytest.raises(NetlinkParseError):
            parse_messages(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_input_raises_only_netlink_errors(data):
    try:
        parse_messages(data)
    except (NetlinkParseError, NetlinkError):
        pass


def test_dump_of_this_namespace_has_loopback():
    state = NetState()
    state.apply(dump())
    lo = state.index("lo")
    assert lo is not None
    if state.addresses.get(lo):  # IPv6 may be disabled on lo
        assert A("::1") in state.addresses[lo]


# --- locate -----------------------------------------------------------------------------------------------------


def state_of(*events) -> NetState:
    state = NetState()
    state.apply(events)
    return state


def test_locate_home_away_detached():
    links = (LinkEvent(2, "eth0", True), LinkEvent(3, "wlan0", True))
    home = state_of(*links, AddressEvent(2, A("2001:db8:1::100"), 64, 0, 0))
    assert locate(home, ["eth0", "wlan0"], HOME).at_home
    away = state_of(*links, AddressEvent(3, A("2001:db8:f::100"), 64, 0, 0))
    loc = locate(away, ["eth0", "wlan0"], HOME)
    assert (loc.kind, loc.interface, loc.coa) == ("away", "wlan0", A("2001:db8:f::100"))
    assert locate(state_of(*links), ["eth0", "wlan0"], HOME).kind == "detached"


def test_locate_ignores_down_links_tentative_link_local_and_other_interfaces():
    state = state_of(
        LinkEvent(2, "eth0", False), AddressEvent(2, A("2001:db8:1::100"), 64, 0, 0),  # home, link down
        LinkEvent(3, "eth1", True), AddressEvent(3, A("2001:db8:e::1"), 64, IFA_F_TENTATIVE, 0),
        AddressEvent(3, A("fe80::1"), 64, 0, 253),
        LinkEvent(4, "eth2", True), AddressEvent(4, A("2001:db8:d::1"), 64, 0, 0),
        LinkEvent(9, "mip6tnl", True), AddressEvent(9, A("2001:db8:1::100"), 128, 0, 0),  # HoA on the TUN
    )
    loc = locate(state, ["eth0", "eth1", "eth2"], HOME)
    assert (loc.interface, loc.coa) == ("eth2", A("2001:db8:d::1"))


def test_locate_prefers_non_deprecated_and_follows_preference_order():
    state = state_of(
        LinkEvent(2, "eth0", True), LinkEvent(3, "wlan0", True),
        AddressEvent(2, A("2001:db8:f::1"), 64, IFA_F_DEPRECATED, 0), AddressEvent(2, A("2001:db8:f::9"), 64, 0, 0),
        AddressEvent(3, A("2001:db8:e::1"), 64, 0, 0),
    )
    assert locate(state, ["eth0", "wlan0"], HOME).coa == A("2001:db8:f::9")
    assert locate(state, ["wlan0", "eth0"], HOME).coa == A("2001:db8:e::1")


def test_movement_sequence_from_events():
    """Home -> link down -> visited address appears -> it goes -> home again."""
    state, ifaces, seen = NetState(), ["eth0", "eth1"], []
    steps = [
        [LinkEvent(2, "eth0", True), LinkEvent(3, "eth1", False), AddressEvent(2, A("2001:db8:1::100"), 64, 0, 0)],
        [LinkEvent(2, "eth0", False)],
        [LinkEvent(3, "eth1", True), AddressEvent(3, A("2001:db8:f::100"), 64, 0, 0)],
        [AddressEvent(3, A("2001:db8:f::100"), 64, 0, 0, removed=True), LinkEvent(3, "eth1", False)],
        [LinkEvent(2, "eth0", True)],
    ]
    for events in steps:
        state.apply(events)
        seen.append(locate(state, ifaces, HOME).kind)
    assert seen == ["home", "detached", "away", "detached", "home"]
