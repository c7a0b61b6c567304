"""The web chat as a ModelScope Studio app: a top-level ``app.py`` that builds ``demo`` and launches it.

To publish it, create a Studio (Gradio SDK) on modelscope.cn and put this file
at the top of its repo, with a ``requirements.txt`` holding
``modelscope_llama2[web]``. Studio runs ``python app.py`` and sets
``GRADIO_SERVER_NAME``/``GRADIO_SERVER_PORT``, which ``launch()`` reads.

Locally (the page is at http://127.0.0.1:7860)::

    python examples/app.py                                          # the offline demo checkpoint
    MODEL_ID=modelscope/Llama-2-13b-chat-ms DTYPE=float16 python examples/app.py   # the real model, on a GPU

``MODEL_ID`` is a ModelScope model id or a local checkpoint dir (without it:
the demo checkpoint); ``MODEL_REVISION``, ``DEVICE`` (``cpu``, ``gpu``,
``cuda:N``, ``auto``) and ``DTYPE`` (``float16``...) are optional.
"""

import os

from modelscope_llama2.apps.web import build_demo, local_backend

backend = local_backend(os.environ.get("MODEL_ID"), revision=os.environ.get("MODEL_REVISION"),
                        device=os.environ.get("DEVICE"), dtype=os.environ.get("DTYPE", "auto"))
demo = build_demo(backend)

if __name__ == "__main__":
    demo.queue().launch()
