"""vLLM's ``/tokenize``, ``/detokenize`` and ``/tokenizer_info``: the server's own tokenizer, over HTTP.

``/tokenize`` takes a ``prompt`` (``add_special_tokens`` adds BOS, as
``/v1/completions`` does with a text prompt) or chat ``messages`` (the
Meta-exact ids ``/v1/chat/completions`` would generate from, same rules);
``/tokenizer_info`` answers what lm-eval's remote tokenizer asks first.

Example:
    >>> TokenizationHandler.__name__
    'TokenizationHandler'
"""

from typing import Optional

from ..errors import APIError
from ..protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse, TokenizerInfo
from .base import RequestBuilder, dialog_of, vocabulary_checked


class TokenizationHandler:
    """Tokenize, detokenize and describe the tokenizer; no generation, so no admission."""

    def __init__(self, builder: RequestBuilder):
        self.builder = builder

    def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        self._check_model(body.model)
        tokenizer = self.builder.tokenizer
        if (body.prompt is None) == (body.messages is None):
            param = "prompt" if body.prompt is None else "messages"
            raise APIError(400, f"{param}: send either prompt (text) or messages (chat), not both or neither",
                           param=param)
        if body.messages is not None:
            if body.add_special_tokens is not None:
                raise APIError(400, "add_special_tokens: not for messages, whose ids are Meta's (BOS and EOS "
                                    "placed by the format)", param="add_special_tokens")
            ids = self.builder.chat_ids(dialog_of(body.messages))
        else:
            ids = tokenizer.encode(body.prompt, bos=body.add_special_tokens is not False)
        strs = [tokenizer.sp_model.id_to_piece(i) for i in ids] if body.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self.builder.context, tokens=ids, token_strs=strs)

    def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        self._check_model(body.model)
        ids = vocabulary_checked(body.tokens, self.builder.tokenizer.vocab_size, "tokens")
        return DetokenizeResponse(prompt=self.builder.tokenizer.decode(ids))

    def info(self) -> TokenizerInfo:
        return TokenizerInfo(**self.builder.tokenizer.tokenizer_config())

    def _check_model(self, name: Optional[str]) -> None:
        if name is not None:  # optional on these routes, as in vLLM
            self.builder.check_model(name)


