"""mobility: Mobile IPv6 (RFC 6275) and DSMIPv6 (RFC 5555) MN and HA above an unmodified IPsec.

Uses only the public API of ``bits``. Cores are sans-I/O; TUN, sockets and netlink live in
``mobility.io``.
"""
