"""The domain: payments, operations, attempts, ledger postings, records, events, errors, limits.

No I/O and no import of another layer: everything above builds on these types and rules."""
