"""The async path: authorize, capture/void/refund, resolve pending, retries, the worker loop."""
