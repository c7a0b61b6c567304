"""The OpenAI server on Ray Serve: N engine replicas across machines, conversations kept on their cache.

Two deployments make one Serve application:

* :class:`ModelReplica` (``num_replicas`` or autoscaled): each replica holds
  one engine (transformers, or vLLM with its own tensor/pipeline parallelism)
  behind a :class:`~modelscope_llama2.serving.backend.LocalBackend`, and
  streams plain :class:`~modelscope_llama2.decoding.TextDelta` items back.
* :class:`OpenAIIngress` (``num_cpus=0``): the same FastAPI app as the
  single-process server, over a :class:`RemoteBackend` that calls the
  replicas through a ``DeploymentHandle``.

Routing happens one hop after Serve's HTTP proxy, in the ingress, where the
prompt is a :class:`~modelscope_llama2.prompts.prompt.Prompt` and not bytes:
:class:`ConversationAffinityRouter` (Serve's public request-router API) starts
a conversation on the least loaded replica and sends its later turns where
it went (:mod:`~modelscope_llama2.serving.affinity`), and to the least loaded
replica when that one is busy, full or gone. Since the next turn comes back, a
replica then prefills its known beginning (the answer as the next prompt
re-encodes it) while the user reads: :class:`NextTurnPrefill`.

Faults: a request whose replica dies before any text reached the app is sent
again (the router no longer offers the dead replica); one cut mid-stream
raises :class:`~modelscope_llama2.serving.backend.BackendUnavailable`, which
the app turns into an OpenAI error event. Serve restarts the replica; it
takes the dead one's rank (its place in the rendezvous order of new
conversations).

Example (the ``+SKIP`` lines deploy onto a Ray cluster; ``tests/ray`` does so on
a simulated two-node one):
    >>> spec = EngineSpec(model="path/to/Llama-2-7b-chat-ms")
    >>> app = build_application(spec, ServerConfig("llama-2-7b-chat"), ScaleSpec(replicas=2))  # doctest: +SKIP
    >>> serve.run(app, name="modelscope-llama2", route_prefix="/")  # doctest: +SKIP
"""

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Callable, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple, Union

try:
    from ray import serve
    from ray.exceptions import RayActorError
    from ray.serve.config import RequestRouterConfig
    from ray.serve.exceptions import ReplicaUnavailableError
    from ray.serve.handle import DeploymentHandle
    from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "serve --replicas runs on Ray Serve, which is not installed: pip install 'modelscope_llama2[ray]'"
    ) from error

from prometheus_client import CollectorRegistry, Counter

from ..decoding import TextDelta
from ..engines.base import Engine, PushEngine, Usage
from ..engines.process import ProcessEngine
from ..prompts.prompt import Prompt, SamplingParams
from ..tokenizer import Llama2Tokenizer
from .affinity import Placements, conversation_key, next_turn_ids, rank_order, turn_end_ids
from .backend import Backend, BackendUnavailable, LocalBackend
from .metrics import PREFIX
from .app import create_app
from .config import ServerConfig
from .server import drain_of

logger = logging.getLogger(__name__)

APP_NAME = "modelscope-llama2"
MODEL_DEPLOYMENT = "Llama2Replica"
INGRESS_DEPLOYMENT = "OpenAIIngress"
ROUTERS = ("affinity", "default")

# Seconds past the drain timeout the ingress may take to end its last requests before the app is stopped anyway.
DRAIN_GRACE_S = 10.0
# How often a stopping replica looks whether its requests are done (Serve's default: 2 s, slept once even when
# none is left). The ingress has drained them already, so each 2 s sleep would only delay the exit.
SHUTDOWN_POLL_S = 0.2

# Longest a turn waits for the prefill of its beginning (NextTurnPrefill) before it is computed alongside.
NEXT_TURN_WAIT_S = 10.0

