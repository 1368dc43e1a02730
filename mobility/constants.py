"""Mobile IPv6 (RFC 6275) and DSMIPv6 (RFC 5555) wire numbers, protocol constants and defaults.

Split as in wireguard-go ``constants.go``: *Specification* values come from the RFCs (and the IANA
registries they created) and never change; *Implementation* values are our defaults.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

from bits.constants import IpProto

# --- Specification: numbers ----------------------------------------------------------------------

IPPROTO_MH = IpProto.MH  # 135, Next Header value of the Mobility Header (RFC 6275 6.1.1)
IPPROTO_NONE = IpProto.NONE  # 59, the MH Payload Proto a sender sets (RFC 6275 6.1.1)
MH_ALIGN = 8  # the Mobility Header length is a multiple of 8 octets (RFC 6275 6.1.1)
LIFETIME_UNIT = 4  # seconds per BU/BA Lifetime and Refresh Interval unit (RFC 6275 6.1.7, 6.2.4)
MAX_LIFETIME_UNITS = 0xFFFF  # 16-bit field: 262140 seconds
HAO_OPTION_TYPE = 201  # Home Address destination option, 0xC9 (RFC 6275 6.3)
HAO_DATA_LEN = 16
ROUTING_TYPE_2 = 2  # type 2 routing header (RFC 6275 6.4)
DSMIPV6_UDP_PORT = 4191  # RFC 5555 section 8
NAT_REFRESH_NOT_NEEDED = 0xFFFFFFFF  # NAT Detection refresh time "no keepalives" (RFC 5555 3.2.2)
NAT_REFRESH_IGNORE = 0  # NAT Detection refresh time "ignore this field" (RFC 5555 3.2.2)


class MhType(IntEnum):
    """Mobility Header types (RFC 6275 6.1.2-6.1.9, IANA "Mobility Header Types")."""

    BRR = 0  # Binding Refresh Request
    HOTI = 1  # Home Test Init
    COTI = 2  # Care-of Test Init
    HOT = 3  # Home Test
    COT = 4  # Care-of Test
    BU = 5  # Binding Update
    BA = 6  # Binding Acknowledgement
    BE = 7  # Binding Error


class BuFlag(IntFlag):
    """Flags word of the Binding Update at MH offset 8 (RFC 6275 6.1.7; IANA "Binding Update Flags")."""

    A = 0x8000  # Acknowledge requested (RFC 6275)
    H = 0x4000  # Home registration (RFC 6275)
    L = 0x2000  # Link-local address compatibility (RFC 6275)
    K = 0x1000  # Key management mobility capability (RFC 6275)
    M = 0x0800  # MAP registration (RFC 5380)
    R = 0x0400  # Mobile router (RFC 3963)
    P = 0x0200  # Proxy registration (RFC 5213)
    F = 0x0100  # Force UDP encapsulation (RFC 5555 3.1.3)
    T = 0x0080  # TLV-header format (RFC 5845 5.1; not used by DSMIPv6, see dsmipv6.md)
    B = 0x0040  # Bulk binding update (RFC 6602)


#: BU flag bits with an assigned meaning; the rest are Reserved ("ignored by the receiver").
BU_FLAGS_KNOWN = 0xFFC0


class BaFlag(IntFlag):
    """Flags octet of the Binding Acknowledgement at MH offset 7 (RFC 6275 6.1.8; IANA)."""

    K = 0x80  # Key management mobility capability (RFC 6275)
    R = 0x40  # Mobile router (RFC 3963)
    P = 0x20  # Proxy registration (RFC 5213)
    T = 0x10  # TLV-header format (RFC 5845)
    B = 0x08  # Bulk binding update (RFC 6602)


BA_FLAGS_KNOWN = 0xF8


class BaStatus(IntEnum):
    """Binding Acknowledgement Status (RFC 6275 6.1.8, RFC 3963, RFC 5555). < 128 = accepted."""

    ACCEPTED = 0
    ACCEPTED_PREFIX_DISCOVERY = 1  # accepted but prefix discovery necessary
    REASON_UNSPECIFIED = 128
    ADMIN_PROHIBITED = 129
    INSUFFICIENT_RESOURCES = 130
    HOME_REGISTRATION_NOT_SUPPORTED = 131
    NOT_HOME_SUBNET = 132
    NOT_HOME_AGENT = 133  # not home agent for this mobile node
    DAD_FAILED = 134
    SEQ_OUT_OF_WINDOW = 135
    EXPIRED_HOME_NONCE_INDEX = 136
    EXPIRED_COA_NONCE_INDEX = 137
    EXPIRED_NONCES = 138
    REG_TYPE_CHANGE_DISALLOWED = 139  # registration type change disallowed
    MR_OP_NOT_PERMITTED = 140  # RFC 3963
    INVALID_PREFIX = 141  # RFC 3963
    NOT_AUTHORIZED_FOR_PREFIX = 142  # RFC 3963
    FORWARDING_SETUP_FAILED = 143  # RFC 3963
    MIPV6_ID_MISMATCH = 144  # IANA (RFC 4285)
    # RFC 5555 4.4.2/4.5 use 144 for "HA refuses forced UDP encapsulation (F flag)"; it collides with
    # IANA's 144 above. Kept as an alias so code can say what it means; the wire value is the same.
    UDP_ENCAPSULATION_REFUSED = 144
    INVALID_COA = 174  # Invalid Care-of Address (RFC 6275, new since RFC 3775)


class BeStatus(IntEnum):
    """Binding Error Status (RFC 6275 6.1.9)."""

    UNKNOWN_BINDING_HAO = 1  # unknown binding for Home Address destination option
    UNKNOWN_MH_TYPE = 2  # unrecognized MH Type value


class OptionType(IntEnum):
    """Mobility option types (RFC 6275 6.2, RFC 5555 3; IANA "Mobility Options")."""

    PAD1 = 0
    PADN = 1
    BINDING_REFRESH_ADVICE = 2
    ALTERNATE_COA = 3
    NONCE_INDICES = 4
    BINDING_AUTH_DATA = 5
    MOBILE_NETWORK_PREFIX = 6  # RFC 3963; parsed as an unknown option here
    IPV4_HOME_ADDRESS = 29  # RFC 5555 3.1.1
    IPV4_ADDRESS_ACK = 30  # RFC 5555 3.2.1 (section 8 says 29: typo, IANA has 30)
    NAT_DETECTION = 31  # RFC 5555 3.2.2
    IPV4_COA = 32  # RFC 5555 3.1.2


class Ipv4AckStatus(IntEnum):
    """IPv4 Address Acknowledgement Status (RFC 5555 3.2.1). 0..127 = success."""

    SUCCESS = 0
    FAILURE_UNSPECIFIED = 128
    ADMIN_PROHIBITED = 129
    INCORRECT_IPV4_HOA = 130
    INVALID_IPV4_ADDRESS = 131
    DYNAMIC_HOA_NOT_AVAILABLE = 132
    PREFIX_ALLOCATION_UNAUTHORIZED = 133


# --- Specification: protocol constants (RFC 6275 section 12; seconds unless noted) ---------------

DHAAD_RETRIES = 4  # retransmissions
INITIAL_BINDACK_TIMEOUT = 1.0
INITIAL_DHAAD_TIMEOUT = 3.0
INITIAL_SOLICIT_TIMER = 3.0
MAX_BINDACK_TIMEOUT = 32.0
MAX_DELETE_BCE_TIMEOUT = 10.0
MAX_NONCE_LIFETIME = 240.0
MAX_TOKEN_LIFETIME = 210.0
MAX_RO_FAILURE = 3  # retries
MAX_RR_BINDING_LIFETIME = 420.0
MAX_UPDATE_RATE = 3  # messages of one MH type per second to one destination
PREFIX_ADV_RETRIES = 3  # retransmissions
PREFIX_ADV_TIMEOUT = 3.0
NATKATIMEOUT = 110.0  # DSMIPv6 NAT keepalive / BU refresh period (RFC 5555 section 6)

# --- Implementation: defaults of the configuration variables (RFC 6275 section 13) ---------------

DEFAULT_MAX_MOB_PFX_ADV_INTERVAL = 86400.0
DEFAULT_MIN_MOB_PFX_ADV_INTERVAL = 600.0
DEFAULT_MIN_DELAY_BETWEEN_RAS = 3.0  # minimum allowed 0.03 s
#: 1.5 x RetransTimer (1 s) x DupAddrDetectTransmits (1): leaves the HA time for DAD (RFC 6275 13).
DEFAULT_INITIAL_BINDACK_TIMEOUT_FIRST_REG = 1.5
