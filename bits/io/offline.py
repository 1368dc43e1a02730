"""Offline adapter: run every packet of a capture through the engine (``mipbits ipsec ...``).

``encrypt`` treats each packet as sent by this node (outbound processing), ``decrypt`` as received
(inbound processing). Packets the engine drops are reported with their reason, never skipped
silently; passed and transformed packets go to a LINKTYPE_RAW pcap.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from ..engine import Engine
from ..verdict import Drop, DropReason
from .pcap import PcapWriter, read_pcap


@dataclass(slots=True)
class OfflineReport:
    written: int = 0
    transformed: int = 0
    passed: int = 0
    drops: Counter[str] = field(default_factory=Counter)

    @property
    def dropped(self) -> int:
        return sum(self.drops.values())


def process_capture(
    engine: Engine,
    direction: str,
    in_path: str,
    out_path: str,
    report_drop: Callable[[int, Drop], None],
    *,
    now: Callable[[float], float] = lambda ts: ts,
) -> OfflineReport:
    """Apply ``engine`` to every packet of ``in_path``; write the results to ``out_path``.

    ``now`` maps a packet's capture time to the engine clock (lifetimes count in capture time).
    """
    step = engine.process_outbound if direction == "encrypt" else engine.process_inbound
    report = OfflineReport()
    with open(in_path, "rb") as fin, open(out_path, "wb") as fout:
        writer = PcapWriter(fout)
        for rec in read_pcap(fin):
            if not rec.packet:
                report_drop(rec.index, Drop(DropReason.MALFORMED, detail="not an IP packet"))
                report.drops["not-ip"] += 1
                continue
            result = step(rec.packet, now(rec.ts))
            if isinstance(result, Drop):
                report_drop(rec.index, result)
                report.drops[result.reason.value] += 1
                continue
            if result is rec.packet:
                report.passed += 1
            else:
                report.transformed += 1
            writer.write(result, rec.ts)
            report.written += 1
    return report


__all__ = ["OfflineReport", "process_capture"]
