"""dcml client SDK and CLI; home of the wire formats that both sides sign and verify."""
