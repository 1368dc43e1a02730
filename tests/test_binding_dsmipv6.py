"""HA BindingCache, DSMIPv6 part (RFC 5555 4.2, 4.5): IPv4 CoA, NAT detection, IPv4 home address."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

import pytest

from mobility.binding import (
    BindingCache,
    BindingCreated,
    BindingDeleted,
    BindingRefreshed,
    BindingUpdated,
    HomeAgentConfig,
    Ipv4Endpoint,
)
from mobility.constants import NAT_REFRESH_NOT_NEEDED, BaStatus, BuFlag, Ipv4AckStatus
from mobility.mh import BindingUpdate
from mobility.options import (
    AlternateCareOfAddress,
    Ipv4AddressAck,
    Ipv4CareOfAddress,
    Ipv4HomeAddress,
    NatDetection,
    find_option,
)

HOA = IPv6Address("2001:db8:1::100")
HOA2 = IPv6Address("2001:db8:1::200")
COA6 = IPv6Address("2001:db8:a::100")
COA4 = IPv4Address("192.168.1.10")  # as configured on the MN (private, behind the NAT)
NAT = Ipv4Endpoint(IPv4Address("198.51.100.7"), 40001)  # what the HA sees
PUBLIC = Ipv4Endpoint(COA4, 4191)  # no NAT: outer source == IPv4 CoA option
POOL = tuple(IPv4Address(f"10.1.0.{i}") for i in (10, 11))
AH = BuFlag.A | BuFlag.H


def cache(**kw) -> BindingCache:
    kw.setdefault("home_prefixes", ("2001:db8:1::/64",))
    kw.setdefault("ipv4_pool", POOL)
    return BindingCache(HomeAgentConfig(**kw))


def bu4(seq, *extra, coa4=COA4, flags=AH, lifetime=60) -> BindingUpdate:
    options = ((Ipv4CareOfAddress(coa4),) if coa4 is not None else ()) + extra
    return BindingUpdate(seq, flags, lifetime, options)


def send(bc, msg, udp_source=NAT, now=0.0, hoa=HOA):
    return bc.handle_binding_update(msg, hoa=hoa, src=hoa, now=now, udp_source=udp_source)


def test_nat_detected_when_outer_source_differs_from_ipv4_coa_option():
    bc = cache(nat_refresh_time=110)
    ack, events = send(bc, bu4(1), udp_source=NAT)
    assert ack.status == BaStatus.ACCEPTED
    assert find_option(ack.options, NatDetection) == NatDetection(False, 110)
    entry = bc.lookup(HOA)
    assert (entry.coa, entry.udp_source, entry.nat_detected, entry.udp_encap) == (COA4, NAT, True, True)
    assert entry.tunnel_destination == NAT.address
    assert events == [BindingCreated(HOA, COA4, entry)]


def test_no_nat_means_refresh_all_ones_and_ip_in_ip():
    bc = cache()
    ack, _ = send(bc, bu4(1), udp_source=PUBLIC)
    assert find_option(ack.options, NatDetection) == NatDetection(False, NAT_REFRESH_NOT_NEEDED)
    entry = bc.lookup(HOA)
    assert (entry.nat_detected, entry.udp_encap, entry.tunnel_destination) == (False, False, COA4)


def test_forced_udp_accepted_sets_f_in_nat_detection():
    bc = cache()
    ack, _ = send(bc, bu4(1, flags=AH | BuFlag.F), udp_source=PUBLIC)
    assert find_option(ack.options, NatDetection) == NatDetection(True, NAT_REFRESH_NOT_NEEDED)
    assert bc.lookup(HOA).udp_encap and not bc.lookup(HOA).nat_detected


def test_forced_udp_refused_is_144():
    bc = cache(accept_force_udp=False)
    ack, _ = send(bc, bu4(1, flags=AH | BuFlag.F), udp_source=PUBLIC)
    assert ack.status == 144 and bc.lookup(HOA) is None
    assert find_option(ack.options, NatDetection) is not None  # the BU came in UDP (4.2)


def test_ha_policy_forces_udp():
    ack, _ = send(cache(force_udp=True), bu4(1), udp_source=PUBLIC)
    assert find_option(ack.options, NatDetection) == NatDetection(True, NAT_REFRESH_NOT_NEEDED)


def test_udp_bu_without_ipv4_coa_option_is_174():
    bc = cache()
    ack, _ = send(bc, bu4(1, coa4=None))
    assert ack.status == BaStatus.INVALID_COA and bc.lookup(HOA) is None


def test_ipv6_coa_bu_has_no_nat_detection_and_ignores_f():
    bc = cache()
    msg = BindingUpdate(1, AH | BuFlag.F, 60, (AlternateCareOfAddress(COA6),))
    ack, _ = send(bc, msg, udp_source=None)
    assert ack.status == BaStatus.ACCEPTED and ack.options == ()
    assert bc.lookup(HOA).udp_encap is False


def test_nat_mapping_change_is_followed_after_authenticated_bu():
    bc = cache()
    send(bc, bu4(1), udp_source=NAT)
    moved = Ipv4Endpoint(NAT.address, 40999)
    _, events = send(bc, bu4(2), udp_source=moved, now=1.0)
    assert [type(e) for e in events] == [BindingUpdated]
    assert events[0].old_coa == events[0].new_coa == COA4 and bc.lookup(HOA).udp_source == moved
    _, events = send(bc, bu4(3), udp_source=moved, now=2.0)
    assert [type(e) for e in events] == [BindingRefreshed]


def test_dynamic_ipv4_home_address_from_pool():
    bc = cache()
    ack, _ = send(bc, bu4(1, Ipv4HomeAddress(IPv4Address(0))))
    assert find_option(ack.options, Ipv4AddressAck) == Ipv4AddressAck(Ipv4AckStatus.SUCCESS, 32, POOL[0])
    assert bc.lookup(HOA).ipv4_hoa == POOL[0] and bc.lookup_ipv4(POOL[0]).hoa == HOA
    # refresh asking again for 0.0.0.0, or for the address it holds, keeps it
    ack, _ = send(bc, bu4(2, Ipv4HomeAddress(IPv4Address(0))), now=1.0)
    assert find_option(ack.options, Ipv4AddressAck).hoa == POOL[0]
    ack, _ = send(bc, bu4(3, Ipv4HomeAddress(POOL[0])), now=2.0)
    assert find_option(ack.options, Ipv4AddressAck).status == Ipv4AckStatus.SUCCESS
    # a second MN gets the next address; a third finds the pool empty: 132, but the IPv6 binding stands
    ack, _ = send(bc, bu4(1, Ipv4HomeAddress(IPv4Address(0))), hoa=HOA2)
    assert find_option(ack.options, Ipv4AddressAck).hoa == POOL[1]
    third = IPv6Address("2001:db8:1::300")
    ack, _ = send(bc, bu4(1, Ipv4HomeAddress(IPv4Address(0))), hoa=third)
    assert ack.status == BaStatus.ACCEPTED
    refused = Ipv4AddressAck(Ipv4AckStatus.DYNAMIC_HOA_NOT_AVAILABLE, 0, IPv4Address(0))
    assert find_option(ack.options, Ipv4AddressAck) == refused
    assert bc.lookup(third).ipv4_hoa is None


def test_other_mns_ipv4_address_is_incorrect_130():
    bc = cache()
    send(bc, bu4(1, Ipv4HomeAddress(IPv4Address(0))))
    ack, _ = send(bc, bu4(1, Ipv4HomeAddress(POOL[0])), hoa=HOA2)
    assert find_option(ack.options, Ipv4AddressAck).status == Ipv4AckStatus.INCORRECT_IPV4_HOA
    ack, _ = send(bc, bu4(2, Ipv4HomeAddress(IPv4Address("203.0.113.9"))), hoa=HOA2)
    assert find_option(ack.options, Ipv4AddressAck).status == Ipv4AckStatus.INCORRECT_IPV4_HOA


def test_static_ipv4_home_address():
    static = IPv4Address("10.1.0.99")
    bc = cache(ipv4_static={HOA: static})
    ack, _ = send(bc, bu4(1, Ipv4HomeAddress(IPv4Address(0))))
    assert find_option(ack.options, Ipv4AddressAck).hoa == static and not bc.lookup(HOA).ipv4_hoa_dynamic
    ack, _ = send(bc, bu4(1, Ipv4HomeAddress(static)), hoa=HOA2)
    assert find_option(ack.options, Ipv4AddressAck).status == Ipv4AckStatus.INCORRECT_IPV4_HOA


@pytest.mark.parametrize(
    "option,status",
    [
        (Ipv4HomeAddress(IPv4Address(0), prefix_len=0), Ipv4AckStatus.FAILURE_UNSPECIFIED),
        (Ipv4HomeAddress(IPv4Address(0), prefix_len=24, p=True), Ipv4AckStatus.PREFIX_ALLOCATION_UNAUTHORIZED),
        (Ipv4HomeAddress(IPv4Address("224.0.0.1")), Ipv4AckStatus.INVALID_IPV4_ADDRESS),
        (Ipv4HomeAddress(IPv4Address("255.255.255.255")), Ipv4AckStatus.INVALID_IPV4_ADDRESS),
    ],
)
def test_ipv4_home_address_failures(option, status):
    ack, _ = send(cache(), bu4(1, option))
    assert ack.status == BaStatus.ACCEPTED
    assert find_option(ack.options, Ipv4AddressAck) == Ipv4AddressAck(status, 0, option.hoa)


def test_bu_without_ipv4_option_removes_only_the_ipv4_binding_and_frees_it():
    bc = cache(ipv4_pool=POOL[:1])
    send(bc, bu4(1, Ipv4HomeAddress(IPv4Address(0))))
    ack, events = send(bc, bu4(2), now=1.0)  # RFC 5555 4.4.2.1
    assert find_option(ack.options, Ipv4AddressAck) is None
    assert [type(e) for e in events] == [BindingUpdated] and events[0].previous.ipv4_hoa == POOL[0]
    assert bc.lookup(HOA).ipv4_hoa is None and bc.lookup_ipv4(POOL[0]) is None
    ack, _ = send(bc, bu4(1, Ipv4HomeAddress(IPv4Address(0))), hoa=HOA2)
    assert find_option(ack.options, Ipv4AddressAck).hoa == POOL[0]


def test_deregistration_removes_all_bindings_and_frees_pool():
    bc = cache(ipv4_pool=POOL[:1])
    send(bc, bu4(1, Ipv4HomeAddress(IPv4Address(0))))
    ack, events = send(bc, bu4(2, lifetime=0), now=1.0)
    assert ack.status == BaStatus.ACCEPTED and [type(e) for e in events] == [BindingDeleted]
    assert events[0].entry.ipv4_hoa == POOL[0] and bc.lookup_ipv4(POOL[0]) is None
    assert find_option(ack.options, NatDetection) is not None
    ack, _ = send(bc, bu4(1, Ipv4HomeAddress(IPv4Address(0))), hoa=HOA2)
    assert find_option(ack.options, Ipv4AddressAck).hoa == POOL[0]
