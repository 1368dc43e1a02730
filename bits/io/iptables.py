"""iptables / ip6tables rules that hand packets to the processor (rendered from ``rules/*.tmpl``).

Two dedicated chains per family, each reached by ONE jump inserted first in a built-in chain:

=========  ========  ===========  =====================================================
direction  table     built-in     why
=========  ========  ===========  =====================================================
out        mangle    OUTPUT       after routing; nf_reinject re-routes LOCAL_OUT packets
                                  whose addresses changed (tunnel mode)
in         raw       PREROUTING   before conntrack, so conntrack sees decrypted packets
=========  ========  ===========  =====================================================

Loopback is excluded, and so are packets with ``emitted_mark`` (already processed: results of
another IP version the adapter sent itself, ``bits/io/crossfamily.py``); IPv6 Neighbour Discovery
optionally too (``nd_bypass``). The NFQUEUE target
never has ``--queue-bypass``: without a bound processor the kernel drops the packets (fail
closed). Several queues for one direction become ``--queue-balance FIRST:LAST``.

Each table is changed in one ``iptables-restore --noflush`` transaction, so there is no moment when
the jump exists and the chain is empty (traffic in clear). ``install`` is idempotent: it declares
(= flushes) our chain, refills it and adds the jump only when missing. ``remove`` deletes exactly
our jump and chains; if ``install`` had created the table (nf_tables backend: tables appear when
first used), the jump's comment says so and ``remove`` deletes the then-empty table, so
``iptables-save`` reads exactly as before ``install``.

Rules are written in the canonical form ``iptables-save`` prints, so ``show`` can tell an
installed, up-to-date ruleset from a stale one by comparing lines.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Protocol

from ..errors import BitsError, ConfigError
from .crossfamily import EMITTED_MARK

CHAIN_OUT = "MIPBITS-OUT"
CHAIN_IN = "MIPBITS-IN"
JUMP_COMMENT = "mipbits"
JUMP_COMMENT_NEW_TABLE = "mipbits created-table"  # install created the table: remove deletes it
RULES_DIR = Path(__file__).resolve().parents[2] / "rules"


class IptablesError(BitsError):
    """An iptables command failed; carries the command and its stderr."""


#: 1500 - 40 (IPv6) - 20 (TCP) - 40 (tunnel-mode outer IPv6) - 57 (worst-case ESP overhead), rounded down
DEFAULT_TCP_MSS = 1340


@dataclass(frozen=True, slots=True)
class RuleSettings:
    """The ``[rules]`` section of a node configuration."""

    ipv4: bool = True
    ipv6: bool = True
    interfaces: tuple[str, ...] = ()  # empty: every interface except loopback
    nd_bypass: bool = True  # never queue IPv6 Neighbour Discovery (ICMPv6 133-137)
    # TCP MSS written into outgoing SYN / SYN-ACK (0: leave it). ESP adds 26..57 octets (plus 20/40
    # in tunnel mode) after the kernel sized the segment for the plain path, so without clamping a
    # full-sized segment no longer fits the link MTU (RFC 4301 section 8 leaves PMTU to the host).
    tcp_mss: int = DEFAULT_TCP_MSS
    # Packets carrying this mark were already processed: results of another IP version the
    # adapter emitted itself (bits/io/crossfamily.py), or what a tunnel adapter sends after the
    # engine. Both chains RETURN on it (0: no such rule).
    emitted_mark: int = EMITTED_MARK


class QueueLike(Protocol):
    outbound: tuple[int, ...]
    inbound: tuple[int, ...]


class RulesConfig(Protocol):
    """What the rules need from a node configuration (``mipbits.nodeconfig.NodeConfig``)."""

    rules: RuleSettings
    queues: QueueLike


@dataclass(frozen=True, slots=True)
class Family:
    name: str  # "ipv4" | "ipv6"
    cmd: str  # "iptables" | "ip6tables"
    nft: str  # nft family: "ip" | "ip6"


IPV4 = Family("ipv4", "iptables", "ip")
IPV6 = Family("ipv6", "ip6tables", "ip6")


@dataclass(frozen=True, slots=True)
class Hook:
    direction: str  # "out" | "in"
    table: str
    builtin: str
    chain: str
    template: str


HOOK_OUT = Hook("out", "mangle", "OUTPUT", CHAIN_OUT, "outbound.tmpl")
HOOK_IN = Hook("in", "raw", "PREROUTING", CHAIN_IN, "inbound.tmpl")
HOOKS = (HOOK_OUT, HOOK_IN)


# -- rendering (pure) ----------------------------------------------------------------------------


def queue_target(queues: Sequence[int]) -> str:
    """``-j NFQUEUE`` arguments for one direction: one queue, or a contiguous balanced range."""
    qs = sorted(queues)
    if not qs:
        raise ConfigError("no queue configured")
    if len(qs) == 1:
        return f"-j NFQUEUE --queue-num {qs[0]}"
    if qs != list(range(qs[0], qs[-1] + 1)):
        raise ConfigError(f"queues {qs} are not contiguous: --queue-balance needs a range")
    return f"-j NFQUEUE --queue-balance {qs[0]}:{qs[-1]}"


def _template(name: str) -> Template:
    path = RULES_DIR / name
    try:
        return Template(path.read_text())
    except OSError as exc:
        raise ConfigError(f"rules template missing: {exc}") from None


def chain_rules(cfg: RulesConfig, family: Family, hook: Hook) -> list[str]:
    """The ``-A CHAIN ...`` lines of our chain, in iptables-save's canonical form."""
    return [line for line in _render_table(cfg, family, hook, jump="").splitlines() if line.startswith("-A ")]


