"""The command line: ``python -m modelscope_llama2 {chat,serve,web,push,download,convert}``.

Each subcommand is a thin argument parser over a public function of the
package; errors are reported as one line on stderr with exit status 1.
Building the parser imports neither torch, ModelScope nor an optional stack,
so ``--help`` answers at once on a bare install; each command imports what it
runs, after checking what it needs (its extra, a free port) before any model
loads.
"""

import argparse
import importlib.util
import os
import socket
import sys
from typing import List, Optional

from .apps.terminal import COMMANDS
from .constants import API_KEY_ENV, CHECKPOINT_DTYPES, LOAD_DTYPES

DESCRIPTION = ("Meta's Llama 2 chat models through ModelScope: chat in the terminal or the browser, an "
               "OpenAI-compatible server, hub push and download, conversion of Meta's release layout.")

# The modules each extra installs that its command imports.
EXTRAS = {
    "serve": ("fastapi", "uvicorn", "prometheus_client"),
    "web": ("gradio", "openai"),
    "ray": ("ray",),
}


def require_extra(extra: str, command: str) -> None:
    """Fail with one line naming the extra to install when its modules are missing."""
    missing = [module for module in EXTRAS[extra] if importlib.util.find_spec(module) is None]
    if missing:
        raise RuntimeError(f"{command} needs {', '.join(missing)}, not installed: "
                           f'pip install "modelscope_llama2[{extra}]"')


