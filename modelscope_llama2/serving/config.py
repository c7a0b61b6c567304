"""What the OpenAI-compatible app serves and its limits.

Example:
    >>> ServerConfig("llama-2-7b-chat", api_key="sk-1").max_running
    8
"""

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional


@dataclass(frozen=True)
class ServerConfig:
    """What the app serves and its limits.

    ``default_sampling``: the checkpoint's ``generation_config`` settings
    (``do_sample``, ``temperature``, ``top_p``) used when a request leaves
    ``temperature``/``top_p`` out, as vLLM does. ``max_running``: choices
    generating at once; ``max_waiting``: choices queued behind them before
    new requests get 429. ``responses_store_size``: responses kept in memory
    for ``GET /v1/responses/{id}`` and ``previous_response_id`` (least recently
    used evicted first).
    """

    served_model_name: str
    api_key: Optional[str] = None
    default_sampling: Mapping[str, Any] = field(default_factory=dict)
    max_running: int = 8
    max_waiting: int = 64
    max_body_bytes: int = 1 << 20
    # Seconds a request's body may take to arrive (408 past it).
    body_timeout: float = 30.0
    responses_store_size: int = 1000
