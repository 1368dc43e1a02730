"""The mobility inbound hook: NFQUEUE in raw PREROUTING, *before* the engine's chain.

The tunnel module's ``inbound`` must see a packet before the engine does (the MN gives ESP sent to
a CoA back its HoA; the HA swaps a Home Address option, which this kernel would otherwise discard
with a Parameter Problem). Only ESP, packets with a Destination Options header (where a Home
Address option lives; the ``dst`` match compares options by position, padding included, so it
cannot find option 201 wherever the sender's alignment put it) and packets with a type 2 routing
header are queued. Verdicts:

* changed packet -> new payload, ``HOOK_MARK`` or-ed into the mark, NF_REPEAT;
* unchanged      -> ``HOOK_MARK``, NF_REPEAT;
* a ``TunnelDrop`` -> NF_DROP.

NF_ACCEPT would end the whole raw PREROUTING hook and so skip the engine's chain; NF_REPEAT runs
raw PREROUTING again, where our first rule RETURNs for marked packets and the engine's jump comes
next. The NFQUEUE rules have no ``--queue-bypass``: without this process, ESP is dropped (fail
closed).

``HookRules`` also owns one rule in mangle OUTPUT: packets carrying ``SEND_MARK`` (what the tunnel
module sends, already ESP) are ACCEPTed before the engine's chain. Our jumps are inserted at
position 1 of PREROUTING / OUTPUT: install them after the engine's rules; ``install()`` moves them
back to the front if something was inserted before them since.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from ..tunnel import TunnelDrop
from .routes import HOOK_MARK, SEND_MARK, RoutesError, Runner, command_runner

LOG = logging.getLogger("mipbits.hook")

CHAIN_IN = "MIPBITS-MIP-IN"
CHAIN_OUT = "MIPBITS-MIP-OUT"
COMMENT = "mipbits-mobility"
DEFAULT_QUEUE = 7
DEFAULT_MAXLEN = 4096


class InboundTunnel(Protocol):
    def inbound(self, packet: bytes, now: float) -> bytes | TunnelDrop | None: ...


class QueuedPacket(Protocol):
    """What the hook needs of a ``netfilterqueue.Packet``."""

    def get_payload(self) -> bytes: ...

    def set_payload(self, payload: bytes) -> None: ...

    def get_mark(self) -> int: ...

    def set_mark(self, mark: int) -> None: ...

    def repeat(self) -> None: ...

    def drop(self) -> None: ...


# --- the verdict (one packet) ---------------------------------------------------------------------------------


class InboundHook:
    """``handle(pkt)`` is the NFQUEUE callback; ``bind()``/``fileno()``/``service()`` the loop."""

    def __init__(self, tunnel: InboundTunnel, queue: int = DEFAULT_QUEUE, *, mark: int = HOOK_MARK,
                 clock: Callable[[], float] = time.monotonic, maxlen: int = DEFAULT_MAXLEN) -> None:
        self.tunnel = tunnel
        self.queue = queue
        self.mark = mark
        self.clock = clock
        self.maxlen = maxlen
        self.counts = {"rewritten": 0, "unchanged": 0, "dropped": 0, "errors": 0}
        self._nfq: Any = None

    def handle(self, pkt: QueuedPacket) -> None:
        try:
            out = self.tunnel.inbound(pkt.get_payload(), self.clock())
        except Exception:  # a bug in the core: drop (fail closed), count, keep the loop alive
            LOG.exception("tunnel inbound raised")
            self.counts["errors"] += 1
            pkt.drop()
            return
        if isinstance(out, TunnelDrop):
            self.counts["dropped"] += 1
            pkt.drop()
            return
        if out is None:
            self.counts["unchanged"] += 1
        else:
            pkt.set_payload(out)
            self.counts["rewritten"] += 1
        pkt.set_mark(pkt.get_mark() | self.mark)
        pkt.repeat()

    def bind(self) -> None:
        from netfilterqueue import NetfilterQueue  # the adapter's only C dependency, loaded late

        nfq = NetfilterQueue()
        nfq.bind(self.queue, self.handle, max_len=self.maxlen)
        self._nfq = nfq

    def fileno(self) -> int:
        return self._nfq.get_fd()

    def service(self) -> None:
        """Handle every packet queued now (call when ``fileno()`` is readable)."""
        self._nfq.run(block=False)

    def run(self) -> None:
        """Block, handling packets (a process of its own)."""
        self._nfq.run()

    def close(self) -> None:
        if self._nfq is not None:
            self._nfq.unbind()
            self._nfq = None


# --- the rules -----------------------------------------------------------------------------------------------------


def chain_rules(queue: int, mark: int = HOOK_MARK, send_mark: int = SEND_MARK) -> dict[str, list[str]]:
    """Our chains' rules per table, in ip6tables-save's canonical form."""
    target = f"-j NFQUEUE --queue-num {queue}"
    return {
        "raw": [
            f"-A {CHAIN_IN} -m mark --mark {mark:#x}/{mark:#x} -j RETURN",
            f"-A {CHAIN_IN} -p esp {target}",
            f"-A {CHAIN_IN} -m ipv6header --header ipv6-opts --soft {target}",
            f"-A {CHAIN_IN} -m rt --rt-type 2 {target}",
        ],
        "mangle": [f"-A {CHAIN_OUT} -m mark --mark {send_mark:#x}/{send_mark:#x} -j ACCEPT"],
    }


_BUILTIN = {"raw": ("PREROUTING", CHAIN_IN), "mangle": ("OUTPUT", CHAIN_OUT)}


def _jump(builtin: str, chain: str) -> str:
    return f"-A {builtin} -m comment --comment {COMMENT} -j {chain}"  # canonical: no quotes


class HookRules:
    """Install / remove the hook's ip6tables rules (one iptables-restore transaction per table)."""

    def __init__(self, queue: int = DEFAULT_QUEUE, runner: Runner | None = None, *,
                 mark: int = HOOK_MARK, send_mark: int = SEND_MARK) -> None:
        self.queue = queue
        self.run = runner or command_runner()
        self.rules = chain_rules(queue, mark, send_mark)

    def _builtin_rules(self, table: str, builtin: str) -> list[str]:
        out = self.run(["ip6tables", "-t", table, "-S", builtin])
        return [line for line in out.splitlines() if line.startswith(f"-A {builtin} ")]

    def install(self) -> None:
        """Our chains (re)filled, our jumps first in their built-in chains. Idempotent."""
        for table, (builtin, chain) in _BUILTIN.items():
            jump = _jump(builtin, chain)
            present = self._builtin_rules(table, builtin)
            mine = [r for r in present if r.endswith(f"-j {chain}")]
            lines = [f"*{table}", f":{chain} - [0:0]", *self.rules[table]]
            if present[:1] != [jump] or len(mine) != 1:
                lines += ["-D" + r[2:] for r in mine]
                lines.append(f"-I {builtin} 1" + jump[len(f"-A {builtin}"):])
            self.run_restore(lines)

    def remove(self) -> None:
        """Our jumps and chains gone; nothing else touched."""
        for table, (builtin, chain) in _BUILTIN.items():
            mine = [r for r in self._builtin_rules(table, builtin) if r.endswith(f"-j {chain}")]
            chains = self.run(["ip6tables", "-t", table, "-S"])
            lines = [f"*{table}", *("-D" + r[2:] for r in mine)]
            if f"-N {chain}" in chains.splitlines():
                lines += [f"-F {chain}", f"-X {chain}"]
            if len(lines) > 1:
                self.run_restore(lines)

    def installed(self) -> bool:
        """Our jumps first and our chains holding exactly our rules."""
        try:
            for table, (builtin, chain) in _BUILTIN.items():
                if self._builtin_rules(table, builtin)[:1] != [_jump(builtin, chain)]:
                    return False
                if self.run(["ip6tables", "-t", table, "-S", chain]).splitlines()[1:] != self.rules[table]:
                    return False
        except RoutesError:  # our chain does not exist
            return False
        return True

    def run_restore(self, lines: list[str]) -> None:
        self.run(["ip6tables-restore", "--noflush"], "\n".join([*lines, "COMMIT", ""]))


__all__ = ["CHAIN_IN", "CHAIN_OUT", "DEFAULT_QUEUE", "HookRules", "InboundHook", "chain_rules"]
