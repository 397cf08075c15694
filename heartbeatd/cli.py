"""Command line: argv, logging, wiring and exit statuses (the only `sys.exit` is here)."""

from __future__ import annotations

import argparse
import dataclasses
import io
import logging
import math
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, NamedTuple, NoReturn, Optional, Sequence

import psycopg2

from heartbeatd import __version__, config as configmod, conninfo, logsetup, metrics, page, probes, render, rollup, schema
from heartbeatd.config import Config, ConfigError
from heartbeatd.cycle import Cycle, Services
from heartbeatd.daemon import Daemon
from heartbeatd.heartbeat import canonical_ip, naive_utc, utcnow
from heartbeatd.ledger import Ledger, TableMissing, parse_when
from heartbeatd.notify import Notifier
from heartbeatd.pg import Connector, DatabaseUnreachable, explain, reason
from heartbeatd.delivery import retry_rejected
from heartbeatd.spool import Spool, SpoolUnavailable, rejected_raw, rejected_rows
from heartbeatd.writer import WriteError, Writer

EX_OK, EX_DOWN, EX_USAGE, EX_UNAVAILABLE, EX_SOFTWARE, EX_CONFIG = 0, 1, 64, 69, 70, 78
# The reader of the output went away (`| head -1`, `| true`): what a shell reports of a tool SIGPIPE
# ended (128 + 13), so `set -o pipefail` sees it as it sees any other tool's.
EX_PIPE = 141

log = logging.getLogger("heartbeatd.cli")


HELP_EPILOG = """\
commands:
  run            the daemon, in the foreground, until SIGTERM/SIGINT (the default); SIGHUP re-reads the env file
  once           one cycle: check, write, print one line per service
  init-db        create the table and its indexes if missing; --with-latency also adds the latency_ms column;
                 --partitioned[=day|month]: partitioned by report_time, partitions made ahead;
                 --timeout SECONDS: HEARTBEAT_TIMEOUT for this run
  check-config   print the effective configuration, passwords masked
  rejected       list rows the table refused, kept aside in the spool; --retry writes them again
{ledger}
configuration (environment variables, and one env file: --env-file PATH, else the daemon's
/etc/heartbeatd/heartbeatd.env (HEARTBEAT_ENV_FILE names another) if it exists, else ./.env;
the values of the first two win over the environment, the environment wins over ./.env):
{variables}
  A password may also come from $CREDENTIALS_DIRECTORY/database_url or .../redis_url (systemd LoadCredential=).

exit statuses:
  0 ok   1 a service down / rows not recorded / stale / the command failed once connected
  64 bad arguments   69 database unreachable (no connection made: login refused, database missing too)
  70 internal error   78 bad configuration (also: spool in use or unusable, watchdog too short)
  141 the output's reader went away (| head -1), as for a tool SIGPIPE ends

See heartbeatd(8) and /usr/share/doc/heartbeatd/README.md.gz.
"""
LEDGER_HELP = """\
  status         newest heartbeat per service and IP seen in --window (1d): fresh, stale or ahead; exit 1 if any not fresh
                 (--format text|json|prometheus; prometheus [--output FILE]: 0 once written, 1 if FILE cannot be
                 written)
  report         uptime, outages and no-data stretches per service and IP (--since 24h|7d|DATE, --until,
                 --service, --ip, --gap SECONDS, --format text|json|csv|html, --output FILE, --timeout SECONDS);
                 html: a self-contained status page of the 90 days up to --until
  prune          remove rows older than --older-than (or HEARTBEAT_RETENTION): partitions wholly older dropped,
                 the rest deleted in batches; --dry-run says what; first, on a table init-db --partitioned made,
                 the partitions ahead that are missing are made; --timeout SECONDS: HEARTBEAT_TIMEOUT for this run
  rollup         fold the rows written since the last pass into hourly rollups, which report reads for whole hours
                 (--timeout SECONDS, 600: the first pass reads the whole table)
"""


