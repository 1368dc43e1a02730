"""setkey parser: statements, selectors, algorithms and keys, direction rules, every error message
(with file and line), key file permissions, and robustness (only ConfigError on any input)."""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bits.constants import Action, AuthAlg, Direction, EncAlg, Mode
from bits.errors import ConfigError, KeyFileError
from bits.ip import PacketSelectors
from bits.setkey import ENC_ALGORITHMS, load_setkey, parse_setkey, read_key_file, tokenize
from bits.spd import IcmpRange, Level, PortRange

OUT, IN = Direction.OUT, Direction.IN
A, B = "2001:db8:a::1", "2001:db8:a::2"
GCM = "0x" + "11" * 20  # AES-128 key + salt
GCM2 = "0x" + "22" * 20
CBC = "0x" + "33" * 16
SHA = "0x" + "44" * 32


def addr(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def pkt(src: str, dst: str, proto: int, **kw: int | None) -> PacketSelectors:
    return PacketSelectors(addr(src).version, int(addr(src)), int(addr(dst)), proto, **kw)


def sa_line(spi: str = "0x1001", src: str = A, dst: str = B, extra: str = "-dir out", enc: str = f"aes-gcm-16 {GCM}") -> str:
    return f"add {src} {dst} esp {spi} {extra} -E {enc};\n"


def one_entry(spdadd: str):
    """Parse one spdadd (with a matching 'use'-free policy) and return its entry."""
    cfg = parse_setkey(spdadd)
    (entry,) = cfg.spd.entries()
    return entry


# --- tokens -------------------------------------------------------------------------------------------


def test_tokenizer_comments_quotes_and_multiline_statements() -> None:
    text = 'flush; # a comment ; with "quotes"\nadd 1 2\n  esp 3 -E x "a key; with # inside" ;;'
    stmts = tokenize(text, "f")
    assert [[t.text for t in s] for s in stmts] == [
        ["flush"],
        ["add", "1", "2", "esp", "3", "-E", "x", "a key; with # inside"],
        [],
    ]
    assert [t.line for t in stmts[1]] == [2, 2, 2, 3, 3, 3, 3, 3]
    assert stmts[1][-1].quoted


# --- SAs ------------------------------------------------------------------------------------------------


def test_add_full_set_of_options() -> None:
    cfg = parse_setkey(
        f"add {A} {B} esp 0x12345 -m tunnel -r 256 -u 7 -esn -dir out\n"
        f"  -ls 60 -lh 120 -bs 1000 -bh 2000 -ps 10 -ph 20\n"
        f"  -E aes-cbc {CBC} -A hmac-sha256 {SHA};\n"
        f"spdadd {A} {B} any -P out ipsec esp/tunnel/{A}-{B}/unique:7;"
    )
    (p,) = cfg.sas
    assert (p.spi, p.src, p.dst, p.direction, p.mode) == (0x12345, addr(A), addr(B), OUT, Mode.TUNNEL)
    assert (p.replay_window, p.reqid, p.esn) == (256, 7, True)
    assert (p.enc, p.enc_key, p.auth, p.auth_key) == (EncAlg.AES_CBC, b"\x33" * 16, AuthAlg.HMAC_SHA256_128, b"\x44" * 32)
    assert (p.soft.seconds, p.soft.bytes, p.soft.packets) == (60, 1000, 10)
    assert (p.hard.seconds, p.hard.bytes, p.hard.packets) == (120, 2000, 20)
    assert "33" * 16 not in repr(p)  # keys stay out of reprs


def test_add_defaults() -> None:
    (p,) = parse_setkey(sa_line(spi="4096")).sas
    assert (p.spi, p.mode, p.replay_window, p.esn, p.reqid) == (4096, Mode.TRANSPORT, 64, False, None)
    assert p.soft.is_unlimited() and p.hard.is_unlimited() and p.auth == AuthAlg.NONE
    (q,) = parse_setkey(sa_line(extra="-dir out -r 0 -lh 0")).sas
    assert q.replay_window == 0 and q.hard.seconds is None  # 0 = off / no limit, as in setkey


@pytest.mark.parametrize(
    ("name", "alg", "key"),
    [
        *[(n, a, {EncAlg.AES_GCM_16: GCM, EncAlg.AES_CBC: CBC,
                  EncAlg.CHACHA20_POLY1305: "0x" + "55" * 36, EncAlg.NULL: ""}[a])
          for n, a in ENC_ALGORITHMS.items()],
        ("AES-GCM-16", EncAlg.AES_GCM_16, GCM),
    ],
)
def test_encryption_algorithm_names(name: str, alg: EncAlg, key: str) -> None:
    auth = "" if alg in (EncAlg.AES_GCM_16, EncAlg.CHACHA20_POLY1305) else f" -A hmac-sha256 {SHA}"
    (p,) = parse_setkey(f"add {A} {B} esp 0x1001 -dir out -E {name} {key}{auth};").sas
    assert p.enc == alg


@pytest.mark.parametrize("name", ["hmac-sha256", "hmac-sha2-256", "hmac-sha256-128", "hmac(sha256)", "HMAC-SHA256"])
def test_integrity_algorithm_names(name: str) -> None:
    (p,) = parse_setkey(f"add {A} {B} esp 0x1001 -dir out -E null -A {name} {SHA};").sas
    assert (p.enc, p.enc_key, p.auth) == (EncAlg.NULL, b"", AuthAlg.HMAC_SHA256_128)


def test_key_lengths_accepted() -> None:
    for octets in (20, 28, 36):
        (p,) = parse_setkey(sa_line(enc=f"aes-gcm-16 0x{'ab' * octets}")).sas
        assert len(p.enc_key) == octets
    for octets in (16, 24, 32):
        (p,) = parse_setkey(sa_line(enc=f"aes-cbc 0x{'ab' * octets} -A hmac-sha256 {SHA}")).sas
        assert len(p.enc_key) == octets


def test_quoted_string_keys() -> None:
    (p,) = parse_setkey(f'add {A} {B} esp 0x1001 -dir out -E rijndael-cbc "0123456789abcdef" '
                        f'-A hmac-sha256 "0123456789abcdef0123456789abcdef";').sas
    assert p.enc_key == b"0123456789abcdef" and p.auth_key == b"0123456789abcdef" * 2
    (q,) = parse_setkey(f'add {A} {B} esp 0x1001 -dir out -E null "" -A hmac-sha256 {SHA};').sas
    assert q.enc_key == b""


def test_direction_from_local_addresses() -> None:
    text = sa_line("0x1001", A, B, "") + sa_line("0x1002", B, A, "", f"aes-gcm-16 {GCM2}")
    at_a = parse_setkey(text, local_addresses=[A, "10.0.0.1"])
    at_b = parse_setkey(text, local_addresses=[addr(B)])
    assert [p.direction for p in at_a.sas] == [OUT, IN]
    assert [p.direction for p in at_b.sas] == [IN, OUT]
    explicit = parse_setkey(sa_line("0x1001", A, B, "-dir in"), local_addresses=[A])
    assert explicit.sas[0].direction == IN  # -dir wins


def test_flush_and_spdflush() -> None:
    cfg = parse_setkey(
        sa_line("0x1001") + f"spdadd {A} {B} any -P out none;\nflush;\nspdflush;\n"
        + sa_line("0x1002") + f"spdadd {A} {B} tcp -P out discard;"
    )
    assert [p.spi for p in cfg.sas] == [0x1002]
    assert [e.action for e in cfg.spd] == [Action.DISCARD]


# --- policies -----------------------------------------------------------------------------------------------


def test_spdadd_direction_semantics() -> None:
    out = one_entry(f"spdadd {A}[1000] {B}[80] tcp -P out none;")
    assert (out.direction, str(out.selector.local), str(out.selector.remote)) == (OUT, A, B)
    assert (out.selector.local_port, out.selector.remote_port) == (PortRange.single(1000), PortRange.single(80))
    inb = one_entry(f"spdadd {A}[1000] {B}[80] tcp -P in none;")
    assert (inb.direction, str(inb.selector.local), str(inb.selector.remote)) == (IN, B, A)
    assert (inb.selector.local_port, inb.selector.remote_port) == (PortRange.single(80), PortRange.single(1000))
    # the same packet A:1000 -> B:80 is outbound at A and inbound at B
    p = pkt(A, B, 6, sport=1000, dport=80)
    assert out.selector.matches(p, True) and inb.selector.matches(p, False)


@pytest.mark.parametrize(
    ("upper", "proto", "extra"),
    [
        ("any", None, {}),
        ("255", None, {}),
        ("tcp", 6, {}),
        ("udp", 17, {}),
        ("icmp", 1, {}),
        ("icmp6", 58, {}),
        ("ipv6-icmp", 58, {}),
        ("58", 58, {}),
        ("mh", 135, {}),
        ("135", 135, {}),
        ("sctp", 132, {}),
        ("47", 47, {}),
        ("mh 5", 135, {"mh_type": 5}),
        ("135 5", 135, {"mh_type": 5}),
        ("mh bu", 135, {"mh_type": 5}),
        ("mh BA", 135, {"mh_type": 6}),
        ("mh back", 135, {"mh_type": 6}),
        ("mh be", 135, {"mh_type": 7}),
        ("mh brr", 135, {"mh_type": 0}),
        ("mh hoti", 135, {"mh_type": 1}),
        ("mh coti", 135, {"mh_type": 2}),
        ("mh hot", 135, {"mh_type": 3}),
        ("mh cot", 135, {"mh_type": 4}),
        ("icmp6 146", 58, {"icmp": IcmpRange.of(146)}),
        ("icmp6 mps", 58, {"icmp": IcmpRange.of(146)}),
        ("icmp6 mpa", 58, {"icmp": IcmpRange.of(147)}),
        ("icmp6 1,4", 58, {"icmp": IcmpRange.of(1, 4)}),
        ("icmp6 1,0", 58, {"icmp": IcmpRange.of(1, 0)}),  # code 0 exactly (KAME: wildcard)
        ("icmp6 1,0-3", 58, {"icmp": IcmpRange.of(1, 0, 3)}),
        ("icmp6 echo-request", 58, {"icmp": IcmpRange.of(128)}),
        ("58 135,0", 58, {"icmp": IcmpRange.of(135, 0)}),
    ],
)
def test_upper_layer_specs(upper: str, proto: int | None, extra: dict) -> None:
    sel = one_entry(f"spdadd {A} {B} {upper} -P out none;").selector
    assert sel.proto == proto
    assert sel.mh_type == extra.get("mh_type")
    assert sel.icmp == extra.get("icmp", IcmpRange())


def test_icmpv4_type_names() -> None:
    sel = one_entry("spdadd 10.0.0.1 10.0.0.2 icmp echo-request -P out none;").selector
    assert sel.icmp == IcmpRange.of(8)


@pytest.mark.parametrize(
    ("src", "local", "port"),
    [
        ("2001:db8::/64", "2001:db8::/64", PortRange.ANY),
        ("2001:db8::/64[any]", "2001:db8::/64", PortRange.ANY),
        ("::/0[53]", "::/0", PortRange.single(53)),
        ("10.0.0.0/8[1000-2000]", "10.0.0.0/8", PortRange(1000, 2000)),
        ("10.0.0.5-10.0.0.9", "10.0.0.5-10.0.0.9", PortRange.ANY),
        ("any", "any", PortRange.ANY),
        ("any6[22]", "::/0", PortRange.single(22)),
    ],
)
def test_address_and_port_forms(src: str, local: str, port: PortRange) -> None:
    dst = "0.0.0.0/0" if src.startswith("10.") else "::/0"
    sel = one_entry(f"spdadd {src} {dst} udp -P out none;").selector
    assert str(sel.local) == local and sel.local_port == port


def test_policy_words() -> None:
    assert one_entry(f"spdadd {A} {B} any -P out discard;").action == Action.DISCARD
    assert one_entry(f"spdadd {A} {B} any -P out none;").action == Action.BYPASS
    assert one_entry(f"spdadd {A} {B} any -P out bypass;").action == Action.BYPASS
    e = one_entry(f"spdadd {A} {B} any -P out ipsec esp/transport//use;")
    assert (e.action, e.mode, e.level, e.reqid) == (Action.PROTECT, Mode.TRANSPORT, Level.USE, None)
    assert e.accepts_cleartext


def test_use_level_without_sa_is_a_warning() -> None:
    cfg = parse_setkey(f"spdadd {A} {B} any -P out ipsec esp/transport//use;", path="x.conf")
    assert len(cfg.warnings) == 1 and cfg.warnings[0].startswith("x.conf:1: ") and "clear" in cfg.warnings[0]


def test_unused_sa_is_a_warning() -> None:
    cfg = parse_setkey(sa_line("0x1001", extra="-dir in"), path="x.conf")
    assert "serves no policy" in cfg.warnings[0] and "selector check" in cfg.warnings[0]


def test_spddefault() -> None:
    cfg = parse_setkey("spddefault in bypass; spddefault out discard;")
    assert cfg.spd.default(IN).action == Action.BYPASS and cfg.spd.default(OUT).action == Action.DISCARD
    assert parse_setkey("").spd.default(IN).action == Action.DISCARD


def test_entry_names_are_file_and_line() -> None:
    cfg = parse_setkey(f"spdadd {A} {B} tcp -P out none; spdadd {A} {B} udp -P out none;\n"
                       f"spdadd {A} {B} any -P in none;", path="/etc/mipbits/ipsec.conf")
    assert [e.name for e in cfg.spd] == ["ipsec.conf:1", "ipsec.conf:1.2", "ipsec.conf:2"]


def test_four_six_flags() -> None:
    assert parse_setkey("spdadd -4 10.0.0.1 10.0.0.2 any -P out none;").spd.entries()[0].selector.version == 4
    assert parse_setkey(f"add -6 -n {A} {B} esp 0x1001 -dir out -E aes-gcm-16 {GCM};").sas[0].spi == 0x1001


# --- error messages (each names file and line) -----------------------------------------------------------------

ERRORS = [
    # (text, line, problem fragment)
    ("bogus;", 1, "unknown statement 'bogus'"),
    ("flush", 1, "is not ended by ';'"),
    ('add "x', 1, "unterminated quoted string"),
    ("flush now;", 1, "unexpected 'now' after flush"),
    ("\n\nadd 2001:db8:a::1;", 3, "missing destination address before ';'"),
    (f"add {A}/64 {B} esp 0x1001;", 1, "one address, without prefix or port"),
    (f"add {A} nowhere esp 0x1001;", 1, "'nowhere' is not an IPv4 or IPv6 address"),
    (f"add {A} 10.0.0.1 esp 0x1001;", 1, "mix IPv4 and IPv6"),
    (f"add -4 {A} {B} esp 0x1001;", 1, "-4 given but the SA addresses are IPv6"),
    (f"add {A} {B} ah 0x1001;", 1, "protocol 'ah' is not supported: only esp"),
    (f"add {A} {B} esp 255 -dir out -E aes-gcm-16 {GCM};", 1, "SPI 255 is reserved"),
    (f"add {A} {B} esp 0 -dir out -E aes-gcm-16 {GCM};", 1, "SPI 0 is reserved"),
    (f"add {A} {B} esp 0x100000000;", 1, "SPI 0x100000000 out of range"),
    (f"add {A} {B} esp twelve;", 1, "SPI must be a number, not 'twelve'"),
    (f"add {A} {B} esp 0x1001 -dir out -X 1;", 1, "unknown SA option '-X'"),
    (f"add {A} {B} esp 0x1001 -dir out -f zero-pad;", 1, "option -f (padding/compression) is not supported"),
    (f"add {A} {B} esp 0x1001 -m any;", 1, "mode must be transport or tunnel, not 'any'"),
    (f"add {A} {B} esp 0x1001 -dir sideways;", 1, "direction must be in or out, not 'sideways'"),
    (f"add {A} {B} esp 0x1001 -r 16 -dir out -E aes-gcm-16 {GCM};", 1, "replay window 16 is below the minimum of 32"),
    (f"add {A} {B} esp 0x1001 -r 100000;", 1, "replay window -r 100000 out of range"),
    (f"add {A} {B} esp 0x1001 -u 0;", 1, "reqid 0 out of range"),
    (f"add {A} {B} esp 0x1001 -dir out;", 1, "SA has no -E algorithm"),
    (f"add {A} {B} esp 0x1001 -dir out -E des-cbc 0x0102030405060708;", 1, "unknown encryption algorithm 'des-cbc'"),
    (f"add {A} {B} esp 0x1001 -dir out -E aes-cbc {CBC} -A hmac-md5 {SHA};", 1, "unknown integrity algorithm 'hmac-md5'"),
    (f"add {A} {B} esp 0x1001 -dir out -E aes-cbc -A hmac-sha256 {SHA};", 1, "missing key after aes-cbc"),
    (f"add {A} {B} esp 0x1001 -dir out -E aes-cbc;", 1, "missing key after aes-cbc"),
    (f"add {A} {B} esp 0x1001 -dir out -E aes-cbc 0x123;", 1, "even number of hex digits"),
    (f"add {A} {B} esp 0x1001 -dir out -E aes-cbc secret;", 1, "0x followed by an even number of hex digits"),
    (f"add {A} {B} esp 0x1001 -dir out\n -E aes-cbc 0x{'ab' * 20} -A hmac-sha256 {SHA};", 2,
     "wrong key length for aes-cbc: 20 octets, expected 16, 24 or 32"),
    (f"add {A} {B} esp 0x1001 -dir out -E aes-cbc {CBC} -A hmac-sha256 0x{'ab' * 20};", 1,
     "wrong key length for hmac-sha256-128: 20 octets, expected 32"),
    (f"add {A} {B} esp 0x1001 -dir out -E aes-gcm-16 0x{'ab' * 16};", 1,
     "aes-gcm-16 key of 16 octets has no salt: append the 4-octet salt (RFC 4106 section 8.1), 20, 28 or 36"),
    (f"add {A} {B} esp 0x1001 -dir out -E aes-gcm-16 0x{'ab' * 32};", 1, "key of 32 octets has no salt"),
    (f"add {A} {B} esp 0x1001 -dir out -E aes-gcm-16 0x{'ab' * 21};", 1,
     "wrong key length for aes-gcm-16: 21 octets, expected 20, 28 or 36"),
    (f"add {A} {B} esp 0x1001 -dir out -E chacha20-poly1305 0x{'ab' * 32};", 1,
     "chacha20-poly1305 key of 32 octets has no salt: append the 4-octet salt (RFC 7634 section 2), 36 octets"),
    (f"add {A} {B} esp 0x1001 -dir out -E aes-cbc {CBC};", 1, "aes-cbc gives no integrity: add -A hmac-sha256"),
    (f"add {A} {B} esp 0x1001 -dir out -E null;", 1, "null gives no integrity"),
    (f"add {A} {B} esp 0x1001 -dir out -E null 0x01 -A hmac-sha256 {SHA};", 1, "-E null takes no key"),
    (f"add {A} {B} esp 0x1001 -dir out -E aes-gcm-16 {GCM} -A hmac-sha256 {SHA};", 1,
     "combined-mode algorithm with its own integrity: remove -A"),
    (f"add {A} {B} esp 0x1001 -dir out -ls 100 -lh 50 -E aes-gcm-16 {GCM};", 1,
     "soft lifetime 100 seconds is not below the hard lifetime 50"),
    (f"add {A} {B} esp 0x1001 -dir out -bs 9 -bh 9 -E aes-gcm-16 {GCM};", 1, "soft lifetime 9 bytes"),
    (f"add {A} {B} esp 0x1001 -dir out -ps 5 -ph 1 -E aes-gcm-16 {GCM};", 1, "soft lifetime 5 packets"),
    (f"add {A} {B} esp 0x1001 -E aes-gcm-16 {GCM};", 1, "cannot tell whether SA 0x00001001"),
    (sa_line() + sa_line(enc=f"aes-gcm-16 {GCM2}"), 2, "duplicate SPI 0x00001001 for destination 2001:db8:a::2 (first at line 1)"),
    (sa_line() + sa_line("0x1002"), 2, "reuses the aes-gcm-16 key and salt of SA 0x00001001 (line 1)"),
    (f"spdadd {A} {B} any -P fwd none;", 1, "direction fwd is not supported"),
    (f"spdadd {A} {B} any -X out none;", 1, "expected -P, got '-X'"),
    (f"spdadd {A} {B} any -P out;", 1, "missing policy (discard, none or ipsec) before ';'"),
    (f"spdadd {A} {B} any -P out prio 10 none;", 1, "policy priorities are not supported"),
    (f"spdadd {A} {B} any -P out entrust;", 1, "policy entrust is not supported"),
    (f"spdadd {A} {B} any -P out allow;", 1, "policy must be discard, none or ipsec, not 'allow'"),
    (f"spdadd {A} {B} any -P out none extra;", 1, "unexpected 'extra' after none"),
    (f"spdadd {A} {B} any -P out ipsec esp/transport/require;", 1, "must be PROTOCOL/MODE/SRC-DST/LEVEL"),
    (f"spdadd {A} {B} any -P out ipsec ah/transport//require;", 1, "protocol 'ah' is not supported in policies"),
    (f"spdadd {A} {B} any -P out ipsec esp/transport//require ah/transport//require;", 1, "SA bundles"),
    (f"spdadd {A} {B} any -P out ipsec esp/beet//require;", 1, "mode must be transport or tunnel, not 'beet'"),
    (f"spdadd {A} {B} any -P out ipsec esp/transport/{A}-{B}/require;", 1, "transport mode takes no endpoints"),
    (f"spdadd {A} {B} any -P out ipsec esp/tunnel//require;", 1, "tunnel mode needs the outer endpoints"),
    (f"spdadd {A} {B} any -P out ipsec esp/tunnel/{A}-10.0.0.1/require;", 1, "tunnel endpoints"),
    (f"spdadd {A} {B} any -P out ipsec esp/tunnel/{A}-x/require;", 1, "tunnel destination 'x'"),
    (f"spdadd {A} {B} any -P out ipsec esp/transport//unique;", 1, "level unique needs the SA's reqid"),
    (f"spdadd {A} {B} any -P out ipsec esp/transport//unique:zero;", 1, "unique id must be a number"),
    (f"spdadd {A} {B} any -P out ipsec esp/transport//default;", 1, "level default means the kernel"),
    (f"spdadd {A} {B} any -P out ipsec esp/transport//;", 1, "level default"),
    (f"spdadd {A} {B} any -P out ipsec esp/transport//maybe;", 1, "level must be require, use or unique:N"),
    (f"spdadd {A} {B} bogus -P out none;", 1, "unknown upper-layer protocol 'bogus'"),
    (f"spdadd {A} {B} 256 -P out none;", 1, "upper-layer protocol 256 out of range"),
    (f"spdadd {A} {B} tcp 5 -P out none;", 1, "a type selector only follows icmp, icmp6 or mh"),
    (f"spdadd {A} {B} mh hello -P out none;", 1, "unknown Mobility Header type 'hello'"),
    (f"spdadd {A} {B} mh 300 -P out none;", 1, "MH type 300 out of range"),
    (f"spdadd {A} {B} icmp6 1,x -P out none;", 1, "ICMP code must be a number"),
    (f"spdadd {A} {B} icmp6 1,5-4 -P out none;", 1, "ICMP code 4 out of range 5..255"),
    (f"spdadd {A} {B} icmp6 x -P out none;", 1, "ICMP type must be a number"),
    (f"spdadd {A}[80] {B} icmp6 -P out none;", 1, "port selectors need tcp"),
    (f"spdadd {A}[http] {B} tcp -P out none;", 1, "port must be a number, not 'http'"),
    (f"spdadd {A}[70000] {B} tcp -P out none;", 1, "port 70000 out of range"),
    (f"spdadd {A}[[1]] {B} tcp -P out none;", 1, "bad address selector"),
    (f"spdadd 2001:db8::1/64 {B} tcp -P out none;", 1, "host bits set"),
    (f"spdadd 10.0.0.1 {B} tcp -P out none;", 1, "mix IPv4 and IPv6"),
    (f"spdadd -4 {A} {B} tcp -P out none;", 1, "-4 given but the selector has IPv6"),
    ("spddefault in protect;", 1, "default action must be discard or bypass"),
    ("spddefault up discard;", 1, "direction must be in or out, not 'up'"),
    ("spddefault in discard now;", 1, "unexpected 'now' after spddefault"),
    # whole-file checks point at the policy's line
    (f"\nspdadd {A} {B} any -P out ipsec esp/transport//require;", 2,
     f"policy -P out requires an SA (require) but no out transport SA from {A} to {B} is configured"),
    (sa_line(extra="-dir in") + f"spdadd {A} {B} any -P out ipsec esp/transport//require;", 2,
     "no out transport SA"),
    (f"spdadd {A} ::/0 any -P out ipsec esp/tunnel/{A}-{B}/require;", 1,
     f"no out tunnel SA from {A} to {B} is configured"),
    (f"spdadd {A} {B} any -P in ipsec esp/transport//unique:4;", 1, "no SA has reqid 4 (add ... -u 4)"),
    (sa_line(extra="-dir out -u 4") + f"spdadd {B} {A} any -P in ipsec esp/transport//unique:4;", 2,
     "the SA with -u 4 (SPI 0x00001001) is out transport, the policy needs in transport"),
]


@pytest.mark.parametrize(("text", "line", "problem"), ERRORS)
def test_error_messages_name_file_line_and_problem(text: str, line: int, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_setkey(text, path="site.conf")
    err = info.value
    assert (err.path, err.line) == ("site.conf", line)
    assert problem in err.problem
    assert str(err).startswith(f"site.conf:{line}: ")


def test_errors_about_local_addresses() -> None:
    with pytest.raises(ConfigError, match="both ends of SA 0x00001001 .* are local addresses"):
        parse_setkey(sa_line(extra=""), local_addresses=[A, B])
    with pytest.raises(ConfigError, match="neither end of SA 0x00001001 .* is a local address"):
        parse_setkey(sa_line(extra=""), local_addresses=["2001:db8::99"])
    with pytest.raises(ConfigError, match="bad local address"):
        parse_setkey("", local_addresses=["not-an-address"])


# --- the MIPv6 configuration (RFC 3776 / RFC 4877 SAs, host-wide payload entries by ordering) -------------------

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "ipsec"
HOA, HA, COA, CN = "2001:db8:1::100", "2001:db8:1::1", "2001:db8:f::100", "2001:db8:9::9"
MH, ICMPV6, UDP = 135, 58, 17


@pytest.fixture
def installed(tmp_path: Path):
    """Copy an example as an admin would install it: mode 0600 (git does not keep modes)."""

    def install(name: str) -> Path:
        dst = tmp_path / name
        shutil.copyfile(EXAMPLES / name, dst)
        os.chmod(dst, 0o600)
        return dst

    return install


class _Sa:
    def __init__(self, params) -> None:
        self.params = params


def test_mipv6_mn_and_ha_share_their_sa_lines() -> None:
    def sa_block(name: str) -> str:
        text = (EXAMPLES / name).read_text()
        return text[text.index("# --- SAs") : text.index("# --- SPD")]

    assert sa_block("mipv6-mn.conf") == sa_block("mipv6-ha.conf")


def test_mipv6_mobile_node(installed) -> None:
    cfg = load_setkey(installed("mipv6-mn.conf"), local_addresses=[HOA, COA])
    assert cfg.warnings == []
    by_spi = {p.spi: p for p in cfg.sas}
    assert {s: by_spi[s].direction for s in by_spi} == {
        0x2001: OUT, 0x2002: IN, 0x2003: OUT, 0x2004: IN, 0x2005: OUT, 0x2006: IN, 0x2007: OUT, 0x2008: IN,
    }
    assert by_spi[0x2007].esn and by_spi[0x2007].enc == EncAlg.CHACHA20_POLY1305
    pdb = cfg.policy_db(_Sa)

    def out_spi(p: PacketSelectors) -> int | None:
        entry, sa = pdb.lookup_outbound(p)
        assert entry.action == Action.PROTECT
        return None if sa is None else sa.params.spi

    assert out_spi(pkt(HOA, HA, MH, mh_type=5)) == 0x2001  # BU: transport SA1
    assert out_spi(pkt(HOA, CN, MH, mh_type=1)) == 0x2003  # HoTI: tunnel SA3
    assert out_spi(pkt(HOA, HA, ICMPV6, icmp_type=146, icmp_code=0)) == 0x2005  # MPS: SA5
    # everything else from the HoA, to the HA too, takes the payload tunnel: ordering does
    # what "remote != HA" (RFC 5555 5.2.2) would
    assert out_spi(pkt(HOA, HA, MH, mh_type=7)) == 0x2007
    assert out_spi(pkt(HOA, HA, UDP, sport=1, dport=2)) == 0x2007
    assert out_spi(pkt(HOA, CN, UDP, sport=1, dport=2)) == 0x2007
    # not from the HoA: bypassed by the configured default
    assert pdb.lookup_outbound(pkt(COA, CN, UDP, sport=1, dport=2))[0].name == "default-out"
    # inbound: each SA accepts exactly what its policy says (RFC 4301 5.2)
    sa = {p.spi: pdb.sad.get_inbound(p.spi) for p in cfg.sas if p.direction == IN}
    assert pdb.check_inbound(sa[0x2002], pkt(HA, HOA, MH, mh_type=6))  # BA
    assert not pdb.check_inbound(sa[0x2002], pkt(HA, HOA, MH, mh_type=5))
    assert pdb.check_inbound(sa[0x2004], pkt(CN, HOA, MH, mh_type=3))  # HoT
    assert pdb.check_inbound(sa[0x2006], pkt(HA, HOA, ICMPV6, icmp_type=147, icmp_code=0))  # MPA
    assert pdb.check_inbound(sa[0x2008], pkt(CN, HOA, UDP, sport=2, dport=1))
    assert not pdb.check_inbound(sa[0x2008], pkt(CN, "2001:db8:1::200", UDP, sport=2, dport=1))
    # cleartext to the HoA is refused: the payload-in entry requires ESP
    entry = pdb.spd.lookup(IN, pkt(CN, HOA, UDP, sport=2, dport=1))
    assert entry.action == Action.PROTECT and not entry.accepts_cleartext


def test_mipv6_home_agent(installed) -> None:
    cfg = load_setkey(installed("mipv6-ha.conf"), local_addresses=[HA])
    assert cfg.warnings == []
    assert {p.spi: p.direction for p in cfg.sas} == {
        0x2001: IN, 0x2002: OUT, 0x2003: IN, 0x2004: OUT, 0x2005: IN, 0x2006: OUT, 0x2007: IN, 0x2008: OUT,
    }
    pdb = cfg.policy_db(_Sa)
    assert pdb.lookup_outbound(pkt(HA, HOA, MH, mh_type=6))[1].params.spi == 0x2002  # BA
    assert pdb.lookup_outbound(pkt(CN, HOA, MH, mh_type=3))[1].params.spi == 0x2004  # HoT relayed
    assert pdb.lookup_outbound(pkt(CN, HOA, UDP, sport=5, dport=6))[1].params.spi == 0x2008
    # draft 4.4.2: the HA tells a BU from data by the SPI's traffic selectors
    assert [s.mh_type for s in pdb.query_inbound_spi(0x2001).selectors] == [5]
    assert [s.mh_type for s in pdb.query_inbound_spi(0x2007).selectors] == [None]
    bu_sa = pdb.sad.get_inbound(0x2001)
    assert pdb.check_inbound(bu_sa, pkt(HOA, HA, MH, mh_type=5))


def test_transport_example(installed) -> None:
    cfg = load_setkey(installed("transport.conf"))
    assert cfg.warnings == []
    pdb = cfg.policy_db(_Sa)
    assert pdb.lookup_outbound(pkt(A, B, 6, sport=5, dport=22))[1].params.spi == 0x1001
    ssh = pdb.lookup_outbound(pkt(A, "2001:db8:c::3", 6, sport=5, dport=22))
    assert ssh[0].action == Action.BYPASS and ssh[1] is None
    assert pdb.lookup_outbound(pkt(A, "2001:db8:c::3", 6, sport=5, dport=80))[0].name == "default-out"
    assert pdb.spd.lookup(IN, pkt("fe80::2", A, ICMPV6, icmp_type=136, icmp_code=0)).action == Action.BYPASS
    assert pdb.check_inbound(pdb.sad.get_inbound(0x1002), pkt(B, A, UDP, sport=1, dport=2))


def test_tunnel_example(installed) -> None:
    cfg = load_setkey(installed("tunnel.conf"))
    assert cfg.warnings == []
    (out_sa, in_sa) = cfg.sas
    assert (out_sa.src, out_sa.dst, out_sa.mode) == (addr("192.0.2.10"), addr("198.51.100.1"), Mode.TUNNEL)
    pdb = cfg.policy_db(_Sa)
    assert pdb.lookup_outbound(pkt("2001:db8:a::10", "2001:db8:b:7::1", UDP, sport=1, dport=2))[1].params.spi == 0x3001
    assert pdb.check_inbound(pdb.sad.get_inbound(0x3002), pkt("2001:db8:b::5", "2001:db8:a::10", UDP, sport=1, dport=2))
    assert not pdb.check_inbound(pdb.sad.get_inbound(0x3002), pkt("2001:db8:c::5", "2001:db8:a::10", UDP, sport=1, dport=2))


def test_examples_in_the_repository_parse() -> None:
    for f in sorted(EXAMPLES.glob("*.conf")):
        local = {"mipv6-mn.conf": [HOA, COA], "mipv6-ha.conf": [HA]}.get(f.name)
        parse_setkey(f.read_text(), path=str(f), local_addresses=local)


# --- key file permissions ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o602])
def test_key_file_accessible_by_others_is_refused(installed, mode: int) -> None:
    path = installed("transport.conf")
    os.chmod(path, mode)
    with pytest.raises(KeyFileError) as info:
        load_setkey(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: ") and f"chmod 600 {path}" in msg and f"{mode:04o}" in msg


def test_key_file_owned_by_someone_else_is_refused(installed) -> None:
    if os.geteuid() != 0:
        pytest.skip("changing a file's owner needs root")
    path = installed("transport.conf")
    os.chown(path, 4242, -1)
    with pytest.raises(KeyFileError, match="owned by uid 4242"):
        read_key_file(path)


def test_key_file_0600_and_0400_are_accepted(installed) -> None:
    path = installed("transport.conf")
    os.chmod(path, 0o400)
    assert "add 2001:db8:a::1" in read_key_file(path)


def test_missing_or_binary_key_file(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cannot read key file"):
        read_key_file(tmp_path / "absent.conf")
    binary = tmp_path / "bin.conf"
    binary.write_bytes(b"flush;\xff\xfe")
    os.chmod(binary, 0o600)
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_key_file(binary)


def test_errors_from_a_loaded_file_name_that_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.conf"
    path.write_text("flush;\n\nspdadd x y any -P out none;\n")
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError, match=re.escape(f"{path}:3: ")):
        load_setkey(path)


# --- robustness: only ConfigError, whatever the input ----------------------------------------------------------

VOCAB = [
    "add", "spdadd", "spddefault", "flush", "spdflush", "esp", "ah", "-m", "tunnel", "transport", "-r",
    "-u", "-E", "-A", "-esn", "-dir", "in", "out", "-lh", "-ls", "-bh", "-ps", "-P", "ipsec", "none",
    "discard", "bypass", "aes-gcm-16", "aes-cbc", "null", "hmac-sha256", "chacha20-poly1305", A, B,
    "10.0.0.1", "::/0", "0.0.0.0/0", f"{A}[80]", "::/0[any]", "[", "]", "[1-2]", "mh", "bu", "icmp6",
    "1,2", "1,2-3", "tcp", "any", "0x1001", "256", "0", "4294967296", GCM, CBC, SHA, '"k"', ";", "#",
    "\n", "esp/transport//require", f"esp/tunnel/{A}-{B}/unique:1", "esp/tunnel/-/use", "unique:",
    "a-b", "::1-::", "-4", "-6", "/", "0x", "1.2.3.4/33", "fe80::1%eth0", "\u0663", "\x00",
]


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=300))
def test_random_text_raises_only_config_error(text: str) -> None:
    try:
        parse_setkey(text, local_addresses=[A])
    except ConfigError as exc:
        assert exc.line is None or exc.line >= 1


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.sampled_from(VOCAB), max_size=40), st.booleans())
def test_token_soup_raises_only_config_error(words: list[str], with_local: bool) -> None:
    try:
        parse_setkey(" ".join(words) + " ;", local_addresses=[A] if with_local else None)
    except ConfigError:
        pass


def test_the_documented_example_is_the_example_file() -> None:
    """docs/setkey.md's complete example is mipv6-mn.conf minus comments, and it parses cleanly."""
    doc = (EXAMPLES.parent.parent / "docs" / "setkey.md").read_text()
    block = re.search(r"```\n(#!/usr/sbin/setkey -f\n# mn.conf.*?)```", doc, re.S).group(1)

    def statements(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]

    assert statements(block) == statements((EXAMPLES / "mipv6-mn.conf").read_text())
    assert parse_setkey(block, path="mn.conf", local_addresses=[HOA, COA]).warnings == []
