"""Imports every module that registers extra routes or lifecycle hooks with `gateway.api.app`."""
from gateway.api import (
    operations,  # noqa: F401 - capture, void, refund, list; the payment worker
    risk_admin,  # noqa: F401 - risk control plane: admin API, rules and lists restored on start
    webhooks,  # noqa: F401 - webhook endpoints and events (delivered by the payment workers)
)