# Shown by `heartbeatd --help` and by every command's own --help: it works before or after the command.
ENV_FILE_HELP = "dotenv file whose values win over the environment"
DESCRIPTIONS = {  # each command's --help: what it does, and its exit statuses (heartbeatd(8) has the rest)
    "run": "The daemon, in the foreground, until SIGTERM/SIGINT; SIGHUP re-reads the env file. "
           "Exit 0 on a clean stop, 78 bad configuration.",
    "once": "One cycle: check, write, print one line per service (nothing is spooled). "
            "Exit 0 all up and recorded, 1 otherwise, 78 bad configuration.",
    "check-config": "Print the effective configuration, passwords masked. Exit 0 valid, 78 invalid.",
    "init-db": "Create the table and its indexes if missing. "
               "Exit 0 done, 1 failed (e.g. no CREATE privilege, a partition not made), 69 database unreachable, "
               "78 bad configuration.",
    "rejected": "List the rows the table refused, kept aside in the spool. "
                "Exit 0; with --retry 1 if some are still refused, 69 database unreachable.",
    "status": "The newest heartbeat of every service and IP seen in the window: fresh, stale, or ahead (of "
              "the clock). Exit 0 all fresh (prometheus: written), 1 any stale or ahead, or none seen (prometheus: "
              "FILE not written), or the read failed (table missing, no SELECT privilege, a timeout), "
              "69 database unreachable.",
    "report": "Uptime, outages and no-data stretches per service and IP. "
              "Exit 0, 1 the read failed (table missing, no SELECT privilege, a timeout), 64 bad arguments, "
              "69 database unreachable.",
    "prune": "Remove rows older than --older-than (default HEARTBEAT_RETENTION): partitions wholly older are "
             "dropped, other rows deleted in batches; on a table init-db --partitioned made, the partitions ahead "
             "that are missing are made first; never rows the hourly rollups do not cover yet, once a pass has run. "
             "Exit 0 (also when another prune is running), 1 a partition's lock not had, rows kept because the "
             "rollups do not cover them yet, or the prune failed (no privilege, a timeout), 69 database unreachable, "
             "130 interrupted.",
    "rollup": "Fold the rows written since the last pass into the hourly rollups report reads for whole hours. "
              "Exit 0 (also when another pass is running), 1 table missing or the pass failed (no privilege, a "
              "timeout), 69 database unreachable.",
}


# `--partitioned` alone: the unit of the table's partitions, a day for a new table, so that the hints that say
# "run init-db --partitioned" hold on a monthly table too. Not a str: argparse checks only a str against choices.
OWN_UNIT: Any = object()


class _Parser(argparse.ArgumentParser):
    def _print_message(self, message: str, file: Optional[Any] = None) -> None:
        """--help and --version as any output: argparse drops a failed write (a closed pipe); main() says 141."""
        if message:
            (file or sys.stderr).write(message)

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
    parser.add_argument("--env-file", type=Path, metavar="PATH", help=ENV_FILE_HELP)
    parser.add_argument("--version", action="version", version=f"heartbeatd {__version__}")
    # --env-file is accepted after the command too (`heartbeatd once --env-file F`).
    common = _Parser(add_help=False)
    common.add_argument("--env-file", type=Path, metavar="PATH", default=argparse.SUPPRESS, help=ENV_FILE_HELP)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in ("run", "once", "check-config"):
        commands.add_parser(name, parents=[common], description=DESCRIPTIONS[name])
    init_db = commands.add_parser("init-db", parents=[common], description=DESCRIPTIONS["init-db"])
    init_db.add_argument("--with-latency", action="store_true",
                         help="also add the nullable latency_ms column (each row's check latency)")
    init_db.add_argument("--partitioned", nargs="?", const=OWN_UNIT, choices=("day", "month"), default=None,
                         help="create the table partitioned by report_time, a partition a day (or month), made "
                              "ahead, and a DEFAULT one; on a partitioned table, make the partitions ahead (alone: "
                              "of the table's own unit)")
    init_db.add_argument("--timeout", type=_seconds(*configmod.TIMEOUT_RANGE), default=None, help=STEP_TIMEOUT_HELP)
    rejected = commands.add_parser("rejected", parents=[common], description=DESCRIPTIONS["rejected"])
    rejected.add_argument("--retry", action="store_true", help="write the rejected rows again")
    _ledger_arguments(commands, common)
    return parser


