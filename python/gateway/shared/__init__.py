"""State shared by the gateway processes of cluster mode (Redis), behind the `SharedState` interface."""

from gateway.shared.redis_state import (
    Admission,
    InMemorySharedState,
    RedisSharedState,
    SharedState,
    SharedStateUnavailable,
)

__all__ = ["Admission", "InMemorySharedState", "RedisSharedState", "SharedState", "SharedStateUnavailable"]
