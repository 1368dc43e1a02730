"""scapy (2.8, scapy.layers.inet6) as an independent oracle for the Mobility Header codec.

Direction 1: scapy builds IPv6 + MH packets from random field values, we parse them and find the
same fields and a valid checksum. Direction 2: we build, scapy dissects with equal fields, and scapy
re-serialising the packet with its own checksum computation yields our bytes exactly.

scapy quirks worked around here (not ours to fix):
* ``in6_pseudoheader`` uses the Home Address option only when it is the *only* option of the
  Destination Options header, so a dissected packet (PadN + HAO) gets the CoA as pseudo source; we
  rebuild the header as ``IPv6ExtHdrDestOpt(options=[HAO(...)])`` (scapy autopads it identically).
* ``MIP6OptBindingAuthData`` and ``MIP6OptNonceIndices`` default to olen=16 although they carry 12
  and 4 octets (our parser rightly rejects that); we set olen explicitly.
* scapy knows options 0-16 only; DSMIPv6 options (29-32) are ``MIP6OptUnknown`` whose data we
  encode by hand below (RFC 5555 figures 1, 2, 4, 5), independently of ``mobility.options``.
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

scapy_inet6 = pytest.importorskip("scapy.layers.inet6")
from scapy.layers.inet6 import (  # noqa: E402
    HAO,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrRouting,
    MIP6MH_BA,
    MIP6MH_BE,
    MIP6MH_BRR,
    MIP6MH_BU,
    MIP6MH_CoT,
    MIP6MH_CoTI,
    MIP6MH_HoT,
    MIP6MH_HoTI,
    MIP6OptAltCoA,
    MIP6OptBindingAuthData,
    MIP6OptBRAdvice,
    MIP6OptNonceIndices,
    MIP6OptUnknown,
)
from scapy.packet import Raw  # noqa: E402

from mobility.constants import BaFlag, BuFlag  # noqa: E402
from mobility.ipv6ext import locate_mh, pull_mh_packet, push_mh_packet  # noqa: E402
from mobility.mh import (  # noqa: E402
    BindingAck,
    BindingErrorMessage,
    BindingRefreshRequest,
    BindingUpdate,
    CareOfTest,
    CareOfTestInit,
    HomeTest,
    HomeTestInit,
    pull_mh,
    verify_checksum,
)
from mobility.options import (  # noqa: E402
    AlternateCareOfAddress,
    BindingAuthorizationData,
    BindingRefreshAdvice,
    Ipv4AddressAck,
    Ipv4CareOfAddress,
    Ipv4HomeAddress,
    NatDetection,
    NonceIndices,
    UnknownOption,
)

from .test_mh import ba_flags, bu_flags, cookie  # noqa: E402
from .test_options import ipv4, ipv6, u8, u16, u32  # noqa: E402

MH_LAYERS = (MIP6MH_BRR, MIP6MH_HoTI, MIP6MH_CoTI, MIP6MH_HoT, MIP6MH_CoT, MIP6MH_BU, MIP6MH_BA, MIP6MH_BE)
SCAPY_PADS = ("Pad1", "PadN")

# options scapy does not know (it knows 0..16) and we do not either
scapy_unknown_types = st.integers(17, 255).filter(lambda t: t not in (29, 30, 31, 32))
oracle_option_st = st.one_of(
    st.builds(BindingRefreshAdvice, u16),
    st.builds(AlternateCareOfAddress, ipv6),
    st.builds(NonceIndices, u16, u16),
    st.builds(Ipv4HomeAddress, ipv4, st.integers(0, 63), st.booleans()),
    st.builds(Ipv4AddressAck, u8, st.integers(0, 63), ipv4),
    st.builds(NatDetection, st.booleans(), u32),
    st.builds(Ipv4CareOfAddress, ipv4),
    st.builds(UnknownOption, scapy_unknown_types, st.binary(max_size=24)),
)
oracle_options = st.tuples(
    st.lists(oracle_option_st, max_size=5),
    st.none() | st.builds(BindingAuthorizationData, st.binary(min_size=12, max_size=12)),
).map(lambda t: tuple(t[0]) + ((t[1],) if t[1] is not None else ()))


def to_scapy_option(opt):
    """Our option -> the scapy option with the same meaning (wire data hand-encoded for 29-32)."""
    if isinstance(opt, BindingRefreshAdvice):
        return MIP6OptBRAdvice(rinter=opt.refresh_interval)
    if isinstance(opt, AlternateCareOfAddress):
        return MIP6OptAltCoA(acoa=str(opt.coa))
    if isinstance(opt, NonceIndices):
        return MIP6OptNonceIndices(olen=4, hni=opt.home_nonce_index, coni=opt.care_of_nonce_index)
    if isinstance(opt, BindingAuthorizationData):
        return MIP6OptBindingAuthData(olen=12, authenticator=int.from_bytes(opt.authenticator, "big"))
    if isinstance(opt, Ipv4HomeAddress):  # |Prefix-len(6)|P|Reserved(9)|, IPv4 HoA
        word = opt.prefix_len * 1024 + (512 if opt.p else 0)
        return MIP6OptUnknown(otype=29, odata=word.to_bytes(2, "big") + opt.hoa.packed)
    if isinstance(opt, Ipv4AddressAck):  # |Status|Pref-len(6)|Res(2)|, IPv4 HoA
        return MIP6OptUnknown(otype=30, odata=bytes([opt.status, opt.prefix_len * 4]) + opt.hoa.packed)
    if isinstance(opt, NatDetection):  # |F|Reserved(15)|, Refresh time
        return MIP6OptUnknown(otype=31, odata=(b"\x80\x00" if opt.f else b"\x00\x00") + opt.refresh_time.to_bytes(4, "big"))
    if isinstance(opt, Ipv4CareOfAddress):
        return MIP6OptUnknown(otype=32, odata=b"\x00\x00" + opt.coa.packed)
    return MIP6OptUnknown(otype=opt.option_type, odata=opt.data)


def assert_scapy_option_equals(sopt, opt):
    """A scapy-dissected option has the fields of ours."""
    if isinstance(opt, BindingRefreshAdvice):
        assert isinstance(sopt, MIP6OptBRAdvice) and sopt.rinter == opt.refresh_interval
    elif isinstance(opt, AlternateCareOfAddress):
        assert isinstance(sopt, MIP6OptAltCoA) and IPv6Address(sopt.acoa) == opt.coa
    elif isinstance(opt, NonceIndices):
        assert isinstance(sopt, MIP6OptNonceIndices)
        assert (sopt.hni, sopt.coni) == (opt.home_nonce_index, opt.care_of_nonce_index)
    elif isinstance(opt, BindingAuthorizationData):
        assert isinstance(sopt, MIP6OptBindingAuthData) and sopt.olen == 12
        assert sopt.authenticator == int.from_bytes(opt.authenticator, "big")
    else:  # DSMIPv6 and unknown options are MIP6OptUnknown to scapy: compare the raw data
        assert isinstance(sopt, MIP6OptUnknown) and sopt.otype == opt.TYPE
        assert sopt.odata == to_scapy_option(opt).odata


def to_scapy_mh(msg):
    opts = [to_scapy_option(o) for o in msg.options]
    if isinstance(msg, BindingRefreshRequest):
        return MIP6MH_BRR(options=opts)
    if isinstance(msg, HomeTestInit):
        return MIP6MH_HoTI(cookie=msg.home_init_cookie, options=opts)
    if isinstance(msg, CareOfTestInit):
        return MIP6MH_CoTI(cookie=msg.care_of_init_cookie, options=opts)
    if isinstance(msg, HomeTest):
        return MIP6MH_HoT(index=msg.home_nonce_index, cookie=msg.home_init_cookie, token=msg.home_keygen_token, options=opts)
    if isinstance(msg, CareOfTest):
        return MIP6MH_CoT(
            index=msg.care_of_nonce_index, cookie=msg.care_of_init_cookie, token=msg.care_of_keygen_token, options=opts
        )
    if isinstance(msg, BindingUpdate):  # scapy: 7-bit "PRMKLHA" (A = MSB) + 9-bit reserved (F, T, B)
        word = int(msg.flags)
        return MIP6MH_BU(seq=msg.seq, flags=word >> 9, reserved=word & 0x1FF, mhtime=msg.lifetime, options=opts)
    if isinstance(msg, BindingAck):  # scapy: 3-bit "PRK" (K = MSB) + 5-bit res2 (T, B)
        octet = int(msg.flags)
        return MIP6MH_BA(status=msg.status, flags=octet >> 5, res2=octet & 0x1F, seq=msg.seq, mhtime=msg.lifetime, options=opts)
    assert isinstance(msg, BindingErrorMessage)
    return MIP6MH_BE(status=msg.status, ha=str(msg.home_address), options=opts)


def assert_scapy_mh_equals(layer, msg):
    assert layer.nh == 59 and layer.mhtype == msg.MH_TYPE
    if isinstance(msg, (HomeTestInit, CareOfTestInit)):
        assert layer.cookie == (msg.home_init_cookie if isinstance(msg, HomeTestInit) else msg.care_of_init_cookie)
    elif isinstance(msg, HomeTest):
        assert (layer.index, layer.cookie, layer.token) == (msg.home_nonce_index, msg.home_init_cookie, msg.home_keygen_token)
    elif isinstance(msg, CareOfTest):
        assert (layer.index, layer.cookie, layer.token) == (
            msg.care_of_nonce_index,
            msg.care_of_init_cookie,
            msg.care_of_keygen_token,
        )
    elif isinstance(msg, BindingUpdate):
        assert (layer.seq, layer.mhtime) == (msg.seq, msg.lifetime)
        assert (int(layer.flags) << 9) | layer.reserved == int(msg.flags)
    elif isinstance(msg, BindingAck):
        assert (layer.status, layer.seq, layer.mhtime) == (msg.status, msg.seq, msg.lifetime)
        assert (int(layer.flags) << 5) | layer.res2 == int(msg.flags)
    elif isinstance(msg, BindingErrorMessage):
        assert layer.status == msg.status and IPv6Address(layer.ha) == msg.home_address
    sopts = [o for o in layer.options if type(o).__name__ not in SCAPY_PADS]
    assert len(sopts) == len(msg.options)
    for sopt, opt in zip(sopts, msg.options):
        assert_scapy_option_equals(sopt, opt)


oracle_messages = st.one_of(
    st.builds(BindingRefreshRequest, oracle_options),
    st.builds(HomeTestInit, cookie, oracle_options),
    st.builds(CareOfTestInit, cookie, oracle_options),
    st.builds(HomeTest, u16, cookie, cookie, oracle_options),
    st.builds(CareOfTest, u16, cookie, cookie, oracle_options),
    st.builds(BindingUpdate, u16, bu_flags, u16, oracle_options),
    st.builds(BindingAck, u8, ba_flags, u16, u16, oracle_options),
)
# scapy's MIP6MH_BE has no autopad: only option-less BEs are comparable byte for byte
be_messages = st.builds(BindingErrorMessage, u8, ipv6)

# which extension headers wrap the MH: (home address option?, type 2 routing header?)
wrapping = st.sampled_from([(False, False), (True, False), (False, True)])


def scapy_packet(msg, src, dst, hoa, rh2):
    pkt = IPv6(src=str(src), dst=str(dst))
    if rh2 is not None:
        pkt = pkt / IPv6ExtHdrRouting(type=2, segleft=1, addresses=[str(rh2)])
    if hoa is not None:
        pkt = pkt / IPv6ExtHdrDestOpt(options=[HAO(hoa=str(hoa))])
    return pkt / to_scapy_mh(msg)


# --- direction 1: scapy builds, we parse ---------------------------------------------------------


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(oracle_messages | be_messages, ipv6, ipv6, ipv6, wrapping)
def test_scapy_builds_we_parse(msg, src, dst, home, wrap):
    hoa = home if wrap[0] else None
    rh2 = home if wrap[1] else None
    raw_pkt = bytes(scapy_packet(msg, src, dst, hoa, rh2))
    loc = locate_mh(raw_pkt)
    assert loc is not None and loc.hoa == hoa and loc.rh2_hoa == rh2
    mh = raw_pkt[loc.offset : loc.offset + loc.length]
    assert pull_mh(mh) == msg
    assert verify_checksum(mh, hoa or src, rh2 or dst)
    assert pull_mh_packet(raw_pkt) == (loc, msg)


def test_scapy_bu_with_aligned_dsmipv6_options():
    """A BU as an MN in an IPv4-only network sends it (dsmipv6.md 4): both options land on 4n
    offsets (12, 20) without padding; scapy adds the trailing PadN."""
    opts = [
        MIP6OptUnknown(otype=29, odata=bytes.fromhex("8000") + IPv4Address("0.0.0.0").packed),
        MIP6OptUnknown(otype=32, odata=bytes.fromhex("0000") + IPv4Address("192.0.2.10").packed),
    ]
    bu = MIP6MH_BU(seq=42, flags="AHK", reserved=0x100, mhtime=900, options=opts)
    pkt = bytes(IPv6(src="2001:db8:1::100", dst="2001:db8:1::1") / bu)
    loc, msg = pull_mh_packet(pkt)
    assert msg == BindingUpdate(
        42, BuFlag.A | BuFlag.H | BuFlag.K | BuFlag.F, 900, (Ipv4HomeAddress("0.0.0.0"), Ipv4CareOfAddress("192.0.2.10"))
    )
    assert loc.length == 32  # 12 + 8 + 8 + PadN(4)


# --- direction 2: we build, scapy parses ---------------------------------------------------------


def scapy_rebuilt(raw_pkt: bytes, hoa, rh2) -> bytes:
    """scapy dissects our packet and serialises it again, computing the MH checksum itself."""
    p = IPv6(raw_pkt)
    mh = next(p.getlayer(c) for c in MH_LAYERS if p.haslayer(c))
    mh.cksum = None
    mh_copy = mh.copy()
    head = IPv6(src=p.src, dst=p.dst)
    if rh2 is not None:
        head = head / IPv6ExtHdrRouting(type=2, segleft=1, addresses=[str(rh2)])
    if hoa is not None:
        head = head / IPv6ExtHdrDestOpt(options=[HAO(hoa=str(hoa))])  # see module docstring
    return bytes(head / mh_copy)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(oracle_messages | st.builds(BindingErrorMessage, u8, ipv6, oracle_options), ipv6, ipv6, ipv6, wrapping)
def test_we_build_scapy_parses(msg, src, dst, home, wrap):
    hoa = home if wrap[0] else None
    rh2 = home if wrap[1] else None
    raw_pkt = push_mh_packet(msg, src, dst, hoa=hoa, rh2_hoa=rh2)
    p = IPv6(raw_pkt)
    assert not p.haslayer(Raw)  # nothing left undissected
    layer = next(p.getlayer(c) for c in MH_LAYERS if p.haslayer(c))
    assert_scapy_mh_equals(layer, msg)
    if hoa is not None:
        assert IPv6Address(p[HAO].hoa) == hoa and p[IPv6ExtHdrDestOpt].nh == 135
    if rh2 is not None:
        rh = p[IPv6ExtHdrRouting]
        assert (rh.type, rh.segleft, rh.len) == (2, 1, 2) and [IPv6Address(a) for a in rh.addresses] == [rh2]
    assert scapy_rebuilt(raw_pkt, hoa, rh2) == raw_pkt  # same bytes, hence the same checksum


def test_scapy_checksum_of_reference_bu():
    """mipv6.md section 2: scapy computes 0x5fca for the BU sent with a Home Address option."""
    bu = BindingUpdate(1, BuFlag.A | BuFlag.H | BuFlag.K, 60, (AlternateCareOfAddress("2001:db8:f::100"),))
    raw_pkt = push_mh_packet(bu, "2001:db8:f::100", "2001:db8:1::1", hoa="2001:db8:1::100")
    built = scapy_packet(bu, "2001:db8:f::100", "2001:db8:1::1", "2001:db8:1::100", None)
    assert IPv6(bytes(built))[MIP6MH_BU].cksum == 0x5FCA == struct.unpack_from("!H", raw_pkt, 64 + 4)[0]
    assert bytes(built) == raw_pkt


def test_scapy_ba_with_rh2_checksum():
    ba = BindingAck(0, BaFlag.K, 1, 60)
    raw_pkt = push_mh_packet(ba, "2001:db8:1::1", "2001:db8:f::100", rh2_hoa="2001:db8:1::100")
    built = bytes(scapy_packet(ba, "2001:db8:1::1", "2001:db8:f::100", None, "2001:db8:1::100"))
    assert built == raw_pkt and IPv6(built)[MIP6MH_BA].cksum == 0x6033