class Duration(NamedTuple):
    """A duration as the operator wrote it (for messages) and in seconds."""

    text: str
    seconds: float


def _duration(minimum: float) -> Callable[[str], Duration]:
    """An argparse type: `90s`, `30m`, `24h`, `7d`, `2w`, from `minimum` to MAX_DURATION."""
    def parse(text: str) -> Duration:
        seconds = configmod.parse_duration(text)
        if seconds is None or not minimum <= seconds <= configmod.MAX_DURATION:
            raise argparse.ArgumentTypeError(
                f"not a duration from {configmod.format_duration(minimum)} to "
                f"{configmod.format_duration(configmod.MAX_DURATION)} such as 6h, 7d or 30d: {text!r}")
        return Duration(text, seconds)
    return parse


def _when(text: str) -> str:
    """An argparse type: `24h`, `7d` (before now, at most MAX_DURATION) or a UTC date/time; the text, checked."""
    seconds = configmod.parse_duration(text)
    if seconds is not None and seconds > configmod.MAX_DURATION:
        raise argparse.ArgumentTypeError(
            f"at most {configmod.format_duration(configmod.MAX_DURATION)} back, got {text!r}")
    try:
        parse_when(text, utcnow())
    except (ValueError, OverflowError) as exc:  # year 1 with an offset is before datetime.min in UTC
        raise argparse.ArgumentTypeError(str(exc) if isinstance(exc, ValueError) else
                                         f"not a date/time datetime can hold in UTC: {text!r}") from None
    return text