# What Serve raises when the replica serving a call is gone.
REPLICA_LOST = (RayActorError, ReplicaUnavailableError)


# -- plain data between the driver, the ingress and the replicas --------------------


@dataclass(frozen=True)
class EngineSpec:
    """The engine each replica builds: checkpoint (dir or ModelScope id), engine name and its options.

    ``engine_options`` go to the engine (vLLM: ``tensor_parallel_size``,
    ``pipeline_parallel_size``, ``gpu_memory_utilization``, ...; transformers:
    :class:`~modelscope_llama2.engines.batching.BatchingEngine`'s
    ``kv_cache_bytes``, ``max_model_len``, ...). ``max_concurrent``: requests
    one replica batches at once (the rest wait inside it, not yet
    streaming); ``serve --replicas`` sizes it to the deployment's
    ``max_ongoing_requests``, so a replica batches all Serve lets it hold.
    """

    model: str
    engine: str = "transformers"
    revision: Optional[str] = None
    device: Optional[str] = None
    dtype: str = "auto"
    engine_options: Mapping[str, Any] = field(default_factory=dict)
    max_concurrent: int = 8


@dataclass(frozen=True)
class ScaleSpec:
    """How many replicas, what each may hold, and how Serve watches them.

    With ``min_replicas``/``max_replicas`` Serve autoscales (starting at
    ``replicas``) toward ``target_ongoing_requests`` per replica.
    ``max_ongoing_requests``: a replica with that many requests is full; the
    router then prefers the least loaded other replica, as it does while the
    preferred one has ``imbalance`` more requests than the least loaded.
    """

    replicas: int = 1
    min_replicas: Optional[int] = None
    max_replicas: Optional[int] = None
    target_ongoing_requests: Optional[float] = None
    max_ongoing_requests: int = 8
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    router: str = "affinity"
    imbalance: int = 4
    health_check_period_s: float = 10.0
    graceful_shutdown_timeout_s: float = 20.0

    def __post_init__(self) -> None:
        _positive_int(self.replicas, "replicas")
        _positive_int(self.max_ongoing_requests, "max_ongoing_requests")
        _positive_int(self.imbalance, "imbalance")
        if self.router not in ROUTERS:
            raise ValueError(f"router: expected one of {list(ROUTERS)}, got {self.router!r}")
        if self.autoscaling:
            low = self.replicas if self.min_replicas is None else self.min_replicas
            high = self.replicas if self.max_replicas is None else self.max_replicas
            _positive_int(high, "max_replicas")
            if not isinstance(low, int) or isinstance(low, bool) or not 0 <= low <= self.replicas <= high:
                raise ValueError(f"replicas: expected min_replicas <= replicas <= max_replicas, got "
                                 f"{low} <= {self.replicas} <= {high}")
        if self.target_ongoing_requests is not None and not self.target_ongoing_requests > 0:
            raise ValueError(f"target_ongoing_requests: expected a positive number, got {self.target_ongoing_requests!r}")
        for name in ("replica_cpus", "replica_gpus"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}: expected a non-negative number, got {getattr(self, name)!r}")

    @property
    def autoscaling(self) -> bool:
        return (self.min_replicas, self.max_replicas, self.target_ongoing_requests) != (None, None, None)

    def deployment_options(self) -> Dict[str, Any]:
        """Keyword arguments for ``serve.deployment`` of the model replicas."""
        options: Dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": {"num_cpus": self.replica_cpus, "num_gpus": self.replica_gpus},
            "health_check_period_s": self.health_check_period_s,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "graceful_shutdown_wait_loop_s": SHUTDOWN_POLL_S,
        }
        if self.autoscaling:
            config = {"initial_replicas": self.replicas,
                      "min_replicas": self.replicas if self.min_replicas is None else self.min_replicas,
                      "max_replicas": self.replicas if self.max_replicas is None else self.max_replicas}
            if self.target_ongoing_requests is not None:
                config["target_ongoing_requests"] = self.target_ongoing_requests
            options["autoscaling_config"] = config
        else:
            options["num_replicas"] = self.replicas
        if self.router == "affinity":
            options["request_router_config"] = RequestRouterConfig(
                request_router_class=ConversationAffinityRouter, request_router_kwargs={"imbalance": self.imbalance})
        return options


