"""Settlement reconciliation in cluster mode: two gateway processes, two workers writing PostgreSQL,
one shared `gateway psp-sim`; the PSP's settlement files (downloaded with `gateway reconcile fetch`)
reconciled with `gateway reconcile settlement --config FILE` against PostgreSQL: exit 0 when all
match, 1 with the exact discrepancies of a tampered copy, and the ledger still balanced after fee
corrections (`gateway ledger check --config FILE`)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from support import run_cli

from .conftest import ServiceUrls
from .test_cluster_processing import ProcessingCluster

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def cl(services: ServiceUrls, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessingCluster]:
    yield from ProcessingCluster(services, tmp_path_factory.mktemp("crecon"), psp_time_scale=0.01).serving()


def reconcile(cl: ProcessingCluster, psp: str, path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_cli("reconcile", "settlement", "--psp", psp, "--file", str(path), "--config", str(cl.config_path),
                   "--json", *extra, check=False)


def test_cluster_settlement_files_match_and_tampering_and_fee_corrections_are_handled(cl: ProcessingCluster) -> None:
    pids = [cl.create(capture=True, amount=1500 + 11 * i) for i in range(10)]
    for pid in pids:
        assert cl.get(pid)["status"] == "captured"
    partial = cl.create(capture=False, amount=3000)
    assert cl.get(partial)["status"] == "authorized"
    assert cl.op(partial, "capture", {"amount": 2000}).status_code == 200
    assert cl.op(partial, "refunds", {"amount": 500}).status_code == 200

    day = datetime.now(UTC).date().isoformat()
    files: dict[str, Path] = {}
    for psp in ("psp_a", "psp_b"):
        path = cl.tmp / f"{psp}-{day}.csv"
        run_cli("reconcile", "fetch", "--psp", psp, "--date", day, "--psp-url", cl.psp_url, "--out", str(path))
        files[psp] = path
        n = len(path.read_text().splitlines()) - 1
        proc = reconcile(cl, psp, path)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        report = json.loads(proc.stdout)
        assert report["ok"] and report["counts"]["matched"] == n
    assert sum(len(p.read_text().splitlines()) - 1 for p in files.values()) == 12  # 11 captures, 1 refund

    psp = max(files, key=lambda p: len(files[p].read_text().splitlines()))
    header, *rows = files[psp].read_text().splitlines()
    single = [r for r in rows if sum(x.split(",")[0] == r.split(",")[0] for x in rows) == 1]
    assert len(single) >= 2, rows
    dropped, changed = single[0], single[1]
    ref, amount, currency, fee, net, status = changed.split(",")
    higher_fee = f"{ref},{amount},{currency},{int(fee) + 3},{int(net) - 3},{status}"
    tampered = cl.tmp / f"tampered-{files[psp].name}"
    tampered.write_text("\n".join([header, *(higher_fee if r == changed else r for r in rows if r != dropped),
                                   f"pay_not_ours,100,{currency},0,100,captured"]) + "\n")
    proc = reconcile(cl, psp, tampered, "--apply-fee-corrections", "--actor", "cluster-op")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert {k: v for k, v in report["counts"].items() if v and k != "matched"} == {
        "fee_mismatch": 1, "missing_in_settlement": 1, "missing_in_gateway": 1, "totals_mismatch": 1}
    assert [(i["type"], i.get("reference")) for i in report["items"][:3]] == [
        ("fee_mismatch", ref), ("missing_in_gateway", "pay_not_ours"), ("missing_in_settlement", dropped.split(",")[0])]
    assert [(c["reference"], c["difference"]) for c in report["fee_corrections"]] == [(ref, 3)]
    cl.assert_ledger_ok()
    audit = cl.query("SELECT actor FROM audit_log WHERE payment_id = %s ORDER BY id DESC LIMIT 1", ref)
    assert audit == [("reconciler:cluster-op",)]

    # The same file again is the stored run; --force runs it again and the fee now matches.
    again = reconcile(cl, psp, tampered)
    assert json.loads(again.stdout)["existing_run"] is True and json.loads(again.stdout)["run_id"] == report["run_id"]
    forced = json.loads(reconcile(cl, psp, tampered, "--force").stdout)
    assert forced["counts"]["fee_mismatch"] == 0 and forced["counts"]["missing_in_settlement"] == 1
    runs = cl.query("SELECT psp, discrepancies, fee_corrections FROM reconciliation_runs ORDER BY id")
    assert len(runs) == 4 and runs[2] == (psp, 4, 1)