def _seconds(low: float, high: float) -> Callable[[str], float]:
    """An argparse type: a finite number of seconds from `low` to `high` (no nan, no inf)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
        if not (math.isfinite(value) and low <= value <= high):
            raise argparse.ArgumentTypeError(f"must be a number of seconds from {low:.10g} to {high:.10g}, got {text!r}")
        return value
    return parse


def _output_file(text: str) -> Path:
    """An argparse type: a file to write (a directory is refused here; an unwritable one when written, exit 1)."""
    path = Path(text)
    if not path.name or path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory: name a file in it")
    return path


# Bounds of the read side's options: an outage gap below 10 ms or a read of over an hour is a mistake.
GAP_RANGE = (0.01, 30 * 86400.0)
READ_TIMEOUT_RANGE = (0.01, 3600.0)
# init-db's and prune's --timeout: HEARTBEAT_TIMEOUT for this run (what a DDL waits, a move of rows takes).
STEP_TIMEOUT_HELP = ("seconds any one step may take, its lock waits too (default HEARTBEAT_TIMEOUT); a longer one lets "
                     "the DEFAULT partition's rows of a missing partition move into it, the table held meanwhile")
STEP_TIMEOUT_COMMANDS = ("init-db", "prune")


def _ledger_arguments(commands: Any, common: _Parser) -> None:
    """The read side's commands (status, report, prune); each value checked as it is parsed (bad: exit 64)."""
    status = commands.add_parser("status", parents=[common], description=DESCRIPTIONS["status"])
    status.add_argument("--window", type=_duration(1), default=Duration("1d", 86400.0),
                        help="how far back to look for services (default 1d)")
    status.add_argument("--format", choices=("text", "json", "prometheus"), default="text",
                        help="text (default), json, or prometheus: the ledger's view as metrics")
    status.add_argument("--output", type=_output_file, default=None, metavar="FILE",
                        help="--format prometheus: write FILE atomically (temporary file, rename) instead of stdout")
    report = commands.add_parser("report", parents=[common], description=DESCRIPTIONS["report"])
    report.add_argument("--since", type=_when, default=None,
                        help="24h (the default), 7d, 1y, or a UTC date/time such as 2026-11-01")
    report.add_argument("--until", type=_when, default=None, help="as --since (default: now)")
    report.add_argument("--service", default=None, help="only this service (后端, redis, postgres)")
    report.add_argument("--ip", default=None, help="only this address")
    report.add_argument("--gap", type=_seconds(*GAP_RANGE), default=None,
                        help="seconds without a heartbeat that make an outage (default 2 x interval + timeout)")
    report.add_argument("--format", choices=("text", "json", "csv", "html"), default="text",
                        help="text (default), json, csv, or html: a status page of the 90 days up to --until, "
                             "in one self-contained file")
    report.add_argument("--output", type=_output_file, default=None, metavar="FILE",
                        help="write FILE atomically (temporary file, rename; 0644) instead of stdout")
    report.add_argument("--timeout", type=_seconds(*READ_TIMEOUT_RANGE), default=60.0,
                        help="seconds the report's reads may take (60)")
    prune = commands.add_parser("prune", parents=[common], description=DESCRIPTIONS["prune"])
    prune.add_argument("--older-than", type=_duration(3600), default=None,
                       help="30d, 12w ... at least 1h (default: HEARTBEAT_RETENTION)")
    prune.add_argument("--dry-run", action="store_true", help="say what would be removed (the same lines and figures), remove nothing")
    prune.add_argument("--timeout", type=_seconds(*configmod.TIMEOUT_RANGE), default=None, help=STEP_TIMEOUT_HELP)
    roll = commands.add_parser("rollup", parents=[common], description=DESCRIPTIONS["rollup"])
    roll.add_argument("--timeout", type=_seconds(*READ_TIMEOUT_RANGE), default=600.0,
                      help="seconds the pass may take (600; the first pass reads the whole table)")


def _spool(config: Config, previous: Optional[Services]) -> Spool:
    """The spool for a configuration: the one already open if the path is the same (it is locked)."""
    old = previous.spool if previous is not None else None
    if isinstance(old, Spool) and old.path == config.spool_path:
        old.max_rows = config.spool_max_rows
        return old
    spool = Spool(config.spool_path, config.spool_max_rows)
    if isinstance(old, Spool):  # HEARTBEAT_SPOOL_PATH changed: the backlog moves with it
        try:
            moved = spool.take_over(old)
        except BaseException:
            spool.close()  # the lock too: the old spool stays in use, as it was
            raise
        if moved:
            log.warning("心跳缓存已迁移 - %d row(s) moved from %s to %s", moved, old.path, spool.path)
    return spool


def build_services(config: Config, previous: Optional[Services] = None, spool: bool = True) -> Services:
    """The probes, writer and spool for one configuration."""
    found = probes.build(config)
    try:
        return Services(found, Writer(config.table, config.timeout), _spool(config, previous) if spool else None)
    except BaseException:
        probes.close_all(found)
        raise


def _apply(config: Config) -> None:
    logsetup.set_level(config.log_level)
    logsetup.set_secrets(config.secrets)


def _config_error(problems: Sequence[str]) -> int:
    for problem in problems:
        print(f"heartbeatd: {problem}", file=sys.stderr)
    return EX_CONFIG


# What check-config shows of libpq's reading of DATABASE_URL: where it connects, and as whom.
LIBPQ_SHOWN = ("host", "hostaddr", "port", "dbname", "user")


