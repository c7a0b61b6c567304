"""Building and running the server: a checkpoint dir to an engine, a backend, an app, uvicorn.

Example:
    >>> from modelscope_llama2.constants import DEMO_DIR
    >>> sorted(default_sampling(DEMO_DIR))
    ['do_sample']
"""

import ipaddress
import logging
import os
from typing import Any, Dict, Optional

from ..constants import API_KEY_ENV
from ..engines.factory import load_engine
from .backend import LocalBackend
from .app import create_app
from .config import ServerConfig

logger = logging.getLogger(__name__)



def default_sampling(model_dir: str) -> Dict[str, Any]:
    """The checkpoint's sampling defaults (``do_sample``, ``temperature``, ``top_p``), from its generation config."""
    from transformers import GenerationConfig

    if not os.path.isfile(os.path.join(model_dir, "generation_config.json")):
        return {}
    config = GenerationConfig.from_pretrained(model_dir).to_diff_dict()
    return {key: config[key] for key in ("do_sample", "temperature", "top_p") if key in config}


def build_app(model_dir: str, served_model_name: str, engine: str = "transformers", dtype: str = "auto",
              device: Optional[str] = None, api_key: Optional[str] = None, **limits: Any) -> Any:
    """The OpenAI app over a local engine for ``model_dir`` (``limits``: :class:`ServerConfig` fields)."""
    from ..tokenizer import Llama2Tokenizer

    tokenizer = Llama2Tokenizer.from_pretrained(model_dir)
    max_running = limits.get("max_running", ServerConfig.max_running)
    # The batching engine runs as many requests at once as the server admits.
    engine_kwargs = {"max_batch_size": max_running} if engine == "transformers" else {}
    backend = LocalBackend(load_engine(model_dir, engine, dtype, device, **engine_kwargs), tokenizer,
                           max_workers=max_running)
    config = ServerConfig(served_model_name, api_key=api_key, default_sampling=default_sampling(model_dir), **limits)
    return create_app(backend, config)


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine.

    Example:
        >>> is_loopback("127.0.0.1"), is_loopback("localhost"), is_loopback("0.0.0.0")
        (True, True, False)
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(app: Any, host: str = "127.0.0.1", port: int = 8000, api_key: Optional[str] = None) -> None:
    """Serve ``app`` with uvicorn until interrupted; warns when a public address has no API key."""
    import uvicorn

    if not api_key and not is_loopback(host):
        logger.warning("serving on %s without an API key: anyone who can reach this address can use the model "
                       "(pass --api-key or set %s)", host, API_KEY_ENV)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