def _render_table(cfg: RulesConfig, family: Family, hook: Hook, jump: str) -> str:
    rules = cfg.rules
    queues = cfg.queues.outbound if hook.direction == "out" else cfg.queues.inbound
    target = queue_target(queues)
    flag = "-o" if hook.direction == "out" else "-i"
    ifaces = rules.interfaces or ("",)
    queue = "\n".join(
        f"-A {hook.chain} {flag} {i} {target}" if i else f"-A {hook.chain} {target}" for i in ifaces
    )
    bypass = ""
    if rules.emitted_mark:
        mark = f"{rules.emitted_mark:#x}"
        bypass = f"-A {hook.chain} -m mark --mark {mark}/{mark} -j RETURN\n"
    if family is IPV6 and rules.nd_bypass:
        bypass += _template("nd-bypass.tmpl").substitute(chain=hook.chain)
    if hook.direction == "out" and rules.tcp_mss:
        bypass += (f"\n-A {hook.chain} -p tcp -m tcp --tcp-flags SYN,RST SYN "
                   f"-j TCPMSS --set-mss {rules.tcp_mss}")
    text = _template(hook.template).substitute(
        family=family.cmd, chain=hook.chain, jump=jump, bypass=bypass, queue=queue
    )
    return "\n".join(line for line in text.splitlines() if line.strip()) + "\n"


def jump_rule(hook: Hook, created_table: bool = False, op: str = "-I") -> str:
    comment = JUMP_COMMENT_NEW_TABLE if created_table else JUMP_COMMENT
    where = f"{hook.builtin} 1" if op == "-I" else hook.builtin
    return f'{op} {where} -m comment --comment "{comment}" -j {hook.chain}'


def families(cfg: RulesConfig) -> list[Family]:
    return [f for f, on in ((IPV4, cfg.rules.ipv4), (IPV6, cfg.rules.ipv6)) if on]


def render_rules(cfg: RulesConfig) -> str:
    """Everything ``install`` would put in place, as iptables-restore input per family."""
    parts = []
    for family in families(cfg):
        for hook in HOOKS:
            parts.append(_render_table(cfg, family, hook, jump_rule(hook, op="-A")))
    return "".join(parts)


# -- iptables-save parsing (pure) ----------------------------------------------------------------


@dataclass
class TableDump:
    chains: dict[str, str] = field(default_factory=dict)  # name -> policy ("-" for user chains)
    rules: list[str] = field(default_factory=list)  # "-A CHAIN ..." lines


_CHAIN_LINE = re.compile(r"^:(\S+) (\S+)")


def parse_save(text: str) -> dict[str, TableDump]:
    """``iptables-save`` output -> tables (comments and counters dropped)."""
    tables: dict[str, TableDump] = {}
    current: TableDump | None = None
    for raw in text.splitlines():
        line = _strip_counters(raw.strip())
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            current = tables.setdefault(line[1:], TableDump())
        elif line == "COMMIT":
            current = None
        elif current is not None and (m := _CHAIN_LINE.match(line)):
            current.chains[m.group(1)] = m.group(2)
        elif current is not None and line.startswith("-A "):
            current.rules.append(line)
    return tables


def _strip_counters(line: str) -> str:
    return re.sub(r"^\[\d+:\d+\] ", "", line)


def normalise_save(text: str) -> str:
    """iptables-save output without comments (timestamps) and counters, for comparisons."""
    out = []
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        out.append(re.sub(r" \[\d+:\d+\]$", " [0:0]", line))
    return "\n".join(out) + "\n"


def jumps_to(table: TableDump, hook: Hook) -> list[str]:
    return [r for r in table.rules if r.startswith(f"-A {hook.builtin} ") and r.endswith(f"-j {hook.chain}")]


def table_is_empty(table: TableDump) -> bool:
    """No rules, no user chains, every built-in policy ACCEPT: the same as no table at all."""
    return not table.rules and all(policy == "ACCEPT" for policy in table.chains.values())


# -- running -------------------------------------------------------------------------------------

Runner = Callable[[Sequence[str], str | None], str]


def subprocess_runner(netns: str | None = None) -> Runner:
    """Run commands (optionally inside ``ip netns exec NETNS``); raise IptablesError on failure."""
    prefix = ["ip", "netns", "exec", netns] if netns else []

    def run(argv: Sequence[str], stdin: str | None = None) -> str:
        cmd = [*prefix, *argv]
        try:
            done = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=30)
        except FileNotFoundError as exc:
            raise IptablesError(f"{argv[0]}: not found ({exc})") from None
        if done.returncode != 0:
            raise IptablesError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    return run


