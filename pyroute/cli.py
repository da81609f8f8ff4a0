"""The `pyroute` command: serve (the default), demo, version."""

from __future__ import annotations

import argparse
import logging
import sys

from . import __version__
from .config import SettingsError, add_setting_flags, settings_from_args

EXAMPLES = """\
examples:
  pyroute                                    run with DFP's defaults (80, 443:ssl; admin on 8080)
  DEFAULT_PORTS=8000 PORT=9000 pyroute       the same on unprivileged ports
  pyroute --config /etc/pyroute.toml         settings from a file (flags and env win over it)
  pyroute demo                               a proxy plus a demo service, ready to curl

then, as with Docker Flow Proxy:
  curl "localhost:8080/v1/docker-flow-proxy/reconfigure?serviceName=go-demo&servicePath=/demo&port=8080"
"""
COMMANDS = ("serve", "demo", "version")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyroute",
        description="An L7 reverse proxy for Docker Swarm that speaks Docker Flow Proxy's API.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the proxy (the default command)",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_setting_flags(serve)
    demo = commands.add_parser("demo", help="run the proxy with a built-in demo service and register it")
    demo.add_argument("--http-port", type=int, default=8000, help="public HTTP port (default 8000)")
    demo.add_argument("--admin-port", type=int, default=8080, help="admin API port (default 8080)")
    commands.add_parser("version", help="print the version")
    return parser


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def run(coro) -> None:
    """Run on uvloop: pyroute's hot path is written for it."""
    import uvloop

    uvloop.run(coro)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv.insert(0, "serve")
    args = build_parser().parse_args(argv)

    if args.command == "version":
        print(f"pyroute {__version__}")
        return 0

    from .server import StartupError

    try:
        if args.command == "demo":
            from .demo import run_demo

            setup_logging("info")
            run(run_demo(args.http_port, args.admin_port))
            return 0
        settings = settings_from_args(args)
        setup_logging(settings.log_level)
        from .server import serve

        run(serve(settings, lambda: settings_from_args(args)))
    except (SettingsError, StartupError) as exc:
        print(f"pyroute: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0
