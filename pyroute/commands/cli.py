"""The `pyroute` command: serve (the default), check-config, routes, top, demo, version."""

from __future__ import annotations

import argparse
import platform
import sys

from pyroute import __version__, eventlog
from pyroute.config import SettingsError, add_setting_flags, settings_from_args
from pyroute.listen import StartupError
from pyroute.process import run, serve

EXAMPLES = """\
examples:
  pyroute                                    run with DFP's defaults (80, 443:ssl; admin on 8080)
  DEFAULT_PORTS=8000 PORT=9000 pyroute       the same on unprivileged ports
  pyroute --config /etc/pyroute.toml         settings from a file (flags and env win over it)
  pyroute check-config /etc/pyroute.toml     validate file + env + secrets, show each setting's source
  pyroute routes                             the live route table of the pyroute on 127.0.0.1:$PORT
  pyroute routes --admin http://proxy:8080   ... of another one (ADMIN_USER/ADMIN_PASS are sent)
  pyroute routes --match http://a.com/x      which route a request takes, and why the others lost
  pyroute top                                routes with live request and error rates, p99, task health
  pyroute demo                               a proxy plus a demo service, ready to curl
  pyroute version

then, as with Docker Flow Proxy:
  curl "localhost:8080/v1/docker-flow-proxy/reconfigure?serviceName=go-demo&servicePath=/demo&port=8080"

on Swarm: docker stack deploy -c deploy/docker-stack.yml proxy   (see README.md)
"""
COMMANDS = ("serve", "check-config", "routes", "top", "demo", "version")
# What `pyroute version` reports besides pyroute itself: the libraries a bug report needs.
LIBRARIES = ("uvloop", "httptools", "aiodns", "orjson", "google-re2", "libpass", "bcrypt", "h2", "hyperframe",
             "acme", "josepy")


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
    check = commands.add_parser("check-config", help="validate settings (TOML file, env, secrets) and show them",
                                description="Validate the settings pyroute would start with: FILE (or "
                                            "PYROUTE_CONFIG), the environment and the Docker secrets. Prints "
                                            "every setting with its source; exits 1 naming each problem.")
    check.add_argument("file", nargs="?", metavar="FILE", help="TOML settings file (default: env PYROUTE_CONFIG)")
    routes = commands.add_parser("routes", help="print the live route table of a running pyroute",
                                 description="The routes a running pyroute serves, in match order: host and "
                                             "path rule, service, port, resolved addresses and their health.")
    routes.add_argument("--admin", metavar="URL", help="its admin API (default http://127.0.0.1:$PORT, PORT 8080)")
    routes.add_argument("--user", help="admin user (default env ADMIN_USER or the secret dfp_admin_user)")
    routes.add_argument("--password", help="admin password (default env ADMIN_PASS or the secret dfp_admin_pass)")
    routes.add_argument("--match", metavar="URL",
                        help="which route a request for URL (http[s]://host[:port]/path) takes, and why each "
                             "route tried before it lost")
    routes.add_argument("--header", metavar="NAME:VALUE", action="append", default=[],
                        help="a request header for --match (serviceHeader, userAgent); repeatable")
    routes.add_argument("--method", default="GET", help="the request method for --match (default GET)")
    watch = commands.add_parser("top", help="watch a running pyroute: routes with live rates, p99 and task health",
                                description="Routes in match order with their request rate, error rate (5xx "
                                            "and no response), p99 latency over the last interval, requests so "
                                            "far and task health, refreshed in place from the admin API. q quits.")
    watch.add_argument("--admin", metavar="URL", help="its admin API (default http://127.0.0.1:$PORT, PORT 8080)")
    watch.add_argument("--user", help="admin user (default env ADMIN_USER or the secret dfp_admin_user)")
    watch.add_argument("--password", help="admin password (default env ADMIN_PASS or the secret dfp_admin_pass)")
    watch.add_argument("--interval", type=interval, default=2.0, metavar="SECONDS",
                       help="seconds between readings (default 2)")
    demo = commands.add_parser("demo", help="run the proxy with a built-in demo service and register it")
    demo.add_argument("--http-port", type=int, default=8000, help="public HTTP port (default 8000)")
    demo.add_argument("--admin-port", type=int, default=8080, help="admin API port (default 8080)")
    commands.add_parser("version", help="print the version, with Python's and the libraries'")
    return parser


def interval(text: str) -> float:
    """A positive number of seconds (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r}: give seconds between 0.1 and 3600")
    return value


def version_report() -> str:
    """pyroute's version, then Python's and each library's (the installed distribution's).
    importlib.metadata is imported here: it brings the email package (~4 MiB resident with
    it), which a serving proxy has no use for."""
    from importlib.metadata import PackageNotFoundError, version

    lines = [f"pyroute {__version__}",
             f"{platform.python_implementation()} {platform.python_version()} ({sys.executable})"]
    for name in LIBRARIES:
        try:
            lines.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            lines.append(f"{name} not installed")
    return "\n".join(lines)


def setup_logging(level: str) -> None:
    eventlog.setup_logging(level, "%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv.insert(0, "serve")
    args = build_parser().parse_args(argv)

    if args.command == "version":
        print(version_report())
        return 0
    # Each subcommand's module is imported when it runs: the proxy itself never loads them.
    if args.command == "check-config":
        from pyroute.commands.check_config import main as check_config
        return check_config(args.file)
    if args.command == "routes":
        if args.match:
            from pyroute.commands.routes import match as show_match
            return show_match(args.admin, args.user, args.password, args.match, args.header, args.method)
        from pyroute.commands.routes import main as show_routes
        return show_routes(args.admin, args.user, args.password)
    if args.command == "top":
        from pyroute.commands.top import main as top
        return top(args.admin, args.user, args.password, args.interval)

    try:
        if args.command == "demo":
            setup_logging("info")
            from pyroute.commands.demo import run_demo
            run(run_demo(args.http_port, args.admin_port))
            return 0
        settings = settings_from_args(args)
        setup_logging(settings.log_level)
        run(serve(settings, lambda: settings_from_args(args)))
    except (SettingsError, StartupError) as exc:
        print(f"pyroute: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0