def cmd_check_config(config: Config) -> int:
    """Print the effective configuration, passwords masked; below DATABASE_URL, what libpq makes of it
    (the URL, then the PG* variables and the service file for what it leaves out)."""
    lines = config.describe()
    found = conninfo.effective(config.database_url).options
    used = " ".join(f"{key}={found[key]}" for key in LIBPQ_SHOWN if found.get(key))
    lines.insert(1, configmod.mask(f"  libpq reads it as: {used}", config.secrets))
    print("\n".join(lines))
    return EX_OK


def _connect(config: Config) -> Any:
    """A connection for a command; DatabaseUnreachable (its line printed by main) if none."""
    return Connector(config.database_url, config.timeout).open()


def cmd_init_db(config: Config, with_latency: bool = False, partitioned: Optional[str] = None) -> int:
    """Create the table and index if missing (and the latency_ms column, if asked)."""
    connector = Connector(config.database_url, config.timeout)
    conn = connector.open()
    try:
        # The helper connection cancels a DDL the deadline cut short, and asks who held the table.
        failed: list[schema.NotMade] = []
        try:
            done = schema.init_db(conn, config.table, config.timeout, with_latency, helper=connector.open,
                                  partitioned=partitioned)
        except schema.PartitionsNotMade as exc:  # all else made: the rest of init-db goes on, then exit 1
            done, failed = exc.done, exc.failed
        done += rollup.init_db(conn, config.table, config.timeout, helper=connector.open)
    except Exception as exc:  # noqa: BLE001 - reported as one line
        print(f"heartbeatd: init-db failed: {' '.join(str(exc).split())}", file=sys.stderr)
        return EX_DOWN
    finally:
        conn.close()
    for line in done:
        print(line)
    for not_made in failed:
        print(f"heartbeatd: init-db: partition not made: {not_made.line()}", file=sys.stderr)
    if failed:
        return EX_DOWN
    print(f"table {'.'.join(config.table)} and its indexes are ready in {configmod.mask_url(config.database_url)}")
    return EX_OK


def cmd_once(config: Config) -> int:
    """One cycle, one line per service; no spool (a manual check leaves nothing behind)."""
    cycle = Cycle(config, build_services(config, spool=False))
    try:
        outcome = cycle.run()
    finally:
        cycle.close()
    recorded = {row.service for row in outcome.recorded}
    refused = {row.service: why.split(" DETAIL: ")[0] for row, why in outcome.rejected}
    table = ".".join(config.table)
    for result in outcome.results:
        state = "up" if result.ok else "down"
        if not result.ok:
            note = result.error or "down"
        elif result.service in recorded:
            note = "recorded"
        elif result.service in refused:
            note = f"not recorded: refused by table {table}: {refused[result.service]}"
        else:
            note = f"not recorded: {outcome.write_error or 'PostgreSQL unavailable'}"
        print(f"{result.service}\t{state}\t{result.ip}\t{result.latency * 1000:.1f}ms\t{note}")
    return EX_OK if outcome.all_up and len(recorded) == len(outcome.results) else EX_DOWN


def cmd_rejected(config: Config, retry: bool) -> int:
    """List the rows the table refused, kept aside in the spool; with retry, write them again."""
    if not config.spool_path.exists():  # do not create an empty spool just to look into it
        print(f"no spool at {config.spool_path} (HEARTBEAT_SPOOL_PATH): nothing rejected", file=sys.stderr)
        return EX_OK
    try:
        # No lock: the running daemon holds it, and neither touches the other's rows.
        spool = Spool(config.spool_path, config.spool_max_rows, lock=False)
    except SpoolUnavailable as exc:
        return _config_error([f"HEARTBEAT_SPOOL_PATH: {exc}"])
    try:
        refused = rejected_rows(spool)
        if not retry or not refused:
            render.rejected(refused, rejected_raw(spool), spool.path, sys.stdout, sys.stderr)
            return EX_OK
        conn = _connect(config)
        try:
            written, still = retry_rejected(spool, Writer(config.table, config.timeout), conn, refused)
        except WriteError as exc:
            print(f"heartbeatd: retry failed: {exc}", file=sys.stderr)
            return EX_DOWN
        finally:
            conn.close()
        render.retried(written, still, sys.stdout)
        return EX_OK if not still else EX_DOWN
    finally:
        spool.close()