@dataclass(frozen=True)
class ReplicaCard:
    """What the ingress needs from the replicas to build and check prompts.

    ``name`` and ``sampling_options`` are the engine's, so the engine's own
    :meth:`~modelscope_llama2.engines.base.Engine.check_sampling` runs on them.
    """

    tokenizer: Any
    context_length: int
    name: str
    sampling_options: FrozenSet[str]


@dataclass(frozen=True)
class ServedBy:
    """The first item of every replica stream: which replica (and rank) answers."""

    replica_id: str
    rank: int


# -- the replicas ---------------------------------------------------------------------


def load_engine(spec: EngineSpec) -> Engine:
    """The engine of ``spec`` over weights loaded through ModelScope's ``Model.from_pretrained``.

    transformers weights get the batching engine of every server
    (:func:`~modelscope_llama2.engines.factory.serving_engine`), running up to
    ``spec.max_concurrent`` requests in the same forward passes; its idle KV
    slots keep the conversations affinity routing sends back. A replica runs
    it in a child process (:class:`ModelReplica`). ``vllm``: the facade builds
    it (imported only then).
    """
    import modelscope_llama2  # noqa: F401  (registers the model with ModelScope)
    from modelscope import Model

    from ..constants import LLM_FRAMEWORK_KEY
    from ..engines.factory import serving_engine

    kwargs: Dict[str, Any] = {LLM_FRAMEWORK_KEY: spec.engine}
    for key, value in (("revision", spec.revision), ("device", spec.device)):
        if value is not None:
            kwargs[key] = value
    if spec.dtype != "auto":
        kwargs["torch_dtype" if spec.engine == "transformers" else "dtype"] = spec.dtype
    if spec.engine == "transformers":
        model = Model.from_pretrained(spec.model, **kwargs)
        return serving_engine(model, **{"max_batch_size": spec.max_concurrent, **spec.engine_options})
    return Model.from_pretrained(spec.model, **kwargs, **spec.engine_options).engine


def local_checkpoint(spec: EngineSpec) -> EngineSpec:
    """``spec`` with a local directory for its model (a ModelScope id is downloaded here, into ModelScope's cache)."""
    if os.path.isdir(os.path.expanduser(spec.model)):
        return spec
    from modelscope import snapshot_download

    return replace(spec, model=snapshot_download(spec.model, revision=spec.revision), revision=None)


