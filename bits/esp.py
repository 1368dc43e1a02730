"""Sans-I/O ESP (RFC 4303): one ``SecurityAssociation`` per SA, whole IP packets in and out.

    sa = SecurityAssociation(params, rand=os.urandom, reserver=FileSeqReserver(dir), now=t)
    out = sa.encapsulate(packet, now)            # bytes, or a typed Drop
    inner = sa.decapsulate(packet, esp_offset, now)
    spi, seq = peek_spi_seq(packet, esp_offset)  # for the SAD lookup, before decapsulate

Outbound (RFC 4303 section 3.3): sequence counter + 1 (never cycles, section 3.3.3) -> padding,
Pad Length, Next Header -> encrypt + ICV (``bits/transforms.py``) -> outer header. Tunnel mode
builds a fresh outer header from the SA addresses (RFC 4301 section 5.1.2: DSCP and ECN copied,
IPv6 flow label copied, hop limit / TTL 64). Transport mode inserts ESP where ``bits.ip.pull_ip``
says (RFC 4303 section 3.1.1) and fixes the lengths.

Inbound (RFC 4303 section 3.4): replay pre-check -> ICV / AEAD open -> window commit -> padding
check -> Next Header 59 dummies dropped -> inner packet (tunnel) or rebuilt packet (transport).

Nothing here raises on bad packets: every failure is a ``Drop`` with a ``DropReason`` and a
per-SA counter. Exceptions are for misuse (``encapsulate`` on an inbound SA) and configuration.

Lifetimes (RFC 4301 section 4.4.2.1): soft and hard limits in bytes (cleartext payload octets),
packets and seconds since the SA was added. Reaching a soft limit appends one ``SaLifetimeEvent``
to ``sa.events``; reaching a hard limit appends one and makes the SA refuse every further packet
(``Drop(SA_EXPIRED)``). The packet that reaches a hard byte/packet limit is still processed.
When soft and hard limits are reached together only the hard event is reported.

Anti-replay across restarts: an inbound SA given a store (``bits.seqstore.ReplayStore``) starts
its window at the saved right edge with the whole window marked seen, saves the edge while it
moves (``next_timer``/``handle_timer``, at most every ``REPLAY_SAVE_INTERVAL`` seconds, no fsync)
and durably on ``flush()``, which the adapter calls on a clean stop. ``docs/esp.md`` section 2.

Speed: the MIPv6 data path is tunnel mode, IPv6 in IPv6, with an AEAD. For that case the SA binds
``encapsulate``/``decapsulate`` to fast paths (``_encap_fast6``/``_decap_fast6``) that inline the
AEAD call and hand anything unusual (other versions, ESN, reservation, out-of-order, bad input) to
the generic paths, which are the reference behaviour; tests check that the two agree.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from cryptography.exceptions import InvalidTag

from .constants import (
    ESP_HEADER_LEN,
    ESP_TRAILER_LEN,
    MAX_SEQ32,
    MAX_SEQ64,
    SEQ_RESERVE_BLOCK,
    Direction,
    IpProto,
    Mode,
)
from .errors import BitsError, ConfigError, ParseError
from .ip import fix_ipv4_header, pull_ip, push_ipv4_header, push_ipv6_header
from .replay import ReplayCheck, ReplayWindow
from .sa import SaParams
from .seqstore import (
    ReplayStore,
    SeqReserver,
    SeqStoreError,
    replay_fingerprint,
    sa_fingerprint,
)
from .transforms import PAD, Rand, Transform, is_aead, make_transform
from .verdict import Drop, DropReason

# --- Specification -------------------------------------------------------------------------------

_PROTO_ESP = IpProto.ESP.value
_NH_IPV4 = IpProto.IPV4.value
_NH_IPV6 = IpProto.IPV6.value
_NH_NONE = IpProto.NONE.value  # dummy packet (RFC 4303 section 2.6)
_IPV6_HDR = 40
_IPV4_MIN_HDR = 20
_MAX_IP_LEN = 0xFFFF  # IPv4 Total Length / IPv6 Payload Length (no jumbograms)
_CE, _ECT0, _ECT1 = 3, 2, 1  # ECN codepoints (RFC 3168 section 5)
_V6_EXT_HEADERS = frozenset({0, 43, 44, 60, 51})  # hop-by-hop, routing, fragment, dest-opts, AH
_AEAD_OVERHEAD = ESP_HEADER_LEN + 8 + 16  # header + IV + ICV of the AEAD transforms

# --- Implementation ------------------------------------------------------------------------------

TUNNEL_HOP_LIMIT = 64  # fresh hop limit / TTL of the outer header (RFC 4301 section 5.1.2)
#: Seconds between two saves of a moving inbound right edge (no fsync; ``flush()`` syncs). A crash
#: (kill -9) can re-open at most the sequence numbers accepted since the last save.
REPLAY_SAVE_INTERVAL = 1.0

_SPI_SEQ = struct.Struct("!II")
_H = struct.Struct("!H")
_V4_HEAD = struct.Struct("!BBHHHBBH")  # version/IHL .. checksum; addresses follow
_V6_WORD = struct.Struct("!I")
# fast path: outer IPv6 header (first word copied from the inner one: "4s" packs the first four
# octets of the whole inner packet, saving a slice) + the constant rest of the header and the SPI
# + Seq, IV = Seq; the bound pack functions save two attribute lookups per packet
_pack_fast6_head = struct.Struct("!4sH38sIQ").pack
_pack_nonce = struct.Struct("!4sQ").pack
_unpack_h = _H.unpack_from
_unpack_spi_seq = _SPI_SEQ.unpack_from
#: Largest inner IPv6 packet the fast path takes: ESP overhead and 3 octets of padding still fit
#: in the 16-bit Payload Length.
_FAST6_MAX_INNER = _MAX_IP_LEN - _AEAD_OVERHEAD - ESP_TRAILER_LEN - 3
_INF = float("inf")
_UNLIMITED = 1 << 80  # "no limit" for the packet/byte limits: int-int compares stay fast
#: Fast path: inner IPv6 packet length -> (outer Payload Length, padding || Pad Length || Next
#: Header 41) for the AEAD transforms (4-octet alignment, 32 octets of overhead). Filled on first
#: use of a length; at most one small entry per possible length.
_FAST6_SIZES: dict[int, tuple[int, bytes]] = {}
_fast6_size = _FAST6_SIZES.get

LifetimeKind = Literal["soft", "hard"]
LifetimeLimit = Literal["bytes", "packets", "seconds"]


@dataclass(frozen=True, slots=True)
class SaLifetimeEvent:
    """A soft or hard lifetime limit was reached (RFC 4301 section 4.4.2.1)."""

    spi: int
    kind: LifetimeKind
    limit: LifetimeLimit


@dataclass(slots=True)
class SaStats:
    """Per-SA counters. ``packets``/``bytes`` are what the lifetimes count: packets protected
    (outbound) or authenticated (inbound, dummies included) and their cleartext payload octets.
    ``sa.stats`` returns this object with the outbound counters brought up to date."""

    packets: int = 0
    bytes: int = 0
    replay_drops: int = 0
    auth_failures: int = 0
    other_drops: int = 0
    replay_save_errors: int = 0  # periodic saves of the inbound right edge that failed


def peek_spi_seq(packet: bytes, esp_offset: int) -> tuple[int, int]:
    """SPI and (low 32 bits of the) sequence number of the ESP header at ``esp_offset``.

    Raises ParseError if the header is truncated.
    """
    if esp_offset < 0 or len(packet) < esp_offset + ESP_HEADER_LEN:
        raise ParseError("truncated ESP header")
    return _SPI_SEQ.unpack_from(packet, esp_offset)  # type: ignore[return-value]


class SecurityAssociation:
    """One ESP SA: immutable ``params`` + keyed ``transform`` + the small mutable per-SA state
    (sequence counter, replay window, lifetime usage and flags, statistics, pending events).

    ``encapsulate(packet, now) -> bytes | Drop`` and
    ``decapsulate(packet, esp_offset, now) -> bytes | Drop`` are bound at construction to the
    path that fits the SA (see the module docstring); call them like methods.
    """

    encapsulate: Callable[[bytes, float], bytes | Drop]
    decapsulate: Callable[[bytes, int, float], bytes | Drop]

    __slots__ = (
        "params",
        "spi",
        "sa_id",
        "transform",
        "seq",
        "replay",
        "_stats",
        "events",
        "added_at",
        "soft_fired",
        "hard_expired",
        "encapsulate",
        "decapsulate",
        "_reserver",
        "_reserved",
        "_max_seq",
        "_esn",
        "_tunnel",
        "_overhead",
        "_ct_align",
        "_outer_v6",
        "_outer_tail",
        "_outer_sum",
        "_head6",
        "_seq0",
        "_fast_seq_max",
        "_tx_bytes",
        "_salt",
        "_aead_encrypt",
        "_aead_decrypt",
        "_soft_deadline",
        "_hard_deadline",
        "_deadline",
        "_lim_packets",
        "_lim_bytes",
        "_rx_store",
        "_rx_id",
        "_rx_saved",
        "_rx_synced",
        "_rx_save_due",
    )

    def __init__(
        self,
        params: SaParams,
        *,
        rand: Rand,
        reserver: SeqReserver | None = None,
        now: float,
    ) -> None:
        """Build the SA. An outbound SA with a ``reserver`` continues after the persisted mark
        (``bits/seqstore.py``); without one its counter starts at 0 (RFC 4303 section 3.3.3).
        An inbound SA whose ``reserver`` is also a ``ReplayStore`` resumes its anti-replay
        window at the saved right edge and keeps saving it; without one the window starts empty.
        Raises ConfigError for bad algorithms/keys/window, SeqStoreError if the mark or right
        edge is unreadable."""
        self.params = params
        self.spi = params.spi
        self.transform: Transform = make_transform(params, rand)
        self.sa_id = sa_fingerprint(params)
        self.replay = ReplayWindow(params.replay_window)
        self._stats = SaStats()
        self._tx_bytes = 0
        self.events: list[SaLifetimeEvent] = []
        self._esn = params.esn
        self._max_seq = MAX_SEQ64 if params.esn else MAX_SEQ32
        self._reserver = reserver
        self._init_sequence(params.direction is Direction.OUT)
        self._init_replay_store(params, now)
        t = self.transform
        self._tunnel = params.mode is Mode.TUNNEL
        self._overhead = ESP_HEADER_LEN + t.iv_len + t.icv_len
        self._ct_align = t.block if t.iv_len == 16 else 1  # CBC: whole blocks only
        self._init_outer(params)
        self._init_lifetimes(params, now)
        self._bind_paths()

    def _init_sequence(self, outbound: bool) -> None:
        if not outbound:
            self.seq = 0
            self._reserved = -1  # encapsulate() on an inbound SA lands in _reserve() and raises
        elif self._reserver is None:
            self.seq = 0
            self._reserved = self._max_seq
        else:
            self.seq = self._reserver.load(self.sa_id)
            self._reserved = self.seq
        self._seq0 = self.seq  # outbound: packets protected = seq - _seq0

    def _init_replay_store(self, params: SaParams, now: float) -> None:
        """Inbound: resume the window at the saved right edge (``ReplayWindow.restore``)."""
        store = self._reserver
        self._rx_store = None
        self._rx_id = ""
        self._rx_saved = self._rx_synced = 0
        self._rx_save_due = now  # the first movement is saved at the next timer run
        if params.direction is Direction.OUT or not isinstance(store, ReplayStore):
            return
        self._rx_id = replay_fingerprint(params)
        top = store.load_top(self._rx_id)
        if top > self._max_seq:
            raise SeqStoreError(f"SA spi={params.spi:#x}: saved right edge {top} out of range")
        self.replay.restore(top)
        self._rx_store = store
        self._rx_saved = self._rx_synced = top

    def _init_outer(self, params: SaParams) -> None:
        """Precompute the constant part of the tunnel-mode outer header (RFC 4301 5.1.2)."""
        if params.src.version != params.dst.version:
            raise ConfigError(f"SA spi={params.spi:#x}: source and destination IP versions differ")
        src, dst = params.src.packed, params.dst.packed
        self._outer_v6 = params.dst.version == 6
        if self._outer_v6:
            tmpl = push_ipv6_header(src, dst, _PROTO_ESP, 0, hop_limit=TUNNEL_HOP_LIMIT)
            self._outer_tail = tmpl[6:]  # Next Header, Hop Limit, addresses
            self._outer_sum = 0
        else:
            tmpl = push_ipv4_header(src, dst, _PROTO_ESP, 0, ttl=TUNNEL_HOP_LIMIT)
            self._outer_tail = tmpl[12:]  # addresses
            # one's complement sum of the constant fields, recovered from the template checksum
            self._outer_sum = ~_H.unpack_from(tmpl, 10)[0] & 0xFFFF

    def _init_lifetimes(self, params: SaParams, now: float) -> None:
        self.added_at = now
        self.soft_fired = False
        self.hard_expired = False
        soft, hard = params.soft.seconds, params.hard.seconds
        self._soft_deadline = _INF if soft is None else now + soft
        self._hard_deadline = _INF if hard is None else now + hard
        self._refresh_limits()

    def _bind_paths(self) -> None:
        t = self.transform
        fast = self._tunnel and self._outer_v6 and not self._esn and is_aead(t)
        if fast:
            self._head6 = self._outer_tail + _V6_WORD.pack(self.spi)
            self._salt = t.salt  # type: ignore[attr-defined]
            self._aead_encrypt = t.aead.encrypt  # type: ignore[attr-defined]
            self._aead_decrypt = t.aead.decrypt  # type: ignore[attr-defined]
            self.encapsulate = self._encap_fast6
            self.decapsulate = self._decap_fast6
        else:
            self.encapsulate = self._encap_tunnel if self._tunnel else self._encap_transport
            self.decapsulate = self._decap

    # --- outbound ---------------------------------------------------------------------------------

    def _encap_fast6(self, packet: bytes, now: float) -> bytes | Drop:
        """Tunnel mode, IPv6 in IPv6, AEAD, 32-bit sequence numbers: ``_encap_tunnel`` with the
        transform inlined. The outer header copies the inner first word (version, traffic class,
        flow label); the IV is the sequence number, the AAD is SPI || Seq (RFC 4106 section 5).

        One compare against ``_fast_seq_max`` covers the reservation mark, the end of the
        sequence space and the packet lifetime limits; the packet count is ``seq - _seq0``."""
        n = len(packet)
        sizes = _fast6_size(n)
        if sizes is None:
            return self._encap_fast6_new_size(packet, now)
        seq = self.seq + 1
        if now >= self._deadline or seq > self._fast_seq_max or packet[0] >> 4 != 6:
            return self._encap_tunnel(packet, now)
        self.seq = seq
        plen, trailer = sizes
        head = _pack_fast6_head(packet, plen, self._head6, seq, seq)
        out = head + self._aead_encrypt(_pack_nonce(self._salt, seq), packet + trailer, head[40:48])
        total = self._tx_bytes = self._tx_bytes + n
        if total >= self._lim_bytes:
            self._usage_limit_reached()
        return out

    def _encap_fast6_new_size(self, packet: bytes, now: float) -> bytes | Drop:
        """First packet of a length: add it to ``_FAST6_SIZES`` if the fast path can take it."""
        n = len(packet)
        if not _IPV6_HDR <= n <= _FAST6_MAX_INNER:
            return self._encap_tunnel(packet, now)
        pad = -(n + 2) & 3
        trailer = self.transform.trailers[(pad << 8) | _NH_IPV6]
        _FAST6_SIZES[n] = (n + 2 + pad + _AEAD_OVERHEAD, trailer)
        return self._encap_fast6(packet, now)

    def _encap_tunnel(self, packet: bytes, now: float) -> bytes | Drop:
        """Tunnel mode (RFC 4303 section 3.1.2): outer header from the SA, ESP, inner packet."""
        if now >= self._deadline and self._expired_at(now):
            return self._drop(DropReason.SA_EXPIRED)
        n = len(packet)
        if n < _IPV4_MIN_HDR:
            return self._drop(DropReason.MALFORMED, detail="short inner packet")
        b0 = packet[0]
        if b0 >> 4 == 6 and n >= _IPV6_HDR:
            nh, tos = _NH_IPV6, ((b0 & 0x0F) << 4) | (packet[1] >> 4)
        elif b0 >> 4 == 4:
            nh, tos = _NH_IPV4, packet[1]
        else:
            return self._drop(DropReason.MALFORMED, detail="inner IP version")
        t = self.transform
        plaintext = packet + t.trailers[((-(n + 2) % t.block) << 8) | nh]
        esp_len = self._overhead + len(plaintext)
        if esp_len + (0 if self._outer_v6 else _IPV4_MIN_HDR) > _MAX_IP_LEN:
            return self._drop(DropReason.TOO_BIG)
        seq = self.seq + 1
        if seq > self._reserved and (drop := self._reserve(seq)) is not None:
            return drop
        self.seq = seq
        esp = t.seal(self.spi, seq, plaintext)
        if self._outer_v6:
            if nh == _NH_IPV6:  # version, traffic class and flow label copied as they are
                word = packet[:4]
            else:
                word = _V6_WORD.pack(0x60000000 | tos << 20)
            out = word + _H.pack(esp_len) + self._outer_tail + esp
        else:
            df = nh == _NH_IPV4 and packet[6] & 0x40
            out = self._outer_ipv4(tos, _IPV4_MIN_HDR + esp_len, seq & 0xFFFF, df) + esp
        self._account_out(n)
        return out

    def _outer_ipv4(self, tos: int, total: int, ident: int, df: int) -> bytes:
        """Outer IPv4 header; checksum updated from the precomputed constant sum (RFC 1624).

        DF is copied from an IPv4 inner packet and clear for IPv6 inner packets (RFC 4213 3.2);
        the Identification is the low 16 bits of the sequence number: unique per SA and source.
        """
        frag = 0x4000 if df else 0
        s = self._outer_sum + tos + total + ident + frag
        s = (s & 0xFFFF) + (s >> 16)
        s = (s & 0xFFFF) + (s >> 16)
        head = _V4_HEAD.pack(
            0x45, tos, total, ident, frag, TUNNEL_HOP_LIMIT, _PROTO_ESP, ~s & 0xFFFF
        )
        return head + self._outer_tail

    def _encap_transport(self, packet: bytes, now: float) -> bytes | Drop:
        """Transport mode: ESP goes between the IP header chain and the upper layer (RFC 4303
        3.1.1); the header before it gets Next Header 50, ESP carries the original value."""
        if now >= self._deadline and self._expired_at(now):
            return self._drop(DropReason.SA_EXPIRED)
        try:
            info = pull_ip(packet)
        except ParseError:
            return self._drop(DropReason.MALFORMED, detail="IP header")
        if info.fragment:
            return self._drop(DropReason.FRAGMENT)  # transport ESP is applied before fragmenting
        end = _ip_end(packet, info.version)
        if end < 0:
            return self._drop(DropReason.MALFORMED, detail="IPv6 jumbogram")
        off, nh_off = info.esp_offset, info.nh_offset
        payload = packet[off:end]
        t = self.transform
        plaintext = payload + t.trailers[((-(len(payload) + 2) % t.block) << 8) | packet[nh_off]]
        total = off + self._overhead + len(plaintext)
        if total - (_IPV6_HDR if info.version == 6 else 0) > _MAX_IP_LEN:
            return self._drop(DropReason.TOO_BIG)
        seq = self.seq + 1
        if seq > self._reserved and (drop := self._reserve(seq)) is not None:
            return drop
        self.seq = seq
        head = bytearray(packet[:off])
        head[nh_off] = _PROTO_ESP
        _set_ip_length(head, info.version, total)
        self._account_out(len(payload))
        return bytes(head) + t.seal(self.spi, seq, plaintext)

    def _reserve(self, seq: int) -> Drop | None:
        """Slow path of the sequence counter: direction misuse, exhaustion (RFC 4303 3.3.3: the
        counter never cycles), or the next durable reservation block (``bits/seqstore.py``)."""
        if self.params.direction is not Direction.OUT:
            raise BitsError(f"encapsulate() on inbound SA spi={self.spi:#x}")
        if seq > self._max_seq:
            return self._drop(DropReason.SEQ_EXHAUSTED, seq=seq)
        upto = min(seq - 1 + SEQ_RESERVE_BLOCK, self._max_seq)
        try:
            self._reserver.reserve(self.sa_id, upto)  # type: ignore[union-attr]
        except (SeqStoreError, OSError) as exc:
            return self._drop(DropReason.SEQ_NOT_PERSISTED, seq=seq, detail=str(exc))
        self._reserved = upto
        self._refresh_fast_seq_max()
        return None

    # --- inbound ----------------------------------------------------------------------------------

    def _decap_fast6(self, packet: bytes, esp_offset: int, now: float) -> bytes | Drop:
        """``_decap`` for an AEAD tunnel SA when the packet is IPv6 and in order (seq right of the
        window); the common success case is finished inline, everything else by the general
        code."""
        n = len(packet)
        if (
            now >= self._deadline
            or n < esp_offset + _AEAD_OVERHEAD + ESP_TRAILER_LEN
            or esp_offset < _IPV6_HDR
            or packet[0] >> 4 != 6
            or _IPV6_HDR + _unpack_h(packet, 4)[0] != n
        ):
            return self._decap(packet, esp_offset, now)
        spi, seq = _unpack_spi_seq(packet, esp_offset)
        replay = self.replay
        if spi != self.spi or seq <= replay.top:
            return self._decap(packet, esp_offset, now)
        iv = esp_offset + ESP_HEADER_LEN
        try:
            plaintext = self._aead_decrypt(
                self._salt + packet[iv : iv + 8], packet[iv + 8 :], packet[esp_offset:iv]
            )
        except InvalidTag:
            self._stats.auth_failures += 1
            return Drop(DropReason.AUTH_FAILED, spi, seq)
        replay.commit(seq)
        pad = plaintext[-2]
        size = len(plaintext) - 2 - pad
        if (
            plaintext[-1] != _NH_IPV6
            or size < _IPV6_HDR
            or _IPV6_HDR + _unpack_h(plaintext, 4)[0] != size
            or packet[1] & 0x30  # outer ECN set: RFC 6040 folding
            or plaintext[0] >> 4 != 6
            or (pad and plaintext[size:-2] != PAD[:pad])
        ):
            return self._deliver(packet, esp_offset, 6, 0, plaintext, seq)
        st = self._stats
        st.packets += 1
        st.bytes += size
        if st.packets >= self._lim_packets or st.bytes >= self._lim_bytes:
            self._usage_limit_reached()
        return plaintext[:size]

    def _decap(self, packet: bytes, esp_offset: int, now: float) -> bytes | Drop:
        """Verify and strip the ESP header at ``esp_offset`` (RFC 4303 section 3.4).

        Tunnel mode returns the inner IP packet; transport mode returns the packet rebuilt with
        the original Next Header and lengths. The caller found this SA by the SPI.
        """
        if now >= self._deadline and self._expired_at(now):
            return self._drop(DropReason.SA_EXPIRED)
        if len(packet) < _IPV4_MIN_HDR or esp_offset < _IPV4_MIN_HDR:
            return self._drop(DropReason.MALFORMED, detail="short packet")
        version = packet[0] >> 4
        end = _ip_end(packet, version)
        ct_len = end - esp_offset - self._overhead
        if end > len(packet) or ct_len < ESP_TRAILER_LEN or ct_len % self._ct_align:
            return self._drop(DropReason.MALFORMED, detail="ESP length")
        nh_off = 0 if self._tunnel else _nh_offset(packet, version, esp_offset)
        if nh_off < 0:
            return self._drop(DropReason.MALFORMED, detail="header chain to ESP")
        spi, seq = _SPI_SEQ.unpack_from(packet, esp_offset)
        if spi != self.spi:
            return self._drop(DropReason.UNKNOWN_SPI, seq=seq)
        replay = self.replay
        if self._esn:
            seq = replay.infer(seq)
        verdict = replay.check(seq)
        if verdict:
            self._stats.replay_drops += 1
            return Drop(DropReason.REPLAY, self.spi, seq, _REPLAY_DETAIL[verdict])
        plaintext = self.transform.open(packet, esp_offset, end, seq)
        if plaintext is None:
            self._stats.auth_failures += 1
            return Drop(DropReason.AUTH_FAILED, self.spi, seq)
        replay.commit(seq)  # only now: the ICV verified (RFC 4303 3.4.3 step 5)
        return self._deliver(packet, esp_offset, version, nh_off, plaintext, seq)

    def _deliver(
        self, packet: bytes, esp_offset: int, version: int, nh_off: int, plaintext: bytes, seq: int
    ) -> bytes | Drop:
        """After authentication: padding check, dummies, then the inner or rebuilt packet."""
        pad, nh = plaintext[-2], plaintext[-1]
        size = len(plaintext) - 2 - pad
        if size < 0 or (pad and plaintext[size:-2] != PAD[:pad]):
            return self._drop(DropReason.BAD_PADDING, seq=seq)
        self._account(size)
        if nh == _NH_NONE:
            return self._drop(DropReason.DUMMY, seq=seq)
        if self._tunnel:
            return self._inner_packet(packet, plaintext, size, nh, seq)
        head = bytearray(packet[:esp_offset])
        head[nh_off] = nh
        _set_ip_length(head, version, esp_offset + size)
        return bytes(head) + plaintext[:size]

    def _inner_packet(
        self, outer: bytes, plaintext: bytes, size: int, nh: int, seq: int
    ) -> bytes | Drop:
        """Tunnel mode: the inner packet, cut to its own length (dropping any TFC padding, RFC
        4303 section 2.4) and with the outer ECN folded in (RFC 6040 section 4.2)."""
        if nh == _NH_IPV6:
            if size < _IPV6_HDR or plaintext[0] >> 4 != 6:
                return self._drop(DropReason.MALFORMED, seq=seq, detail="inner IPv6 header")
            length = _IPV6_HDR + _H.unpack_from(plaintext, 4)[0]
            inner_ecn = (plaintext[1] >> 4) & 3
        elif nh == _NH_IPV4:
            if size < _IPV4_MIN_HDR or plaintext[0] >> 4 != 4:
                return self._drop(DropReason.MALFORMED, seq=seq, detail="inner IPv4 header")
            length = _H.unpack_from(plaintext, 2)[0]
            inner_ecn = plaintext[1] & 3
        else:
            return self._drop(DropReason.BAD_NEXT_HEADER, seq=seq, detail=str(nh))
        if length > size:
            return self._drop(DropReason.MALFORMED, seq=seq, detail="inner length")
        inner = plaintext[:length]
        outer_ecn = (outer[1] >> 4) & 3 if outer[0] >> 4 == 6 else outer[1] & 3
        if outer_ecn and outer_ecn != inner_ecn:
            return self._fold_ecn(inner, nh, inner_ecn, outer_ecn, seq)
        return inner

    def _fold_ecn(
        self, inner: bytes, nh: int, inner_ecn: int, outer_ecn: int, seq: int
    ) -> bytes | Drop:
        """RFC 6040 section 4.2 decapsulation table, for an outer ECN that is set and differs
        from the inner one."""
        if inner_ecn == 0:
            if outer_ecn == _CE:  # the congestion mark cannot be passed on: drop (RFC 6040 4.2)
                return self._drop(DropReason.MALFORMED, seq=seq, detail="outer CE, inner Not-ECT")
            return inner
        if outer_ecn == _CE:
            new = _CE
        elif outer_ecn == _ECT1 and inner_ecn == _ECT0:
            new = _ECT1
        else:
            return inner
        buf = bytearray(inner)
        if nh == _NH_IPV6:
            buf[1] = (buf[1] & 0xCF) | (new << 4)
        else:
            buf[1] = (buf[1] & 0xFC) | new
            fix_ipv4_header(buf)
        return bytes(buf)

    # --- lifetimes (RFC 4301 section 4.4.2.1) -----------------------------------------------------

    def next_timer(self) -> float | None:
        """Absolute time of the next pending seconds limit or right-edge save, or None."""
        if self.hard_expired:
            t = _INF
        else:
            t = min(_INF if self.soft_fired else self._soft_deadline, self._hard_deadline)
        if self._rx_store is not None and self.replay.top > self._rx_saved:
            t = min(t, self._rx_save_due)
        return None if t == _INF else t

    def handle_timer(self, now: float) -> None:
        """Save a moved inbound right edge when due; fire the soft/hard seconds limits."""
        if self._rx_store is not None and now >= self._rx_save_due:
            self._save_top(now)
        if self.hard_expired:
            return
        if now >= self._hard_deadline:  # checked first: a soft event for a dead SA is noise
            self._fire_hard("seconds")
        elif not self.soft_fired and now >= self._soft_deadline:
            self._fire_soft("seconds")
        self._refresh_limits()

    # --- anti-replay state across restarts (docs/esp.md section 2) --------------------------------

    def _save_top(self, now: float) -> None:
        """Periodic, non-durable save of the right edge T (survives kill -9, not a power loss).
        A failure is counted and retried after the next interval; packets are not refused."""
        top = self.replay.top
        if top <= self._rx_saved:
            return
        self._rx_save_due = now + REPLAY_SAVE_INTERVAL
        try:
            self._rx_store.save_top(self._rx_id, top, durable=False)  # type: ignore[union-attr]
        except (SeqStoreError, OSError):
            self._stats.replay_save_errors += 1
            return
        self._rx_saved = top

    def flush(self) -> None:
        """Make the inbound right edge durable: call on a clean stop (and before a reload builds
        new SAs from the same store). Afterwards a restart accepts no packet this SA accepted.
        Cheap and idempotent (no I/O unless T moved since the last durable save); the SA keeps
        working. A no-op for outbound SAs, whose reservations are always durable first.
        Raises SeqStoreError if the store fails."""
        top = self.replay.top
        if self._rx_store is None or top <= self._rx_synced:
            return
        try:
            self._rx_store.save_top(self._rx_id, top, durable=True)
        except (SeqStoreError, OSError) as exc:
            raise SeqStoreError(f"SA spi={self.spi:#x}: right edge not saved: {exc}") from exc
        self._rx_saved = self._rx_synced = top

    def _expired_at(self, now: float) -> bool:
        self.handle_timer(now)
        return self.hard_expired

    @property
    def stats(self) -> SaStats:
        """The SA's counters (outbound packets and bytes are kept apart by the hot path)."""
        st = self._stats
        if self.params.direction is Direction.OUT:
            st.packets = self.seq - self._seq0
            st.bytes = self._tx_bytes
        return st

    def _account_out(self, size: int) -> None:
        """A packet was protected (its sequence number is already counted in ``seq``)."""
        self._tx_bytes += size
        if self.seq - self._seq0 >= self._lim_packets or self._tx_bytes >= self._lim_bytes:
            self._usage_limit_reached()

    def _account(self, size: int) -> None:
        """A packet was authenticated (inbound)."""
        st = self._stats
        st.packets += 1
        st.bytes += size
        if st.packets >= self._lim_packets or st.bytes >= self._lim_bytes:
            self._usage_limit_reached()

    def _usage_limit_reached(self) -> None:
        st, soft, hard = self.stats, self.params.soft, self.params.hard
        if hard.packets is not None and st.packets >= hard.packets:
            self._fire_hard("packets")
        elif hard.bytes is not None and st.bytes >= hard.bytes:
            self._fire_hard("bytes")
        elif not self.soft_fired:
            if soft.packets is not None and st.packets >= soft.packets:
                self._fire_soft("packets")
            elif soft.bytes is not None and st.bytes >= soft.bytes:
                self._fire_soft("bytes")
        self._refresh_limits()

    def _fire_soft(self, limit: LifetimeLimit) -> None:
        self.soft_fired = True
        self.events.append(SaLifetimeEvent(self.spi, "soft", limit))

    def _fire_hard(self, limit: LifetimeLimit) -> None:
        self.hard_expired = True
        self.soft_fired = True  # a soft event after (or with) the hard one tells nobody anything
        self.events.append(SaLifetimeEvent(self.spi, "hard", limit))

    def _refresh_limits(self) -> None:
        """Cache the nearest pending limit per unit so the hot path compares just three numbers;
        once hard-expired the deadline is -inf, so every packet takes the slow path and drops."""
        if self.hard_expired:
            self._deadline = -_INF
            self._lim_packets = self._lim_bytes = _UNLIMITED
        else:
            soft, hard = self.params.soft, self.params.hard
            limits = (hard,) if self.soft_fired else (soft, hard)
            packets = [x.packets for x in limits if x.packets is not None]
            octets = [x.bytes for x in limits if x.bytes is not None]
            self._lim_packets = min(packets, default=_UNLIMITED)
            self._lim_bytes = min(octets, default=_UNLIMITED)
            soft_deadline = _INF if self.soft_fired else self._soft_deadline
            self._deadline = min(soft_deadline, self._hard_deadline)
        self._refresh_fast_seq_max()

    def _refresh_fast_seq_max(self) -> None:
        """Highest sequence number the outbound fast path may use without the general code: below
        the reservation mark and short of the packet that reaches a packet limit."""
        self._fast_seq_max = min(self._reserved, self._seq0 + self._lim_packets - 1)

    # --- drops ------------------------------------------------------------------------------------

    def _drop(self, reason: DropReason, seq: int | None = None, detail: str = "") -> Drop:
        self._stats.other_drops += 1
        return Drop(reason, self.spi, seq, detail)

    def __repr__(self) -> str:  # keys stay out (SaParams hides them too)
        p = self.params
        return (
            f"SecurityAssociation(spi={self.spi:#010x}, {p.direction.value}, {p.mode.value}, "
            f"{self.transform.name}, seq={self.seq}, packets={self.stats.packets})"
        )