def _ledger(config: Config) -> Ledger:
    """A Ledger on a fresh connection (DatabaseUnreachable if none), with a helper for parallel reads."""
    connector = Connector(config.database_url, config.timeout)
    return Ledger(connector.open(), config.table, config.timeout, helper=connector.open)


def _stale_after(config: Config) -> float:
    """Seconds without a heartbeat after which a service is stale, or a gap is an outage."""
    return 2 * config.interval + config.timeout


def cmd_status(config: Config, args: argparse.Namespace) -> int:
    """One line per (service, ip) seen in the window: newest heartbeat, its age, fresh or stale."""
    if args.output is not None and args.format != "prometheus":
        return _usage("--output goes with --format prometheus")
    ledger = _ledger(config)
    now = utcnow()
    try:
        found = ledger.latest(timedelta(seconds=args.window.seconds), _stale_after(config), now,
                              pairs=rollup.Rollup(ledger).readable_pairs)
    except READ_FAILURES as exc:
        return _read_failed("status", exc)
    finally:
        ledger.conn.close()
    if args.format == "prometheus":
        # For a timer on the monitoring host: staleness is in the metrics, so success is "written".
        text = metrics.exposition(metrics.ledger_families(found, now, _stale_after(config), ledger.default_rows))
        if args.output is None:
            sys.stdout.write(text)
            return EX_OK
        try:
            metrics.write_atomically(args.output, text)
        except OSError as exc:
            print(f"heartbeatd: status: cannot write {args.output}: {exc.strerror or exc}", file=sys.stderr)
            return EX_DOWN
        return EX_OK
    stale = [f for f in found if not f.fresh]
    render.status(found, now, _stale_after(config), args.window.text, args.format, sys.stdout, sys.stderr,
                  ledger.default_rows)
    return EX_OK if found and not stale else EX_DOWN


def cmd_report(config: Config, args: argparse.Namespace) -> int:
    """Uptime, outages and no-data stretches per (service, ip)."""
    now = utcnow()
    if args.format == "html" and args.since is not None:
        return _usage("--since does not go with --format html: the page shows the 90 days up to --until")
    try:
        until = parse_when(args.until, now) if args.until else now
        since = until - timedelta(days=page.DAYS) if args.format == "html" else parse_when(args.since or "24h", now)
    except ValueError as exc:
        return _usage(f"--since/--until: {exc}")
    if until <= since:
        return _usage("--until must be after --since")
    gap = args.gap if args.gap is not None else _stale_after(config)
    if args.ip is not None:  # as stored: `--ip 2001:DB8:0::1` finds 2001:db8::1
        args.ip = canonical_ip(args.ip)
    ledger = _ledger(config)
    buffer = io.StringIO()  # with --output, the whole text first: the file is replaced only once it is complete
    out = buffer if args.output is not None else sys.stdout
    try:
        if args.format == "html":
            out.write(page.html(page.gather(ledger, min(until, now), gap, now, args.service, args.ip, args.timeout)))
        else:
            reporter = rollup.RollupReport(ledger)
            found, source = reporter.run(since, until, gap, now, args.service, args.ip, args.timeout)
            print(f"report: {source}", file=sys.stderr)
            # The window reported: --since rounded up where the raw rows of its first hour are pruned (said above).
            render.write(found, reporter.since or since, min(until, now), gap, args.format, out)
    except READ_FAILURES as exc:
        return _read_failed("report", exc)
    finally:
        ledger.conn.close()
    if args.output is not None:
        try:
            metrics.write_atomically(args.output, buffer.getvalue())
        except OSError as exc:
            print(f"heartbeatd: report: cannot write {args.output}: {exc.strerror or exc}", file=sys.stderr)
            return EX_DOWN
    return EX_OK


