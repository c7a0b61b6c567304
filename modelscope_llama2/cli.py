"""``python -m modelscope_llama2 {chat,push,download,convert}``.

Each subcommand is a thin argument parser over a public function of the
package; errors are reported as one line on stderr with exit status 1.
"""

import argparse
import sys
from typing import List, Optional


def _add_chat(subparsers) -> None:
    from .chat_cli import COMMANDS, DTYPES

    parser = subparsers.add_parser(
        "chat", help="chat in the terminal (reads stdin line by line when not a tty)",
        description="Chat with a Llama 2 chat checkpoint; without --model, with the offline demo checkpoint. "
                    "Commands: " + "; ".join(f"{name}: {what}" for name, what in COMMANDS.items()),
    )
    parser.add_argument("--model", help="ModelScope model id or local checkpoint dir (default: the demo checkpoint)")
    parser.add_argument("--revision", help="hub revision (tag, branch or commit) of --model")
    parser.add_argument("--system", help="system prompt (default: none)")
    parser.add_argument("--device", help="cpu, gpu, cuda:N, or auto (accelerate's device_map) (default: gpu if "
                                         "available, else cpu)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="weights dtype (default: the checkpoint's)")
    parser.add_argument("--max-new-tokens", type=int, help="longest answer, in tokens")
    parser.set_defaults(run=_run_chat)


def _run_chat(args: argparse.Namespace) -> int:
    from .chat_cli import run

    return run(args.model, args.revision, args.system, args.device, args.dtype, args.max_new_tokens)


def _add_push(subparsers) -> None:
    parser = subparsers.add_parser("push", help="publish a checkpoint dir as a tagged revision on the ModelScope hub")
    parser.set_defaults(run=_run_push)


def _run_push(args: argparse.Namespace) -> int:
    raise NotImplementedError("push command: issue 4")


def _add_download(subparsers) -> None:
    parser = subparsers.add_parser("download", help="fetch one revision of a checkpoint, verified")
    parser.set_defaults(run=_run_download)


def _run_download(args: argparse.Namespace) -> int:
    raise NotImplementedError("download command: issue 4")


def _add_convert(subparsers) -> None:
    parser = subparsers.add_parser("convert", help="convert Meta's original release layout to a ModelScope checkpoint")
    parser.set_defaults(run=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    raise NotImplementedError("convert command: issue 4")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m modelscope_llama2", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in (_add_chat, _add_push, _add_download, _add_convert):
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
