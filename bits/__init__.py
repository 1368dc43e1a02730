"""bits: a generic RFC 4301/4303 ESP bump-in-the-stack engine.

It knows nothing of mobility and never imports ``mobility``. Cores are sans-I/O: they take bytes and
``now`` and return verdicts; NFQUEUE, sockets and files live in ``bits.io``.
"""
