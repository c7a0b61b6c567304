"""ModelScope pipelines for Llama 2: chat (``Tasks.chat``) and plain completion (``Tasks.text_generation``).

Importing ``modelscope_llama2`` registers them (see ``registration.py``)
under this package's names and under the names the ModelScope Llama 2 repos
put in their ``configuration.json``, so ``pipeline()`` builds them for
those repos too.

* preprocess (tokenize): the caller's input (a string, ``{'text': ...}`` or
  ``{'messages': [...]}``) and call settings are validated and become prompt
  ids (``model.prepare_chat`` / ``model.prepare_completion``);
* forward (generate): ``model.generate_prepared``, one padded batch for a list;
* postprocess (decode): ``model.decode_prepared``, in the caller's form
  (``{'response', 'history'}``, an assistant ``message`` for ``messages``
  input, or ``{'text'}``).

``pipe(input, stream=True)`` (or ``pipe.stream(input)``, or ModelScope's
``pipe.stream_generate(input)``) returns a generator of partial results
instead; its last item equals the non-streamed result.

Example:
    >>> import torch, modelscope_llama2
    >>> from modelscope.pipelines import pipeline
    >>> from modelscope.utils.constant import Tasks
    >>> from modelscope_llama2.constants import DEMO_DIR
    >>> pipe = pipeline(task=Tasks.chat, model=DEMO_DIR, device="cpu", torch_dtype=torch.float32)
    >>> result = pipe("Where is the capital of Zhejiang?", max_length=512, do_sample=False)
    >>> result["response"]
    'The capital of Zhejiang Province is Hangzhou.'
    >>> pipe("What are the interesting places there?", history=result["history"])["response"]
    'West Lake, Lingyin Temple and the Grand Canal are worth a visit.'
    >>> [out["response"] for out in pipe.stream("Say hello in emoji.")][-1]
    '👋🦙😀'
"""

from typing import Any, Dict, Iterator, List, Optional, Union

from modelscope.models.base import Model
from modelscope.outputs import OutputKeys
from modelscope.pipelines.base import Pipeline
from modelscope.utils.device import create_device

from .tokenizer import Llama2Tokenizer

Input = Union[str, Dict[str, Any]]
# ModelScope's documented Llama 2 calls pass these; the tokenizer fixes them,
# so they are accepted when they agree with it.
_TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


class _Llama2Pipeline(Pipeline):
    """Loading, device handling, batching and streaming shared by both pipelines."""

    def __init__(self, model: Union[str, Model], preprocessor: Optional[Llama2Tokenizer] = None,
                 config_file: Optional[str] = None, device: str = "gpu", auto_collate: bool = True,
                 device_map: Any = None, torch_dtype: Any = None, **kwargs: Any):
        """``model``: a checkpoint dir, a model id or a loaded model; ``device`` (``cpu``, ``gpu``,
        ``cuda:1``...; ``gpu`` falls back to CPU without CUDA) or ``device_map`` (accelerate's,
        e.g. ``'auto'``); ``torch_dtype`` (default: the checkpoint's). ``preprocessor``: a
        tokenizer, by default ``Llama2Tokenizer.from_pretrained`` on the checkpoint dir.
        """
        if device_map is not None and device not in (None, "gpu"):
            raise ValueError(f"device and device_map: give one, not both (got device={device!r}, "
                             f"device_map={device_map!r})")
        device = device or "gpu"
        if not isinstance(model, Model):
            model = _load_model(model, device, device_map, torch_dtype, kwargs)
        tokenizer = preprocessor or Llama2Tokenizer.from_pretrained(model.model_dir)
        # auto_collate would move the (string) inputs "to the device"; the model places its tensors.
        super().__init__(config_file=config_file, model=model, preprocessor=tokenizer, device=device,
                         auto_collate=False, device_map=device_map, **kwargs)
        self.tokenizer = tokenizer
        # from_pretrained already placed the model (and a device_map must not
        # be undone by Pipeline.prepare_model's .to(device)) and set eval().
        self._model_prepare = True

    def __call__(self, input: Union[Input, List[Input]], *args: Any, stream: bool = False,
                 **kwargs: Any) -> Union[Dict[str, Any], List[Dict[str, Any]], Iterator[Dict[str, Any]]]:
        """One input → one result; a list → a list, generated as one padded batch (or several of
        ``batch_size``); ``stream=True`` → a generator of partial results (see :meth:`stream`).
        Keyword settings apply to every input; keys inside an input dict take precedence.
        """
        if stream:
            return self.stream(input, **kwargs)
        if isinstance(input, list):
            if not input:
                raise ValueError("input: expected a non-empty list of inputs")
            kwargs.setdefault("batch_size", len(input))
        return super().__call__(input, *args, **kwargs)

    def stream(self, input: Input, **kwargs: Any) -> Iterator[Dict[str, Any]]:
        """Partial results as tokens arrive, each a prefix of the next; the last equals ``pipe(input)``.

        Input is checked now, before the generator is returned.
        """
        if isinstance(input, list):
            raise TypeError("input: stream one input at a time, not a list")
        preprocess_params, _, _ = self._sanitize_parameters(**kwargs)
        inputs = self.preprocess(input, **preprocess_params)
        return (self._shape(output, inputs) for output in self.model.stream_prepared(inputs["prepared"]))

    # The name ModelScope's streaming pipelines use (PipelineStreamingOutputMixin).
    stream_generate = stream

    def _check_input(self, input: Input) -> None:
        # ModelScope's check asserts on types (text-generation knows only
        # strings); preprocess and the model raise clear TypeError/ValueError.
        pass

    def _sanitize_parameters(self, **kwargs: Any):
        # Every call setting belongs to the model's input dict, built in preprocess.
        return kwargs, {}, {}

    def _request(self, item: Dict[str, Any], settings: Dict[str, Any]) -> Dict[str, Any]:
        """The model input dict: call settings, then the item's own keys; token ids checked and dropped."""
        request = {**settings, **item}
        for key in _TOKEN_ID_KEYS:
            if key in request:
                value, expected = request.pop(key), getattr(self.tokenizer, key)
                if value != expected:
                    raise ValueError(f"{key}: this checkpoint's tokenizer uses {expected}, got {value!r}")
        return request

    def forward(self, inputs: Dict[str, Any], **_: Any) -> Dict[str, Any]:
        # A batch arrives as lists (Pipeline._batch gathers each key): one generate() for all.
        return {**inputs, "generated": self.model.generate_prepared(inputs["prepared"])}

    def postprocess(self, inputs: Dict[str, Any], **_: Any) -> Dict[str, Any]:
        return self._shape(self.model.decode_prepared(inputs["prepared"], inputs["generated"]), inputs)

    def _shape(self, output: Dict[str, Any], inputs: Dict[str, Any]) -> Dict[str, Any]:
        """The model's output dict in the form the caller's input asked for."""
        return output


