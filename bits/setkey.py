"""setkey(8) configuration (ipsec-tools / KAME syntax, as UMIP and RFC 3776-era setups use it).

``parse_setkey(text)`` is pure: text in, ``IpsecConfig`` (SA parameters + an ``Spd``) out, or a
``ConfigError`` naming the file, the line and the problem. ``load_setkey(path)`` is the thin file
reader for the composition root: it refuses a key file that group or others can access
(``KeyFileError``) before parsing it.

Supported statements (the full reference with examples is docs/setkey.md)::

    add [-46n] SRC DST esp SPI [-m transport|tunnel] [-r WINDOW] [-u REQID]
        [-lh|-ls SECONDS] [-bh|-bs BYTES] [-ph|-ps PACKETS] [-esn] [-dir in|out]
        -E ALGORITHM KEY [-A ALGORITHM KEY] ;
    spdadd [-46n] SRC[PORT] DST[PORT] UPPERSPEC [TYPE[,CODE]] -P in|out POLICY ;
        POLICY := discard | none | bypass | ipsec esp/MODE/[A-B]/LEVEL
        LEVEL  := require | use | unique:N
    spddefault in|out discard|bypass ;
    flush ;  spdflush ;

Extensions to setkey (no word for them there): ``-ph/-ps`` packet lifetimes, ``-esn``, ``-dir``,
``spddefault``, address ranges ``A-B`` and ``any``/``any4``/``any6``, port ranges ``[P-Q]``,
ICMP/MH type selectors after ``icmp``/``icmp6``/``mh``, ``bypass`` as a synonym of ``none``.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from .constants import (
    DEFAULT_REPLAY_WINDOW,
    MAX_REPLAY_WINDOW,
    MIN_REPLAY_WINDOW,
    RESERVED_SPI_MAX,
    Action,
    AuthAlg,
    Direction,
    EncAlg,
    IpProto,
    Mode,
)
from .errors import ConfigError, KeyFileError
from .sa import IPAddress, Lifetime, SaParams
from .sad import PolicyDb, Sad, sa_serves
from .spd import (
    DEFAULT_CACHE_SIZE,
    AddressRange,
    IcmpRange,
    Level,
    PortRange,
    Spd,
    SpdEntry,
    TrafficSelector,
)

SaT = TypeVar("SaT")

# --- vocabulary --------------------------------------------------------------------------------------

#: -E names (setkey, Linux ``ip xfrm`` and FreeBSD spellings) -> transform.
ENC_ALGORITHMS: dict[str, EncAlg] = {
    "aes-gcm-16": EncAlg.AES_GCM_16,
    "aes-gcm": EncAlg.AES_GCM_16,
    "aes-gcm16": EncAlg.AES_GCM_16,
    "rijndael-gcm": EncAlg.AES_GCM_16,
    "rijndael-gcm-16": EncAlg.AES_GCM_16,
    "rfc4106(gcm(aes))": EncAlg.AES_GCM_16,
    "aes-cbc": EncAlg.AES_CBC,
    "rijndael-cbc": EncAlg.AES_CBC,
    "cbc(aes)": EncAlg.AES_CBC,
    "chacha20-poly1305": EncAlg.CHACHA20_POLY1305,
    "rfc7539esp(chacha20,poly1305)": EncAlg.CHACHA20_POLY1305,
    "null": EncAlg.NULL,
    "cipher_null": EncAlg.NULL,
}
#: -A names -> integrity transform.
AUTH_ALGORITHMS: dict[str, AuthAlg] = {
    "hmac-sha256": AuthAlg.HMAC_SHA256_128,
    "hmac-sha2-256": AuthAlg.HMAC_SHA256_128,
    "hmac-sha256-128": AuthAlg.HMAC_SHA256_128,
    "hmac(sha256)": AuthAlg.HMAC_SHA256_128,
}
#: Key lengths in octets. AEAD keys end with the 4-octet salt (RFC 4106 section 8.1, RFC 7634 section 2).
ENC_KEY_LENGTHS: dict[EncAlg, tuple[int, ...]] = {
    EncAlg.AES_GCM_16: (20, 28, 36),
    EncAlg.AES_CBC: (16, 24, 32),
    EncAlg.CHACHA20_POLY1305: (36,),
    EncAlg.NULL: (0,),
}
AUTH_KEY_LENGTHS: dict[AuthAlg, tuple[int, ...]] = {AuthAlg.HMAC_SHA256_128: (32,)}  # RFC 4868 2.1.1
AEAD = frozenset({EncAlg.AES_GCM_16, EncAlg.CHACHA20_POLY1305})
SALT_LEN = 4

#: Upper-layer protocol names (a subset of /etc/protocols plus setkey's own words).
PROTOCOLS: dict[str, int | None] = {
    "any": None,
    "icmp": 1,
    "ipv4": 4,
    "ip4": 4,
    "ipencap": 4,
    "tcp": 6,
    "udp": 17,
    "dccp": 33,
    "ipv6": 41,
    "ip6": 41,
    "gre": 47,
    "esp": 50,
    "ah": 51,
    "icmp6": 58,
    "ipv6-icmp": 58,
    "sctp": 132,
    "mh": 135,
    "ipv6-mh": 135,
    "mobility-header": 135,
    "udplite": 136,
}
ULPROTO_ANY = 255  # setkey's number for "any" (IPSEC_ULPROTO_ANY)
#: Mobility Header type names (RFC 6275 section 6.1, mipv6.md section 3).
MH_TYPES: dict[str, int] = {
    "brr": 0, "hoti": 1, "coti": 2, "hot": 3, "cot": 4, "bu": 5, "ba": 6, "back": 6, "be": 7,
}
#: ICMPv6 type names useful in MIPv6 SPDs (RFC 4443, RFC 4861, RFC 6275 sections 6.5-6.8).
ICMP6_TYPES: dict[str, int] = {
    "echo-request": 128, "echo-reply": 129, "rs": 133, "ra": 134, "ns": 135, "na": 136,
    "haad-request": 144, "haad-reply": 145, "mps": 146, "mpa": 147,
}
ICMP4_TYPES: dict[str, int] = {"echo-reply": 0, "unreachable": 3, "echo-request": 8}

_NUMBER = re.compile(r"0[xX][0-9a-fA-F]+|[0-9]+")
_HEX_KEY = re.compile(r"0[xX]([0-9a-fA-F]*)")
_ADDR_PORT = re.compile(r"([^\[\]]+)(?:\[([^\[\]]*)\])?")
_LIFETIME_FLAGS = {
    "-lh": ("hard", "seconds"), "-ls": ("soft", "seconds"),
    "-bh": ("hard", "bytes"), "-bs": ("soft", "bytes"),
    "-ph": ("hard", "packets"), "-ps": ("soft", "packets"),
}


# --- result ------------------------------------------------------------------------------------------


@dataclass(slots=True)
class IpsecConfig:
    """What a setkey file configures: SA parameters in file order, the SPD, and warnings."""

    sas: list[SaParams]
    spd: Spd
    warnings: list[str] = field(default_factory=list)

    def policy_db(self, make_sa: Callable[[SaParams], SaT]) -> PolicyDb:
        """Build the SAD (``make_sa`` turns parameters into engine SAs) and tie it to the SPD."""
        return PolicyDb(self.spd, Sad(make_sa(p) for p in self.sas))


# --- tokens ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Token:
    text: str
    line: int
    quoted: bool = False


def tokenize(text: str, path: str) -> list[list[Token]]:
    """Split ``text`` into statements (token lists ending before each ``;``).

    ``#`` starts a comment to the end of the line; ``"..."`` is one token (keys); a statement may
    span lines.
    """
    statements: list[list[Token]] = []
    current: list[Token] = []
    i, n, line = 0, len(text), 1
    while i < n:
        c = text[i]
        if c == "\n":
            line += 1
            i += 1
        elif c.isspace():
            i += 1
        elif c == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end
        elif c == ";":
            statements.append(current)
            current = []
            i += 1
        elif c == '"':
            end = text.find('"', i + 1)
            if end < 0 or "\n" in text[i:end]:
                raise ConfigError("unterminated quoted string", path=path, line=line)
            current.append(Token(text[i + 1 : end], line, quoted=True))
            i = end + 1
        else:
            j = i
            while j < n and not text[j].isspace() and text[j] not in ';"#':
                j += 1
            current.append(Token(text[i:j], line))
            i = j
    if current:
        first = current[0]
        raise ConfigError(f"statement {first.text!r} is not ended by ';'", path=path, line=first.line)
    return statements


class _Cursor:
    """Reads one statement's tokens; every error names the file and the line."""

    def __init__(self, tokens: list[Token], path: str) -> None:
        self.tokens, self.path, self.pos = tokens, path, 0
        self.line = tokens[0].line if tokens else 0

    def error(self, message: str, tok: Token | None = None) -> ConfigError:
        return ConfigError(message, path=self.path, line=tok.line if tok else self.line)

    def peek(self) -> Token | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, what: str) -> Token:
        tok = self.peek()
        if tok is None:
            last = self.tokens[-1] if self.tokens else None
            raise self.error(f"missing {what} before ';'", last)
        self.pos += 1
        return tok

    def word(self, what: str) -> Token:
        """Next unquoted token."""
        tok = self.take(what)
        if tok.quoted:
            raise self.error(f"expected {what}, got a quoted string", tok)
        return tok

    def number(self, what: str, lo: int, hi: int) -> tuple[int, Token]:
        tok = self.word(what)
        return _number(self, tok, what, lo, hi), tok

    def done(self) -> bool:
        return self.pos >= len(self.tokens)


