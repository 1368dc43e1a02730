"""The (DS)MIPv6 tunnel interface below the BITS engine (draft sections 3.2, 4.1, 4.3, 4.4).

Sans-I/O: bytes in, bytes and verdicts out, ``now`` injected, no socket, no clock. The adapters in
``mobility/io`` feed it: packets the kernel routed into the TUN device (after the engine's outbound
ESP processing) go to ``outbound``; packets seen in raw PREROUTING *before* the engine go to
``inbound``. Neither side ever touches the ESP bytes: only the outer IPv6 header and the Mobile IPv6
extension headers change, so the peer's unmodified engine decrypts them (the ICV does not cover the
IP header, RFC 4303 3.3.4).

What is rewritten where (docs/tunnel.md has the table and the reasons):

=====  ========  =========================================================================
node   side      rewrite
=====  ========  =========================================================================
MN     outbound  data (tunnel-mode SA HoA->HA): outer source HoA -> current data CoA (draft
                 4.1.1 MN side); BU (transport SA, MH type 5): source -> *newest* CoA and a
                 Home Address option with the HoA before ESP (RFC 6275 6.3, 11.7.1). While a
                 BU is in flight from a new CoA, data keeps the old CoA (draft 4.3, Req #3).
MN     inbound   ESP from the HA to one of our CoAs: destination -> HoA; a type 2 routing
                 header is checked (its address must be our HoA) and removed (RFC 6275 11.3.3)
HA     outbound  destination HoA -> the CoA of the binding (draft 4.1.2, Req #1); a BA
                 (transport SA, MH type 6) also gets a type 2 routing header with the HoA
                 (RFC 6275 6.4, 9.5.4); no binding -> counted drop
HA     inbound   Home Address option: source and option swapped (RFC 6275 9.3.1), the option
                 retyped to 0x1E (RFC 4727 experimental, "skip if unknown") because this kernel
                 has no MIPv6 and would discard type 201 -- and discards PadN runs over 7 octets
                 (RFC 4942 2.1.9.5), so PadN cannot stand in for it
=====  ========  =========================================================================

Telling signalling from data is by SPI (draft 4.3.2 / 4.4.2), in one of two modes: ``api`` asks the
engine's query interface once per peer and caches the answer until ``sad_changed()``;
``heuristic`` never asks: "heuristic and locking" on the sender side, binding-cache comparison on
the HA's receiving side.

DSMIPv6 (RFC 5555; ``mobility.udp4191``, docs/dsmipv6.md): for an IPv4 care-of address nothing is
rewritten. ``outbound`` returns the engine's IPv6 packet unchanged with an ``Ipv4Path`` instead of
a ``Route``: the MN's BU in UDP from the newest IPv4 CoA to the HA's port 4191, its data in UDP
(NAT or F) or IPv6-in-IPv4 from the acknowledged CoA (Req #3 as above); the HA's BA in UDP to the
outer address and port the BU came from, its data as the binding says. ``inbound_udp`` /
``inbound_ipip`` take what the IPv4 sockets received and return the IPv6 packet to write into the
TUN, so it reaches the engine *below* the stack; on the HA ``inbound_udp`` first records the outer
address and port of a possible BU (Req #4) and ``bu_udp_source`` hands the right record to the
binding cache once the engine has authenticated the BU.
"""

from __future__ import annotations

import ipaddress
import struct
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, NamedTuple, Protocol

from bits.constants import AuthAlg, EncAlg, IpProto
from bits.ip import PacketSelectors, fix_ipv4_header

from .binding import BindingCreated, BindingDeleted, BindingUpdated, Ipv4Endpoint
from .constants import HAO_DATA_LEN, HAO_OPTION_TYPE, MAX_UPDATE_RATE, ROUTING_TYPE_2, MhType
from .errors import MobilityError, ParseError
from .ipv6ext import push_home_address_option, push_type2_routing_header
from .mh import BindingUpdate
from .options import Ipv4CareOfAddress, find_option
from .udp4191 import (
    DSMIPV6_PORT,
    Encap,
    Endpoint,
    InboundSeq,
    Ipv4Path,
    OuterRecords,
    endpoint_of,
    esp_seq,
    ipip_path,
    pull_ipv4_outer,
    to_ipv4_endpoint,
    udp_path,
)

# --- Specification ----------------------------------------------------------------------------------

IPV6_HEADER_LEN = 40
IPV6_MIN_MTU = 1280  # RFC 8200 section 5
HAO_OVERHEAD = 24  # Destination Options header with the Home Address option (RFC 3776 7.1)
RH2_OVERHEAD = 24  # type 2 routing header (RFC 6275 6.4)
ESP_HEADER_LEN = 8  # SPI + Sequence Number (RFC 4303 2)
ESP_TRAILER_LEN = 2  # Pad Length + Next Header
ICMPV6_PACKET_TOO_BIG = 2  # RFC 4443 3.2
ICMPV6_MPS = 146  # Mobile Prefix Solicitation (RFC 6275 6.7): transport SA, needs the HAO
ICMPV6_MPA = 147  # Mobile Prefix Advertisement: transport SA, needs the type 2 routing header
#: RFC 4727 experimental destination option type: action bits 00 (skip if unrecognized), C = 0.
NEUTRAL_OPTION_TYPE = 0x1E

_HOPOPT, _ROUTING, _FRAGMENT, _DSTOPTS = 0, 43, 44, 60
_ESP, _AH, _ICMPV6 = int(IpProto.ESP), int(IpProto.AH), int(IpProto.ICMPV6)
_MH = int(IpProto.MH)
_EXT_HEADERS = frozenset({_HOPOPT, _ROUTING, _DSTOPTS})

# --- Implementation ---------------------------------------------------------------------------------

DEFAULT_PATH_MTU = 1500
QUERY_RETRY_INTERVAL = 5.0  # seconds before a failed engine query is tried again (api mode)
SIGNAL_RATE_WINDOW = 1.0  # seconds: more packets than MAX_UPDATE_RATE on a "signalling" SPI in
#                           one window cannot be BUs/BAs (RFC 6275 11.8): the lock was wrong
SEEN_COA_LIMIT = 4096  # HoAs whose last Home Address option source the HA remembers
INBOUND_QUERY_BUDGET = 10  # api: engine queries a second for SPIs never seen (random-SPI garbage)
INBOUND_CACHE_LIMIT = 4096  # api: inbound SPI answers kept (cleared when full)

_H = struct.Struct("!H")
_I = struct.Struct("!I")
_PTB = struct.Struct("!BBHI")  # Type, Code, Checksum, MTU
_PSEUDO = struct.Struct("!16s16sI3xB")

#: (protocol, MH type or ICMPv6 type) of the transport-mode signalling each side sends.
MN_SIGNALS: tuple[tuple[int, int], ...] = ((_MH, int(MhType.BU)), (_ICMPV6, ICMPV6_MPS))
HA_SIGNALS: tuple[tuple[int, int], ...] = ((_MH, int(MhType.BA)), (_ICMPV6, ICMPV6_MPA))


class EngineQueryError(MobilityError):
    """The engine's query interface could not answer (control socket unreachable, bad reply).
    Raised by query callables (``mobility.io.classify``); the api classifier falls back."""


# --- wire enums and records ---------------------------------------------------------------------------


class ClassifyMode(str, Enum):
    """How BU/BA packets are told from data packets (draft 4.3.2, 4.4.2)."""

    API = "api"
    HEURISTIC = "heuristic"


class Route(Enum):
    """Where the adapter sends a packet ``outbound`` returns."""

    WIRE = "wire"  # raw socket with the tunnel mark: the engine skips it, policy routing sends it out
    LOCAL = "local"  # raw socket without the mark: a locally sent packet the engine will protect
    TUN = "tun"  # written back into the TUN device: the local stack receives it (an ICMPv6 error)


class Kind(str, Enum):
    SIGNAL = "signal"  # ESP on a transport-mode signalling SA: BU/MPS (MN), BA/MPA (HA)
    DATA = "data"  # ESP on the payload (tunnel-mode) SA
    PLAIN = "plain"  # not ESP
    HAO = "hao"  # HA inbound: a packet carrying a Home Address option
    PTB = "ptb"  # an ICMPv6 Packet Too Big we generated
    DECAP = "decap"  # an IPv6 packet taken out of UDP/IPv4 or IPv4 and written into the TUN
    COMMIT = "commit"  # HA: the outer endpoint recorded before IPsec, given to an authenticated BU


class Reason(str, Enum):
    """Why a packet was classified as it was (one counter each; in every trace record)."""

    API_SIGNAL_SPI = "api-signal-spi"  # the engine says this SPI protects BU/BA (or MPS/MPA)
    API_OTHER_SPI = "api-other-spi"  # the engine's signalling SPIs do not include this one
    API_UNAVAILABLE = "api-unavailable"  # the query failed: the heuristic decided instead
    LOCKED_SIGNAL_SPI = "locked-signal-spi"  # heuristic: the SPI locked as the BU/BA SPI
    DATA_SPI = "data-spi"  # heuristic: a data SPI (it once ran faster than BUs may)
    DIFFERS_FROM_DATA = "differs-from-data"  # heuristic: BU/BA expected, SPI differs from data
    FIRST_WHILE_EXPECTING = "first-while-expecting"  # heuristic: BU/BA expected, no data SPI known yet
    NOT_EXPECTING = "not-expecting"  # heuristic: no BU/BA expected, not the locked SPI: data
    TOO_FAST = "too-fast"  # heuristic: more packets a second than BUs may be sent: a data SPI now
    COA_CHANGED = "coa-changed"  # HA heuristic: HAO source differs from the binding's CoA
    COA_KNOWN = "coa-known"  # HA heuristic: HAO source equals the binding's CoA
    NO_BINDING = "no-binding"  # HA heuristic: HAO for a HoA without binding (first registration)
    NOT_ESP = "not-esp"
    # DSMIPv6, HA, UDP 4191 before IPsec (draft 4.4.2 heuristic); api mode uses the API_* reasons
    OUTER_CHANGED = "outer-changed"  # outer address/port differs from the binding's: recorded
    OUTER_KNOWN = "outer-known"  # the binding's own outer address/port: nothing to record
    # DSMIPv6, HA, after IPsec: which record the authenticated BU gets (``bu_udp_source``)
    RECORD_SEQ = "record-seq"  # the engine authenticated this record's SPI and sequence number
    RECORD_LATEST = "record-latest"  # the newest fresh record
    RECORD_BINDING = "record-binding"  # no fresh record: the binding's own outer address/port
    NO_RECORD = "no-record"  # nothing recorded and no binding: the BU has no UDP source


