"""The engine's query interface over its control socket, as the callables ``ApiClassifier`` takes
(draft 4.3.2 / 4.4.2 "DSMIPv6-IPsec API").

``control_queries(path)`` returns ``(query_outbound, query_inbound_spi)``. Each call is one
request on ``bits.io.control``'s Unix socket with a short timeout; any failure (no processor, a
refused or unreadable answer) becomes ``EngineQueryError``, on which the classifier falls back to
the heuristic and retries later. The classifier caches answers, so this runs once per peer and
SPI, not per packet.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from typing import Any

from bits.errors import BitsError
from bits.io.control import control_request
from bits.ip import PacketSelectors

from ..tunnel import EngineQueryError, QueryInboundSpi, QueryOutbound

DEFAULT_TIMEOUT = 0.5  # seconds: the first packet to a peer waits at most this long


def control_queries(
    path: str | os.PathLike[str], timeout: float = DEFAULT_TIMEOUT
) -> tuple[QueryOutbound, QueryInboundSpi]:
    def ask(cmd: str, **args: Any) -> Any:
        try:
            return control_request(path, cmd, timeout, **args)
        except (BitsError, OSError, ValueError) as exc:
            raise EngineQueryError(f"{cmd}: {exc}") from None

    def query_outbound(sel: PacketSelectors) -> Mapping[str, Any] | None:
        return ask("query_outbound", **selector_request(sel))

    def query_inbound_spi(spi: int) -> Mapping[str, Any] | None:
        return ask("query_inbound_spi", spi=spi)

    return query_outbound, query_inbound_spi


def selector_request(sel: PacketSelectors) -> dict[str, Any]:
    """PacketSelectors -> the fields of a ``query_outbound`` request (None fields left out)."""
    version = ipaddress.IPv6Address if sel.version == 6 else ipaddress.IPv4Address
    req: dict[str, Any] = {"src": str(version(sel.src)), "dst": str(version(sel.dst)), "proto": sel.proto}
    for name in ("sport", "dport", "icmp_type", "icmp_code", "mh_type"):
        value = getattr(sel, name)
        if value is not None:
            req[name] = value
    return req


__all__ = ["control_queries", "selector_request"]
