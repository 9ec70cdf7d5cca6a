"""The simulated PSP's request pipeline, the part every operation shares: idempotency by key and
fingerprint, capacity, latency, injected faults and lost responses (`SimulatedPSP` in core.py is this
plus the operations).

A call runs as a coroutine (`_call`), or at time scale 0 as the event loop's callbacks (`_submit`):
there the latency is one turn of the loop, as `asyncio.sleep(0)` is, and a callback takes a turn where
a task's step would, so that calls made together are in flight together either way and the answers,
the draws and the order of everything else on the loop are the same; only the task per call (and
its coroutine frames) is saved.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.psp.wire import Response as SimResponse

from .profiles import PSPProfile

IDEMPOTENCY_KEY_LENGTH_MAX = 255
RESTART_ADVICE = "; restart the simulator or raise the limit"
# What an operation does once admitted: its answer, with whether that answer is lost.
Process = Callable[[], "tuple[SimResponse, bool] | SimResponse"]
# Told the answer of a submitted call, or the exception `_call` would have raised (see `_submit`).
Done = Callable[[SimResponse | BaseException], None]


class ResponseLost(Exception):
    """The PSP processed the request but the caller never gets the answer (it sees a timeout)."""

    def __init__(self, psp: str, operation: str, idempotency_key: str) -> None:
        super().__init__(f"{psp}: response to {operation} (key {idempotency_key!r}) was lost")
        self.psp = psp
        self.operation = operation
        self.idempotency_key = idempotency_key


class Pipeline:
    """What `SimulatedPSP.__init__` sets up for the pipeline."""

    profile: PSPProfile
    seed: int
    time_scale: float
    operations_max: int
    _sleep: Callable[[float], Awaitable[None]]
    _sequence: int
    _inflight: int
    # (operation, key) -> (fingerprint, response); None while in progress.
    _results: dict[tuple[str, str], tuple[tuple[object, ...], SimResponse] | None]
    _key_to_psp_reference: dict[str, str]
    # The hash state after `(seed, name, ` of every draw's repr (see `_unit`).
    _draws: hashlib.blake2b

    @property
    def name(self) -> str:
        return self.profile.name

    def answers_at_once(self) -> bool:
        """Whether calls may go through `_submit`: time scale 0 with the event loop's own sleep."""
        return self.time_scale == 0.0 and self._sleep is asyncio.sleep

    # -- randomness and time --------------------------------------------------------------------

    def _unit(self, *parts: object) -> float:
        """A uniform draw in [0, 1) determined by the seed and `parts`: the hash of
        `repr((seed, name, *parts))`, its first two items hashed once (`_draws`)."""
        h = self._draws.copy()
        h.update((", ".join(map(repr, parts)) + ")").encode())
        return int.from_bytes(h.digest(), "big") / 2**64

    def latency_ms(self, operation: str, key: str, sequence: int) -> float:
        p = self.profile
        latency = (
            p.latency_ms_base
            + (2.0 * self._unit("jitter", operation, key, sequence) - 1.0) * p.latency_ms_jitter
        )
        if self._unit("tail", operation, key, sequence) < p.latency_tail_rate:
            latency *= p.latency_tail_factor
        return max(0.0, latency)

    async def _wait_ms(self, duration_ms: float) -> None:
        await self._sleep(duration_ms * self.time_scale / 1000.0)

    async def _wait_latency(self, operation: str, key: str, sequence: int) -> None:
        """The call's latency; at time scale 0 only a turn of the event loop (its draws would be
        multiplied by 0: they are skipped, which changes no other draw)."""
        await self._sleep(self.latency_ms(operation, key, sequence) * self.time_scale / 1000.0 if self.time_scale
                          else 0.0)



    def _error(self, operation: str, code: str, message: str, *, retryable: bool) -> SimResponse:
        return SimResponse(
            outcome="error",
            psp=self.name,
            operation=operation,
            code=code,
            message=message,
            retryable=retryable,
        )

    def _admit(
        self, operation: str, key: str, fingerprint: tuple[object, ...]
    ) -> SimResponse | tuple[int, SimResponse | None, float]:
        """The request at the door, before its latency: an answer at once (refused), or (sequence, the
        stored answer a repeated request replays or None, utilisation). A new request is counted in
        flight and holds its key until `_release`."""
        if not key or len(key) > IDEMPOTENCY_KEY_LENGTH_MAX:
            return self._error(
                operation, "invalid_request", "idempotency key must be 1..255 characters", retryable=False
            )
        self._sequence += 1
        sequence = self._sequence
        slot = (operation, key)
        if slot in self._results:
            stored = self._results[slot]
            if stored is None:
                return self._error(
                    operation, "request_in_progress", "a request with this key is in flight", retryable=True
                )
            stored_fingerprint, stored_response = stored
            if stored_fingerprint != fingerprint:
                return self._error(
                    operation,
                    "idempotency_key_reused",
                    "this idempotency key was used with different parameters",
                    retryable=False,
                )
            return sequence, stored_response, 0.0

        p = self.profile
        if self._inflight + 1 > p.capacity_inflight_max:
            # Rejected at the door: no latency, nothing processed.
            return self._error(
                operation,
                "capacity_exceeded",
                f"{self.name} is at capacity ({p.capacity_inflight_max} requests in flight)",
                retryable=True,
            )
        if len(self._results) >= self.operations_max:
            return self._storage_full(operation, "stored-operations", f"operations_max={self.operations_max}")
        self._inflight += 1
        self._results[slot] = None
        return sequence, None, self._inflight / p.capacity_inflight_max

    def _respond(
        self, operation: str, key: str, sequence: int, utilisation: float, fingerprint: tuple[object, ...],
        process: Process, force_error: str | None,
    ) -> tuple[SimResponse, bool]:
        """An admitted request after its latency: the answer, and whether it is lost (the caller then
        waits `timeout_hang_ms` and raises `ResponseLost`). An answer processed is stored under the key."""
        p = self.profile
        if utilisation > p.overload_utilisation_threshold:
            over = (utilisation - p.overload_utilisation_threshold) / (1.0 - p.overload_utilisation_threshold)
            if self._unit("overload", operation, key, sequence) < over * p.overload_error_rate_max:
                return self._error(
                    operation,
                    "processor_overloaded",
                    f"{self.name} is overloaded ({utilisation:.0%} of capacity)",
                    retryable=True,
                ), False
        if force_error is not None:
            return self._error(
                operation, force_error, f"{self.name} could not process the request", retryable=True
            ), False
        # A draw is a pure function of its parts: skipping one that cannot hit (a rate of 0) changes no
        # other draw.
        if p.error_rate and self._unit("error", operation, key, sequence) < p.error_rate:
            return self._error(
                operation, "processor_error", f"{self.name} failed to process the request", retryable=True
            ), False
        result = process()
        response, lost = result if isinstance(result, tuple) else (result, False)
        if response.outcome == "error" and response.retryable:
            return response, False
        self._results[(operation, key)] = (fingerprint, response)
        if response.psp_reference is not None:
            self._key_to_psp_reference[key] = response.psp_reference
        lost = lost or bool(p.timeout_rate and self._unit("timeout", operation, key, sequence) < p.timeout_rate)
        return response, lost

    def _release(self, slot: tuple[str, str]) -> None:
        """An admitted request is no longer in flight; its key is free again unless its answer is stored."""
        self._inflight -= 1
        if self._results[slot] is None:
            del self._results[slot]

    async def _call(
        self,
        operation: str,
        key: str,
        fingerprint: tuple[object, ...],
        process: Process,
        force_error: str | None = None,
    ) -> SimResponse:
        admitted = self._admit(operation, key, fingerprint)
        if isinstance(admitted, SimResponse):
            return admitted
        sequence, replay, utilisation = admitted
        if replay is not None:
            await self._wait_latency(operation, key, sequence)
            return replay
        try:
            await self._wait_latency(operation, key, sequence)
            response, lost = self._respond(operation, key, sequence, utilisation, fingerprint, process, force_error)
            if lost:
                await self._wait_ms(self.profile.timeout_hang_ms)
                raise ResponseLost(self.name, operation, key)
            return response
        finally:
            self._release((operation, key))

    def _storage_full(self, op: str, stored: str, limit: str, advice: str = RESTART_ADVICE) -> SimResponse:
        """The limit on what the simulator stores (`limit`: name=value) is reached: a non-retryable error."""
        message = f"simulator {stored} limit reached ({limit}){advice}"
        return self._error(op, "simulator_storage_full", message, retryable=False)

    # -- the same at time scale 0, as callbacks ---------------------------------------------------

    def _submit(
        self, call: asyncio.Future[Any], done: Done, operation: str, key: str, fingerprint: tuple[object, ...],
        process: Process, force_error: str | None = None,
    ) -> None:
        """`_call` as callbacks on `call`'s loop, for a caller in the turn where the task running `_call`
        would start (only where `answers_at_once`): `done` is called with the answer or the exception
        where `_call` would return or raise, a turn of the loop later where `_call` waits (its latency,
        a lost answer's hang); `call` cancelled by then is a CancelledError there, as the task's would be."""
        admitted = self._admit(operation, key, fingerprint)
        if isinstance(admitted, SimResponse):
            done(admitted)
            return
        sequence, replay, utilisation = admitted
        if replay is not None:
            call.get_loop().call_soon(_replayed, call, done, replay)
            return
        call.get_loop().call_soon(self._answer, call, done, operation, key, sequence, utilisation, fingerprint,
                                  process, force_error)

    def _answer(
        self, call: asyncio.Future[Any], done: Done, operation: str, key: str, sequence: int, utilisation: float,
        fingerprint: tuple[object, ...], process: Process, force_error: str | None,
    ) -> None:
        slot = (operation, key)
        if call.cancelled():
            self._release(slot)
            done(asyncio.CancelledError())
            return
        try:
            response, lost = self._respond(operation, key, sequence, utilisation, fingerprint, process, force_error)
        except BaseException as exc:
            self._release(slot)
            done(exc)
            if not isinstance(exc, Exception):
                raise
            return
        if lost:
            call.get_loop().call_soon(self._lost, call, done, operation, key)
            return
        self._release(slot)
        done(response)

    def _lost(self, call: asyncio.Future[Any], done: Done, operation: str, key: str) -> None:
        self._release((operation, key))
        done(asyncio.CancelledError() if call.cancelled() else ResponseLost(self.name, operation, key))


def _replayed(call: asyncio.Future[Any], done: Done, replay: SimResponse) -> None:
    done(asyncio.CancelledError() if call.cancelled() else replay)
