"""dcml node daemon: attested inference, paid through payment channels."""

__version__ = "0.1.0"
