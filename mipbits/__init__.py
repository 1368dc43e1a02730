"""The composition root: the ``mipbits`` command wires ``bits`` and ``mobility`` together."""
