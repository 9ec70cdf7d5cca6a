"""The risk model's input features, in order.

Shared by `rust/risk/src/attrs.rs` (`MODEL_FEATURES`), `tests/reference/risk_ref.py` and
`train_model.py`; a test on each side checks the order. Every name is also a rules attribute.
"""

MODEL_FEATURE_NAMES: tuple[str, ...] = (
    "amount_usd",
    "card_ip_country_mismatch",
    "card_customer_country_mismatch",
    "card_count_1h",
    "card_count_24h",
    "card_amount_usd_24h",
    "ip_count_1h",
    "ip_count_24h",
    "email_count_24h",
    "device_count_1h",
    "cards_per_device_24h",
    "cards_per_email_24h",
    "cards_per_ip_24h",
    "customer_count_24h",
    "emails_per_card_24h",
)