class ModelReplica:
    """One Serve replica: one engine, streaming a prompt's :class:`TextDelta` items after a :class:`ServedBy`.

    The stream is cancelled by Serve when the caller goes away, which closes
    the local backend's stream and aborts the request in the engine.
    """

    def __init__(self, spec: EngineSpec, prefill_next_turn: bool = False):
        # The transformers engine in a child process, as ``serve`` runs it: the replica's event loop (Serve's
        # requests, every streamed delta) and the step loop no longer take turns on one interpreter lock.
        # vLLM runs its engine core in a process of its own already.
        spec = local_checkpoint(spec)
        engine = ProcessEngine(load_engine, spec) if spec.engine == "transformers" else load_engine(spec)
        tokenizer = Llama2Tokenizer.from_pretrained(spec.model)
        self._ahead = NextTurnPrefill(engine, tokenizer) if prefill_next_turn else None
        self._backend = LocalBackend(engine, tokenizer, max_workers=spec.max_concurrent)
        self._engine: Engine = engine
        context = serve.get_replica_context()
        self._served_by = ServedBy(context.replica_id.unique_id, context.rank.rank)
        self._turn_end = turn_end_ids(tokenizer.sp_model.encode)
        # As the single server does: the loaded libraries (and a vLLM engine's objects) frozen, a full
        # collection never walks them again (one held the replica's loop for 0.5-1 s).
        gc.freeze()

    def record_replica_metadata(self) -> Dict[str, Any]:
        """Published once to every router: the rank (which keys are ours) and how a user turn ends."""
        return {"rank": self._served_by.rank, "turn_end_ids": list(self._turn_end)}

    def card(self) -> ReplicaCard:
        """What the ingress builds prompts with (asked once, when it starts)."""
        return ReplicaCard(self._backend.tokenizer, self._engine.context_length, self._engine.name,
                           frozenset(self._engine.sampling_options))

    async def stream(self, prompt: Prompt) -> AsyncIterator[Union[ServedBy, TextDelta]]:
        yield self._served_by
        if self._ahead is not None:
            await self._ahead.wait_for(prompt)
        answer: List[str] = []
        finish: Optional[str] = None
        async for delta in self._backend.stream(prompt):
            answer.append(delta.text)
            finish = delta.finish_reason
            yield delta
        if self._ahead is not None and finish in ("stop", "length"):
            self._ahead.start(prompt, "".join(answer))

    async def __del__(self) -> None:
        await self._backend.close()


class NextTurnPrefill:
    """Prefills each answered conversation's next prompt as far as it is known, while its user reads the answer.

    With conversation affinity the next turn comes back to this replica, so
    it then computes only its new message: the answer's sampled ids rarely
    equal its re-encoded text's (:func:`~.affinity.next_turn_ids`), and
    without this its whole answer would be prefilled again on top. Chat
    prompts on the batching engine only; nothing is sent back. A turn that arrives while the prefill of its
    beginning still runs waits for it (its KV is what the turn reuses,
    instead of computing the same ids a second time beside it). A client
    that edits the answer loses only the prefill.
    """

    def __init__(self, engine: Engine, tokenizer: Any):
        # The batching engine only (here or in its child): it takes a prompt to prefill alone
        # (max_new_tokens=0); vLLM does not.
        self._submit = engine.submit if isinstance(engine, PushEngine) else None
        self._context_length = engine.context_length
        self._tokenizer = tokenizer
        self._running: Dict[str, Tuple[Tuple[int, ...], asyncio.Event]] = {}

    def start(self, prompt: Prompt, answer: str) -> None:
        """Queue the prefill of what follows ``prompt`` once ``answer`` is its reply (on the event loop)."""
        if self._submit is None or prompt.kind != "chat" or prompt.tools is not None:
            return
        tokenizer = self._tokenizer
        ids = (*prompt.token_ids,
               *next_turn_ids(answer, tokenizer.sp_model.encode, tokenizer.bos_token_id, tokenizer.eos_token_id))
        if len(ids) >= self._context_length:
            return
        ahead = Prompt(token_ids=ids, sampling=SamplingParams(max_new_tokens=0, options={"do_sample": False}),
                       background=True)
        loop, request_id = asyncio.get_running_loop(), ahead.request_id
        self._running[request_id] = (ids, asyncio.Event())

        def on_event(event: Any) -> None:  # on the engine's thread
            if event.finished:
                with contextlib.suppress(RuntimeError):  # the event loop is gone: the replica is stopping
                    loop.call_soon_threadsafe(self._finished, request_id)

        try:
            self._submit(ahead, on_event)
        except Exception:  # a lost prefill costs the next turn some time, never this answer
            self._running.pop(request_id, None)
            logger.exception("prefilling the next turn after request %s failed", prompt.request_id)

    async def wait_for(self, prompt: Prompt) -> None:
        """Return once no prefill of a beginning of ``prompt`` runs (or after :data:`NEXT_TURN_WAIT_S`)."""
        ids = prompt.token_ids
        waits = [done.wait() for ahead, done in self._running.values()
                 if len(ahead) < len(ids) and ids[:len(ahead)] == ahead]
        if waits:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.gather(*waits), NEXT_TURN_WAIT_S)

    def _finished(self, request_id: str) -> None:
        entry = self._running.pop(request_id, None)
        if entry is not None:
            entry[1].set()


