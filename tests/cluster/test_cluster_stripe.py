"""The Stripe-compatible surface in cluster mode (two gateway processes behind one port, two `gateway
worker` processes, PostgreSQL, Redis, Kafka, the shared PSP simulator), driven by the official SDKs:
the `stripe` Python SDK (the cases of tests/stripe_sdk_cases.py) and the `stripe` Node SDK."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import stripe_sdk_cases as cases
from e2e.test_stripe_sdk_node import run_node_sdk
from stripe_sdk_cases import Receiver, receiver  # noqa: F401 - the fixture, shared

from .conftest import ServiceUrls
from .test_cluster_processing import ProcessingCluster
from .test_cluster_risk import rules_version_by_slot

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

ADMIN_KEY = "ak_test_" + "t" * 24


@pytest.fixture(scope="module")
def cl(services: ServiceUrls, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessingCluster]:
    c = ProcessingCluster(services, tmp_path_factory.mktemp("cstripe"), psp_time_scale=0.01)
    c.gateway.extra_env = {"GATEWAY_ADMIN_KEY": ADMIN_KEY, "GATEWAY_WEBHOOK_ALLOW_PRIVATE_URLS": "1"}
    c.worker_env.update({"GATEWAY_WEBHOOK_ALLOW_PRIVATE_URLS": "1", "GATEWAY_WEBHOOK_POLL_MS": "20"})
    for c_ in c.serving():
        rules_version_by_slot(c_, cases.push_rules(c_.gateway.url, ADMIN_KEY))  # type: ignore[arg-type]
        cases.configure(c_.gateway.url)
        yield c_
        cases.close_sdk_connections()


def test_confirm_capture_cancel_and_refunds(cl: ProcessingCluster) -> None:
    cases.confirmed_intent_succeeds_with_its_charge()
    cases.manual_capture_partial_then_partial_refunds()
    cases.cancel_authorized_intent()


def test_declines_validation_and_authentication(cl: ProcessingCluster) -> None:
    cases.declines_are_card_errors()
    cases.risk_block_is_a_synchronous_card_error()
    cases.validation_errors_name_the_param()
    cases.authentication_errors(cl.gateway.url)


def test_idempotency_and_pagination(cl: ProcessingCluster) -> None:
    cases.idempotent_replay_and_mismatch()
    cases.list_with_auto_pagination()


def test_webhooks_and_three_d_secure(cl: ProcessingCluster, receiver: Receiver) -> None:  # noqa: F811
    cases.webhooks_signed_and_verified_by_the_sdk(receiver)
    cases.three_d_secure_completion(cl.gateway.url)


def test_unconfirmed_intents_across_processes(cl: ProcessingCluster) -> None:
    # Two HTTP processes behind one port: each call may land on either; the intent is in PostgreSQL.
    cases.unconfirmed_intent_updated_confirmed_captured()
    cases.unconfirmed_intent_canceled()
    cases.unconfirmed_decline_then_another_method()
    cases.unconfirmed_idempotency()


def test_ending_before_and_events_beyond_the_newest_payments(cl: ProcessingCluster) -> None:
    cases.ending_before_pages_back()
    cases.events_beyond_the_newest_payments(cl.gateway.url)
    r = Receiver()
    try:
        cases.created_and_requires_action_events(r)
    finally:
        r.stop()


def test_node_sdk(cl: ProcessingCluster) -> None:
    done = run_node_sdk(cl.gateway.url)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "# fail 0" in done.stdout, done.stdout[-3000:]
