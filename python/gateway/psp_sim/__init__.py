"""PSP simulator: latency, capacity, errors, lost responses, idempotency and settlement files."""

from .core import (
    SETTLEMENT_CSV_HEADER,
    ResponseLost,
    SettlementLine,
    SimResponse,
    SimulatedPSP,
    TransactionStatus,
)
from .profiles import DEFAULT_PROFILES, PSP_A, PSP_B, PSP_C, PSPProfile
from .tokens import TEST_TOKENS, TokenBehaviour, TokenSpec

__all__ = [
    "DEFAULT_PROFILES",
    "PSP_A",
    "PSP_B",
    "PSP_C",
    "SETTLEMENT_CSV_HEADER",
    "TEST_TOKENS",
    "PSPProfile",
    "ResponseLost",
    "SettlementLine",
    "SimResponse",
    "SimulatedPSP",
    "TokenBehaviour",
    "TokenSpec",
    "TransactionStatus",
]
