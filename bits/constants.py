"""Wire numbers (Specification) and engine defaults (Implementation)."""

from __future__ import annotations

from enum import Enum, IntEnum

# --- Specification -------------------------------------------------------------------------------


class IpProto(IntEnum):
    """IP protocol / IPv6 Next Header numbers (IANA)."""

    HOPOPT = 0
    ICMP = 1
    IPV4 = 4  # IP-in-IP, tunnel-mode ESP with an IPv4 inner packet
    TCP = 6
    UDP = 17
    IPV6 = 41
    ROUTING = 43
    FRAGMENT = 44
    ESP = 50
    AH = 51
    ICMPV6 = 58
    NONE = 59  # "no next header": ESP dummy packet (RFC 4303 section 2.6)
    DSTOPTS = 60
    MH = 135  # Mobility Header (RFC 6275 section 6.1)


#: IPv6 extension headers that may precede ESP in transport mode (RFC 4303 section 3.1.1).
IPV6_EXT_HEADERS = frozenset({IpProto.HOPOPT, IpProto.ROUTING, IpProto.FRAGMENT, IpProto.DSTOPTS})

ESP_HEADER_LEN = 8  # SPI + sequence number (RFC 4303 section 2)
ESP_TRAILER_LEN = 2  # Pad Length + Next Header
MAX_SEQ32 = 2**32 - 1
MAX_SEQ64 = 2**64 - 1
MIN_REPLAY_WINDOW = 32  # RFC 4303 section 3.4.3
RESERVED_SPI_MAX = 255  # SPI 1..255 reserved by IANA, 0 for local use (RFC 4303 section 2.1)


class Mode(str, Enum):
    TRANSPORT = "transport"
    TUNNEL = "tunnel"


class Direction(str, Enum):
    IN = "in"
    OUT = "out"


class Action(str, Enum):
    """SPD actions (RFC 4301 section 4.4.1)."""

    PROTECT = "protect"
    BYPASS = "bypass"
    DISCARD = "discard"


class EncAlg(str, Enum):
    """ESP encryption / combined-mode transforms."""

    AES_GCM_16 = "aes-gcm-16"  # RFC 4106, 16-octet ICV, key || 4-octet salt
    AES_CBC = "aes-cbc"  # RFC 3602, needs an integrity algorithm
    CHACHA20_POLY1305 = "chacha20-poly1305"  # RFC 7634, key || 4-octet salt
    NULL = "null"  # RFC 2410, needs an integrity algorithm


class AuthAlg(str, Enum):
    NONE = "none"
    HMAC_SHA256_128 = "hmac-sha256-128"  # RFC 4868


# --- Implementation ------------------------------------------------------------------------------

DEFAULT_REPLAY_WINDOW = 64
MAX_REPLAY_WINDOW = 65536
#: How many sequence numbers are reserved (persisted) at once; see bits/seqstore.py.
SEQ_RESERVE_BLOCK = 4096
