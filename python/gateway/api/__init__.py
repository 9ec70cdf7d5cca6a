"""The merchant HTTP API (RSGI app served by granian)."""