# -- routing ----------------------------------------------------------------------------


class ConversationAffinityRouter(RequestRouter):
    """Each conversation to one replica, chosen by load when it starts (:class:`~.affinity.Placements`).

    Ranks: the conversation's replica first, then all the others (Serve
    takes the least loaded replica with room in the first rank that has one;
    a replica is full at its ``max_ongoing_requests``). Anything that is not
    a prompt goes to the least loaded replica. This never raises: a request
    must never hang on a routing bug.
    """

    def initialize_state(self, imbalance: int = 4, **_: Any) -> None:
        self._placements = Placements(imbalance)

    async def choose_replicas(
        self, candidate_replicas: List[RunningReplica], pending_request: Optional[PendingRequest] = None
    ) -> List[List[RunningReplica]]:
        if pending_request is not None:
            # Without backoff, a deployment whose replicas are all full spins on this loop.
            pending_request.routing_context.should_backoff = True
        try:
            return preference(candidate_replicas, _prompt_of(pending_request), self._placements, self._load)
        except Exception:  # a routing bug must cost cache hits, never requests
            logger.exception("conversation affinity failed; routing to the least loaded replica")
            return [list(candidate_replicas)]

    def _load(self, replica_id: Any) -> int:
        return self.replica_queue_len_cache.get(replica_id) or 0  # unknown: assume idle


def preference(replicas: Sequence[Any], prompt: Optional[Prompt], placements: Placements,
               load: Callable[[Any], int]) -> List[List[Any]]:
    """``[[the conversation's replica], [the others]]`` for ``prompt`` (one rank of all when there is no choice)."""
    if prompt is None or len(replicas) < 2:
        return [list(replicas)]
    metadata = [replica.replica_metadata for replica in replicas]
    turn_end = next((m["turn_end_ids"] for m in metadata if "turn_end_ids" in m), ())
    # A replica that published no rank (still starting) can only be a fallback.
    by_rank = {m["rank"]: replica for replica, m in zip(replicas, metadata) if "rank" in m}
    if not by_rank:
        return [list(replicas)]
    key = conversation_key(prompt.token_ids, turn_end)
    ordered = {by_rank[rank].replica_id: by_rank[rank] for rank in rank_order(key, sorted(by_rank))}
    home = ordered[placements.choose(key, list(ordered), load)]
    return [[home], [r for r in replicas if r is not home]]


def _prompt_of(pending_request: Optional[PendingRequest]) -> Optional[Prompt]:
    if pending_request is None:
        return None
    first = pending_request.args[0] if pending_request.args else None
    return first if isinstance(first, Prompt) else None


# -- the ingress -------------------------------------------------------------------------


class ReplicaMetrics:
    """Per-replica requests and prefix-cache hits, counted where the streams end (the ingress)."""

    LABELS = ("replica", "rank")

    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter(PREFIX + "replica_requests", "Finished requests, by replica", self.LABELS,
                                registry=registry)
        self.cache_hits = Counter(PREFIX + "replica_prefix_cache_hits",
                                  "Finished requests that reused cached prompt tokens, by replica", self.LABELS,
                                  registry=registry)
        self.cached_tokens = Counter(PREFIX + "replica_prompt_tokens_cached",
                                     "Prompt tokens served from the replica's prefix cache", self.LABELS,
                                     registry=registry)
        self.prompt_tokens = Counter(PREFIX + "replica_prompt_tokens", "Prompt tokens, by replica", self.LABELS,
                                     registry=registry)
        self.retries = Counter(PREFIX + "replica_retries",
                               "Requests sent to another replica after theirs stopped before answering",
                               registry=registry)

    def record(self, served_by: ServedBy, usage: Usage) -> None:
        labels = {"replica": served_by.replica_id, "rank": str(served_by.rank)}
        self.requests.labels(**labels).inc()
        self.prompt_tokens.labels(**labels).inc(usage.prompt_tokens)
        self.cached_tokens.labels(**labels).inc(usage.cached_tokens)
        if usage.cached_tokens:
            self.cache_hits.labels(**labels).inc()


