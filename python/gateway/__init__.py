"""Payment gateway: a Python service with a Rust fast path (``gateway._fastpath``)."""

__version__ = "0.1.0"