def cmd_prune(config: Config, args: argparse.Namespace) -> int:
    """Delete rows older than the retention, in short batches; safe to interrupt and to run anywhere."""
    if args.older_than is not None:
        keep = args.older_than.seconds
    elif config.retention is None:
        print("HEARTBEAT_RETENTION is empty: keeping everything, nothing pruned")
        return EX_OK
    else:
        keep = config.retention
    ledger = _ledger(config)
    cutoff = utcnow() - timedelta(seconds=keep)
    tty = sys.stderr.isatty()

    def progress(removed: int) -> None:
        if tty:
            print(f"\rpruning: {removed} row(s) removed so far", end="", file=sys.stderr, flush=True)

    estimates = []

    def dropped(name: str, rows: int, estimated: bool) -> None:
        if tty:
            print("\r", end="", file=sys.stderr)
        estimates.append(estimated)
        figure = f"about {rows} rows" if estimated else f"{rows} row(s)"
        print(f"{'would drop' if args.dry_run else 'dropped'} partition {name} ({figure})", flush=True)

    def ahead(made: list[str], said: list[str], failed: list[schema.NotMade]) -> None:
        if made:
            print(f"{'would make' if args.dry_run else 'made'} partition(s) ahead: {', '.join(made)}", flush=True)
        for line in said:
            print(line, flush=True)
        for not_made in failed:  # each on its own line; prune goes on, exit 0 (README)
            print(f"heartbeatd: prune: partitions ahead not made: {not_made.line()}", file=sys.stderr)

    try:
        # Rows are pruned only once the hourly rollups hold them: where a pass has run, never past the
        # hours it covers (a rollup that fails, as the prune unit's ExecStartPre may, holds prune back).
        state = ledger._read(lambda cur: rollup.Rollup(ledger).read_state(cur, missing_ok=True))
        held = state is not None and state.covered_until < cutoff
        if held:
            cutoff = state.covered_until
        removed = ledger.prune(cutoff, args.dry_run, progress, dropped, ahead)
    except schema.DdlFailed as exc:
        print(f"heartbeatd: prune failed: {exc}; nothing more removed, run it again later", file=sys.stderr)
        return EX_DOWN
    except KeyboardInterrupt:
        print("\nheartbeatd: prune interrupted; what was removed stays removed, run it again to go on",
              file=sys.stderr)
        return 130
    except READ_FAILURES as exc:
        return _read_failed("prune", exc)
    finally:
        ledger.conn.close()
    if tty:
        print(file=sys.stderr)
    if removed is None:
        print("another heartbeatd prune is running on this table; nothing done")
        return EX_OK
    verb = "would remove" if args.dry_run else "removed"
    about, note = ("about ", " (dropped partitions' rows estimated from their statistics)") if any(estimates) else ("", "")
    print(f"{verb} {about}{removed} row(s) older than {naive_utc(cutoff)} UTC from {ledger.name}{note}")
    if held:
        assert state is not None
        print(f"heartbeatd: prune: kept the rows from {naive_utc(cutoff)} UTC on: the hourly rollups cover only the "
              f"hours before it (last pass {naive_utc(state.passed_at)} UTC); run `heartbeatd rollup`, see why it "
              "did not run or failed (journalctl -u heartbeatd-prune -u heartbeatd-rollup), and prune again",
              file=sys.stderr)
        return 1
    return EX_OK


