"""Schema of the Stripe-compatible surface's own rows (migration 10), kept apart like the others.

`stripe_intents` holds a PaymentIntent created without `confirm`: the engine has no payment before a
create reaches the fast path, so the intent waits here (SQLite in embedded mode, PostgreSQL in cluster
mode, where every HTTP process sees it) until it is confirmed, cancelled or updated. Its `id` is the
native payment id the confirmation creates (`pay_X`, shown as `pi_X`): it is derived from
`confirm_key`, the Idempotency-Key the confirmation passes to the fast path, so the confirmed payment
keeps the `pi_` id the merchant already holds and a repeated confirmation converges on it. `status`:
`requires_payment_method`, `requires_confirmation`, `confirming` (the fast-path call may be under
way), `confirmed` (the payment is the truth from then on), `canceled`. `body` is the intent's fields as
a native payment body (amount, currency, payment_method, capture, ...), which the Stripe objects read.

`payment_events_by_merchant` lets `GET /v1/events` page over every stored event of a merchant (newest
first, with `created` bounds) instead of the events of its newest payments.
"""

# No statement below may contain a semicolon inside it: the migrator splits on them.
MIGRATION_10_STRIPE_INTENTS = """
CREATE TABLE stripe_intents (
    id TEXT PRIMARY KEY,
    merchant_id TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('requires_payment_method', 'requires_confirmation', 'confirming',
                                           'confirmed', 'canceled')),
    confirm_key TEXT NOT NULL CHECK (length(confirm_key) BETWEEN 1 AND 255),
    created INTEGER NOT NULL,
    version INTEGER NOT NULL DEFAULT 0,
    body TEXT NOT NULL,
    updated_ms INTEGER NOT NULL,
    UNIQUE (merchant_id, confirm_key)
);
CREATE INDEX stripe_intents_by_merchant ON stripe_intents (merchant_id, created DESC, id DESC);
CREATE INDEX payment_events_by_merchant ON payment_events (merchant_id, created_ms DESC, id DESC)
"""