def _number(cur: _Cursor, tok: Token, what: str, lo: int, hi: int) -> int:
    if tok.quoted or not _NUMBER.fullmatch(tok.text):
        raise cur.error(f"{what} must be a number, not {tok.text!r}", tok)
    value = int(tok.text, 0) if tok.text[:2].lower() == "0x" else int(tok.text)
    if not lo <= value <= hi:
        raise cur.error(f"{what} {tok.text} out of range {lo}..{hi}", tok)
    return value


def _address(cur: _Cursor, tok: Token, what: str) -> IPAddress:
    try:
        return ipaddress.ip_address(tok.text)
    except ValueError:
        raise cur.error(f"{what} {tok.text!r} is not an IPv4 or IPv6 address", tok) from None


# --- add: SAs ------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _SaOptions:
    mode: Mode = Mode.TRANSPORT
    replay_window: int = DEFAULT_REPLAY_WINDOW  # setkey's default is none; ours is safer
    reqid: int | None = None
    enc: tuple[EncAlg, bytes, Token] | None = None
    auth: tuple[AuthAlg, bytes, Token] | None = None
    esn: bool = False
    direction: Direction | None = None
    lifetimes: dict[tuple[str, str], int] = field(default_factory=dict)


class _Parser:
    def __init__(self, path: str, local: frozenset[IPAddress] | None, cache_size: int) -> None:
        self.path = path
        self.base = os.path.basename(path) or path
        self.local = local
        self.sas: list[tuple[SaParams, int]] = []
        self.entries: list[tuple[SpdEntry, int]] = []
        self.defaults = {Direction.IN: Action.DISCARD, Direction.OUT: Action.DISCARD}
        self.cache_size = cache_size

    def run(self, text: str) -> IpsecConfig:
        handlers = {
            "add": self.add,
            "spdadd": self.spdadd,
            "spddefault": self.spddefault,
            "flush": self.flush,
            "spdflush": self.spdflush,
        }
        for tokens in tokenize(text, self.path):
            if not tokens:
                continue  # empty statement ";"
            cur = _Cursor(tokens, self.path)
            head = cur.word("a statement")
            handler = handlers.get(head.text)
            if handler is None:
                expected = ", ".join(handlers)
                raise cur.error(f"unknown statement {head.text!r} (expected {expected})", head)
            handler(cur)
        return self.finish()

    # --- flush / spdflush / spddefault ---

    def flush(self, cur: _Cursor) -> None:
        self._no_more(cur, "flush")
        self.sas.clear()

    def spdflush(self, cur: _Cursor) -> None:
        self._no_more(cur, "spdflush")
        self.entries.clear()

    def spddefault(self, cur: _Cursor) -> None:
        direction = self._direction(cur, cur.word("direction (in or out)"))
        tok = cur.word("default action (discard or bypass)")
        actions = {"discard": Action.DISCARD, "bypass": Action.BYPASS, "none": Action.BYPASS}
        if tok.text not in actions:
            raise cur.error(f"default action must be discard or bypass, not {tok.text!r}", tok)
        self._no_more(cur, "spddefault")
        self.defaults[direction] = actions[tok.text]

    def _no_more(self, cur: _Cursor, what: str) -> None:
        tok = cur.peek()
        if tok is not None:
            raise cur.error(f"unexpected {tok.text!r} after {what}", tok)

    def _direction(self, cur: _Cursor, tok: Token) -> Direction:
        if tok.text == "in":
            return Direction.IN
        if tok.text == "out":
            return Direction.OUT
        if tok.text == "fwd":
            raise cur.error("direction fwd is not supported: this engine is a host; use out for forwarded "
                            "traffic it protects", tok)
        raise cur.error(f"direction must be in or out, not {tok.text!r}", tok)

    # --- add ---

    def add(self, cur: _Cursor) -> None:
        family = self._families(cur)
        src = _address(cur, self._plain_address(cur, "source address"), "source address")
        dst = _address(cur, self._plain_address(cur, "destination address"), "destination address")
        if src.version != dst.version:
            raise cur.error(f"SA addresses {src} and {dst} mix IPv4 and IPv6")
        if family and src.version != family:
            raise cur.error(f"-{family} given but the SA addresses are IPv{src.version}")
        proto = cur.word("protocol (esp)")
        if proto.text != "esp":
            raise cur.error(f"protocol {proto.text!r} is not supported: only esp", proto)
        spi, spi_tok = cur.number("SPI", 0, 0xFFFFFFFF)
        if spi <= RESERVED_SPI_MAX:
            raise cur.error(f"SPI {spi} is reserved: 0 and 1..255 are not for SAs (RFC 4303 section 2.1); "
                            "use 256 or more", spi_tok)
        opts = _SaOptions()
        while not cur.done():
            self._sa_option(cur, opts)
        self._duplicate_spi(cur, spi, dst)
        params = self._sa_params(cur, spi, src, dst, opts)
        self._key_reuse(cur, params)
        self.sas.append((params, cur.line))

    def _families(self, cur: _Cursor) -> int:
        family = 0
        while (tok := cur.peek()) is not None and tok.text in ("-4", "-6", "-n"):
            cur.pos += 1
            if tok.text != "-n":
                family = int(tok.text[1])
        return family

    def _plain_address(self, cur: _Cursor, what: str) -> Token:
        tok = cur.word(what)
        if "/" in tok.text or "[" in tok.text:
            raise cur.error(f"an SA {what} is one address, without prefix or port: {tok.text!r}", tok)
        return tok

    def _sa_option(self, cur: _Cursor, opts: _SaOptions) -> None:
        flag = cur.word("an option")
        f = flag.text
        if f == "-m":
            opts.mode = self._mode(cur, cur.word("mode"))
        elif f == "-r":
            opts.replay_window = self._replay_window(cur)
        elif f == "-u":
            opts.reqid = cur.number("reqid", 1, 0xFFFFFFFF)[0]
        elif f == "-E":
            opts.enc = self._enc(cur, flag)
        elif f == "-A":
            opts.auth = self._auth(cur, flag)
        elif f == "-esn":
            opts.esn = True
        elif f == "-dir":
            opts.direction = self._direction(cur, cur.word("direction (in or out)"))
        elif f in _LIFETIME_FLAGS:
            opts.lifetimes[_LIFETIME_FLAGS[f]] = cur.number(f"lifetime {f}", 0, 2**64 - 1)[0]
        elif f in ("-f", "-C", "-c"):
            raise cur.error(f"option {f} (padding/compression) is not supported", flag)
        else:
            raise cur.error(f"unknown SA option {f!r}", flag)

    def _mode(self, cur: _Cursor, tok: Token) -> Mode:
        if tok.text == "transport":
            return Mode.TRANSPORT
        if tok.text == "tunnel":
            return Mode.TUNNEL
        raise cur.error(f"mode must be transport or tunnel, not {tok.text!r}", tok)

    def _replay_window(self, cur: _Cursor) -> int:
        window, tok = cur.number("replay window -r", 0, MAX_REPLAY_WINDOW)
        if 0 < window < MIN_REPLAY_WINDOW:
            raise cur.error(f"replay window {window} is below the minimum of {MIN_REPLAY_WINDOW} packets "
                            "(RFC 4303 section 3.4.3); use -r 0 to turn anti-replay off", tok)
        return window

    def _enc(self, cur: _Cursor, flag: Token) -> tuple[EncAlg, bytes, Token]:
        name = cur.word("encryption algorithm")
        alg = ENC_ALGORITHMS.get(name.text.lower())
        if alg is None:
            raise cur.error(f"unknown encryption algorithm {name.text!r} (supported: "
                            f"{', '.join(ENC_ALGORITHMS)})", name)
        if alg == EncAlg.NULL and self._key_absent(cur):
            return alg, b"", name
        return alg, self._key(cur, name), name

    def _auth(self, cur: _Cursor, flag: Token) -> tuple[AuthAlg, bytes, Token]:
        name = cur.word("integrity algorithm")
        alg = AUTH_ALGORITHMS.get(name.text.lower())
        if alg is None:
            raise cur.error(f"unknown integrity algorithm {name.text!r} (supported: "
                            f"{', '.join(AUTH_ALGORITHMS)})", name)
        return alg, self._key(cur, name), name

    @staticmethod
    def _key_absent(cur: _Cursor) -> bool:
        tok = cur.peek()
        return tok is None or (not tok.quoted and tok.text.startswith("-"))

    def _key(self, cur: _Cursor, alg: Token) -> bytes:
        if self._key_absent(cur):
            raise cur.error(f"missing key after {alg.text}", alg)
        tok = cur.take("key")
        if tok.quoted:
            try:
                return tok.text.encode("utf-8")
            except UnicodeEncodeError:
                raise cur.error("quoted key is not valid text", tok) from None
        m = _HEX_KEY.fullmatch(tok.text)
        if m is None or len(m.group(1)) % 2:
            raise cur.error(
                'key must be 0x followed by an even number of hex digits, or a "quoted string"', tok
            )
        return bytes.fromhex(m.group(1))

    def _sa_params(
        self, cur: _Cursor, spi: int, src: IPAddress, dst: IPAddress, opts: _SaOptions
    ) -> SaParams:
        enc, enc_key, auth, auth_key = self._algorithms(cur, opts)
        soft, hard = self._lifetime(opts, "soft"), self._lifetime(opts, "hard")
        self._check_lifetimes(cur, soft, hard)
        return SaParams(
            spi=spi,
            src=src,
            dst=dst,
            direction=self._sa_direction(cur, spi, src, dst, opts.direction),
            mode=opts.mode,
            enc=enc,
            enc_key=enc_key,
            auth=auth,
            auth_key=auth_key,
            esn=opts.esn,
            replay_window=opts.replay_window,
            soft=soft,
            hard=hard,
            reqid=opts.reqid,
        )

    def _algorithms(self, cur: _Cursor, opts: _SaOptions) -> tuple[EncAlg, bytes, AuthAlg, bytes]:
        if opts.enc is None:
            raise cur.error("SA has no -E algorithm (ESP needs one; -E null for integrity only)")
        enc, enc_key, enc_tok = opts.enc
        _check_key(cur, enc_tok, enc, enc_key, ENC_KEY_LENGTHS[enc])
        if enc in AEAD:
            if opts.auth is not None:
                raise cur.error(f"{enc.value} is a combined-mode algorithm with its own integrity: remove -A "
                                "(RFC 4303 section 3.2.3)", opts.auth[2])
            return enc, enc_key, AuthAlg.NONE, b""
        if opts.auth is None:
            raise cur.error(f"{enc.value} gives no integrity: add -A hmac-sha256 KEY (RFC 4303 section 3.2, "
                            "RFC 8221 section 5)", enc_tok)
        auth, auth_key, auth_tok = opts.auth
        _check_key(cur, auth_tok, auth, auth_key, AUTH_KEY_LENGTHS[auth])
        return enc, enc_key, auth, auth_key

    def _sa_direction(self, cur: _Cursor, spi: int, src: IPAddress, dst: IPAddress,
                      explicit: Direction | None) -> Direction:
        """``-dir`` if given, else inferred from the node's local addresses."""
        if explicit is not None:
            return explicit
        what = f"SA {spi:#010x} from {src} to {dst}"
        if self.local is None:
            raise cur.error(f"cannot tell whether {what} is inbound or outbound: add -dir in or -dir out, "
                            "or give the node's local addresses")
        s, d = src in self.local, dst in self.local
        if s and not d:
            return Direction.OUT
        if d and not s:
            return Direction.IN
        if s and d:
            raise cur.error(f"both ends of {what} are local addresses: add -dir in or -dir out")
        raise cur.error(f"neither end of {what} is a local address of this node: add -dir in or -dir out, "
                        "or check the addresses")

    def _lifetime(self, opts: _SaOptions, kind: str) -> Lifetime:
        """0 or absent: no limit (as in setkey)."""
        units = ("bytes", "packets", "seconds")
        got = {unit: opts.lifetimes.get((kind, unit)) or None for unit in units}
        return Lifetime(**got)  # type: ignore[arg-type]

    def _check_lifetimes(self, cur: _Cursor, soft: Lifetime, hard: Lifetime) -> None:
        """A soft lifetime warns before the hard one ends the SA (RFC 4301 section 4.4.2.1)."""
        for unit, flag in (("seconds", "-ls/-lh"), ("bytes", "-bs/-bh"), ("packets", "-ps/-ph")):
            s, h = getattr(soft, unit), getattr(hard, unit)
            if s is not None and h is not None and s >= h:
                raise cur.error(f"soft lifetime {s} {unit} is not below the hard lifetime {h} ({flag})")

    def _duplicate_spi(self, cur: _Cursor, spi: int, dst: IPAddress) -> None:
        for other, line in self.sas:
            if other.spi == spi and other.dst == dst:
                raise cur.error(
                    f"duplicate SPI {spi:#010x} for destination {dst} (first at line {line})"
                )

    def _key_reuse(self, cur: _Cursor, p: SaParams) -> None:
        """AEAD nonces are only unique per key: two SAs must never share key and salt."""
        if p.enc not in AEAD:
            return
        for other, line in self.sas:
            if other.enc == p.enc and other.enc_key == p.enc_key:
                raise cur.error(
                    f"SA {p.spi:#010x} reuses the {p.enc.value} key and salt of SA {other.spi:#010x} "
                    f"(line {line}): each SA needs its own (RFC 4106 section 8.1)"
                )

    # --- spdadd ---

    def spdadd(self, cur: _Cursor) -> None:
        family = self._families(cur)
        src_tok, dst_tok = cur.word("source selector"), cur.word("destination selector")
        src, sport = self._range_and_port(cur, src_tok)
        dst, dport = self._range_and_port(cur, dst_tok)
        proto, type_sel = self._upperspec(cur)
        flag = cur.word("-P")
        if flag.text != "-P":
            raise cur.error(f"expected -P, got {flag.text!r}", flag)
        direction = self._direction(cur, cur.word("direction (in or out)"))
        outbound = direction == Direction.OUT
        local, remote = (src, dst) if outbound else (dst, src)
        lport, rport = (sport, dport) if outbound else (dport, sport)
        for r in (local, remote):
            if family and r.version not in (0, family):
                raise cur.error(f"-{family} given but the selector has IPv{r.version} addresses")
        try:
            sel = TrafficSelector(local, remote, proto, lport, rport, **type_sel)
        except ConfigError as exc:
            raise cur.error(exc.problem) from None
        entry = self._policy(cur, self._entry_name(cur.line), direction, sel)
        self.entries.append((entry, cur.line))

    def _range_and_port(self, cur: _Cursor, tok: Token) -> tuple[AddressRange, PortRange]:
        m = _ADDR_PORT.fullmatch(tok.text)
        if m is None:
            raise cur.error(f"bad address selector {tok.text!r} (expected ADDRESS[/LEN][[PORT]])", tok)
        try:
            addr = AddressRange.parse(m.group(1))
        except ConfigError as exc:
            raise cur.error(exc.problem, tok) from None
        port = m.group(2)
        if port is None or port == "any":
            return addr, PortRange.ANY
        lo, _, hi = port.partition("-")
        first = _number(cur, Token(lo, tok.line), "port", 0, 0xFFFF)
        last = _number(cur, Token(hi, tok.line), "port", first, 0xFFFF) if hi else first
        return addr, PortRange(first, last)

    def _upperspec(self, cur: _Cursor) -> tuple[int | None, dict]:
        tok = cur.word("upper-layer protocol")
        name = tok.text.lower()
        if name in PROTOCOLS:
            proto = PROTOCOLS[name]
        elif _NUMBER.fullmatch(name):
            proto = _number(cur, tok, "upper-layer protocol", 0, 255)
            proto = None if proto == ULPROTO_ANY else proto
        else:
            raise cur.error(f"unknown upper-layer protocol {tok.text!r} (a number 0..255, any, or one of "
                            f"{', '.join(n for n in PROTOCOLS if n != 'any')})", tok)
        nxt = cur.peek()
        if nxt is None or nxt.quoted or nxt.text.startswith("-"):
            return proto, {}
        cur.pos += 1
        if proto == IpProto.MH:
            return proto, {"mh_type": self._mh_type(cur, nxt)}
        if proto in (IpProto.ICMP, IpProto.ICMPV6):
            return proto, {"icmp": self._icmp(cur, nxt, proto)}
        raise cur.error(f"unexpected {nxt.text!r}: a type selector only follows icmp, icmp6 or mh", nxt)

    def _mh_type(self, cur: _Cursor, tok: Token) -> int:
        name = tok.text.lower()
        if name in MH_TYPES:
            return MH_TYPES[name]
        if not _NUMBER.fullmatch(name):
            raise cur.error(f"unknown Mobility Header type {tok.text!r} (a number 0..255 or one of "
                            f"{', '.join(MH_TYPES)})", tok)
        return _number(cur, tok, "MH type", 0, 255)

    def _icmp(self, cur: _Cursor, tok: Token, proto: int) -> IcmpRange:
        names = ICMP6_TYPES if proto == IpProto.ICMPV6 else ICMP4_TYPES
        type_text, comma, code_text = tok.text.partition(",")
        if type_text.lower() in names:
            icmp_type = names[type_text.lower()]
        else:
            icmp_type = _number(cur, Token(type_text, tok.line), "ICMP type", 0, 255)
        if not comma:
            return IcmpRange.of(icmp_type)
        lo, _, hi = code_text.partition("-")
        code = _number(cur, Token(lo, tok.line), "ICMP code", 0, 255)
        last = _number(cur, Token(hi, tok.line), "ICMP code", code, 255) if hi else code
        return IcmpRange.of(icmp_type, code, last)

    def _entry_name(self, line: int) -> str:
        name = f"{self.base}:{line}"
        taken = {e.name for e, _ in self.entries}
        n = 2
        while name in taken:
            name = f"{self.base}:{line}.{n}"
            n += 1
        return name

    # --- -P ... policy ---

    def _policy(self, cur: _Cursor, name: str, direction: Direction, sel: TrafficSelector) -> SpdEntry:
        tok = cur.word("policy (discard, none or ipsec)")
        word = tok.text
        if word in ("discard", "none", "bypass"):
            self._no_more(cur, word)
            return SpdEntry(name, direction, sel, Action.DISCARD if word == "discard" else Action.BYPASS)
        if word in ("prio", "priority"):
            raise cur.error("policy priorities are not supported: the SPD is ordered as the file is", tok)
        if word == "entrust":
            raise cur.error("policy entrust is not supported: write discard, none or ipsec", tok)
        if word != "ipsec":
            raise cur.error(f"policy must be discard, none or ipsec, not {word!r}", tok)
        request = cur.word("an esp/MODE/SRC-DST/LEVEL request")
        extra = cur.peek()
        if extra is not None:
            raise cur.error("SA bundles (several requests, nested ESP, AH) are not supported", extra)
        return self._request(cur, request, name, direction, sel)

    def _request(self, cur: _Cursor, tok: Token, name: str, direction: Direction,
                 sel: TrafficSelector) -> SpdEntry:
        parts = tok.text.split("/")
        if len(parts) != 4:
            raise cur.error(f"request {tok.text!r} must be PROTOCOL/MODE/SRC-DST/LEVEL, "
                            "e.g. esp/transport//require", tok)
        proto, mode_text, ends, level_text = parts
        if proto != "esp":
            raise cur.error(f"protocol {proto!r} is not supported in policies: only esp", tok)
        mode = self._mode(cur, Token(mode_text, tok.line))
        tsrc, tdst = self._tunnel_ends(cur, tok, mode, ends)
        level, reqid = self._level(cur, tok, level_text)
        return SpdEntry(name, direction, sel, Action.PROTECT, mode, tsrc, tdst, level, reqid)

    def _tunnel_ends(self, cur: _Cursor, tok: Token, mode: Mode,
                     ends: str) -> tuple[IPAddress | None, IPAddress | None]:
        if mode == Mode.TRANSPORT:
            if ends:
                raise cur.error(
                    f"transport mode takes no endpoints: write esp/transport//..., not {ends!r}", tok
                )
            return None, None
        a, dash, b = ends.partition("-")
        if not dash:
            raise cur.error("tunnel mode needs the outer endpoints: esp/tunnel/SRC-DST/...", tok)
        src = _address(cur, Token(a, tok.line), "tunnel source")
        dst = _address(cur, Token(b, tok.line), "tunnel destination")
        if src.version != dst.version:
            raise cur.error(f"tunnel endpoints {src} and {dst} mix IPv4 and IPv6", tok)
        return src, dst

    def _level(self, cur: _Cursor, tok: Token, text: str) -> tuple[Level, int | None]:
        if text == "require":
            return Level.REQUIRE, None
        if text == "use":
            return Level.USE, None
        if text.startswith("unique:"):
            return Level.UNIQUE, _number(cur, Token(text[7:], tok.line), "unique id", 1, 0xFFFFFFFF)
        if text == "unique":
            raise cur.error("level unique needs the SA's reqid: unique:N with add ... -u N", tok)
        if text in ("", "default"):
            raise cur.error("level default means the kernel's default, which is not known here: "
                            "write require or use", tok)
        raise cur.error(f"level must be require, use or unique:N, not {text!r}", tok)

    # --- whole-file checks ---

    def finish(self) -> IpsecConfig:
        sas = [p for p, _ in self.sas]
        warnings = self._policies_without_sa(sas) + self._sas_without_policy()
        spd = Spd(
            (e for e, _ in self.entries),
            default_in=self.defaults[Direction.IN],
            default_out=self.defaults[Direction.OUT],
            cache_size=self.cache_size,
        )
        return IpsecConfig(sas, spd, warnings)

    def _policies_without_sa(self, sas: list[SaParams]) -> list[str]:
        """A require/unique policy needs an SA (error); a use policy may wait for one (warning)."""
        warnings = []
        for entry, line in self.entries:
            if entry.action != Action.PROTECT or any(sa_serves(entry, p) for p in sas):
                continue
            if entry.level != Level.USE:
                raise ConfigError(self._no_sa_problem(entry, sas), path=self.path, line=line)
            warnings.append(f"{self.path}:{line}: policy {entry.name} has no SA yet; "
                            "its traffic goes in the clear (level use)")
        return warnings

    def _sas_without_policy(self) -> list[str]:
        warnings = []
        for p, line in self.sas:
            if any(sa_serves(e, p) for e, _ in self.entries):
                continue
            why = "; packets arriving on it fail the selector check" if p.direction == Direction.IN else ""
            what = f"SA {p.spi:#010x} ({p.direction.value})"
            warnings.append(f"{self.path}:{line}: {what} serves no policy{why}")
        return warnings

    def _no_sa_problem(self, entry: SpdEntry, sas: list[SaParams]) -> str:
        d, m = entry.direction.value, entry.mode.value  # type: ignore[union-attr]
        head = f"policy -P {d} requires an SA ({entry.level.value}) but "
        if entry.reqid is not None:
            same = [p for p in sas if p.reqid == entry.reqid]
            if not same:
                return head + f"no SA has reqid {entry.reqid} (add ... -u {entry.reqid})"
            p = same[0]
            return head + (f"the SA with -u {entry.reqid} (SPI {p.spi:#010x}) is {p.direction.value} "
                           f"{p.mode.value}, the policy needs {d} {m}")
        if entry.mode == Mode.TUNNEL:
            return head + f"no {d} tunnel SA from {entry.tunnel_src} to {entry.tunnel_dst} is configured"
        s = entry.selector
        src, dst = (s.local, s.remote) if entry.direction == Direction.OUT else (s.remote, s.local)
        return head + f"no {d} transport SA from {src} to {dst} is configured"


