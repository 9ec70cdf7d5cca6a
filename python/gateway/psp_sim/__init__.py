"""PSP simulator: latency, capacity, errors, lost responses, idempotency and settlement files.

Only the runtime, the CLI and tests import it; the gateway's processing sees a simulator only through
the `PSPClient` interface (`InProcessPSPClient` here, or the HTTP client against `gateway psp-sim`).
"""

from .client import InProcessPSPClient
from .core import ResponseLost, SimResponse, SimulatedPSP, TransactionStatus
from .profiles import DEFAULT_PROFILES, PSP_A, PSP_B, PSP_C, PSPProfile
from .settlement import SETTLEMENT_CSV_HEADER, SettlementLine
from .tokens import TEST_TOKENS, TokenBehaviour, TokenSpec

__all__ = [
    "DEFAULT_PROFILES",
    "PSP_A",
    "PSP_B",
    "PSP_C",
    "SETTLEMENT_CSV_HEADER",
    "TEST_TOKENS",
    "InProcessPSPClient",
    "PSPProfile",
    "ResponseLost",
    "SettlementLine",
    "SimResponse",
    "SimulatedPSP",
    "TokenBehaviour",
    "TokenSpec",
    "TransactionStatus",
]
