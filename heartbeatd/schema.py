"""The table's DDL and indexes (derived from heartbeat.COLUMNS), and the column lookup writer and ledger share."""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

from psycopg2 import sql

from heartbeatd.heartbeat import COLUMNS, LATENCY
from heartbeatd.pg import deadline

CREATE_TABLE = ("CREATE TABLE IF NOT EXISTS {table} (\n    id           bigserial PRIMARY KEY,\n"
                + ",\n".join(f"    {c.name:<12} {c.ddl}" for c in COLUMNS if c.kind != "extra")
                + "\n);\nCREATE INDEX IF NOT EXISTS {index} ON {table} (service_name, report_time);\n")
# What `heartbeatd status` and `report` read by: latest per (service, ip) in milliseconds.
PAIR_INDEX = "CREATE INDEX {concurrently} IF NOT EXISTS {index} ON {table} (service_name, ip_address, report_time)"
INDEX_STATE = """SELECT i.indisvalid FROM pg_catalog.pg_index i
 WHERE i.indexrelid = pg_catalog.to_regclass(%s)"""
HAS_ROWS = "SELECT EXISTS (SELECT 1 FROM {table})"
# Nullable, no default: PostgreSQL only records it in the catalog, however many rows there are.
ADD_COLUMN = "ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {ddl}"
# The type's name, and the type as declared (format_type with the column's typmod:
# `timestamp(0) without time zone`), which is what a value must be cast to to compare as stored.
COLUMN_TYPES = """\
SELECT a.attname, t.typname, pg_catalog.format_type(a.atttypid, a.atttypmod), a.atttypmod
  FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
 WHERE a.attrelid = pg_catalog.to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped"""
# Building an index over millions of rows takes minutes, not HEARTBEAT_TIMEOUT; still bounded.
INDEX_TIMEOUT = 3600.0


def index_name(table: Sequence[str]) -> str:
    """The name init-db gives the (service_name, report_time) index."""
    return f"{table[-1]}_service_name_report_time_idx"[:63]


def pair_index_name(table: Sequence[str]) -> str:
    """The name init-db gives the (service_name, ip_address, report_time) index the read side uses."""
    return f"{table[-1]}_service_ip_time_idx"[:63]


class ColumnType(NamedTuple):
    """A column's type: its name (`timestamp`), as declared (`timestamp(0) without time zone`), its typmod."""

    name: str
    declared: str
    typmod: int  # -1 when the type has none (`timestamp` alone: 6 digits of fraction)


def declared_types(cur: Any, table: sql.Identifier) -> dict[str, ColumnType]:
    """The table's columns and their types; empty if it does not exist."""
    cur.execute(COLUMN_TYPES, (table.as_string(cur),))
    return {name: ColumnType(typ, declared, typmod) for name, typ, declared, typmod in cur.fetchall()}


def column_types(cur: Any, table: sql.Identifier) -> dict[str, str]:
    """The table's columns and their type names (`timestamp`, `timestamptz`, ...); empty if it does not exist."""
    return {name: typ.name for name, typ in declared_types(cur, table).items()}


def init_db(conn: Any, table: Sequence[str], timeout: float, with_latency: bool = False) -> list[str]:
    """Create the table and its indexes if missing (idempotent), and the latency_ms column if asked; say what was created."""
    done: list[str] = []
    ident = sql.Identifier(*table)
    pair = sql.Identifier(*table[:-1], pair_index_name(table))
    with deadline(timeout), conn.cursor() as cur:
        cur.execute(sql.SQL(CREATE_TABLE).format(table=ident, index=sql.Identifier(index_name(table))))
        if with_latency and LATENCY not in column_types(cur, ident):
            ddl = next(c.ddl for c in COLUMNS if c.name == LATENCY)
            cur.execute(sql.SQL(ADD_COLUMN).format(table=ident, column=sql.Identifier(LATENCY), ddl=sql.SQL(ddl)))
            done.append(f"added column {LATENCY} {ddl}")
        cur.execute(INDEX_STATE, (pair.as_string(cur),))
        state = cur.fetchone()
        if state is not None and not state[0]:  # a CONCURRENTLY build that was interrupted
            cur.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(pair))
            state = None
        cur.execute(sql.SQL(HAS_ROWS).format(table=ident))
        has_rows = bool(cur.fetchone()[0])
    if state is None:
        # On a table that already holds rows, CONCURRENTLY: the daemons go on writing meanwhile.
        with deadline(INDEX_TIMEOUT), conn.cursor() as cur:
            # The index lives in the table's schema; CREATE INDEX takes its bare name.
            cur.execute(sql.SQL(PAIR_INDEX).format(
                concurrently=sql.SQL("CONCURRENTLY" if has_rows else ""),
                index=sql.Identifier(pair_index_name(table)), table=ident))
        done.append(f"created index {pair_index_name(table)}" + (" concurrently" if has_rows else ""))
    return done
