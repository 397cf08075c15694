"""Command line: argv, logging, wiring and exit statuses (the only `sys.exit` is here)."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional, Sequence

from heartbeatd import __version__, config as configmod, logsetup
from heartbeatd.config import Config, ConfigError
from heartbeatd.cycle import Services
from heartbeatd.daemon import Daemon
from heartbeatd.notify import Notifier
from heartbeatd.probes import backend_host, naive_utc
from heartbeatd.probes.backend_check import BackendCheck
from heartbeatd.probes.names import Resolver
from heartbeatd.probes.postgres_connect import PostgresProbe
from heartbeatd.probes.redis_ping import RedisProbe
from heartbeatd.spool import Spool, SpoolUnavailable
from heartbeatd.writer import WriteError, Writer, write_split

EX_OK, EX_DOWN, EX_USAGE, EX_UNAVAILABLE, EX_SOFTWARE, EX_CONFIG = 0, 1, 64, 69, 70, 78
LEDGER_COMMANDS: dict[str, Callable[[Config, argparse.Namespace], int]] = {}
# Steps of one cycle that may each block up to HEARTBEAT_TIMEOUT: Redis PING, PostgreSQL
# connect, the INSERT. The watchdog is pinged between them.
BLOCKING_STEPS = 3

log = logging.getLogger("heartbeatd.cli")


HELP_EPILOG = """\
commands:
  run            the daemon, in the foreground, until SIGTERM/SIGINT (the default); SIGHUP re-reads the env file
  once           one cycle: check, write, print one line per service
  init-db        create the table and its indexes if missing
  check-config   print the effective configuration, passwords masked
  rejected       list rows the table refused, kept aside in the spool; --retry writes them again
{ledger}
configuration (environment variables; an --env-file wins over the environment, ./.env does not):
{variables}
  A password may also come from $CREDENTIALS_DIRECTORY/database_url or .../redis_url (systemd LoadCredential=).
  Under systemd the env file is /etc/heartbeatd/heartbeatd.env.

exit statuses:
  0 ok   1 a service down / rows not recorded / stale   64 bad arguments   69 database unreachable
  70 internal error   78 bad configuration (also: spool in use or unusable, watchdog too short)

See heartbeatd(8) and /usr/share/doc/heartbeatd/README.md.gz.
"""
LEDGER_HELP = ""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """Bad arguments: one line and EX_USAGE, not argparse's usage dump."""
        print(f"heartbeatd: {message} (see heartbeatd --help)", file=sys.stderr)
        raise SystemExit(EX_USAGE)


def _parser() -> argparse.ArgumentParser:
    shown = {**configmod.DEFAULTS, "HEARTBEAT_BACKEND_IP": "(detected)",
             "HEARTBEAT_BACKEND_CHECK": "(none: 后端 means the host is up; systemd:UNIT, tcp://, http(s)://)",
             "HEARTBEAT_SPOOL_PATH": "$STATE_DIRECTORY/spool.db, else ./heartbeatd-spool.db"}
    variables = "\n".join(f"  {name:<26} default: {value or '(none)'}" for name, value in shown.items())
    parser = _Parser(prog="heartbeatd", formatter_class=argparse.RawDescriptionHelpFormatter,
                     description="Record heartbeats of this host, its Redis and its PostgreSQL into service_heartbeat.",
                     epilog=HELP_EPILOG.format(variables=variables, ledger=LEDGER_HELP))
    parser.add_argument("--env-file", type=Path, metavar="PATH", help="dotenv file whose values win over the environment")
    parser.add_argument("--version", action="version", version=f"heartbeatd {__version__}")
    # --env-file is accepted after the command too (`heartbeatd once --env-file F`).
    common = _Parser(add_help=False)
    common.add_argument("--env-file", type=Path, metavar="PATH", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in ("run", "once", "init-db", "check-config"):
        commands.add_parser(name, parents=[common])
    rejected = commands.add_parser("rejected", parents=[common])
    rejected.add_argument("--retry", action="store_true", help="write the rejected rows again")
    _ledger_arguments(commands, common)
    return parser


def _ledger_arguments(commands: Any, common: _Parser) -> None:
    """The read side's commands (status, report, prune)."""


def _spool(config: Config, previous: Optional[Services]) -> Spool:
    """The spool for a configuration: the one already open if the path is the same (it is locked)."""
    old = previous.spool if previous is not None else None
    if isinstance(old, Spool) and old.path == config.spool_path:
        old.max_rows = config.spool_max_rows
        return old
    spool = Spool(config.spool_path, config.spool_max_rows)
    if isinstance(old, Spool):  # HEARTBEAT_SPOOL_PATH changed: the backlog moves with it
        moved = spool.take_over(old)
        if moved:
            log.warning("心跳缓存已迁移 - %d row(s) moved from %s to %s", moved, old.path, spool.path)
    return spool


def _probes(config: Config) -> tuple[RedisProbe, PostgresProbe, Optional[BackendCheck]]:
    """The probes; ConfigError, naming the file a value came from, if a driver's parser refuses a URL."""
    resolver = Resolver()  # one per generation: a lookup that hangs is shared, not repeated
    try:
        app = BackendCheck(config.backend_check, config.timeout, resolver) if config.backend_check else None
        return (RedisProbe(config.redis_url, config.timeout, resolver),
                PostgresProbe(config.database_url, config.timeout, resolver), app)
    except ConfigError as exc:
        raise configmod.with_sources(config, exc) from None


def build_services(config: Config, previous: Optional[Services] = None, spool: bool = True) -> Services:
    """The probes, writer and spool for one configuration."""
    redis, postgres, app = _probes(config)
    return Services(
        redis=redis,
        postgres=postgres,
        backend=functools.partial(backend_host.check, config.backend_ip, app),
        writer=Writer(config.table, config.timeout),
        spool=_spool(config, previous) if spool else None,
    )


def _apply(config: Config) -> None:
    logsetup.set_level(config.log_level)
    logsetup.set_secrets(config.secrets)


def _config_error(problems: Sequence[str]) -> int:
    for problem in problems:
        print(f"heartbeatd: {problem}", file=sys.stderr)
    return EX_CONFIG


def cmd_check_config(config: Config) -> int:
    """Print the effective configuration, passwords masked."""
    print("\n".join(config.describe()))
    return EX_OK


def cmd_init_db(config: Config) -> int:
    """Create the table and index if missing."""
    result, conn = PostgresProbe(config.database_url, config.timeout).check()
    if conn is None:
        print(f"heartbeatd: database unreachable: {result.error}", file=sys.stderr)
        return EX_UNAVAILABLE
    writer = Writer(config.table, config.timeout)
    try:
        writer.init_db(conn)
    except Exception as exc:  # noqa: BLE001 - reported as one line
        print(f"heartbeatd: init-db failed: {' '.join(str(exc).split())}", file=sys.stderr)
        return EX_DOWN
    finally:
        conn.close()
    print(f"table {writer.name} and its index are ready in {configmod.mask_url(config.database_url)}")
    return EX_OK


def cmd_once(config: Config) -> int:
    """One cycle, one line per service; no spool (a manual check leaves nothing behind)."""
    daemon = Daemon(config, functools.partial(build_services, spool=False), Notifier({}))
    try:
        outcome = daemon.run_cycle()
    finally:
        daemon.services.close()
    recorded = {row.service for row in outcome.recorded}
    for result in outcome.results:
        state = "up" if result.ok else "down"
        if not result.ok:
            note = result.error or "down"
        elif result.service in recorded:
            note = "recorded"
        else:
            note = f"not recorded: {outcome.write_error or 'PostgreSQL unavailable'}"
        print(f"{result.service}\t{state}\t{result.ip}\t{result.latency * 1000:.1f}ms\t{note}")
    return EX_OK if outcome.all_up and len(recorded) == len(outcome.results) else EX_DOWN


def cmd_rejected(config: Config, retry: bool) -> int:
    """List the rows the table refused, kept aside in the spool; with retry, write them again."""
    try:
        # No lock: the running daemon holds it, and neither touches the other's rows.
        spool = Spool(config.spool_path, config.spool_max_rows, lock=False)
    except SpoolUnavailable as exc:
        return _config_error([f"HEARTBEAT_SPOOL_PATH: {exc}"])
    try:
        refused = spool.rejected_rows()
        if not retry or not refused:
            for _, row, why in refused:
                print(f"{row.service}\t{row.ip}\t{naive_utc(row.report_time)}\t{why}")
            print(f"{len(refused)} rejected row(s) in {spool.path}", file=sys.stderr)
            return EX_OK
        result, conn = PostgresProbe(config.database_url, config.timeout).check()
        if conn is None:
            print(f"heartbeatd: database unreachable: {result.error}", file=sys.stderr)
            return EX_UNAVAILABLE
        try:
            written, still = write_split(Writer(config.table, config.timeout), conn,
                                         [(i, row) for i, row, _ in refused], dedupe=True)
        except WriteError as exc:
            print(f"heartbeatd: retry failed: {exc}", file=sys.stderr)
            return EX_DOWN
        finally:
            conn.close()
        spool.delete([i for i, _ in written])
        spool.reject(still)
        for _, row, why in still:
            print(f"{row.service}\t{row.ip}\t{naive_utc(row.report_time)}\tstill rejected: {why}")
        print(f"{len(written)} row(s) written, {len(still)} still rejected")
        return EX_OK if not still else EX_DOWN
    finally:
        spool.close()


def cmd_run(config: Config, env_file: Optional[Path]) -> int:
    """The daemon, in the foreground, until SIGTERM/SIGINT."""
    notifier = Notifier(os.environ)
    period = notifier.watchdog_period
    if period is not None and BLOCKING_STEPS * config.timeout > period:
        return _config_error([
            f"HEARTBEAT_TIMEOUT={config.timeout:g} lets one cycle block up to "
            f"{BLOCKING_STEPS * config.timeout:g}s, more than half of WATCHDOG_USEC={os.environ['WATCHDOG_USEC']} "
            f"({period:g}s): raise WatchdogSec= or lower HEARTBEAT_TIMEOUT"
        ])
    try:
        daemon = Daemon(
            config, build_services, notifier,
            reload_config=lambda: configmod.load(os.environ, env_file),
            on_config=_apply,
        )
    except SpoolUnavailable as exc:
        return _config_error([f"HEARTBEAT_SPOOL_PATH: {exc}"])
    return daemon.run()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `heartbeatd` command."""
    args = _parser().parse_args(argv)
    args.command = args.command or "run"
    logsetup.setup()
    try:
        config = configmod.load(os.environ, args.env_file)
    except ConfigError as exc:
        return _config_error(exc.problems)
    _apply(config)
    try:
        # The drivers' own parsers judge the URLs before any command runs (no connection is made).
        _probes(config)[0].close()
        if args.command == "check-config":
            return cmd_check_config(config)
        if args.command == "init-db":
            return cmd_init_db(config)
        if args.command == "once":
            return cmd_once(config)
        if args.command == "rejected":
            return cmd_rejected(config, args.retry)
        if args.command in LEDGER_COMMANDS:
            return LEDGER_COMMANDS[args.command](config, args)
        return cmd_run(config, args.env_file)
    except ConfigError as exc:  # found by a driver's own parser when the services were built
        return _config_error(exc.problems)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - never a traceback on the operator's terminal
        log.error("internal error: %s: %s", type(exc).__name__, exc)
        return EX_SOFTWARE