def check_port_free(host: str, port: int) -> None:
    """Fail with one line when ``host:port`` cannot be listened on, before the model loads (minutes)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as error:
        raise ValueError(f"--host {host}: {error.strerror}") from error
    with socket.socket(family, kind, proto) as probe:
        # uvicorn sets it too: a port whose last connections linger in TIME_WAIT is free for the server.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            raise OSError(f"--port {port}: cannot listen on {host}:{port} ({error.strerror}); "
                          "choose another --port") from error


def register_with_modelscope() -> None:
    """What ``import modelscope_llama2`` does, skipped under ``python -m`` to keep help fast (see __init__)."""
    from .registration import register

    register()


def _command(subparsers, name: str, help: str, description: str, run) -> argparse.ArgumentParser:
    # allow_abbrev=False: a misspelt flag (--max-new-token) is an error, never silently another flag.
    parser = subparsers.add_parser(name, help=help, description=description, allow_abbrev=False)
    parser.set_defaults(run=run)
    return parser


def _add_chat(subparsers) -> None:
    parser = _command(
        subparsers, "chat", help="chat in the terminal (reads stdin line by line when not a tty)",
        description="Chat with a Llama 2 chat checkpoint; without --model, with the offline demo checkpoint. "
                    "Commands: " + "; ".join(f"{name}: {what}" for name, what in COMMANDS.items()),
        run=_run_chat,
    )
    parser.add_argument("--model", help="ModelScope model id or local checkpoint dir (default: the demo checkpoint)")
    parser.add_argument("--revision", help="hub revision (tag, branch or commit) of --model")
    parser.add_argument("--system", help="system prompt (default: none)")
    parser.add_argument("--device", help="cpu, gpu, cuda:N, or auto (accelerate's device_map) (default: gpu if "
                                         "available, else cpu)")
    parser.add_argument("--dtype", choices=LOAD_DTYPES, default="auto",
                        help="weights dtype (default: the checkpoint's)")
    parser.add_argument("--max-new-tokens", type=int, help="longest answer, in tokens")


def _run_chat(args: argparse.Namespace) -> int:
    from .apps.terminal import run

    register_with_modelscope()
    return run(args.model, args.revision, args.system, args.device, args.dtype, args.max_new_tokens)


def _add_serve(subparsers) -> None:
    parser = _command(
        subparsers, "serve", help="OpenAI-compatible HTTP server (chat and completions, Meta-exact prompts)",
        description="Serve a Llama 2 chat checkpoint over the OpenAI API (/v1/chat/completions, /v1/completions, "
                    "/v1/models, /health, /metrics); without --model, the offline demo checkpoint. "
                    'Needs the serve extra: pip install "modelscope_llama2[serve]".',
        run=_run_serve,
    )
    parser.add_argument("--model", help="ModelScope model id or local checkpoint dir (default: the demo checkpoint)")
    parser.add_argument("--revision", help="hub revision (tag, branch or commit) of --model")
    parser.add_argument("--engine", choices=("transformers", "vllm"), default="transformers",
                        help="transformers (continuous batching) or vllm (default: transformers)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                        help=f"require 'Authorization: Bearer KEY' on all routes but /health (default: ${API_KEY_ENV})")
    parser.add_argument("--served-model-name", help="the model name clients send (default: --model as given)")
    parser.add_argument("--dtype", choices=LOAD_DTYPES, default="auto",
                        help="weights dtype (default: the checkpoint's)")
    parser.add_argument("--device", help="cpu, gpu, cuda:N, or auto (default: gpu if available, else cpu)")
    parser.add_argument("--engine-in-process", action="store_true",
                        help="run the transformers engine in the server's own process (default: a child process, "
                             "so HTTP and the model do not share one GIL; this flag is for profilers and debuggers)")
    parser.add_argument("--max-running", type=int, default=8, help="choices generating at once (default: 8)")
    parser.add_argument("--max-waiting", type=int, default=64,
                        help="choices queued behind them; past that, 429 at once (default: 64)")
    _add_ray_options(parser)


# Flags without a default that mean nothing without --replicas.
RAY_ONLY_FLAGS = ("--ray-address", "--min-replicas", "--max-replicas", "--target-ongoing-requests")


def _add_ray_options(parser: argparse.ArgumentParser) -> None:
    # Slow, idle and too many clients; shutdown (issue 19). Defaults are safe for a public address.
    parser.add_argument("--header-timeout", type=float, default=10.0,
                        help="seconds a request's headers may take (default: 10)")
    parser.add_argument("--body-timeout", type=float, default=30.0,
                        help="seconds a request's body may take, 408 past it (default: 30)")
    parser.add_argument("--keep-alive", type=float, default=5.0,
                        help="seconds an idle keep-alive connection stays open (default: 5)")
    parser.add_argument("--max-connections", type=int, default=512,
                        help="connections at once, 503 past it (default: 512)")
    parser.add_argument("--drain-timeout", type=float, default=10.0,
                        help="on SIGTERM/Ctrl-C, seconds in-flight requests may finish before they end with an "
                             "error (default: 10)")
    group = parser.add_argument_group(
        'scale-out on Ray Serve (pip install "modelscope_llama2[ray]")',
        "With --replicas the same API is served by N engine replicas on a Ray cluster, each conversation kept "
        "on the replica that holds its KV cache.")
    group.add_argument("--replicas", type=int, help="engine replicas (default: none, a single-process server)")
    group.add_argument("--ray-address", help="join this Ray cluster ('auto': the one on this machine); default: "
                                             "start a local Ray instance")
    group.add_argument("--min-replicas", type=int, help="autoscale down to this many replicas")
    group.add_argument("--max-replicas", type=int, help="autoscale up to this many replicas")
    group.add_argument("--target-ongoing-requests", type=float, help="autoscaling target of requests per replica")
    group.add_argument("--max-ongoing-requests", type=int, default=8,
                       help="requests one replica takes before the router prefers another (default: 8)")
    group.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs reserved per replica (default: 1)")
    group.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs reserved per replica (default: 0)")
    group.add_argument("--imbalance", type=int, default=4,
                       help="affinity: pass over a conversation's replica while it has this many more requests "
                            "than the least loaded one (default: 4)")
    group.add_argument("--router", choices=("affinity", "default"), default="affinity",
                       help="affinity: each conversation to the replica holding its cache; default: Ray Serve's "
                            "power-of-two-choices (default: affinity)")


def _run_serve(args: argparse.Namespace) -> int:
    require_extra("serve", "serve")
    given = [flag for flag in RAY_ONLY_FLAGS if getattr(args, flag.lstrip("-").replace("-", "_")) is not None]
    if given and args.replicas is None:
        raise ValueError(f"{given[0]}: only applies with --replicas N (scale-out on Ray Serve)")
    if args.engine_in_process and (args.replicas is not None or args.engine != "transformers"):
        raise ValueError("--engine-in-process: only applies to the transformers engine without --replicas (vLLM "
                         "and Ray replicas run their engines where they run them)")
    if args.replicas is not None:
        require_extra("ray", "serve --replicas")
    if args.ray_address is None:  # a cluster joined may already serve on that port itself
        check_port_free(args.host, args.port)
    register_with_modelscope()
    from .apps.terminal import resolve_model_dir
    from .serving.server import build_app, run

    model_dir = resolve_model_dir(args.model, args.revision)
    name = args.served_model_name or args.model or "modelscope-llama2-demo"
    if args.replicas is not None:
        return _run_serve_on_ray(args, model_dir, name)
    from .serving.server import ConnectionLimits

    app = build_app(model_dir, name, engine=args.engine, dtype=args.dtype, device=args.device, api_key=args.api_key,
                    engine_process=not args.engine_in_process, max_running=args.max_running,
                    max_waiting=args.max_waiting, body_timeout=args.body_timeout)
    run(app, args.host, args.port, args.api_key,
        ConnectionLimits(args.header_timeout, args.keep_alive, args.max_connections, args.drain_timeout))
    return 0


def _run_serve_on_ray(args: argparse.Namespace, model_dir: str, name: str) -> int:
    from .serving import ray as on_ray
    from .serving.config import ServerConfig
    from .serving.server import default_sampling

    # A hub id is fetched by each replica on its own node; a directory must exist on every node.
    local = args.model is None or os.path.isdir(os.path.expanduser(args.model))
    engine = on_ray.EngineSpec(model_dir if local else args.model, revision=None if local else args.revision,
                               engine=args.engine, dtype=args.dtype, device=args.device,
                               # Each replica batches all Serve lets it hold: nothing waits inside it.
                               max_concurrent=args.max_ongoing_requests)
    config = ServerConfig(name, api_key=args.api_key, default_sampling=default_sampling(model_dir),
                          max_running=args.max_running, max_waiting=args.max_waiting)
    scale = on_ray.ScaleSpec(replicas=args.replicas, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                             target_ongoing_requests=args.target_ongoing_requests,
                             max_ongoing_requests=args.max_ongoing_requests, replica_cpus=args.replica_cpus,
                             replica_gpus=args.replica_gpus, router=args.router,
                             imbalance=args.imbalance, graceful_shutdown_timeout_s=args.drain_timeout)
    on_ray.run(engine, config, scale, args.host, args.port, args.ray_address)
    return 0


def _add_web(subparsers) -> None:
    parser = _command(
        subparsers, "web", help="chat in the browser (a Gradio page)",
        description="Serve a web chat page: in this process on a checkpoint (without --model, the offline demo "
                    "checkpoint), or as a client of a running 'serve' (--api-base). Each browser tab is its own "
                    'conversation. Needs the web extra: pip install "modelscope_llama2[web]".',
        run=_run_web,
    )
    parser.add_argument("--model", help="ModelScope model id or local checkpoint dir (default: the demo "
                                         "checkpoint); with --api-base, the served model name")
    parser.add_argument("--revision", help="hub revision (tag, branch or commit) of --model")
    parser.add_argument("--api-base", help="answer through this OpenAI-compatible server instead, e.g. "
                                           "http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", help="the server's API key (default: $MODELSCOPE_LLAMA2_API_KEY)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine "
                                                            "only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    parser.add_argument("--share", type=_boolean, default=False, metavar="{true,false}",
                        help="also publish the page through a public gradio.live link (default: false)")
    parser.add_argument("--device", help="cpu, gpu, cuda:N, or auto (accelerate's device_map) (default: gpu if "
                                         "available, else cpu)")
    parser.add_argument("--dtype", choices=LOAD_DTYPES, default="auto",
                        help="weights dtype (default: the checkpoint's)")


def _boolean(value: str) -> bool:
    choices = {"true": True, "false": False}
    if value.lower() not in choices:
        raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
    return choices[value.lower()]


def _run_web(args: argparse.Namespace) -> int:
    require_extra("web", "web")
    check_port_free(args.host, args.port)
    register_with_modelscope()
    from .apps.web import run

    return run(args.model, args.revision, args.api_base, args.api_key, args.host, args.port, args.share,
               args.device, args.dtype)


def _add_push(subparsers) -> None:
    parser = _command(
        subparsers, "push", help="publish a checkpoint dir as a tagged revision on the ModelScope hub",
        description="Make TAG of REPO_ID hold exactly the files of DIR, verified by size and sha256. "
                    "The hub is MODELSCOPE_ENDPOINT; the token is --token, MODELSCOPE_API_TOKEN or a login.",
        run=_run_push,
    )
    parser.add_argument("dir", metavar="DIR", help="checkpoint directory")
    parser.add_argument("repo_id", metavar="REPO_ID", help="owner/name (created when missing)")
    parser.add_argument("--tag", required=True, help="release tag to create, e.g. v1.0.2 (must not exist yet)")
    parser.add_argument("--token", help="ModelScope access token")
    parser.add_argument("--message", help="commit message (default: 'Release TAG')")
    parser.add_argument("--branch", default="master", help="branch that receives the commit (default: master)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _run_push(args: argparse.Namespace) -> int:
    from .checkpoints.hub import push_checkpoint

    commit = push_checkpoint(args.dir, args.repo_id, args.tag, token=args.token, commit_message=args.message,
                             branch=args.branch, progress=args.progress)
    print(f"{args.repo_id}@{args.tag} -> {commit}")
    return 0


def _add_download(subparsers) -> None:
    parser = _command(
        subparsers, "download", help="fetch one revision of a checkpoint, verified",
        description="Download REPO_ID at --revision, check every file against the hub's listing, "
                    "and print the local directory.",
        run=_run_download,
    )
    parser.add_argument("repo_id", metavar="REPO_ID", help="owner/name")
    parser.add_argument("--revision", required=True, help="tag, branch or commit id, e.g. v1.0.2")
    parser.add_argument("--dir", help="cache root (default: MODELSCOPE_CACHE or ~/.cache/modelscope)")
    parser.add_argument("--token", help="ModelScope access token, for private repos")


def _run_download(args: argparse.Namespace) -> int:
    from .checkpoints.hub import fetch_checkpoint

    print(fetch_checkpoint(args.repo_id, args.revision, cache_dir=args.dir, token=args.token))
    return 0


def _add_convert(subparsers) -> None:
    parser = _command(
        subparsers, "convert", help="convert Meta's original release layout to a ModelScope checkpoint",
        description="Read params.json and consolidated.NN.pth from META_DIR and write a ModelScope "
                    "checkpoint to OUT_DIR.",
        run=_run_convert,
    )
    parser.add_argument("meta_dir", metavar="META_DIR", help="dir with params.json and consolidated.*.pth")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="checkpoint dir to write (replaced atomically)")
    parser.add_argument("--tokenizer", help="tokenizer.model (default: in META_DIR or its parent)")
    parser.add_argument("--dtype", choices=CHECKPOINT_DTYPES, default="float16",
                        help="weights dtype (default: float16)")
    parser.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (default: 2GB)")


def _run_convert(args: argparse.Namespace) -> int:
    from .checkpoints.convert_meta import convert_meta_checkpoint

    print(convert_meta_checkpoint(args.meta_dir, args.out_dir, tokenizer_path=args.tokenizer, dtype=args.dtype,
                                  max_shard_size=args.max_shard_size))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m modelscope_llama2", description=DESCRIPTION, allow_abbrev=False)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in (_add_chat, _add_serve, _add_web, _add_push, _add_download, _add_convert):
        add(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return 130
    except (OSError, ValueError, TypeError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
