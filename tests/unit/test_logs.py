"""The log filter: the second line of defence for card numbers and secrets."""

from __future__ import annotations

import logging

from gateway.logs import RedactingFilter, redact


def test_card_numbers_are_redacted_and_other_digit_runs_kept() -> None:
    text = redact("card 4242 4242 4242 4242 order 123456789012")
    assert "4242" not in text and "[REDACTED PAN]" in text
    assert "123456789012" in text  # fails the Luhn check: not a card number


def test_api_admin_and_webhook_secrets_are_masked() -> None:
    text = redact("key=sk_test_abcdef123 admin=ak_zzzz9999 secret=whsec_Q2xlYXJseSBzZWNyZXQ")
    assert text == "key=sk_test_*** admin=ak_*** secret=whsec_***"


def test_filter_rewrites_the_record_with_its_arguments_applied() -> None:
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "endpoint secret %s", ("whsec_abcdefgh",), None)
    assert RedactingFilter().filter(record)
    assert record.getMessage() == "endpoint secret whsec_***"
