"""dcml node daemon: attested inference, paid through payment channels."""

import client  # noqa: F401  # restores Python's recursion limit after py_ecc raised it (client.safejson)

__version__ = "0.1.0"
