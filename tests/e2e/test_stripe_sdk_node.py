"""The Stripe-compatible surface in embedded mode driven by the official `stripe` Node SDK
(tests/sdk/node, installed by `make install` with `npm ci`): the test file runs under `node --test`."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from stripe_sdk_cases import push_rules
from support import Gateway

NODE_DIR = Path(__file__).resolve().parents[1] / "sdk" / "node"
ADMIN_KEY = "ak_test_" + "n" * 24
ENV = {"GATEWAY_ADMIN_KEY": ADMIN_KEY, "GATEWAY_PSP_TIME_SCALE": "0.01", "GATEWAY_WEBHOOK_ALLOW_PRIVATE_URLS": "1",
       "GATEWAY_WEBHOOK_POLL_MS": "20"}


def run_node_sdk(url: str, timeout_s: float = 180) -> subprocess.CompletedProcess[str]:
    """The Node SDK's test file against the gateway at `url`; its TAP report is the output."""
    if shutil.which("node") is None or not (NODE_DIR / "node_modules" / "stripe").is_dir():
        pytest.fail("node or the stripe Node SDK is missing: run `make install` (npm ci in tests/sdk/node)")
    return subprocess.run(["node", "--test", "--test-reporter=tap", "stripe_sdk.test.mjs"], cwd=NODE_DIR,
                          capture_output=True, text=True, timeout=timeout_s, check=False,
                          env={**os.environ, "GATEWAY_URL": url})


def test_node_sdk_drives_the_stripe_surface(tmp_path: Path) -> None:
    g = Gateway(tmp_path / "data", extra_env=ENV).start()
    try:
        push_rules(g.url, ADMIN_KEY)
        done = run_node_sdk(g.url)
        assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
        assert "# fail 0" in done.stdout and "# pass 12" in done.stdout, done.stdout[-3000:]
    finally:
        g.stop()
    assert "Traceback" not in g.log(), g.log()[-3000:]