class RemoteBackend(Backend):
    """A :class:`Backend` whose engine is a Serve deployment of :class:`ModelReplica`.

    ``retries``: how many more replicas a request may try when the one it
    was sent to dies before any text came back.
    """

    def __init__(self, handle: DeploymentHandle, card: ReplicaCard, retries: int = 2):
        self._handle = handle.options(stream=True)
        self._card = card
        self.tokenizer = card.tokenizer
        self.context_length = card.context_length
        self.engine_name = card.name
        self.retries = retries
        self.metrics: Optional[ReplicaMetrics] = None
        self._live: Dict[str, Any] = {}

    def check_sampling(self, sampling: SamplingParams, where: str) -> None:
        # The engine's own check, on the name and options its replicas published.
        Engine.check_sampling(self._card, sampling, where)  # type: ignore[arg-type]

    async def stream(self, prompt: Prompt, whole: bool = False) -> AsyncIterator[TextDelta]:
        """The replica's deltas; a replica lost before any reached the client is replaced by another.

        With ``whole`` (an answer sent only once complete) the deltas of an
        attempt are held until it finishes, so a replica lost at any point
        is retried: nothing had reached the client yet.
        """
        for attempt in range(self.retries + 1):
            response = self._handle.stream.remote(prompt)
            self._live[prompt.request_id] = response
            served_by: Optional[ServedBy] = None
            streamed = False
            held: List[TextDelta] = []
            try:
                async for item in response:
                    if isinstance(item, ServedBy):
                        served_by = item
                        continue
                    if item.usage is not None and self.metrics is not None and served_by is not None:
                        self.metrics.record(served_by, item.usage)
                    if whole:
                        held.append(item)
                        continue
                    streamed = True
                    yield item
                for item in held:
                    yield item
                return
            except REPLICA_LOST as error:
                where = f"replica {served_by.replica_id}" if served_by else "its replica"
                if streamed:
                    raise BackendUnavailable(f"{where} stopped while streaming this answer; send it again") from error
                logger.warning("request %s: %s is gone before answering (attempt %d of %d); trying another",
                               prompt.request_id, where, attempt + 1, self.retries + 1)
                if self.metrics is not None:
                    self.metrics.retries.inc()
            finally:
                self._live.pop(prompt.request_id, None)
                response.cancel()  # no-op once finished; frees the replica when the caller left early
        raise BackendUnavailable(f"no replica could answer: {self.retries + 1} replicas stopped before answering")

    def register_metrics(self, registry: CollectorRegistry) -> None:
        self.metrics = ReplicaMetrics(registry)

    async def abort(self, request_id: str) -> None:
        response = self._live.get(request_id)
        if response is not None:
            response.cancel()


@serve.ingress()
class OpenAIIngress:
    """The single-process server's FastAPI app, over a :class:`RemoteBackend` to the model replicas."""

    async def __init__(self, model: DeploymentHandle, config: ServerConfig):
        card = await model.card.remote()
        self._app = create_app(RemoteBackend(model, card), config)

    def __serve_build_asgi_app__(self) -> Any:
        return self._app

    async def drain(self, timeout: float) -> None:
        """The single-process server's graceful shutdown: called by :func:`run` before Serve stops the app.

        New requests get 503 at once (``/health`` too); requests still
        generating after ``timeout`` seconds end with an error (a stream: an
        error event and ``[DONE]``). Returns once none is generating. Serve's
        own shutdown then waits (``graceful_shutdown_timeout_s``) for the
        last bytes to go out; without this call it would cut the streams
        still running at its end with nothing.
        """
        drain = drain_of(self._app)
        drain.begin(timeout)
        await drain.ended()


