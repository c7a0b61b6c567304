"""The one place where this package plugs into ModelScope; run on ``import modelscope_llama2``.

ModelScope builds a model or pipeline from a checkpoint's ``configuration.json``
(task + type) through its registries, but only for (registry, task, type)
signatures listed in its prebuilt AST index: anything else silently falls
back to a plain transformers model without ``chat()``. It also imports the
module the index names for a signature right before building, which would
re-run ModelScope's own llama2 registrations. So, for every signature below:

1. ModelScope's own llama modules are imported first (their pipeline module
   fails to import under transformers 5, which registers nothing), so their
   decorators can never run after ours;
2. this package's class is registered with ``force=True``;
3. the index entry is pointed at this package's module.

After that, whatever the import order, ``Model.from_pretrained`` and
``pipeline()`` on a Llama 2 checkpoint build this package's classes.
"""

import importlib
import logging

from modelscope.metainfo import Pipelines
from modelscope.models.builder import MODELS
from modelscope.pipelines.builder import PIPELINES
from modelscope.utils.constant import Tasks
from modelscope.utils.import_utils import INDEX_KEY, LazyImportModule

from .constants import CHAT_PIPELINE, TEXT_GENERATION_PIPELINE
from .model import Llama2ForChat
from .pipelines import Llama2ChatPipeline, Llama2TextGenerationPipeline

logger = logging.getLogger(__name__)

# Model types the ModelScope Llama 2 repos carry (and this repo's configuration.json).
MODEL_TYPES = ("llama2", "llama")
MODEL_TASKS = (Tasks.chat, Tasks.text_generation)

# A checkpoint's configuration.json names one of these; the task the caller
# asks for picks the behaviour, so pipeline(Tasks.text_generation, model=<a
# chat repo>) completes text and pipeline(Tasks.chat, model=<a base repo>) chats.
PIPELINE_TYPES = (
    CHAT_PIPELINE,
    Pipelines.llama2_text_generation_chat_pipeline,
    TEXT_GENERATION_PIPELINE,
    Pipelines.llama2_text_generation_pipeline,
)
PIPELINE_CLASSES = {Tasks.chat: Llama2ChatPipeline, Tasks.text_generation: Llama2TextGenerationPipeline}

# ModelScope modules that register classes under the names above.
BUILTIN_MODULES = ("modelscope.models.nlp.llama.text_generation", "modelscope.pipelines.nlp.text_generation_pipeline")


def register() -> None:
    """Make ModelScope build this package's model and pipelines for Llama 2 checkpoints."""
    for module in BUILTIN_MODULES:
        try:
            importlib.import_module(module)
        except ImportError as error:  # expected for the pipeline module under transformers 5
            logger.debug("ModelScope's %s does not import (%s); nothing of it is registered", module, error)
    for task in MODEL_TASKS:
        for model_type in MODEL_TYPES:
            _register(MODELS, task, model_type, Llama2ForChat)
    for task, pipeline_cls in PIPELINE_CLASSES.items():
        for name in PIPELINE_TYPES:
            _register(PIPELINES, task, name, pipeline_cls)


def _register(registry, task: str, name: str, cls: type) -> None:
    registry.register_module(task, module_name=name, module_cls=cls, force=True)
    module = importlib.import_module(cls.__module__)
    LazyImportModule.get_ast_index()[INDEX_KEY][(registry.name.upper(), task, name)] = {
        "filepath": module.__file__,
        "imports": [],
        "module": cls.__module__,
    }