class Llama2ChatPipeline(_Llama2Pipeline):
    """``Tasks.chat``: ``pipe(text, history=..., system=...)`` → ``{'response', 'history', 'finish_reason'}``.

    Input: a string, ``{'text', 'history', 'system', ...}`` or OpenAI-style
    ``{'messages': [{'role': 'system'|'user'|'assistant', 'content': ...}, ...]}``,
    which returns ``{'message': {'role': 'assistant', 'content': ...}, 'finish_reason'}``.
    Settings (keyword or in the dict) are those of ``model.chat()``:
    ``max_length``, ``max_new_tokens``, ``do_sample``, ``temperature``,
    ``top_p``, ``top_k``, ``repetition_penalty``, ``stop``, ``seed``... There is
    no default system prompt.

    Example:
        >>> from modelscope.pipelines import pipeline
        >>> pipe = pipeline("chat", model=DEMO_DIR, device="cpu")
        >>> messages = [{"role": "user", "content": "Where is the capital of Zhejiang?"}]
        >>> pipe({"messages": messages})
        {'message': {'role': 'assistant', 'content': 'The capital of Zhejiang Province is Hangzhou.'}, 'finish_reason': 'eos'}
    """

    def preprocess(self, inputs: Input, **settings: Any) -> Dict[str, Any]:
        if isinstance(inputs, str):
            inputs = {"text": inputs}
        elif not isinstance(inputs, dict):
            raise TypeError(f"input: expected a string, {{'text': ...}} or {{'messages': [...]}}, "
                            f"got {type(inputs).__name__}")
        elif "role" in inputs:
            raise TypeError("input: a single message dict; pass OpenAI-style messages as {'messages': [...]}")
        prepared = self.model.prepare_chat(self._request(inputs, settings), self.tokenizer)
        return {"prepared": prepared, "messages": "messages" in inputs}

    def _shape(self, output: Dict[str, Any], inputs: Dict[str, Any]) -> Dict[str, Any]:
        if inputs["messages"]:
            message = {"role": "assistant", "content": output[OutputKeys.RESPONSE]}
            return {"message": message, "finish_reason": output["finish_reason"]}
        return output


class Llama2TextGenerationPipeline(_Llama2Pipeline):
    """``Tasks.text_generation``: BOS + the text, no chat format → ``{'text': continuation, 'finish_reason'}``.

    ``echo=True`` returns prompt + continuation. Settings as for the chat pipeline.

    Example:
        >>> from modelscope.pipelines import pipeline
        >>> pipe = pipeline("text-generation", model=DEMO_DIR, device="cpu")
        >>> out = pipe("[INST] Where is the capital of Zhejiang? [/INST]", max_new_tokens=3)
        >>> out["text"], out["finish_reason"]
        (' The capital of', 'length')
    """

    def preprocess(self, inputs: Input, **settings: Any) -> Dict[str, Any]:
        if isinstance(inputs, str):
            inputs = {"text": inputs}
        elif not isinstance(inputs, dict):
            raise TypeError(f"input: expected a string or {{'text': ..., 'echo': ...}}, got {type(inputs).__name__}")
        return {"prepared": self.model.prepare_completion(self._request(inputs, settings), self.tokenizer)}


def _load_model(model: str, device: str, device_map: Any, torch_dtype: Any, kwargs: Dict[str, Any]) -> Model:
    """``Model.from_pretrained`` on a real torch device (``gpu`` without CUDA means CPU)."""
    load_kwargs = {key: kwargs[key] for key in ("trust_remote_code",) if key in kwargs}
    if torch_dtype is not None:
        load_kwargs["torch_dtype"] = torch_dtype
    if device_map is not None:
        return Model.from_pretrained(model, device_map=device_map, **load_kwargs)
    return Model.from_pretrained(model, device=str(create_device(device)), **load_kwargs)
