"""The OpenAPI 3.1 description of both surfaces: the checked-in docs/openapi.json is the generated one,
a spec validator accepts it, the gateway serves it at `GET /openapi.json`, and schemathesis, driving
an embedded gateway from it with a bounded number of examples per operation, finds no 5xx and no
answer that the description does not allow (status code, content type, headers, body schema)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from gateway.api import openapi
from openapi_spec_validator import validate
from support import DEMO_KEY, Gateway

REPO = Path(__file__).resolve().parents[2]
CHECKED_IN = REPO / "docs" / "openapi.json"
ST = Path(sys.executable).parent / "st"
# Examples per operation in the fuzzing phase, and stateful scenarios: seconds, not minutes.
EXAMPLES_PER_OPERATION = 10
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
          "response_headers_conformance")


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    # (No waiting for outcomes: the run is about the shapes of the answers.)
    env = {"GATEWAY_PSP_TIME_SCALE": "0.01", "GATEWAY_STRIPE_OUTCOME_WAIT_MS": "0"}
    g = Gateway(tmp_path_factory.mktemp("openapi") / "data", extra_env=env).start()
    yield g
    g.stop()


def test_checked_in_description_is_the_generated_one() -> None:
    assert CHECKED_IN.read_bytes() == openapi.document(), (
        "docs/openapi.json is stale: python -m gateway.api.openapi > docs/openapi.json")


def test_description_is_valid_openapi_3_1_with_both_surfaces() -> None:
    doc = json.loads(CHECKED_IN.read_bytes())
    validate(doc)
    assert doc["openapi"].startswith("3.1")
    ops = {op["operationId"] for path in doc["paths"].values() for op in path.values()}
    assert {"createPayment", "capturePayment", "stripeCreatePaymentIntent", "stripeCapturePaymentIntent",
            "stripeCreateRefund", "createWebhookEndpoint", "listEvents"} <= ops
    # Generated from the handlers' own request types.
    assert doc["components"]["schemas"]["CaptureRequest"]["properties"]["amount"]["anyOf"][0]["maximum"] == 10**12


def test_gateway_serves_the_description(gw: Gateway) -> None:
    r = httpx.get(f"{gw.url}/openapi.json", timeout=10)
    assert r.status_code == 200 and r.content == CHECKED_IN.read_bytes()


def test_schemathesis_finds_no_5xx_and_no_answer_outside_the_description(gw: Gateway, tmp_path: Path) -> None:
    done = subprocess.run(
        [str(ST), "run", f"{gw.url}/openapi.json", "--checks", CHECKS, "--phases", "fuzzing,stateful",
         "-n", str(EXAMPLES_PER_OPERATION), "--generation-deterministic", "--no-color", "-w", "1",
         "-H", f"Authorization: Bearer {DEMO_KEY}", "--report-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=False, cwd=tmp_path,
        env={**os.environ, "SCHEMATHESIS_HOOKS": ""})
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "failed" not in done.stdout.split("SUMMARY")[-1]
    assert "Traceback" not in gw.log(), gw.log()[-3000:]