def _one_of(values: tuple[int, ...]) -> str:
    """(16, 24, 32) -> '16, 24 or 32'."""
    head = ", ".join(str(n) for n in values[:-1])
    return f"{head} or {values[-1]}" if head else str(values[-1])


def _check_key(
    cur: _Cursor, tok: Token, alg: EncAlg | AuthAlg, key: bytes, lengths: tuple[int, ...]
) -> None:
    if len(key) in lengths:
        return
    expected = _one_of(lengths)
    if alg in AEAD and len(key) + SALT_LEN in lengths:
        rfc = "RFC 4106 section 8.1" if alg == EncAlg.AES_GCM_16 else "RFC 7634 section 2"
        raise cur.error(f"{alg.value} key of {len(key)} octets has no salt: append the 4-octet salt "
                        f"({rfc}), {expected} octets in all", tok)
    if alg == EncAlg.NULL:
        raise cur.error("-E null takes no key", tok)
    raise cur.error(f"wrong key length for {alg.value}: {len(key)} octets, expected {expected}", tok)


# --- entry points ------------------------------------------------------------------------------


def parse_setkey(
    text: str,
    *,
    path: str = "<setkey>",
    local_addresses: Iterable[IPAddress | str] | None = None,
    cache_size: int = DEFAULT_CACHE_SIZE,
) -> IpsecConfig:
    """Parse setkey ``text``. ``local_addresses`` (this node's addresses) tell inbound SAs from
    outbound ones when an ``add`` has no ``-dir``. Raises ConfigError naming ``path`` and the line."""
    local = None
    if local_addresses is not None:
        try:
            local = frozenset(ipaddress.ip_address(a) for a in local_addresses)
        except ValueError as exc:
            raise ConfigError(f"bad local address: {exc}") from None
    return _Parser(path, local, cache_size).run(text)