def cmd_rollup(config: Config, args: argparse.Namespace) -> int:
    """One rollup pass: the hours that rows were written into since the last pass, recomputed."""
    ledger = _ledger(config)
    try:
        done = rollup.Rollup(ledger).run(_stale_after(config), config.timeout, config.interval, args.timeout)
    except READ_FAILURES as exc:
        return _read_failed("rollup", exc)
    finally:
        ledger.conn.close()
    if done is None:
        print("another heartbeatd rollup is running on this table; nothing done")
        return EX_OK
    print(f"rolled up {done.hours} hour(s) ({done.rows} row(s)){' (first pass: the whole table)' if done.first else ''}"
          f" into {rollup.names(config.table)[2]}; every hour before {naive_utc(done.covered_until)} UTC is covered")
    return EX_OK


# What a read may meet and says in one line: the table is missing, or the database failed us.
# Anything else is a bug: main() reports it as an internal error (70), with its traceback at DEBUG.
READ_FAILURES = (TableMissing, psycopg2.Error)


def _read_failed(command: str, exc: BaseException) -> int:
    """One line, and 1: the command was connected and did not get done (the table missing, a privilege
    not granted, a timeout, the connection lost), as init-db's and rejected --retry's failures are.
    69 stays what it says: no connection could be made (main, DatabaseUnreachable), so nothing was
    done; a script may run the command again once the database is back."""
    print(f"heartbeatd: {command} failed: {reason(exc)}", file=sys.stderr)
    return EX_DOWN


def _usage(message: str) -> int:
    print(f"heartbeatd: {message} (see heartbeatd --help)", file=sys.stderr)
    return EX_USAGE


LEDGER_COMMANDS: dict[str, Callable[[Config, argparse.Namespace], int]] = {
    "status": cmd_status, "report": cmd_report, "prune": cmd_prune, "rollup": cmd_rollup}


def cmd_run(config: Config, env_file: Optional[Path]) -> int:
    """The daemon, in the foreground, until SIGTERM/SIGINT."""
    notifier = Notifier(os.environ)
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
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # what is still buffered: a closed pipe shows here, not at interpreter exit
    except BrokenPipeError:
        # Quietly, as a tool SIGPIPE ends would. SIGPIPE itself stays ignored: its default would end
        # the daemon on a peer's closed socket. stdout goes to /dev/null so that the flush at
        # interpreter exit does not fail again (Python's own advice for this case).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EX_PIPE


def _main(argv: Optional[Sequence[str]]) -> int:
    args = _parser().parse_args(argv)
    args.command = args.command or "run"
    logsetup.setup()
    try:
        config = configmod.load(os.environ, args.env_file)
    except ConfigError as exc:
        return _config_error(exc.problems)
    if args.command in STEP_TIMEOUT_COMMANDS and args.timeout is not None:
        config = dataclasses.replace(config, timeout=args.timeout)
    _apply(config)
    try:
        # The drivers' own parsers judge the URLs before any command runs (no connection is made).
        probes.close_all(probes.build(config))
        if args.command == "check-config":
            return cmd_check_config(config)
        if args.command == "init-db":
            return cmd_init_db(config, args.with_latency, "" if args.partitioned is OWN_UNIT else args.partitioned)
        if args.command == "once":
            return cmd_once(config)
        if args.command == "rejected":
            return cmd_rejected(config, args.retry)
        if args.command in LEDGER_COMMANDS:
            return LEDGER_COMMANDS[args.command](config, args)
        return cmd_run(config, args.env_file)
    except ConfigError as exc:  # found by a driver's own parser when the services were built
        return _config_error(exc.problems)
    except DatabaseUnreachable as exc:  # still 69 when the login or the database is refused: a connection failed
        print("heartbeatd: {}: {}".format(*explain(str(exc))), file=sys.stderr)
        return EX_UNAVAILABLE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the output's reader went away (the drivers wrap their sockets' own): main says so
        raise
    except Exception as exc:  # noqa: BLE001 - never a traceback on the operator's terminal
        log.debug("internal error", exc_info=True)  # HEARTBEAT_LOG_LEVEL=DEBUG shows where
        log.error("internal error: %s: %s", type(exc).__name__, exc)
        return EX_SOFTWARE

