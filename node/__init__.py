"""dcml node daemon: attested inference, paid through payment channels."""

from client.safejson import restore_recursion_limit

__version__ = "0.1.0"

restore_recursion_limit()  # py_ecc (through eth-account) raises it to 100,000 at import: deep input would segfault
