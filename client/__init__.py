"""dcml client SDK and CLI; home of the wire formats that both sides sign and verify."""

from dcml.client.wire.safejson import restore_recursion_limit

# py_ecc (through eth-account) raises the recursion limit to 100,000 at import, after which deeply nested JSON
# from a peer overflows the C stack instead of raising: put Python's own limit back for every process using us.
restore_recursion_limit()