class TunnelDrop(str, Enum):
    """Typed drops of the tunnel module, counted by name."""

    MALFORMED = "malformed"  # truncated / unparsable IPv6 header chain
    NOT_IPV6 = "not-ipv6"
    NO_COA = "no-coa"  # MN: no acknowledged CoA yet (data waits for the BA: Req #3)
    NO_BINDING = "no-binding"  # HA: no binding for the HoA
    CLEARTEXT = "cleartext"  # MN: a packet from the HoA reached the TUN unprotected (fail closed)
    LINK_LOCAL = "link-local"  # link-local source or multicast destination: not tunnelled
    TOO_BIG = "too-big"  # larger than the path MTU: a Packet Too Big went back instead
    BAD_RH2 = "bad-rh2"  # type 2 routing header not for our HoA or malformed (RFC 6275 11.3.3)
    HOP_LIMIT = "hop-limit"  # HA: cleartext re-injected until its hop limit ran out (a loop)
    LOOP = "loop"  # HA: the destination chosen is the HoA itself (it is at home)
    NOT_ESP = "not-esp"  # DSMIPv6: an IPv6 packet in UDP/IPv4 that is not ESP (fail closed)
    WRONG_PEER = "wrong-peer"  # DSMIPv6: MN: not from the HA's address/port; HA: IPv6-in-IPv4
    #                            not from the binding's IPv4 care-of address
    WRONG_ADDRESS = "wrong-address"  # DSMIPv6: the inner IPv6 packet is not HoA <-> HA


@dataclass(frozen=True, slots=True)
class TunnelTrace:
    """One decision. Built only when tracing is on; formatted only by ``to_dict``."""

    direction: str  # "out" | "in"
    mode: ClassifyMode
    kind: Kind
    reason: Reason | None
    spi: int | None
    hoa: bytes | None
    coa: bytes | None  # the care-of address chosen (outbound) or seen (inbound); 4 octets: IPv4
    drop: TunnelDrop | None = None
    outer: str | None = None  # DSMIPv6: the IPv4 path ("udp 203.0.113.2:40001", "ipip 198.51.100.9")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able; ``outer`` appears only for DSMIPv6 decisions (UDP / IPv6-in-IPv4)."""
        out = {
            "direction": self.direction,
            "mode": self.mode.value,
            "kind": self.kind.value,
            "reason": None if self.reason is None else self.reason.value,
            "spi": None if self.spi is None else f"{self.spi:#010x}",
            "hoa": _text(self.hoa),
            "coa": _text(self.coa),
            "drop": None if self.drop is None else self.drop.value,
        }
        if self.outer is not None:
            out["outer"] = self.outer
        return out


def _text(addr: bytes | None) -> str | None:
    if addr is None:
        return None
    return str(ipaddress.IPv4Address(addr) if len(addr) == 4 else ipaddress.IPv6Address(addr))


def _addr16(addr: ipaddress.IPv6Address | bytes | str) -> bytes:
    try:
        return ipaddress.IPv6Address(addr).packed
    except ValueError:
        raise MobilityError(f"not an IPv6 address: {addr!r}") from None


def _coa_bytes(addr: ipaddress.IPv4Address | ipaddress.IPv6Address | bytes | str) -> bytes:
    """A care-of address: 16 octets (IPv6) or 4 (IPv4, DSMIPv6)."""
    try:
        return ipaddress.ip_address(addr).packed
    except ValueError:
        raise MobilityError(f"not an IP address: {addr!r}") from None


def _dotted(addr4: bytes) -> str:
    return f"{addr4[0]}.{addr4[1]}.{addr4[2]}.{addr4[3]}"


def _packed4(dotted: str) -> bytes:
    return ipaddress.IPv4Address(dotted).packed


def _outer_text(src: str, sport: int) -> str:
    """Trace text of where a packet came from: ``udp ADDR:PORT`` or (port 0) ``ipip ADDR``."""
    return f"udp {src}:{sport}" if sport else f"ipip {src}"


# --- packet views and builders --------------------------------------------------------------------------


class EspView(NamedTuple):
    """Where the ESP header of an IPv6 packet is (``esp_at``) and which byte names it (``nh_at``).

    A Home Address option goes just before ESP (after any routing header, RFC 6275 6.3), and so
    does the type 2 routing header in the packets the engine gives us (IPv6 header, perhaps
    hop-by-hop options, ESP: RFC 8200 4.1 order holds).
    """

    spi: int
    esp_at: int
    nh_at: int


def pull_esp_view(packet: bytes) -> EspView | None:
    """The ESP position of an IPv6 packet; None when the chain ends in anything but ESP (cleartext,
    or a non-first fragment). Raises ParseError on a truncated chain or a non-IPv6 packet."""
    n = len(packet)
    if n < IPV6_HEADER_LEN or packet[0] >> 4 != 6:
        raise ParseError("not an IPv6 packet")
    end = IPV6_HEADER_LEN + _H.unpack_from(packet, 4)[0]
    if end > n:
        raise ParseError("IPv6 Payload Length beyond the packet")
    nh, off, nh_at = packet[6], IPV6_HEADER_LEN, 6
    while nh in _EXT_HEADERS:
        if off + 8 > end:
            raise ParseError("truncated IPv6 extension header")
        nh_at, nh, off = off, packet[off], off + (packet[off + 1] + 1) * 8
    if off > end:
        raise ParseError("IPv6 extension header beyond the packet")
    if nh != _ESP:
        return None  # upper layer, fragment, AH: not our engine's ESP
    if off + ESP_HEADER_LEN > end:
        raise ParseError("truncated ESP header")
    return EspView(_I.unpack_from(packet, off)[0], off, nh_at)


def insert_header(packet: bytes, view: EspView, header: bytes, header_nh: int) -> bytearray:
    """``packet`` with ``header`` (whose own Next Header byte is already set) put just before ESP;
    the byte at ``view.nh_at`` becomes ``header_nh``, Payload Length grows."""
    out = bytearray(packet[: view.esp_at])
    out += header
    out += packet[view.esp_at :]
    out[view.nh_at] = header_nh
    out[4:6] = _H.pack(len(out) - IPV6_HEADER_LEN)
    return out


def icmpv6_checksum(src: bytes, dst: bytes, message: bytes) -> int:
    """RFC 4443 2.3: one's complement sum over the pseudo-header (RFC 8200 8.1) and the message."""
    data = _PSEUDO.pack(src, dst, len(message), _ICMPV6) + message
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def build_packet_too_big(original: bytes, mtu: int, src: bytes, hop_limit: int = 64) -> bytes:
    """ICMPv6 Packet Too Big (RFC 4443 3.2: type 2, code 0, the MTU) from ``src`` to the source of
    ``original``, quoting as much of it as fits in the IPv6 minimum MTU."""
    quote = original[: IPV6_MIN_MTU - IPV6_HEADER_LEN - 8]
    dst = original[8:24]
    body = bytearray(_PTB.pack(ICMPV6_PACKET_TOO_BIG, 0, 0, mtu) + quote)
    body[2:4] = _H.pack(icmpv6_checksum(src, dst, bytes(body)))
    header = struct.pack("!IHBB16s16s", 6 << 28, len(body), _ICMPV6, hop_limit, src, dst)
    return header + bytes(body)


def _link_local_or_multicast(packet: bytes) -> bool:
    """Never tunnelled (RFC 6275 10.4.2): link-local or unspecified source, multicast destination."""
    return packet[24] == 0xFF or packet[8:10] == b"\xfe\x80" or packet[8:24] == bytes(16)


def inner_esp(payload: bytes, src: bytes | None, dst: bytes) -> EspView | TunnelDrop:
    """The checks on an IPv6 packet taken out of UDP/IPv4 or IPv4 before it goes into the TUN
    (DSMIPv6): IPv6, from ``src`` (None: any unicast source) to ``dst``, ending in ESP. Everything
    HoA <-> HA is ESP here, so anything else is refused (fail closed) rather than injected into
    the stack -- an open decapsulator would also relay packets to third parties."""
    if len(payload) < IPV6_HEADER_LEN:
        return TunnelDrop.MALFORMED if payload[:1] and payload[0] >> 4 == 6 else TunnelDrop.NOT_IPV6
    if payload[0] >> 4 != 6:
        return TunnelDrop.NOT_IPV6
    if payload[24:40] != dst or (src is not None and payload[8:24] != src) or _link_local_or_multicast(payload):
        return TunnelDrop.WRONG_ADDRESS
    try:
        view = pull_esp_view(payload)
    except ParseError:
        return TunnelDrop.MALFORMED
    return TunnelDrop.NOT_ESP if view is None else view


# --- MTU -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EspShape:
    """The size parameters of an ESP transform (RFC 4303 2.4, 2.8)."""

    iv_len: int
    icv_len: int
    block: int  # payload || trailer is padded to a multiple of this


_AEAD_SHAPE = EspShape(8, 16, 4)  # RFC 4106 / RFC 7634: 8-octet IV, 16-octet ICV, 4-octet alignment