def build_application(engine: EngineSpec, config: ServerConfig, scale: ScaleSpec):
    """The Serve application: the ingress bound to ``scale.replicas`` model replicas of ``engine``."""
    model = serve.deployment(ModelReplica, name=MODEL_DEPLOYMENT, **scale.deployment_options())
    # On shutdown the ingress, like the replicas, lets its requests finish for graceful_shutdown_timeout_s.
    ingress = serve.deployment(OpenAIIngress, name=INGRESS_DEPLOYMENT, ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=config.max_running + config.max_waiting,
                               graceful_shutdown_timeout_s=scale.graceful_shutdown_timeout_s,
                               graceful_shutdown_wait_loop_s=SHUTDOWN_POLL_S)
    # Only where the next turn comes back: under Serve's own router it lands on this replica by chance.
    return ingress.bind(model.bind(engine, scale.router == "affinity"), config)


def _positive_int(value: Any, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")


def run(engine: EngineSpec, config: ServerConfig, scale: ScaleSpec, host: str = "127.0.0.1", port: int = 8000,
        ray_address: Optional[str] = None, app_name: str = APP_NAME) -> None:
    """Serve on Ray until Ctrl-C or SIGTERM: a local Ray instance, or the cluster at ``ray_address`` (``auto``: this machine's).

    Serve's HTTP proxy listens on ``host:port`` of the head node; a line on
    stderr says when the application is ready. On the way out the ingress
    drains first (:meth:`OpenAIIngress.drain`: requests in flight get
    ``scale.graceful_shutdown_timeout_s`` seconds, then an error event and
    ``[DONE]``), then the application is deleted (also when stopped while it
    deploys); a local instance is shut down, a joined cluster keeps running.
    Exits normally on Ctrl-C and on SIGTERM, also while starting.
    """
    import ray

    joined = ray_address is not None
    previous = signal.getsignal(signal.SIGTERM)
    started = serving = False
    try:
        ray.init(address=ray_address) if joined else ray.init(include_dashboard=False)
        # After ray.init, which installs its own SIGTERM handler (sys.exit: no drain, exit status 15).
        signal.signal(signal.SIGTERM, _interrupt)
        serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
        started = True
        serve.run(build_application(engine, config, scale), name=app_name, route_prefix="/")
        serving = True
        print(f"serving {config.served_model_name} on http://{host}:{port}/v1 with {scale.replicas} replica(s) "
              f"on Ray Serve; Ctrl-C to stop", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass  # how this command stops
    finally:
        try:
            if serving:
                _drain(app_name, scale.graceful_shutdown_timeout_s)
        finally:
            # Stopped before Serve was up, nothing of ours runs there, and asking Serve would block on (or
            # fail for want of) a controller still starting: ray.shutdown() alone ends a local instance.
            if started:
                serve.delete(app_name)
                if not joined:
                    serve.shutdown()
            ray.shutdown()
            signal.signal(signal.SIGTERM, previous)


def _drain(app_name: str, timeout: float) -> None:
    """The ingress's :meth:`OpenAIIngress.drain`; a second Ctrl-C or SIGTERM stops waiting for it."""
    print(f"stopping: requests in flight have {timeout:g} s to finish (Ctrl-C again: stop now)", file=sys.stderr,
          flush=True)
    try:
        serve.get_app_handle(app_name).drain.remote(timeout).result(timeout_s=timeout + DRAIN_GRACE_S)
    except KeyboardInterrupt:
        pass
    except Exception:  # the app is stopped all the same; what went wrong is in the log
        logger.exception("draining the requests in flight failed")


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt
