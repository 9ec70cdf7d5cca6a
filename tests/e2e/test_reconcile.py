"""Settlement reconciliation end to end: a real gateway (embedded mode) whose worker calls a real
`gateway psp-sim` process over HTTP, payments captured and refunded through the merchant API, the
PSP's own settlement file downloaded with `gateway reconcile fetch`, and `gateway reconcile
settlement` run as the operator would: exit 0 when everything matches, 1 with each discrepancy of
a tampered copy reported exactly, 2 with the line number of a malformed file; the ledger still
balances (`gateway ledger check`) after fee corrections.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from support import Gateway, auth, free_port, run_cli, start_psp_sim, stop_process

pytestmark = pytest.mark.timeout(240)

WAIT = {"Prefer": "wait=8000"}
PSPS = ("psp_a", "psp_b")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, str, Path]]:
    tmp = tmp_path_factory.mktemp("recon")
    port = free_port()
    psp_url = f"http://127.0.0.1:{port}"
    sim = start_psp_sim(port, PSPS, 0.01, tmp / "psp-sim.log")
    g = Gateway(tmp / "data", extra_env={"GATEWAY_PSP_URL": psp_url, "GATEWAY_PSP_TIME_SCALE": "0.01",
                                         "GATEWAY_PSPS": ",".join(PSPS), "GATEWAY_RECONCILE_INTERVAL_MS": "100"})
    try:
        g.start()
        yield g, psp_url, tmp
    finally:
        g.stop()
        stop_process(sim)


def create(g: Gateway, amount: int, capture: bool, currency: str = "USD") -> str:
    r = httpx.post(f"{g.url}/v1/payments", headers=auth(), timeout=10,
                   json={"amount": amount, "currency": currency, "payment_method": "tok_visa", "capture": capture})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def settled(g: Gateway, pid: str) -> dict:
    r = httpx.get(f"{g.url}/v1/payments/{pid}", headers={**auth(), **WAIT}, timeout=15)
    assert r.status_code == 200, r.text
    return dict(r.json())


def op(g: Gateway, pid: str, kind: str, body: dict) -> None:
    r = httpx.post(f"{g.url}/v1/payments/{pid}/{kind}", headers={**auth(), **WAIT}, json=body, timeout=15)
    assert r.status_code == 200, r.text


def reconcile(g: Gateway, psp: str, path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_cli("reconcile", "settlement", "--psp", psp, "--file", str(path), "--data-dir", str(g.data_dir),
                   *extra, check=False)


def report(proc: subprocess.CompletedProcess[str]) -> dict:
    return dict(json.loads(proc.stdout))


def lines_of(path: Path) -> list[str]:
    return path.read_text().splitlines()


@pytest.fixture(scope="module")
def files(env: tuple[Gateway, str, Path]) -> dict[str, Path]:
    """Captures and refunds through the merchant API, then each PSP's settlement file of today."""
    g, psp_url, tmp = env
    pids = [create(g, 1000 + 7 * i, capture=True) for i in range(12)]
    pids += [create(g, 5000 + i, capture=True, currency="EUR") for i in range(3)]
    partial = create(g, 3000, capture=False)
    refunded = create(g, 4000, capture=True)
    voided = create(g, 2000, capture=False)
    for pid in pids:
        assert settled(g, pid)["status"] == "captured"
    assert settled(g, partial)["status"] == "authorized"
    op(g, partial, "capture", {"amount": 1000, "final_capture": False})
    op(g, partial, "capture", {"amount": 1000, "final_capture": False})  # two captures of the same amount
    op(g, partial, "refunds", {"amount": 300})
    assert settled(g, refunded)["status"] == "captured"
    op(g, refunded, "refunds", {"amount": 1500})
    op(g, refunded, "refunds", {"amount": 2500})
    assert settled(g, voided)["status"] == "authorized"
    op(g, voided, "void", {})
    assert settled(g, refunded)["status"] == "refunded"
    day = datetime.now(UTC).date().isoformat()
    out: dict[str, Path] = {}
    for psp in PSPS:
        path = tmp / f"{psp}-{day}.csv"
        proc = run_cli("reconcile", "fetch", "--psp", psp, "--date", day, "--psp-url", psp_url, "--out", str(path))
        assert path.exists() and proc.stdout.startswith(str(path))
        out[psp] = path
    # 18 captures (16 payments, one captured twice) and 3 refunds, spread over the two PSPs.
    all_lines = [line for p in out.values() for line in lines_of(p)[1:]]
    assert Counter(line.rsplit(",", 1)[1] for line in all_lines) == {"captured": 18, "refunded": 3}
    return out


def busiest(files: dict[str, Path]) -> tuple[str, Path, str, list[str]]:
    """The PSP with the most lines, its file, the file's header and its rows."""
    psp = max(files, key=lambda p: len(lines_of(files[p])))
    header, *rows = lines_of(files[psp])
    return psp, files[psp], header, rows


def test_the_simulators_files_match_exit_0_and_a_rerun_reports_the_stored_run(
    env: tuple[Gateway, str, Path], files: dict[str, Path]
) -> None:
    g, _, _ = env
    for psp, path in files.items():
        n = len(lines_of(path)) - 1
        proc = reconcile(g, psp, path, "--json")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        r = report(proc)
        assert r["ok"] and r["lines"] == n and r["counts"]["matched"] == n and r["discrepancies"] == 0
        assert r["existing_run"] is False
        for currency, t in r["totals"].items():
            assert (t["file"]["gross"], t["file"]["fees"], t["file"]["net"]) == (
                t["ledger"]["gross"], t["ledger"]["fees"], t["ledger"]["net"]), currency
        again = reconcile(g, psp, path)
        assert again.returncode == 0 and "already reconciled" in again.stdout and r["run_id"] in again.stdout
        assert "result: all lines matched" in again.stdout
    runs = [json.loads(x) for x in run_cli("reconcile", "runs", "--data-dir", str(g.data_dir)).stdout.splitlines()]
    assert sorted(r["psp"] for r in runs) == sorted(PSPS) and all(r["discrepancies"] == 0 for r in runs)


def test_a_tampered_copy_reports_each_discrepancy_exactly_and_exits_1(
    env: tuple[Gateway, str, Path], files: dict[str, Path]
) -> None:
    g, _, tmp = env
    psp, path, header, rows = busiest(files)
    once = [r for r in rows if sum(x.split(",")[0] == r.split(",")[0] for x in rows) == 1]
    assert len(once) >= 3, rows
    changed, dropped, doubled = once[0], once[1], once[2]
    ref, amount, currency, fee, net, status = changed.split(",")
    tampered_line = f"{ref},{int(amount) + 100},{currency},{fee},{int(net) + 100},{status}"
    out = [tampered_line if r == changed else r for r in rows if r != dropped]
    out.append(doubled)
    out.append(f"pay_unknown_in_gateway,700,{currency},20,680,captured")
    copy = tmp / f"tampered-{path.name}"
    copy.write_text("\n".join([header, *out]) + "\n")

    proc = reconcile(g, psp, copy, "--json")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    r = report(proc)
    counts = {k: v for k, v in r["counts"].items() if v}
    assert counts == {"matched": len(rows) - 2, "amount_mismatch": 1, "missing_in_settlement": 1,
                      "duplicate": 1, "missing_in_gateway": 1, "totals_mismatch": 1}
    items = {i["type"]: i for i in r["items"]}
    line_of: dict[str, int] = {}
    for n, line in enumerate([header, *out], start=1):
        line_of.setdefault(line, n)  # the first occurrence
    assert (items["amount_mismatch"]["reference"], items["amount_mismatch"]["line"],
            items["amount_mismatch"]["difference"]) == (ref, line_of[tampered_line], 100)
    assert items["missing_in_settlement"]["reference"] == dropped.split(",")[0]
    assert items["missing_in_settlement"]["expected_amount"] == int(dropped.split(",")[1])
    assert (items["duplicate"]["reference"], items["duplicate"]["line"], items["duplicate"]["duplicate_of_line"]) == (
        doubled.split(",")[0], len(out), line_of[doubled])
    assert (items["missing_in_gateway"]["reference"], items["missing_in_gateway"]["line"]) == (
        "pay_unknown_in_gateway", len(out) + 1)
    diff = items["totals_mismatch"]["difference"]
    d_amount, d_fee = int(doubled.split(",")[1]), int(doubled.split(",")[3])
    assert items["totals_mismatch"]["currency"] == currency
    assert diff["gross"] == 100 + 700 + d_amount - int(dropped.split(",")[1])
    assert diff["fees"] == 20 + d_fee - int(dropped.split(",")[3])
    text = reconcile(g, psp, copy, "--force")
    assert text.returncode == 1
    assert f"amount_mismatch: line {line_of[tampered_line]}: reference={ref}" in text.stdout
    assert "result: 5 discrepancies" in text.stdout


def test_a_malformed_file_exits_2_with_the_line_number(env: tuple[Gateway, str, Path], files: dict[str, Path]) -> None:
    g, _, tmp = env
    psp, path, header, rows = busiest(files)
    ref, amount, currency, fee, net, status = rows[1].split(",")
    bad = tmp / f"malformed-{path.name}"
    bad.write_text("\n".join([header, rows[0], f"{ref},{amount}.50,{currency},{fee},{net},{status}", *rows[2:]]) + "\n")
    proc = reconcile(g, psp, bad)
    assert proc.returncode == 2
    assert "line 3:" in proc.stderr and "integer in minor units" in proc.stderr
    proc = reconcile(g, psp, bad, "--json")
    assert proc.returncode == 2 and report(proc)["error"]["line"] == 3
    nameless = tmp / "settlement.csv"
    nameless.write_text(path.read_text())
    proc = reconcile(g, psp, nameless)
    assert proc.returncode == 2 and "--date" in proc.stderr
    proc = reconcile(g, psp, tmp / "does-not-exist-2026-01-01.csv")
    assert proc.returncode == 2 and "No such file" in proc.stderr
    stored = run_cli("reconcile", "runs", "--data-dir", str(g.data_dir)).stdout
    assert "malformed" not in stored


def test_fee_corrections_keep_the_ledger_balanced_and_make_the_file_match(
    env: tuple[Gateway, str, Path], files: dict[str, Path]
) -> None:
    g, _, tmp = env
    psp, path, header, rows = busiest(files)
    target = next(r for r in rows if r.endswith(",captured"))
    ref, amount, currency, fee, net, status = target.split(",")
    higher = f"{ref},{amount},{currency},{int(fee) + 7},{int(net) - 7},{status}"
    copy = tmp / f"fees-{path.name}"
    copy.write_text("\n".join([header, *(higher if r == target else r for r in rows)]) + "\n")

    proc = reconcile(g, psp, copy, "--json")
    assert proc.returncode == 1
    r = report(proc)
    assert {k: v for k, v in r["counts"].items() if v and k != "matched"} == {"fee_mismatch": 1,
                                                                             "totals_mismatch": 1}
    assert r["items"][0]["reference"] == ref and r["items"][0]["difference"] == 7 and r["fee_corrections"] == []

    proc = reconcile(g, psp, copy, "--json", "--apply-fee-corrections", "--actor", "ana")  # no --force needed
    assert proc.returncode == 1  # the run that corrects still reports what it found
    corrections = report(proc)["fee_corrections"]
    assert [(c["reference"], c["difference"], c["settled_fee"]) for c in corrections] == [(ref, 7, int(fee) + 7)]
    check = run_cli("ledger", "check", "--data-dir", str(g.data_dir), check=False)
    assert check.returncode == 0, check.stdout + check.stderr

    again = reconcile(g, psp, copy, "--json", "--force", "--apply-fee-corrections")
    assert again.returncode == 0, again.stdout
    assert report(again)["fee_corrections"] == [] and report(again)["ok"]
    with sqlite3.connect(f"file:{g.data_dir / 'gateway.db'}?mode=ro", uri=True) as conn:
        audit = conn.execute("SELECT actor, reason FROM audit_log WHERE payment_id = ? ORDER BY id DESC LIMIT 1",
                             (ref,)).fetchone()
        fee_rows = conn.execute("SELECT count(*) FROM ledger_entries WHERE payment_id = ? AND posting_id LIKE ?",
                                (ref, "%fee_correction%")).fetchone()[0]
    assert audit[0] == "reconciler:ana" and f"settled {int(fee) + 7}" in audit[1]
    assert fee_rows == 2
    # The simulator's own file now disagrees by 7 on that capture: reported, never "fixed" silently.
    original = reconcile(g, psp, path, "--json", "--force")
    assert original.returncode == 1 and report(original)["counts"]["fee_mismatch"] == 1


def test_embedded_mode_writes_its_simulators_files_and_they_reconcile(tmp_path: Path) -> None:
    """Without `GATEWAY_PSP_URL` the worker's in-process simulators settle; their files land in
    `data_dir/settlements/` (written again when the worker stops) and match the store."""
    g = Gateway(tmp_path / "data", extra_env={"GATEWAY_PSP_TIME_SCALE": "0.01", "GATEWAY_PSPS": ",".join(PSPS)})
    g.start()
    try:
        pids = [create(g, 2000 + i, capture=True) for i in range(6)]
        for pid in pids:
            assert settled(g, pid)["status"] == "captured"
        op(g, pids[0], "refunds", {"amount": 500})
    finally:
        g.stop()
    day = datetime.now(UTC).date().isoformat()
    found = sorted((g.data_dir / "settlements").glob(f"*-{day}.csv"))
    assert found, "the worker wrote no settlement file"
    lines = 0
    for path in found:
        psp = path.name.removesuffix(f"-{day}.csv")
        assert psp in PSPS
        proc = reconcile(g, psp, path, "--json")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        lines += len(lines_of(path)) - 1
    assert lines == len(pids) + 1  # six captures and one refund, each settled once
