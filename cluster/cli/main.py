"""moectl: the command line of elastic-moe: its parser, dispatch and error policy.

Each command group adds its subcommands and their handlers (checkpoint_cmd: make-checkpoint,
inspect, run-reference; service_cmd: serve, generate, status; placement_cmd: placement,
scale, autoscaler; bench_cmd: simulate, bench). The client and Redis flags they share live
in cluster/deploy/connect.py, where the benchmarks and `moectl serve` reach them too.

Every error a user can cause (a bad path, a corrupt checkpoint, an unsupported model,
a bad flag value) ends as one line on stderr and exit status 2, never a traceback; a Redis
that is down or refuses the URL's password or TLS settings, one line and exit status 1.
"""
from __future__ import annotations

import argparse
import logging
import sys

from cluster.cli import bench_cmd, checkpoint_cmd, placement_cmd, service_cmd


class _Parser(argparse.ArgumentParser):
    """Flag errors as one line, like every other moectl error (subcommand parsers inherit this)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moectl", description="Elastic serving of Mixture-of-Experts models on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # the order of these calls is the order of the commands in --help
    checkpoint_cmd.add_commands(sub)
    service_cmd.add_commands(sub)
    placement_cmd.add_commands(sub)
    bench_cmd.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if getattr(args, "max_tokens", 1) < 1:  # run-reference and generate
        print("moectl: error: --max-tokens must be >= 1", file=sys.stderr)
        return 2
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        # CheckpointError, UnsupportedModelError and KernelError are ValueErrors: user input, one line
        print(f"moectl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `moectl status | head`: the reader left; not an error
        sys.stderr.close()
        return 0
    except Exception as e:
        # Redis down, or it refused our password / TLS settings: one line, no secret (cluster/state/redis_url.py).
        # Looked up lazily: commands that never load cluster.state.store (generate, status) do not import redis.
        state = sys.modules.get("cluster.state.store")
        if state is None or not isinstance(e, state.RedisAccessError):
            raise
        print(f"moectl: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