def read_key_file(path: str | os.PathLike[str]) -> str:
    """Read a file that holds keys, refusing one that group or others can access (KeyFileError).

    The check uses the opened file's own mode, so it applies to the file as installed (git does not
    keep modes: a checked-out example must be chmod 600 before use).
    """
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            st = os.fstat(f.fileno())
            _check_key_file_mode(name, st)
            data = f.read()
    except OSError as exc:
        raise KeyFileError(f"cannot read key file: {exc.strerror or exc}", path=name) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text (byte {exc.start})", path=name) from None


def _check_key_file_mode(name: str, st: os.stat_result) -> None:
    mode = st.st_mode & 0o777
    if mode & 0o077:
        raise KeyFileError(
            f"key file is accessible by group or others (mode {mode:04o}); it holds secret keys: "
            f"run 'chmod 600 {name}'",
            path=name,
        )
    if st.st_uid not in (0, os.geteuid()):
        raise KeyFileError(f"key file is owned by uid {st.st_uid}, not by root or by us: "
                           f"run 'chown root {name}'", path=name)


def load_setkey(
    path: str | os.PathLike[str],
    *,
    local_addresses: Iterable[IPAddress | str] | None = None,
    cache_size: int = DEFAULT_CACHE_SIZE,
) -> IpsecConfig:
    """Read and parse a setkey file (for the composition root; cores never read files)."""
    name = os.fspath(path)
    text = read_key_file(name)
    return parse_setkey(text, path=name, local_addresses=local_addresses, cache_size=cache_size)


__all__ = [
    "AUTH_ALGORITHMS",
    "ENC_ALGORITHMS",
    "IpsecConfig",
    "load_setkey",
    "parse_setkey",
    "read_key_file",
    "tokenize",
]
