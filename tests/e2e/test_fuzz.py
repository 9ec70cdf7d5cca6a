"""A seeded fuzz run against a real embedded gateway: hostile requests of every kind (wrong types,
unicode edge cases, duplicated keys, card numbers in every place, header and path abuse, broken
framing), then the checks that must hold for every one of them and for the data dir afterwards.

`FUZZ_REQUESTS` (default 2000: part of `make test`) sets the run's length and `FUZZ_SEED` its seed;
a failure names both and the request's index, and the same values replay it exactly
(`FUZZ_SEED=16 FUZZ_REQUESTS=200000 .venv/bin/pytest -q tests/e2e/test_fuzz.py` is the long run).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import httpx
import pytest
from fuzzing import Context, check, files_with_pans, request, send
from support import DEMO_KEY, Gateway, auth

FUZZ_REQUESTS = int(os.environ.get("FUZZ_REQUESTS", "2000"))
FUZZ_SEED = int(os.environ.get("FUZZ_SEED", "16"))
ADMIN_KEY = "ak_test_" + "f" * 24
# Failures reported per run before it stops (each names its request).
FAILURES_MAX = 20


@pytest.fixture
def fuzz_gateway(tmp_path: Path):
    g = Gateway(tmp_path / "data", extra_env={"GATEWAY_ADMIN_KEY": ADMIN_KEY}).start()
    yield g
    g.stop()


# The suite's per-test timeout is for tests of a fixed size; a run's length is chosen with FUZZ_REQUESTS.
@pytest.mark.timeout(120 + FUZZ_REQUESTS // 20)
def test_hostile_requests_get_deliberate_answers_and_leave_no_card_number(fuzz_gateway: Gateway) -> None:
    g = fuzz_gateway
    print(f"fuzz: seed {FUZZ_SEED}, {FUZZ_REQUESTS} requests (replay: FUZZ_SEED={FUZZ_SEED}"
          f" FUZZ_REQUESTS={FUZZ_REQUESTS})")
    r = httpx.post(f"{g.url}/v1/admin/lists", json={"name": "fuzz", "kind": "string"},
                   headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)
    assert r.status_code == 201, r.text
    ctx = Context(g.port, DEMO_KEY, ADMIN_KEY)
    failures: list[str] = []
    pans: list[str] = []
    created: list[str] = []
    statuses: Counter[tuple[str, int | None]] = Counter()
    for i in range(FUZZ_REQUESTS):
        req = request(ctx, FUZZ_SEED, i)
        ans = send(g.port, req.raw, req.half_close)
        pans += req.pans
        statuses[(req.family, ans.status)] += 1
        problems = check(req, ans)
        if req.family == "replay" and not problems:
            again = send(g.port, req.raw)
            if (again.status, again.body) != (ans.status, ans.body) and again.status != 409:
                problems.append(f"a replay answered {again.status} {again.body[:200]!r}")
        if problems:
            failures.append(f"request {i} (FUZZ_SEED={FUZZ_SEED}) {req.family}: {problems}; sent {req.raw[:300]!r};"
                            f" got {ans.raw[:300]!r}")
            if len(failures) >= FAILURES_MAX:
                break
        if req.family in ("create", "replay") and ans.status == 201:
            pid = json.loads(ans.body)["id"]
            created.append(pid)
            if pid not in ctx.payments:
                ctx.payments.append(pid)
    print(f"fuzz: {sum(statuses.values())} requests, {len(pans)} card numbers sent, {len(created)} payments"
          f" created, {len(failures)} failures")
    print("fuzz: answers by family and status:", dict(sorted(statuses.items(), key=str)))
    assert not failures, "\n".join(failures)
    assert created, "no request of the run created a payment: the generator is broken"
    with httpx.Client(base_url=g.url, headers=auth(), timeout=10) as c:
        unreadable = [pid for pid in dict.fromkeys(created) if c.get(f"/v1/payments/{pid}").status_code != 200]
    assert not unreadable, f"created payments that cannot be read: {unreadable[:10]}"
    assert httpx.get(f"{g.url}/readyz", timeout=5).status_code == 200
    g.stop()
    leaked = files_with_pans(g.data_dir, pans)
    print(f"fuzz: data dir scanned ({sum(f.stat().st_size for f in g.data_dir.rglob('*') if f.is_file())} bytes):"
          f" {len(leaked)} files with a card number")
    assert not leaked, f"card numbers written under the data dir: {leaked}"
    assert len(pans) > FUZZ_REQUESTS // 10, "the run sent too few card numbers to prove anything"