@dataclass(frozen=True, slots=True)
class HookState:
    family: str
    direction: str
    table: str
    builtin: str
    chain: str
    jumps: int  # how many jumps to our chain (1 when installed)
    chain_present: bool
    up_to_date: bool  # chain holds exactly the configured rules

    @property
    def installed(self) -> bool:
        return self.jumps == 1 and self.chain_present and self.up_to_date


class Rules:
    """install / remove / show for one node configuration, in the current (or given) netns."""

    def __init__(self, cfg: RulesConfig, runner: Runner | None = None) -> None:
        self.cfg = cfg
        self.run = runner or subprocess_runner()

    def save(self, family: Family) -> dict[str, TableDump]:
        return parse_save(self.run([f"{family.cmd}-save"], None))

    def state(self) -> list[HookState]:
        out = []
        for family in families(self.cfg):
            tables = self.save(family)
            for hook in HOOKS:
                table = tables.get(hook.table, TableDump())
                mine = [r for r in table.rules if r.startswith(f"-A {hook.chain} ")]
                out.append(
                    HookState(
                        family.name, hook.direction, hook.table, hook.builtin, hook.chain,
                        len(jumps_to(table, hook)), hook.chain in table.chains,
                        mine == chain_rules(self.cfg, family, hook),
                    )
                )
        return out

    def install(self) -> None:
        """Put our chains and jumps in place; running it again changes nothing."""
        for family in families(self.cfg):
            tables = self.save(family)
            script = []
            for hook in HOOKS:
                table = tables.get(hook.table)
                jump = "" if table and jumps_to(table, hook) else jump_rule(hook, created_table=table is None)
                script.append(_render_table(self.cfg, family, hook, jump))
            self.run([f"{family.cmd}-restore", "--noflush"], "".join(script))

    def remove(self) -> None:
        """Delete our jumps and chains (and a table install created); leave everything else."""
        for family in families(self.cfg):
            tables = self.save(family)
            drop_tables = []
            for hook in HOOKS:
                table = tables.get(hook.table)
                if table is None:
                    continue
                jumps = jumps_to(table, hook)
                lines = [f"*{hook.table}"] + ["-D" + j[2:] for j in jumps]
                if hook.chain in table.chains:
                    lines += [f"-F {hook.chain}", f"-X {hook.chain}"]
                if len(lines) == 1:
                    continue
                self.run([f"{family.cmd}-restore", "--noflush"], "\n".join(lines + ["COMMIT", ""]))
                if any(JUMP_COMMENT_NEW_TABLE in j for j in jumps):
                    drop_tables.append(hook.table)
            self._drop_tables(family, drop_tables)

    def _drop_tables(self, family: Family, names: list[str]) -> None:
        """Delete tables ``install`` created, if nothing else has been put in them since."""
        if not names or not self._nft_backend(family):
            return
        tables = self.save(family)
        for name in names:
            if name in tables and table_is_empty(tables[name]):
                self.run(["nft", "delete", "table", family.nft, name], None)

    def _nft_backend(self, family: Family) -> bool:
        if shutil.which("nft") is None:
            return False
        return "nf_tables" in self.run([family.cmd, "--version"], None)

    def show(self) -> str:
        """The configured rules and, per family and direction, whether they are installed."""
        lines = ["# configured rules (iptables-restore syntax)", render_rules(self.cfg).rstrip(), ""]
        for st in self.state():
            if st.installed:
                what = "installed"
            elif st.jumps == 0 and not st.chain_present:
                what = "not installed"
            elif not st.up_to_date and st.chain_present:
                what = "installed, differs from configuration (run install)"
            else:
                what = f"partly installed ({st.jumps} jumps, chain {'present' if st.chain_present else 'absent'})"
            lines.append(f"{st.family:<5} {st.direction:<3} {st.table}/{st.builtin} -> {st.chain}: {what}")
        return "\n".join(lines) + "\n"


# -- functions for the CLI -----------------------------------------------------------------------


def rules_install(cfg: RulesConfig, netns: str | None = None) -> None:
    Rules(cfg, subprocess_runner(netns)).install()


def rules_remove(cfg: RulesConfig, netns: str | None = None) -> None:
    Rules(cfg, subprocess_runner(netns)).remove()


def rules_show(cfg: RulesConfig, netns: str | None = None) -> str:
    return Rules(cfg, subprocess_runner(netns)).show()


def rules_installed(cfg: RulesConfig, netns: str | None = None) -> bool:
    return all(st.installed for st in Rules(cfg, subprocess_runner(netns)).state())


def ruleset_snapshot(netns: str | None = None) -> str:
    """iptables-save + ip6tables-save without timestamps and counters (to compare rulesets)."""
    run = subprocess_runner(netns)
    return "".join(normalise_save(run([f"{f.cmd}-save"], None)) for f in (IPV4, IPV6))