_REPLAY_DETAIL = {ReplayCheck.DUPLICATE: "duplicate", ReplayCheck.TOO_OLD: "too-old"}


def flush_all(sas: Iterable[SecurityAssociation]) -> None:
    """``flush()`` every SA -- all of them, even when one fails -- then raise one SeqStoreError
    naming the failures. What an engine's ``close()`` calls on a clean stop."""
    errors = []
    for sa in sas:
        try:
            sa.flush()
        except SeqStoreError as exc:
            errors.append(str(exc))
    if errors:
        raise SeqStoreError("; ".join(errors))


def _ip_end(packet: bytes, version: int) -> int:
    """End of the IP packet by its own length field (ignores link-layer trailing bytes); -1 for
    IPv6 with Payload Length 0 (a jumbogram, unsupported); beyond len(packet) if truncated."""
    if version == 6:
        plen = _H.unpack_from(packet, 4)[0]
        return _IPV6_HDR + plen if plen else -1
    if version == 4:
        return _H.unpack_from(packet, 2)[0]
    return -1


def _set_ip_length(head: bytearray, version: int, total: int) -> None:
    """Set IPv6 Payload Length or IPv4 Total Length (+ checksum) for a packet of ``total``."""
    if version == 6:
        head[4:6] = _H.pack(total - _IPV6_HDR)
    else:
        head[2:4] = _H.pack(total)
        fix_ipv4_header(head)


def _nh_offset(packet: bytes, version: int, esp_offset: int) -> int:
    """Offset of the byte that names the ESP header at ``esp_offset`` (IPv4 Protocol, or the
    Next Header of the last IPv6 extension header before ESP); -1 if the chain does not lead
    there. Bounds: the caller checked esp_offset + ESP overhead <= len(packet)."""
    if version == 4:
        return 9 if esp_offset == (packet[0] & 0x0F) * 4 else -1
    nh_off, off = 6, _IPV6_HDR
    while off < esp_offset:
        nh = packet[nh_off]
        if nh not in _V6_EXT_HEADERS:
            return -1
        nh_off = off
        if nh == 44:  # fragment header: fixed 8 octets
            off += 8
        elif nh == 51:  # AH: length in 4-octet units minus 2 (RFC 4302 section 2.2)
            off += (packet[off + 1] + 2) * 4
        else:
            off += (packet[off + 1] + 1) * 8
    return nh_off if off == esp_offset and packet[nh_off] == _PROTO_ESP else -1


__all__ = ["SaLifetimeEvent", "SaStats", "SecurityAssociation", "flush_all", "peek_spi_seq"]