def esp_shape(enc: EncAlg, auth: AuthAlg = AuthAlg.NONE) -> EspShape:
    """The shape of a setkey transform (the same numbers ``bits.transforms`` uses)."""
    if enc in (EncAlg.AES_GCM_16, EncAlg.CHACHA20_POLY1305):
        return _AEAD_SHAPE
    icv = 16 if auth == AuthAlg.HMAC_SHA256_128 else 0  # RFC 4868: 128-bit truncation
    if enc == EncAlg.AES_CBC:
        return EspShape(16, icv, 16)  # RFC 3602
    return EspShape(0, icv, 4)  # NULL (RFC 2410)


def esp_tunnel_size(inner: int, shape: EspShape) -> int:
    """Octets of a tunnel-mode ESP packet over IPv6 carrying an ``inner``-octet packet."""
    padded = -(-(inner + ESP_TRAILER_LEN) // shape.block) * shape.block
    return IPV6_HEADER_LEN + ESP_HEADER_LEN + shape.iv_len + padded + shape.icv_len


@dataclass(frozen=True, slots=True)
class MtuPlan:
    """The MTUs of one tunnel (docs/tunnel.md "MTU").

    ``device_mtu``: the TUN device; it carries the engine's ESP packets, so it is the path MTU
    minus what the tunnel module may still add (24 octets: a Home Address option on a BU, a type 2
    routing header on a BA). ``inner_mtu``: the largest packet the payload SA can carry through
    the device: the MN's default route via the TUN gets it as its ``mtu``, the HA answers larger
    forwarded packets with Packet Too Big.
    """

    path_mtu: int
    device_mtu: int
    inner_mtu: int


def tunnel_mtus(path_mtu: int, shape: EspShape, reserve: int = HAO_OVERHEAD) -> MtuPlan:
    device = path_mtu - reserve
    inner = device - IPV6_HEADER_LEN - ESP_HEADER_LEN - shape.iv_len - shape.icv_len - ESP_TRAILER_LEN
    while inner > 0 and esp_tunnel_size(inner, shape) > device:
        inner -= 1
    return MtuPlan(path_mtu, device, inner)


# --- classification -----------------------------------------------------------------------------------------


class Classifier(Protocol):
    """Tells signalling (BU/BA, MPS/MPA: transport-mode SAs) from data by SPI."""

    mode: ClassifyMode

    def outbound(self, src: bytes, dst: bytes, spi: int, expecting: bool, now: float) -> tuple[bool, Reason]:
        """Is the ESP packet ``src -> dst`` with ``spi`` signalling? ``expecting``: the mobility
        module said a BU (MN) / BA (HA) is about to be sent."""
        ...

    def inbound_signal(self, spi: int, now: float) -> tuple[bool, Reason] | None:
        """HA, api mode: is ``spi`` the SA of a BU? None: this classifier has no opinion."""
        ...

    def sad_changed(self) -> None: ...


class SpiLearner:
    """"Heuristic and locking" (draft 4.3.2) for one sender -> peer stream.

    Data packets are many and share an SPI; a BU (or BA) is a single packet, sent right after the
    mobility module says one is due (``expecting``), and never more than MAX_UPDATE_RATE times a
    second (RFC 6275 11.8). So:

    * an SPI that carried more than MAX_UPDATE_RATE packets within a second is a data SPI, for good
      (until the SAD changes);
    * while a BU/BA is expected, a packet on any other SPI is it -- and its SPI is *locked*;
    * when none is expected, a packet on the locked SPI is still signalling (an unannounced
      refresh); anything else is data.

    The caller ends the expectation at the first signalling packet. With nothing learnt yet, a data
    packet slipping in between the announcement and the BU is taken for the BU (it still arrives);
    the BU then goes as data and is lost, and the retransmission, announced again, finds a data
    SPI by then or comes first.
    """

    __slots__ = ("_recent", "data_spis", "signal_spi")

    def __init__(self) -> None:
        self.data_spis: set[int] = set()
        self.signal_spi: int | None = None
        self._recent: dict[int, deque[float]] = {}  # SPI -> last arrival times (not yet data)

    def classify(self, spi: int, expecting: bool, now: float) -> tuple[bool, Reason]:
        if spi in self.data_spis:
            return False, Reason.DATA_SPI
        if self._too_fast(spi, now):
            return False, Reason.TOO_FAST
        if expecting:
            self.signal_spi = spi
            return True, Reason.DIFFERS_FROM_DATA if self.data_spis else Reason.FIRST_WHILE_EXPECTING
        if spi == self.signal_spi:
            return True, Reason.LOCKED_SIGNAL_SPI
        return False, Reason.NOT_EXPECTING

    def _too_fast(self, spi: int, now: float) -> bool:
        """Record the arrival; True (and ``spi`` becomes a data SPI) when it is the (MAX_UPDATE_RATE
        + 1)-th within SIGNAL_RATE_WINDOW."""
        times = self._recent.get(spi)
        if times is None:
            if len(self._recent) >= 16:  # bounded: SPIs come from our own SAD, but be safe
                self._recent.clear()
            times = self._recent[spi] = deque(maxlen=MAX_UPDATE_RATE + 1)
        times.append(now)
        if len(times) > MAX_UPDATE_RATE and now - times[0] < SIGNAL_RATE_WINDOW:
            del self._recent[spi]
            if len(self.data_spis) >= 16:
                self.data_spis.clear()
            self.data_spis.add(spi)
            if self.signal_spi == spi:
                self.signal_spi = None
            return True
        return False


class HeuristicClassifier:
    """No query at all: one ``SpiLearner`` per destination (the HA for an MN, each HoA for the HA)."""

    mode = ClassifyMode.HEURISTIC

    def __init__(self) -> None:
        self.learners: dict[bytes, SpiLearner] = {}

    def outbound(self, src: bytes, dst: bytes, spi: int, expecting: bool, now: float) -> tuple[bool, Reason]:
        learner = self.learners.get(dst)
        if learner is None:
            learner = self.learners[dst] = SpiLearner()
        return learner.classify(spi, expecting, now)

    def inbound_signal(self, spi: int, now: float) -> tuple[bool, Reason] | None:
        return None

    def sad_changed(self) -> None:
        self.learners.clear()  # new SAs, new SPIs: what was learnt is stale


QueryOutbound = Callable[[PacketSelectors], "Mapping[str, Any] | None"]
QueryInboundSpi = Callable[[int], "Mapping[str, Any] | None"]


class ApiClassifier:
    """The DSMIPv6-IPsec API technique (draft 4.3.2 / 4.4.2): ask the engine, once.

    ``query_outbound(selectors) -> answer`` (the engine's ``query_outbound`` dict: policy, spi,
    sa) says which SA would protect a packet; it is asked for the signalling selectors of each
    (src, dst) pair (``signals``: MN_SIGNALS or HA_SIGNALS) the first time that pair is seen, and
    a transport-mode SA in the answer is a signalling SPI (a selector that falls through to the
    payload entry names the tunnel-mode SA, which is data). ``query_inbound_spi(spi) -> answer or None`` (the
    engine's ``query_inbound_spi`` dict) tells the HA whether an inbound SPI is a BU SA. Answers are
    cached until ``sad_changed()``; nothing is asked per packet. A failed query
    (``EngineQueryError``) is retried after ``retry_interval`` seconds; meanwhile ``fallback``
    (the heuristic) decides and the reason says ``api-unavailable``.
    """

    mode = ClassifyMode.API

    def __init__(
        self,
        query_outbound: QueryOutbound,
        query_inbound_spi: QueryInboundSpi | None = None,
        *,
        signals: Sequence[tuple[int, int]] = MN_SIGNALS,
        retry_interval: float = QUERY_RETRY_INTERVAL,
        fallback: HeuristicClassifier | None = None,
    ) -> None:
        self._query_outbound = query_outbound
        self._query_inbound_spi = query_inbound_spi
        self._signals = tuple(signals)
        self._retry = retry_interval
        self.fallback = fallback if fallback is not None else HeuristicClassifier()
        self._out: dict[tuple[bytes, bytes], frozenset[int]] = {}
        self._in: dict[int, bool] = {}
        self._retry_at: dict[Any, float] = {}
        self.queries = 0  # queries sent to the engine (a test asserts: not one per packet)
        self.failures = 0
        self.budget_skips = 0  # inbound SPIs not asked about: over INBOUND_QUERY_BUDGET
        self._budget_start, self._budget_used = float("-inf"), 0

    def outbound(self, src: bytes, dst: bytes, spi: int, expecting: bool, now: float) -> tuple[bool, Reason]:
        spis = self._out.get((src, dst))
        if spis is None:
            spis = self._ask_outbound(src, dst, now)
            if spis is None:
                return self.fallback.outbound(src, dst, spi, expecting, now)[0], Reason.API_UNAVAILABLE
        if spi in spis:
            return True, Reason.API_SIGNAL_SPI
        return False, Reason.API_OTHER_SPI

    def _ask_outbound(self, src: bytes, dst: bytes, now: float) -> frozenset[int] | None:
        key = (src, dst)
        if now < self._retry_at.get(key, float("-inf")):
            return None
        s, d = int.from_bytes(src, "big"), int.from_bytes(dst, "big")
        found = set()
        try:
            for proto, msg_type in self._signals:
                self.queries += 1
                spi = transport_spi(self._query_outbound(_signal_selectors(s, d, proto, msg_type)))
                if spi is not None:
                    found.add(spi)
        except EngineQueryError:
            self.failures += 1
            self._retry_at[key] = now + self._retry
            return None
        spis = self._out[key] = frozenset(found)
        return spis

    def inbound_signal(self, spi: int, now: float) -> tuple[bool, Reason] | None:
        known = self._in.get(spi)
        if known is None:
            if self._query_inbound_spi is None or now < self._retry_at.get(spi, float("-inf")):
                return None
            if not self._inbound_budget(now):
                return None  # random-SPI garbage must not become a query per packet
            try:
                self.queries += 1
                known = answer_is_binding_update(self._query_inbound_spi(spi))
            except EngineQueryError:
                self.failures += 1
                self._retry_at[spi] = now + self._retry
                return None
            if len(self._in) >= INBOUND_CACHE_LIMIT:
                self._in.clear()
            self._in[spi] = known
        return known, Reason.API_SIGNAL_SPI if known else Reason.API_OTHER_SPI

    def _inbound_budget(self, now: float) -> bool:
        """At most INBOUND_QUERY_BUDGET queries a second for SPIs not cached yet (our own SAs are
        asked about once; a flood of made-up SPIs would otherwise ask once per packet). Over the
        budget the caller's heuristic decides, and the engine drops the garbage anyway."""
        if now - self._budget_start >= 1.0:
            self._budget_start, self._budget_used = now, 0
        if self._budget_used >= INBOUND_QUERY_BUDGET:
            self.budget_skips += 1
            return False
        self._budget_used += 1
        return True

    def sad_changed(self) -> None:
        self._out.clear()
        self._in.clear()
        self._retry_at.clear()
        self.fallback.sad_changed()


def _signal_selectors(src: int, dst: int, proto: int, msg_type: int) -> PacketSelectors:
    if proto == _MH:
        return PacketSelectors(6, src, dst, proto, None, None, None, None, msg_type)
    return PacketSelectors(6, src, dst, proto, None, None, msg_type, 0)


def transport_spi(answer: Mapping[str, Any] | None) -> int | None:
    """The SPI of an engine ``query_outbound`` answer when it names a transport-mode SA."""
    sa = answer.get("sa") if answer else None
    if not sa or sa.get("mode") != "transport":
        return None
    spi = answer.get("spi")  # type: ignore[union-attr]
    return spi if isinstance(spi, int) else None


def answer_is_binding_update(answer: Mapping[str, Any] | None) -> bool:
    """Does an engine ``query_inbound_spi`` answer describe a transport-mode SA whose policy
    selects Binding Updates (proto MH, MH type 5 or any)?"""
    if not answer or answer.get("mode") != "transport":
        return False
    for sel in answer.get("selectors") or ():
        if str(sel.get("proto")) == str(_MH) and str(sel.get("mh_type")) in (str(int(MhType.BU)), "any"):
            return True
    return False


def make_classifier(
    mode: ClassifyMode | str,
    role: str,
    query_outbound: QueryOutbound | None = None,
    query_inbound_spi: QueryInboundSpi | None = None,
) -> Classifier:
    """The classifier for ``role`` ("mn" | "ha") in ``mode``; api mode needs the query callables."""
    mode = ClassifyMode(mode)
    if role not in ("mn", "ha"):
        raise MobilityError(f"role must be 'mn' or 'ha', not {role!r}")
    if mode is ClassifyMode.HEURISTIC:
        return HeuristicClassifier()
    if query_outbound is None:
        raise MobilityError("api mode needs the engine's query_outbound")
    signals = MN_SIGNALS if role == "mn" else HA_SIGNALS
    return ApiClassifier(query_outbound, query_inbound_spi, signals=signals)


# --- common state ------------------------------------------------------------------------------------------


Output = list[tuple[bytes, Route]]


class _TunnelBase:
    """Counters, drops and trace records shared by both ends."""

    _COUNTS: tuple[str, ...] = ()

    def __init__(self, classifier: Classifier, path_mtu: int, tracing: bool) -> None:
        self.classifier = classifier
        self.path_mtu = path_mtu
        self.tracing = tracing
        self.events: list[TunnelTrace] = []
        self.counts: dict[str, int] = dict.fromkeys(self._COUNTS, 0)
        self.reasons: dict[Reason, int] = dict.fromkeys(Reason, 0)
        self.drops: dict[TunnelDrop, int] = dict.fromkeys(TunnelDrop, 0)

    def sad_changed(self) -> None:
        """The engine's SAD changed (reload, new SAs): forget cached and learnt SPIs."""
        self.classifier.sad_changed()

    def drain_events(self) -> list[TunnelTrace]:
        events, self.events = self.events, []
        return events

    def _trace(self, direction: str, kind: Kind, reason: Reason | None, spi: int | None,
               hoa: bytes | None, coa: bytes | None, drop: TunnelDrop | None = None,
               outer: str | None = None) -> None:
        self.events.append(TunnelTrace(direction, self.classifier.mode, kind, reason, spi, hoa, coa, drop, outer))

    def _in_drop(self, drop: TunnelDrop, outer: str, hoa: bytes | None = None,
                 spi: int | None = None) -> TunnelDrop:
        """A packet from an IPv4 socket refused before the TUN (DSMIPv6): counted, traced."""
        self.drops[drop] += 1
        if self.tracing:
            self._trace("in", Kind.DECAP, None, spi, hoa, None, drop, outer)
        return drop

    def _drop(self, drop: TunnelDrop, direction: str = "out", kind: Kind = Kind.PLAIN,
              reason: Reason | None = None, spi: int | None = None, hoa: bytes | None = None) -> Output:
        self.drops[drop] += 1
        if self.tracing:
            self._trace(direction, kind, reason, spi, hoa, None, drop)
        return []

    def _too_big(self, packet: bytes, added: int, src: bytes, hoa: bytes | None) -> Output:
        """RFC 2473 7.1: the packet cannot be sent as it is; tell its source. ``packet`` is what
        came from the TUN, ``added`` what this module would have added to it."""
        self.drops[TunnelDrop.TOO_BIG] += 1
        self.counts["ptb"] += 1
        mtu = max(self.path_mtu - added, IPV6_MIN_MTU)
        if self.tracing:
            self._trace("out", Kind.PTB, None, None, hoa, None, TunnelDrop.TOO_BIG)
        return [(build_packet_too_big(packet, mtu, src), Route.TUN)]

    def status(self) -> dict[str, Any]:
        return {
            "mode": self.classifier.mode.value,
            "path_mtu": self.path_mtu,
            "counts": dict(self.counts),
            "reasons": {r.value: n for r, n in self.reasons.items() if n},
            "drops": {d.value: n for d, n in self.drops.items() if n},
        }


# --- mobile node ------------------------------------------------------------------------------------------------


class MnState(str, Enum):
    AT_HOME = "at-home"  # nothing rewritten: the SAs run HoA <-> HA on the home link
    REGISTERING = "registering"  # away, no acknowledged CoA yet: BUs leave, data waits
    REGISTERED = "registered"  # away, data via the acknowledged CoA
    MOVING = "moving"  # away, a BU from a new CoA in flight: data keeps the old CoA (Req #3)


class MnTunnel(_TunnelBase):
    """The mobile node's tunnel module. Control plane: ``expect_binding_update(coa)`` just before
    the mobility module sends a BU from ``coa``; ``binding_acknowledged(coa, udp_encap=...)`` after
    an accepted BA; ``returned_home()`` after the de-registration. Data plane: ``outbound`` /
    ``inbound`` (raw PREROUTING hook) and, for IPv4 care-of addresses (DSMIPv6, needs ``ha_ipv4``),
    ``inbound_udp`` / ``inbound_ipip`` (what the IPv4 sockets received)."""

    _COUNTS = ("out_signal", "out_data", "out_plain", "out_home", "out_other", "in_rewritten",
               "in_rh2_removed", "ptb", "out_udp", "out_ipip", "in_decap")

    def __init__(
        self,
        hoa: ipaddress.IPv6Address | bytes | str,
        ha: ipaddress.IPv6Address | bytes | str,
        classifier: Classifier,
        *,
        path_mtu: int = DEFAULT_PATH_MTU,
        tracing: bool = False,
        ha_ipv4: ipaddress.IPv4Address | str | None = None,
    ) -> None:
        super().__init__(classifier, path_mtu, tracing)
        self.hoa = _addr16(hoa)
        self.ha = _addr16(ha)
        self.ha_ipv4 = None if ha_ipv4 is None else str(ipaddress.IPv4Address(ha_ipv4))
        self.at_home = True
        # Care-of addresses are 16 octets (IPv6) or 4 (IPv4, DSMIPv6: sent in IPv4, see udp4191).
        self.coa: bytes | None = None  # current data CoA (acknowledged by a BA)
        self.pending: bytes | None = None  # CoA of a BU in flight, when it differs from ``coa``
        self.previous: bytes | None = None  # the CoA before: ESP in flight to it is still ours
        self.expecting = False  # a BU is about to come through the TUN
        self.udp_encap = False  # IPv4 CoA: data in UDP (NAT or F, RFC 5555 4.2), else IPv6-in-IPv4
        self._data_path: Ipv4Path | None = None  # IPv4 CoA: the path of data packets
        self._bu_paths: dict[bytes, Ipv4Path] = {}  # IPv4 CoA -> UDP path of its BUs
        self._hao = push_home_address_option(self.hoa, _ESP)

    # --- control plane ---

    @property
    def state(self) -> MnState:
        if self.at_home:
            return MnState.AT_HOME
        if self.coa is None:
            return MnState.REGISTERING
        return MnState.MOVING if self.pending is not None else MnState.REGISTERED

    def expect_binding_update(self, coa: ipaddress.IPv4Address | ipaddress.IPv6Address | bytes | str) -> None:
        """The mobility module is about to send a BU from ``coa`` (first one, retransmission,
        refresh or NAT keepalive): the next BU through the TUN leaves from ``coa`` -- with a Home
        Address option from an IPv6 CoA; in UDP to the HA's port 4191 from an IPv4 CoA (RFC 5555
        4.2: the IPv6 header keeps the HoA, no option)."""
        coa_b = self._care_of(coa)
        self.at_home = False
        self.pending = None if coa_b == self.coa else coa_b
        self.expecting = True

    def binding_acknowledged(self, coa: ipaddress.IPv4Address | ipaddress.IPv6Address | bytes | str,
                             *, udp_encap: bool = False) -> None:
        """An accepted BA for a BU from ``coa``: data switches to it (draft 4.3.1). ``udp_encap``
        (IPv4 CoA: ``Registered.udp_encap`` / ``HomeBinding.udp_encap``): data in UDP, else
        IPv6-in-IPv4 (RFC 5555 4.2; docs/dsmipv6.md)."""
        coa_b = self._care_of(coa)
        if coa_b != self.coa:
            self.previous, self.coa = self.coa, coa_b
        if self.pending == coa_b:
            self.pending = None
        self.udp_encap = udp_encap and len(coa_b) == 4
        self._data_path = None
        if len(coa_b) == 4:
            src, ha4 = _dotted(coa_b), self.ha_ipv4 or ""
            self._data_path = udp_path(ha4, DSMIPV6_PORT, src) if udp_encap else ipip_path(ha4, src)
        self.at_home, self.expecting = False, False  # the BU evidently went out

    def _care_of(self, coa: ipaddress.IPv4Address | ipaddress.IPv6Address | bytes | str) -> bytes:
        coa_b = _coa_bytes(coa)
        if len(coa_b) == 4 and self.ha_ipv4 is None:
            raise MobilityError("an IPv4 care-of address needs the HA's IPv4 address (ha_ipv4)")
        return coa_b

    def _bu_path(self, coa4: bytes) -> Ipv4Path:
        path = self._bu_paths.get(coa4)
        if path is None:
            if len(self._bu_paths) >= 16:
                self._bu_paths.clear()
            path = self._bu_paths[coa4] = udp_path(self.ha_ipv4 or "", DSMIPV6_PORT, _dotted(coa4))
        return path

    def returned_home(self) -> None:
        """De-registered at home: nothing is rewritten any more (RFC 6275 11.5.5)."""
        self.previous = self.coa
        self.at_home, self.coa, self.pending, self.expecting = True, None, None, False
        self._data_path, self.udp_encap = None, False

    # --- data plane ---

    def outbound(self, packet: bytes, now: float) -> Output:
        """A packet the kernel routed into the TUN (the engine already applied ESP). IPv4 in the
        TUN is the IPv4 home address's traffic (its source route names the TUN) that the engine
        did not protect -- it turns it into IPv6 ESP and sends that itself -- so: cleartext."""
        if packet[:1] and packet[0] >> 4 == 4:
            return self._drop(TunnelDrop.CLEARTEXT, reason=Reason.NOT_ESP)
        try:
            view = pull_esp_view(packet)
        except ParseError:
            return self._drop(TunnelDrop.MALFORMED)
        if view is None:
            return self._plain(packet)
        src = packet[8:24]
        if src != self.hoa or packet[24:40] != self.ha:
            self.counts["out_other"] += 1  # not HoA -> HA: not ours to tunnel
            return [(packet, Route.WIRE)]
        signal, reason = self.classifier.outbound(src, self.ha, view.spi, self.expecting, now)
        self.reasons[reason] += 1
        if self.at_home:
            self.counts["out_home"] += 1
            return [(packet, Route.WIRE)]
        if signal:
            return self._signal(packet, view, reason)
        return self._data(packet, view, reason)

    def _signal(self, packet: bytes, view: EspView, reason: Reason) -> Output:
        """BU (or MPS): from the newest CoA, with the Home Address option (RFC 6275 6.3, 11.7.1);
        from an IPv4 CoA unchanged in UDP to the HA's port 4191 (RFC 5555 4.2, always UDP)."""
        self.expecting = False
        coa = self.pending if self.pending is not None else self.coa
        if coa is None:
            return self._drop(TunnelDrop.NO_COA, "out", Kind.SIGNAL, reason, view.spi, self.hoa)
        if len(coa) == 4:
            path = self._bu_path(coa)
            self.counts["out_signal"] += 1
            self.counts["out_udp"] += 1
            if self.tracing:
                self._trace("out", Kind.SIGNAL, reason, view.spi, self.hoa, coa, outer=path.text())
            return [(packet, path)]
        out = insert_header(packet, view, self._hao, _DSTOPTS)
        out[8:24] = coa
        if len(out) > self.path_mtu:
            return self._too_big(packet, HAO_OVERHEAD, coa, self.hoa)
        self.counts["out_signal"] += 1
        if self.tracing:
            self._trace("out", Kind.SIGNAL, reason, view.spi, self.hoa, coa)
        return [(bytes(out), Route.WIRE)]

    def _data(self, packet: bytes, view: EspView, reason: Reason) -> Output:
        """Data: from the acknowledged CoA only, even while a BU from a new one is in flight."""
        coa = self.coa
        if coa is None:
            return self._drop(TunnelDrop.NO_COA, "out", Kind.DATA, reason, view.spi, self.hoa)
        path = self._data_path
        if path is not None:  # IPv4 CoA: unchanged, in UDP or IPv6-in-IPv4 (the kernel may fragment)
            self.counts["out_data"] += 1
            self.counts["out_udp" if path.encap is Encap.UDP else "out_ipip"] += 1
            if self.tracing:
                self._trace("out", Kind.DATA, reason, view.spi, self.hoa, coa, outer=path.text())
            return [(packet, path)]
        if len(packet) > self.path_mtu:
            return self._too_big(packet, 0, coa, self.hoa)
        self.counts["out_data"] += 1
        if self.tracing:
            self._trace("out", Kind.DATA, reason, view.spi, self.hoa, coa)
        return [(packet[:8] + coa + packet[24:], Route.WIRE)]

    def _plain(self, packet: bytes) -> Output:
        """Not ESP. From the HoA: the engine should have protected it (fail closed). Link-local or
        multicast: never tunnelled. Anything else (say, from the CoA): sent natively."""
        if packet[8:24] == self.hoa:
            return self._drop(TunnelDrop.CLEARTEXT, reason=Reason.NOT_ESP)
        if _link_local_or_multicast(packet):
            return self._drop(TunnelDrop.LINK_LOCAL, reason=Reason.NOT_ESP)
        self.counts["out_plain"] += 1
        return [(packet, Route.WIRE)]

    def inbound(self, packet: bytes, now: float) -> bytes | TunnelDrop | None:
        """A packet in raw PREROUTING, before the engine. ESP from the HA to one of our CoAs gets
        the HoA as destination (its type 2 routing header removed); None: leave it unchanged."""
        if self.at_home or len(packet) < IPV6_HEADER_LEN or packet[0] >> 4 != 6:
            return None
        dst = packet[24:40]
        if packet[8:24] != self.ha or dst == self.hoa or dst not in (self.coa, self.pending, self.previous):
            return None
        try:
            return self._to_hoa(packet, dst)
        except ParseError:
            self.drops[TunnelDrop.MALFORMED] += 1
            return TunnelDrop.MALFORMED

    def _to_hoa(self, packet: bytes, coa: bytes) -> bytes | TunnelDrop | None:
        end = IPV6_HEADER_LEN + _H.unpack_from(packet, 4)[0]
        if end > len(packet):
            raise ParseError("IPv6 Payload Length beyond the packet")
        nh, off, nh_at, rh2, rh2_nh_at = packet[6], IPV6_HEADER_LEN, 6, -1, -1
        while nh in _EXT_HEADERS:
            if off + 8 > end:
                raise ParseError("truncated IPv6 extension header")
            if nh == _ROUTING and packet[off + 2] == ROUTING_TYPE_2:
                if not self._our_rh2(packet, off, end):
                    self.drops[TunnelDrop.BAD_RH2] += 1
                    return TunnelDrop.BAD_RH2
                rh2, rh2_nh_at = off, nh_at
            nh_at, nh, off = off, packet[off], off + (packet[off + 1] + 1) * 8
        if nh != _ESP:
            return None  # cleartext to the CoA: not the tunnel's business
        spi = _I.unpack_from(packet, off)[0] if off + 4 <= end else None
        out = bytearray(packet)
        out[24:40] = self.hoa
        if rh2 >= 0:  # RFC 6275 11.3.3: processed by us, so it goes
            out[rh2_nh_at] = packet[rh2]
            del out[rh2 : rh2 + RH2_OVERHEAD]
            out[4:6] = _H.pack(len(out) - IPV6_HEADER_LEN)
            self.counts["in_rh2_removed"] += 1
        self.counts["in_rewritten"] += 1
        if self.tracing:
            self._trace("in", Kind.SIGNAL if rh2 >= 0 else Kind.DATA, None, spi, self.hoa, coa)
        return bytes(out)

    def inbound_udp(self, payload: bytes, src: str, sport: int, now: float) -> bytes | TunnelDrop:
        """A datagram on the MN's DSMIPv6 UDP socket: from the HA's IPv4 address and port 4191, an
        IPv6 packet HA -> HoA ending in ESP (a BA or data, RFC 5555 4.2). Returns the packet to
        write into the TUN -- it then reaches the engine *below* the stack, in raw PREROUTING, like
        ESP from the wire -- or a counted drop."""
        if src != self.ha_ipv4 or sport != DSMIPV6_PORT:
            return self._in_drop(TunnelDrop.WRONG_PEER, f"udp {src}:{sport}")
        return self._from_ha(payload, src, sport)

    def inbound_ipip(self, packet: bytes, now: float) -> bytes | TunnelDrop:
        """An IPv4 packet of protocol 41 (what a raw socket reads, IPv4 header included) from the
        HA's IPv4 address: its IPv6 packet, checked as in ``inbound_udp``."""
        try:
            outer = pull_ipv4_outer(packet)
        except ParseError:
            return self._in_drop(TunnelDrop.MALFORMED, "ipip")
        if outer.src != self.ha_ipv4:
            return self._in_drop(TunnelDrop.WRONG_PEER, f"ipip {outer.src}")
        return self._from_ha(outer.payload, outer.src, 0)

    def _from_ha(self, payload: bytes, src: str, sport: int) -> bytes | TunnelDrop:
        """The checks common to UDP (``sport``) and IPv6-in-IPv4 (0): HA -> HoA, ESP."""
        view = inner_esp(payload, self.ha, self.hoa)
        if view.__class__ is not EspView:
            return self._in_drop(view, _outer_text(src, sport))  # type: ignore[arg-type]
        self.counts["in_decap"] += 1
        if self.tracing:
            self._trace("in", Kind.DECAP, None, view.spi, self.hoa, self.coa,  # type: ignore[union-attr]
                        outer=_outer_text(src, sport))
        return payload

    def _our_rh2(self, packet: bytes, off: int, end: int) -> bool:
        """RFC 6275 11.3.3: Hdr Ext Len 2, Segments Left 1, and the address is our HoA."""
        return (
            off + RH2_OVERHEAD <= end
            and packet[off + 1] == 2
            and packet[off + 3] == 1
            and packet[off + 8 : off + 24] == self.hoa
        )

    def status(self) -> dict[str, Any]:
        st = super().status()
        st.update(state=self.state.value, hoa=_text(self.hoa), ha=_text(self.ha), coa=_text(self.coa),
                  pending=_text(self.pending))
        return st


# --- home agent ------------------------------------------------------------------------------------------------------


BindingLookup = Callable[[bytes], "bytes | Ipv4Path | None"]


class BindingTable:
    """HoA -> where its packets go, for ``HaTunnel``: one dictionary lookup per packet. Fed with
    the HA ``BindingCache`` events (``apply``). The value is the IPv6 CoA (16 octets) or, for an
    IPv4 CoA (DSMIPv6, RFC 5555 4.2 / 4.5.1), an ``Ipv4Path``: UDP to the outer address and port
    the BU came from when the entry says ``udp_encap`` (NAT detected or F), else IPv6-in-IPv4 to
    the IPv4 CoA. For IPv4 bindings the table also keeps the recorded outer endpoint (where BAs go
    and what the heuristic compares with, draft 4.4.2) and the IPv6-in-IPv4 peer. IPv4 home
    addresses (RFC 5555 4.5) map to the IPv6 HoA whose tunnel carries them (``home_of``)."""

    def __init__(self) -> None:
        self._coa: dict[bytes, bytes | Ipv4Path] = {}
        self._endpoint: dict[bytes, Endpoint] = {}  # IPv4 bindings: recorded (V4ADDR, Z)
        self._ipip_peer: dict[bytes, str] = {}  # IPv4 bindings without UDP: the IPv4 CoA
        self._hoa4: dict[bytes, bytes] = {}  # IPv4 home address (4 octets) -> IPv6 HoA
        self.lookup: BindingLookup = self._coa.get
        self.home_of: Callable[[bytes], bytes | None] = self._hoa4.get

    def set_ipv4_hoa(self, hoa4: ipaddress.IPv4Address | bytes | str, hoa: ipaddress.IPv6Address | bytes | str) -> None:
        """Packets to the IPv4 home address ``hoa4`` go through the tunnel of ``hoa``."""
        self._hoa4[ipaddress.IPv4Address(hoa4).packed] = _addr16(hoa)

    def delete_ipv4_hoa(self, hoa4: ipaddress.IPv4Address | bytes | str) -> None:
        self._hoa4.pop(ipaddress.IPv4Address(hoa4).packed, None)

    def ipv4_hoas(self) -> dict[str, str]:
        return {str(ipaddress.IPv4Address(k)): str(ipaddress.IPv6Address(v)) for k, v in self._hoa4.items()}

    def set(self, hoa: ipaddress.IPv6Address | bytes | str, coa: ipaddress.IPv6Address | bytes | str) -> None:
        hoa16 = _addr16(hoa)
        self._coa[hoa16] = _addr16(coa)
        self._forget_ipv4(hoa16)

    def set_ipv4(self, hoa: ipaddress.IPv6Address | bytes | str, coa: ipaddress.IPv4Address | str, *,
                 udp_source: Ipv4Endpoint | None, udp_encap: bool) -> None:
        """An IPv4 care-of address (RFC 5555 4.5.1): data in UDP to ``udp_source`` (the recorded
        V4ADDR, Z) when ``udp_encap``, else IPv6-in-IPv4 to ``coa``."""
        hoa16 = _addr16(hoa)
        endpoint = endpoint_of(udp_source)
        self._forget_ipv4(hoa16)
        if udp_encap:
            if endpoint is None:
                raise MobilityError("UDP encapsulation needs the recorded outer address and port")
            self._coa[hoa16] = Ipv4Path(Encap.UDP, endpoint[0], endpoint[1])
        else:
            path = self._coa[hoa16] = ipip_path(coa)
            self._ipip_peer[hoa16] = path.dst
        if endpoint is not None:
            self._endpoint[hoa16] = endpoint

    def delete(self, hoa: ipaddress.IPv6Address | bytes | str) -> None:
        hoa16 = _addr16(hoa)
        self._coa.pop(hoa16, None)
        self._forget_ipv4(hoa16)

    def _forget_ipv4(self, hoa16: bytes) -> None:
        self._endpoint.pop(hoa16, None)
        self._ipip_peer.pop(hoa16, None)

    def endpoint(self, hoa16: bytes) -> Endpoint | None:
        """The outer (address, port) recorded for an IPv4 binding of ``hoa16``."""
        return self._endpoint.get(hoa16)

    def ipip_peer(self, hoa16: bytes) -> str | None:
        """The IPv4 CoA from which IPv6-in-IPv4 for ``hoa16`` is accepted."""
        return self._ipip_peer.get(hoa16)

    def ba_path(self, hoa16: bytes) -> Ipv4Path | None:
        """BAs always go in UDP to the recorded endpoint (RFC 5555 4.2)."""
        endpoint = self._endpoint.get(hoa16)
        return None if endpoint is None else Ipv4Path(Encap.UDP, endpoint[0], endpoint[1])

    def apply(self, events: Iterable[object]) -> None:
        """Apply ``BindingCreated`` / ``BindingUpdated`` / ``BindingDeleted``; ignore the rest.
        The entry's IPv4 home address (granted in the BA) maps to its HoA while the entry lives."""
        for ev in events:
            if isinstance(ev, (BindingCreated, BindingUpdated)):
                entry = ev.entry
                if entry.coa.version == 4:
                    self.set_ipv4(ev.hoa, entry.coa, udp_source=entry.udp_source, udp_encap=entry.udp_encap)
                else:
                    self.set(ev.hoa, entry.tunnel_destination)
                previous = getattr(ev, "previous", None)
                if previous is not None and previous.ipv4_hoa not in (None, entry.ipv4_hoa):
                    self.delete_ipv4_hoa(previous.ipv4_hoa)
                if entry.ipv4_hoa is not None:
                    self.set_ipv4_hoa(entry.ipv4_hoa, ev.hoa)
            elif isinstance(ev, BindingDeleted):
                self.delete(ev.hoa)
                if ev.entry.ipv4_hoa is not None:
                    self.delete_ipv4_hoa(ev.entry.ipv4_hoa)

    def __len__(self) -> int:
        return len(self._coa)


class HaTunnel(_TunnelBase):
    """The home agent's tunnel module. ``lookup(hoa16) -> coa16 | Ipv4Path | None`` is the binding
    cache (``BindingTable.lookup``); pass the ``BindingTable`` itself to have DSMIPv6 (it also
    holds the recorded outer endpoints). Control plane: ``expect_binding_ack(hoa, coa)`` before
    the mobility module sends a BA answering an authenticated BU from ``coa`` (an IPv6 CoA, or the
    ``Ipv4Endpoint`` from ``bu_udp_source``). ``inner_mtu``: cleartext packets for a HoA larger
    than this get a Packet Too Big (see ``MtuPlan``).

    DSMIPv6 (Req #4, draft 4.4): ``inbound_udp(payload, src, sport, now)`` for each datagram on
    the HA's UDP port 4191 records the outer address and port of a possible BU before IPsec and
    returns the IPv6 packet to write into the TUN; ``bu_udp_source(hoa, bu, now)`` gives the
    authenticated BU its record (``BindingCache.handle_binding_update(..., udp_source=)``);
    ``inbound_ipip`` takes IPv6-in-IPv4 data from a binding's IPv4 CoA. ``inbound_seq(spi)`` (api
    mode, optional): the engine's anti-replay right edge of an inbound SA, which picks the record
    of exactly the packet the engine authenticated (``mobility.io.udp4191.control_inbound_seq``)."""

    _COUNTS = ("out_signal", "out_data", "out_reinjected", "in_hao", "ptb", "out_udp", "out_ipip",
               "in_udp", "in_ipip", "in_recorded", "bu_udp")

    def __init__(
        self,
        ha: ipaddress.IPv6Address | bytes | str,
        lookup: BindingLookup | BindingTable,
        classifier: Classifier,
        *,
        path_mtu: int = DEFAULT_PATH_MTU,
        inner_mtu: int | None = None,
        tracing: bool = False,
        inbound_seq: InboundSeq | None = None,
        records: OuterRecords | None = None,
    ) -> None:
        super().__init__(classifier, path_mtu, tracing)
        self.ha = _addr16(ha)
        self.table = lookup if isinstance(lookup, BindingTable) else None
        self.lookup: BindingLookup = lookup.lookup if isinstance(lookup, BindingTable) else lookup
        self.inner_mtu = inner_mtu
        self.inbound_seq = inbound_seq
        self.records = records if records is not None else OuterRecords()
        self.expecting: set[bytes] = set()  # HoAs whose BA is about to come through the TUN
        self._ba_dst: dict[bytes, bytes | Ipv4Path] = {}  # HoA -> where the BA being answered goes
        self.seen: dict[bytes, bytes] = {}  # HoA -> source of its last Home Address option packet
        self.seq_failures = 0  # api: inbound_seq could not answer (the newest record is taken)

    # --- control plane ---

    def expect_binding_ack(self, hoa: ipaddress.IPv6Address | bytes | str,
                           coa: ipaddress.IPv6Address | bytes | str | Ipv4Endpoint | Ipv4Path) -> None:
        """The next BA to ``hoa`` answers a BU from ``coa``: it goes there (RFC 6275 9.5.4). For a
        BU that came in UDP/IPv4 ``coa`` is its ``Ipv4Endpoint`` (from ``bu_udp_source``): the BA
        goes back in UDP to that address and port, also when it rejects (RFC 5555 4.2)."""
        hoa16 = _addr16(hoa)
        if isinstance(coa, Ipv4Path):
            self._ba_dst[hoa16] = coa
        elif isinstance(coa, Ipv4Endpoint):
            self._ba_dst[hoa16] = udp_path(coa.address, coa.port)
        else:
            self._ba_dst[hoa16] = _addr16(coa)
        self.expecting.add(hoa16)

    def seen_coa(self, hoa: ipaddress.IPv6Address | bytes | str) -> bytes | None:
        """The source address of the last packet with a Home Address option for ``hoa``
        (unauthenticated: compare it with the BU's Alternate Care-of Address)."""
        return self.seen.get(_addr16(hoa))

    def bu_udp_source(self, hoa: ipaddress.IPv6Address | bytes | str, bu: BindingUpdate,
                      now: float) -> Ipv4Endpoint | None:
        """Req #4 after IPsec (draft 4.4.2): the outer IPv4 address and UDP port (V4ADDR, Z) the
        authenticated ``bu`` from ``hoa`` arrived from, for ``BindingCache.handle_binding_update(
        ..., udp_source=...)``, which compares it with the IPv4 Care-of Address option (NAT
        detection) and records it. None for a BU without that option (it came over IPv6; any
        records of ``hoa`` are dropped). Without a fresh record (a refresh from the binding's own
        endpoint, which the heuristic does not record) the binding's endpoint is the answer."""
        hoa16 = _addr16(hoa)
        option = find_option(bu.options, Ipv4CareOfAddress)
        if option is None:
            self.records.discard(hoa16)
            return None
        use_seq = self.inbound_seq is not None and self.classifier.mode is ClassifyMode.API
        taken = self.records.take(hoa16, now, self._seq_of if use_seq else None)
        spi = None
        if taken.candidate is not None:
            endpoint: Endpoint | None = taken.candidate.endpoint
            spi = taken.candidate.spi
            reason = Reason.RECORD_SEQ if taken.how == "seq" else Reason.RECORD_LATEST
        else:
            endpoint = self.table.endpoint(hoa16) if self.table is not None else None
            reason = Reason.NO_RECORD if endpoint is None else Reason.RECORD_BINDING
        self.reasons[reason] += 1
        self.counts["bu_udp"] += 1
        if self.tracing:
            outer = None if endpoint is None else f"udp {endpoint[0]}:{endpoint[1]}"
            self._trace("in", Kind.COMMIT, reason, spi, hoa16, option.coa.packed, outer=outer)
        return None if endpoint is None else to_ipv4_endpoint(endpoint)

    def _seq_of(self, spi: int) -> int | None:
        try:
            return self.inbound_seq(spi) if self.inbound_seq is not None else None
        except EngineQueryError:
            self.seq_failures += 1
            return None

    def expire_records(self, now: float) -> int:
        """Forget outer records no authenticated BU claimed (garbage); call now and then."""
        return self.records.expire(now)

    # --- data plane ---

    def outbound(self, packet: bytes, now: float) -> Output:
        """A packet the kernel routed into the TUN (route HoA/128 while a binding exists; an IPv4
        home address's route always)."""
        if packet[:1] and packet[0] >> 4 == 4:
            return self._plain4(packet)
        try:
            view = pull_esp_view(packet)
        except ParseError:
            return self._drop(TunnelDrop.MALFORMED)
        hoa = packet[24:40]
        if view is None or packet[8:24] != self.ha:
            return self._plain(packet, hoa)  # not our engine's ESP: have the engine protect it
        expecting = hoa in self.expecting
        signal, reason = self.classifier.outbound(self.ha, hoa, view.spi, expecting, now)
        self.reasons[reason] += 1
        if signal:
            return self._signal(packet, view, hoa, reason)
        return self._data(packet, view, hoa, reason)

    def _signal(self, packet: bytes, view: EspView, hoa: bytes, reason: Reason) -> Output:
        """BA (or MPA): to the CoA the BU came from, with a type 2 routing header (RFC 6275 6.4);
        to an IPv4 CoA unchanged in UDP to the BU's outer address and port (RFC 5555 4.2: the IPv6
        destination is already the HoA, no routing header)."""
        self.expecting.discard(hoa)
        coa = self._ba_dst.pop(hoa, None) or self.seen.get(hoa) or self._bound_ba_destination(hoa)
        if coa is None:
            return self._drop(TunnelDrop.NO_BINDING, "out", Kind.SIGNAL, reason, view.spi, hoa)
        if coa.__class__ is Ipv4Path:
            self.counts["out_signal"] += 1
            self.counts["out_udp"] += 1
            if self.tracing:
                self._trace("out", Kind.SIGNAL, reason, view.spi, hoa, _packed4(coa.dst),  # type: ignore[union-attr]
                            outer=coa.text())  # type: ignore[union-attr]
            return [(packet, coa)]  # type: ignore[list-item]
        if coa == hoa:
            return self._drop(TunnelDrop.LOOP, "out", Kind.SIGNAL, reason, view.spi, hoa)
        out = insert_header(packet, view, push_type2_routing_header(hoa, packet[view.nh_at]), _ROUTING)
        out[24:40] = coa
        if len(out) > self.path_mtu:
            return self._too_big(packet, RH2_OVERHEAD, self.ha, hoa)
        self.counts["out_signal"] += 1
        if self.tracing:
            self._trace("out", Kind.SIGNAL, reason, view.spi, hoa, coa)
        return [(bytes(out), Route.WIRE)]

    def _data(self, packet: bytes, view: EspView, hoa: bytes, reason: Reason) -> Output:
        """Req #1 (draft 4.1.2): after IPsec, destination HoA -> the binding's CoA."""
        coa = self.lookup(hoa)
        if coa is None:
            return self._drop(TunnelDrop.NO_BINDING, "out", Kind.DATA, reason, view.spi, hoa)
        if coa.__class__ is Ipv4Path:  # RFC 5555 4.2: unchanged, in UDP or IPv6-in-IPv4
            self.counts["out_data"] += 1
            self.counts["out_udp" if coa.encap is Encap.UDP else "out_ipip"] += 1  # type: ignore[union-attr]
            if self.tracing:
                self._trace("out", Kind.DATA, reason, view.spi, hoa, _packed4(coa.dst),  # type: ignore[union-attr]
                            outer=coa.text())  # type: ignore[union-attr]
            return [(packet, coa)]  # type: ignore[list-item]
        if len(packet) > self.path_mtu:
            return self._too_big(packet, 0, self.ha, hoa)
        self.counts["out_data"] += 1
        if self.tracing:
            self._trace("out", Kind.DATA, reason, view.spi, hoa, coa)
        return [(packet[:24] + coa + packet[40:], Route.WIRE)]

    def _plain(self, packet: bytes, hoa: bytes) -> Output:
        """A packet forwarded to a bound HoA that the engine has not protected (it hooks locally
        sent packets only): sent again as a local packet so the engine's OUTPUT hook applies the
        payload SA; its hop limit is decremented so that a loop ends."""
        if _link_local_or_multicast(packet):
            return self._drop(TunnelDrop.LINK_LOCAL, reason=Reason.NOT_ESP)
        if self.lookup(hoa) is None:
            return self._drop(TunnelDrop.NO_BINDING, reason=Reason.NOT_ESP, hoa=hoa)
        if packet[7] <= 1:
            return self._drop(TunnelDrop.HOP_LIMIT, reason=Reason.NOT_ESP, hoa=hoa)
        if self.inner_mtu is not None and len(packet) > self.inner_mtu:
            self.drops[TunnelDrop.TOO_BIG] += 1
            self.counts["ptb"] += 1
            if self.tracing:
                self._trace("out", Kind.PTB, Reason.NOT_ESP, None, hoa, None, TunnelDrop.TOO_BIG)
            mtu = max(self.inner_mtu, IPV6_MIN_MTU)
            return [(build_packet_too_big(packet, mtu, self.ha), Route.WIRE)]
        out = bytearray(packet)
        out[7] -= 1
        self.counts["out_reinjected"] += 1
        if self.tracing:
            self._trace("out", Kind.PLAIN, Reason.NOT_ESP, None, hoa, None)
        return [(bytes(out), Route.LOCAL)]

    def _plain4(self, packet: bytes) -> Output:
        """An IPv4 packet forwarded to an IPv4 home address (RFC 5555 4.5): like ``_plain``, sent
        again as a local packet so the engine's IPv4 OUTPUT hook puts it into the HoA's tunnel SA
        (IPv4 inside IPv6 ESP; the engine's adapter emits the IPv6 result, bits.io.crossfamily),
        its TTL decremented. The route of the IPv4 HoA has the inner MTU, so the kernel already
        fragmented or refused (DF) what would not fit."""
        if len(packet) < 20:
            return self._drop(TunnelDrop.MALFORMED, reason=Reason.NOT_ESP)
        hoa = self.table.home_of(packet[16:20]) if self.table is not None else None
        if hoa is None or self.lookup(hoa) is None:
            return self._drop(TunnelDrop.NO_BINDING, reason=Reason.NOT_ESP, hoa=hoa)
        if packet[8] <= 1:
            return self._drop(TunnelDrop.HOP_LIMIT, reason=Reason.NOT_ESP, hoa=hoa)
        if self.inner_mtu is not None and len(packet) > self.inner_mtu:
            return self._drop(TunnelDrop.TOO_BIG, reason=Reason.NOT_ESP, hoa=hoa)
        out = bytearray(packet)
        out[8] -= 1
        fix_ipv4_header(out)
        self.counts["out_reinjected"] += 1
        if self.tracing:
            self._trace("out", Kind.PLAIN, Reason.NOT_ESP, None, hoa, None)
        return [(bytes(out), Route.LOCAL)]

    def inbound(self, packet: bytes, now: float) -> bytes | TunnelDrop | None:
        """A packet in raw PREROUTING, before the engine. One with a Home Address option for us:
        source and option swapped (RFC 6275 9.3.1), the option retyped so the kernel skips it, the
        CoA recorded. None: leave it unchanged."""
        if len(packet) < IPV6_HEADER_LEN or packet[0] >> 4 != 6 or packet[24:40] != self.ha:
            return None
        try:
            found = _find_hao(packet)
        except ParseError:
            self.drops[TunnelDrop.MALFORMED] += 1
            return TunnelDrop.MALFORMED
        if found is None:
            return None
        opt, spi = found
        coa, hoa = packet[8:24], packet[opt + 2 : opt + 18]
        out = bytearray(packet)
        out[8:24] = hoa
        out[opt] = NEUTRAL_OPTION_TYPE
        out[opt + 2 : opt + 18] = coa  # after the swap the option holds the CoA (9.3.1)
        self._record(hoa, coa, spi, now)
        return bytes(out)

    def _bound_ba_destination(self, hoa: bytes) -> bytes | Ipv4Path | None:
        """No announced destination: the binding's -- for an IPv4 binding UDP to its endpoint."""
        dest = self.lookup(hoa)
        if dest.__class__ is Ipv4Path and self.table is not None:
            return self.table.ba_path(hoa)
        return dest

    def inbound_udp(self, payload: bytes, src: str, sport: int, now: float) -> bytes | TunnelDrop:
        """Req #4 before IPsec (draft 4.4.2): a datagram on the HA's UDP port 4191 from ``src``,
        ``sport`` (V4ADDR, Z). Its IPv6 packet must go to the HA and end in ESP. If it may be a
        BU -- api: the engine says its SPI is a BU SA; heuristic: its outer address/port differs
        from the binding's (a NAT-detection BU or garbage) or there is no binding -- the outer
        endpoint is recorded with its SPI and sequence number, and authentication decides
        (``bu_udp_source``). Returns the IPv6 packet to write into the TUN (the engine then
        decapsulates it in raw PREROUTING) or a counted drop; garbage is left to the engine."""
        view = inner_esp(payload, None, self.ha)
        if view.__class__ is not EspView:
            return self._in_drop(view, f"udp {src}:{sport}")  # type: ignore[arg-type]
        hoa, spi = payload[8:24], view.spi  # type: ignore[union-attr]
        endpoint = (src, sport)
        verdict = self.classifier.inbound_signal(spi, now)
        if verdict is None:
            record, reason = self._compare_outer(hoa, spi, endpoint, now)
        else:
            record, reason = verdict
        self.reasons[reason] += 1
        self.counts["in_udp"] += 1
        if record:
            self.records.record(hoa, spi, esp_seq(payload, view.esp_at), endpoint, now)  # type: ignore[union-attr]
            self.counts["in_recorded"] += 1
            self.seen.pop(hoa, None)  # a HAO source from an earlier IPv6 CoA is stale now
            self.expecting.add(hoa)
        if self.tracing:
            kind = Kind.SIGNAL if record else Kind.DATA
            self._trace("in", kind, reason, spi, hoa, None, outer=f"udp {src}:{sport}")
        return payload

    def _compare_outer(self, hoa: bytes, spi: int, endpoint: Endpoint, now: float) -> tuple[bool, Reason]:
        """Draft 4.4.2 heuristic: an outer address differing from the binding's means a NAT
        detection BU or garbage. We compare address *and* port with the recorded endpoint (the
        draft says "the IPv4 CoA previously recorded"; behind a NAT that would record every packet,
        and without a NAT it would miss a new source port)."""
        bound = self.table.endpoint(hoa) if self.table is not None else None
        if bound is None:
            return True, Reason.NO_BINDING
        if bound != endpoint:
            return True, Reason.OUTER_CHANGED
        self.records.saw_bound(hoa, spi, now)  # a refresh BU from the same place (or data)
        return False, Reason.OUTER_KNOWN

    def inbound_ipip(self, packet: bytes, now: float) -> bytes | TunnelDrop:
        """IPv6-in-IPv4 (protocol 41, IPv4 header included as a raw socket reads it): data from an
        MN without NAT and without F. Accepted only from the IPv4 CoA of the inner source's
        binding (BUs always come in UDP). Returns the IPv6 packet for the TUN or a drop."""
        try:
            outer = pull_ipv4_outer(packet)
        except ParseError:
            return self._in_drop(TunnelDrop.MALFORMED, "ipip")
        view = inner_esp(outer.payload, None, self.ha)
        if view.__class__ is not EspView:
            return self._in_drop(view, f"ipip {outer.src}")  # type: ignore[arg-type]
        hoa = outer.payload[8:24]
        peer = self.table.ipip_peer(hoa) if self.table is not None else None
        if peer is None or peer != outer.src:
            return self._in_drop(TunnelDrop.WRONG_PEER, f"ipip {outer.src}", hoa, view.spi)  # type: ignore[union-attr]
        self.counts["in_ipip"] += 1
        if self.tracing:
            self._trace("in", Kind.DECAP, None, view.spi, hoa, _packed4(outer.src),  # type: ignore[union-attr]
                        outer=f"ipip {outer.src}")
        return outer.payload

    def _record(self, hoa: bytes, coa: bytes, spi: int | None, now: float) -> None:
        """Draft 4.4.2: is this a BU (record its CoA before IPsec)? api: the SPI's selectors say so;
        heuristic: the source differs from the binding's CoA -- a BU from a new CoA, or garbage that
        authentication will drop. Either way the next BA to ``hoa`` is expected."""
        verdict = self.classifier.inbound_signal(spi, now) if spi is not None else None
        if verdict is None:
            bound = self.lookup(hoa)
            is_bu = True
            reason = Reason.NO_BINDING if bound is None else (
                Reason.COA_KNOWN if bound == coa else Reason.COA_CHANGED)
        else:
            is_bu, reason = verdict
        self.reasons[reason] += 1
        self.counts["in_hao"] += 1
        if is_bu:
            if hoa not in self.seen and len(self.seen) >= SEEN_COA_LIMIT:
                self.seen.pop(next(iter(self.seen)))
            self.seen[hoa] = coa
            self.expecting.add(hoa)
        if self.tracing:
            self._trace("in", Kind.HAO, reason, spi, hoa, coa)

    def status(self) -> dict[str, Any]:
        st = super().status()
        st.update(ha=_text(self.ha), expecting=sorted(_text(h) for h in self.expecting),  # type: ignore[type-var]
                  records=dict(self.records.counts), pending_records=len(self.records))
        return st


def _find_hao(packet: bytes) -> tuple[int, int | None] | None:
    """Offset of the Home Address option's Type octet in the Destination Options header before
    ESP/the upper layer, and the SPI when ESP follows; None without the option."""
    end = IPV6_HEADER_LEN + _H.unpack_from(packet, 4)[0]
    if end > len(packet):
        raise ParseError("IPv6 Payload Length beyond the packet")
    nh, off, opt = packet[6], IPV6_HEADER_LEN, -1
    while nh in _EXT_HEADERS:
        if off + 8 > end:
            raise ParseError("truncated IPv6 extension header")
        hlen = (packet[off + 1] + 1) * 8
        if off + hlen > end:
            raise ParseError("IPv6 extension header beyond the packet")
        if nh == _DSTOPTS and opt < 0:
            opt = _hao_in(packet, off + 2, off + hlen)
        nh, off = packet[off], off + hlen
    if opt < 0:
        return None
    spi = _I.unpack_from(packet, off)[0] if nh == _ESP and off + 4 <= end else None
    return opt, spi


def _hao_in(packet: bytes, i: int, end: int) -> int:
    while i < end:
        otype = packet[i]
        if otype == 0:  # Pad1
            i += 1
            continue
        if i + 2 > end or i + 2 + packet[i + 1] > end:
            raise ParseError("destination option beyond its header")
        if otype == HAO_OPTION_TYPE:
            if packet[i + 1] != HAO_DATA_LEN:
                raise ParseError("Home Address option length is not 16")
            return i
        i += 2 + packet[i + 1]
    return -1


__all__ = [
    "HA_SIGNALS",
    "MN_SIGNALS",
    "ApiClassifier",
    "BindingTable",
    "ClassifyMode",
    "EngineQueryError",
    "EspShape",
    "EspView",
    "HaTunnel",
    "HeuristicClassifier",
    "Ipv4Path",
    "Kind",
    "MnState",
    "MnTunnel",
    "MtuPlan",
    "Reason",
    "Route",
    "SpiLearner",
    "TunnelDrop",
    "TunnelTrace",
    "answer_is_binding_update",
    "build_packet_too_big",
    "esp_shape",
    "esp_tunnel_size",
    "inner_esp",
    "insert_header",
    "make_classifier",
    "pull_esp_view",
    "transport_spi",
    "tunnel_mtus",
]
