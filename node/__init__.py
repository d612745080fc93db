"""dcml node daemon: attested inference, paid through payment channels."""

import dcml.client  # noqa: F401  # restores Python's recursion limit after py_ecc raised it (dcml.client.wire.safejson)

__version__ = "0.1.0"
