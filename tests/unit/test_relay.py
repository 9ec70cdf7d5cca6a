"""The relay's bookkeeping without a broker: the contiguously acknowledged LSN under out-of-order
delivery callbacks, rewinds on a failed delivery, and the fsync'd checkpoint file."""

from __future__ import annotations

from pathlib import Path

import msgspec
from gateway.feed.relay import Checkpoint, Relay, record_key


class NoSource:
    def committed_lsn(self) -> int:
        return 0

    def wait_committed(self, lsn: int, timeout_ms: int) -> bool:
        return False


def relay(tmp_path: Path, acked: list[int] | None = None) -> Relay:
    r = Relay(str(tmp_path / "wal"), tmp_path / "relay.checkpoint", NoSource(), "127.0.0.1:1", "t",
              on_acked=(acked.append if acked is not None else None))
    return r


def test_acked_lsn_advances_only_over_a_contiguous_prefix(tmp_path: Path) -> None:
    acked: list[int] = []
    r = relay(tmp_path, acked)
    r._inflight.extend([1, 2, 3, 5])
    r._delivered(r._generation, 2, None)
    r._delivered(r._generation, 5, None)
    assert r.acked_lsn == 0 and acked == []
    r._delivered(r._generation, 1, None)
    assert r.acked_lsn == 2 and acked == [2]
    r._delivered(r._generation, 3, None)
    assert r.acked_lsn == 5 and acked == [2, 5]
    assert r.inflight() == 0


def test_failed_delivery_requests_a_rewind_and_stale_callbacks_are_ignored(tmp_path: Path) -> None:
    r = relay(tmp_path)
    r._inflight.extend([1, 2])
    r._delivered(r._generation - 1, 1, None)  # a callback of a producer dropped by an earlier rewind
    assert r.acked_lsn == 0
    r._delivered(r._generation, 1, object())  # type: ignore[arg-type]
    assert r._rewind.is_set() and r.acked_lsn == 0


def test_checkpoint_survives_a_new_relay(tmp_path: Path) -> None:
    r = relay(tmp_path)
    r._inflight.extend([1, 2])
    r._delivered(r._generation, 1, None)
    r._delivered(r._generation, 2, None)
    r._save_checkpoint(force=True)
    assert Checkpoint(tmp_path / "relay.checkpoint").load() == 2
    assert relay(tmp_path).acked_lsn == 2


def test_records_are_keyed_by_payment_id() -> None:
    payload = msgspec.json.encode({"type": "payment.created", "payment": {"id": "pay_x", "amount": 1}})
    assert record_key(payload) == b"pay_x"
    assert record_key(b"not json") is None
