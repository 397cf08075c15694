"""README's least-privilege roles, run as written: the daemon's role writes, rolls up and prunes with
the grants the recipe gives and no more, and the readers' role reads; neither can do what it was not given."""

from __future__ import annotations

import re
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

import psycopg2
import pytest

from conftest import cli, clean_env
from heartbeatd.heartbeat import Row
from heartbeatd.writer import INTO, READ, Writer
from servers import PgServer, RedisServer

README = Path(__file__).resolve().parent.parent / "README.md"


def recipe() -> str:
    """The SQL between README's role-sql markers."""
    text = README.read_text(encoding="utf-8")
    found = re.search(r"<!-- role-sql -->\n```sql\n(.*?)```\n<!-- /role-sql -->", text, re.S)
    assert found, "README.md has no role recipe between <!-- role-sql --> markers"
    return found.group(1)


@pytest.fixture
def roles(pg: PgServer) -> Iterator[tuple[str, str]]:
    """The recipe applied in the test's database, with role names of this test's own (roles are the cluster's)."""
    writer, reader = f"hb_w_{uuid.uuid4().hex[:8]}", f"hb_r_{uuid.uuid4().hex[:8]}"
    sql = recipe().replace("heartbeatd_reader", reader).replace("heartbeatd", writer) \
        .replace("DATABASE app", f"DATABASE {pg.dbname}")  # type: ignore[attr-defined]
    assert cli(["init-db"], clean_env(DATABASE_URL=pg.url(db=pg.dbname))).returncode == 0  # type: ignore[attr-defined]
    pg.sql(sql, db=pg.dbname)  # type: ignore[attr-defined]
    yield writer, reader
    for role in (writer, reader):
        pg.sql(f"DROP OWNED BY {role}", db=pg.dbname)  # type: ignore[attr-defined]
        pg.sql(f"DROP ROLE {role}")


def test_the_daemons_role_writes_rolls_up_and_prunes_with_the_recipes_grants(
        pg: PgServer, redis_server: RedisServer, roles: tuple[str, str]) -> None:
    writer, reader = roles
    db = pg.dbname  # type: ignore[attr-defined]
    env = clean_env(DATABASE_URL=pg.url(user=writer, db=db), REDIS_URL=redis_server.url())
    once = cli(["once"], env)
    assert once.returncode == 0, once.stdout + once.stderr
    assert pg.sql("SELECT count(*) FROM service_heartbeat", db=db) == [(3,)]
    old = datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(days=40)
    pg.sql("INSERT INTO service_heartbeat (service_name, ip_address, report_time, created_at) "
           "VALUES ('redis', '10.0.0.1', %s, %s)", (old, old), db=db)
    rolled = cli(["rollup"], env)
    assert rolled.returncode == 0, rolled.stderr
    pruned = cli(["prune", "--older-than", "30d"], env)
    assert pruned.returncode == 0 and "1" in pruned.stdout, pruned.stdout + pruned.stderr
    assert pg.sql("SELECT count(*) FROM service_heartbeat", db=db) == [(3,)]
    # The recipe gives no more than that: no DDL, and nothing of the application's other tables.
    denied = cli(["init-db", "--with-latency"], env)
    assert denied.returncode == 1 and "must be owner" in denied.stderr, denied.stderr


def test_the_readers_role_reads_and_cannot_write(pg: PgServer, redis_server: RedisServer,
                                                 roles: tuple[str, str]) -> None:
    writer, reader = roles
    db = pg.dbname  # type: ignore[attr-defined]
    assert cli(["once"], clean_env(DATABASE_URL=pg.url(user=writer, db=db), REDIS_URL=redis_server.url())
               ).returncode == 0
    env = clean_env(DATABASE_URL=pg.url(user=reader, db=db))
    status = cli(["status"], env)
    assert status.returncode == 0 and "fresh" in status.stdout, status.stdout + status.stderr
    report = cli(["report", "--since", "1h", "--format", "json"], env)
    assert report.returncode == 0, report.stderr
    once = cli(["once"], clean_env(DATABASE_URL=pg.url(user=reader, db=db), REDIS_URL=redis_server.url()))
    assert once.returncode == 1 and "permission denied" in once.stdout + once.stderr, once.stdout + once.stderr


@pytest.fixture
def partitioned_roles(pg: PgServer) -> Iterator[tuple[str, str]]:
    """The recipe on a table init-db --partitioned made, then init-db --partitioned again, as README says."""
    writer, reader = f"hb_w_{uuid.uuid4().hex[:8]}", f"hb_r_{uuid.uuid4().hex[:8]}"
    sql = recipe().replace("heartbeatd_reader", reader).replace("heartbeatd", writer) \
        .replace("DATABASE app", f"DATABASE {pg.dbname}")  # type: ignore[attr-defined]
    owner = clean_env(DATABASE_URL=pg.url(db=pg.dbname))  # type: ignore[attr-defined]
    assert cli(["init-db", "--partitioned"], owner).returncode == 0
    assert "run `heartbeatd init-db --partitioned` once more as the owner" in " ".join(README.read_text(encoding="utf-8").split())
    pg.sql(sql, db=pg.dbname)  # type: ignore[attr-defined]
    again = cli(["init-db", "--partitioned"], owner)
    assert again.returncode == 0 and "granted SELECT on partition(s) public.service_heartbeat_default, " \
        "public.service_heartbeat_p" in again.stdout, again.stdout + again.stderr
    yield writer, reader
    for role in (writer, reader):
        pg.sql(f"DROP OWNED BY {role}", db=pg.dbname)  # type: ignore[attr-defined]
        pg.sql(f"DROP ROLE {role}")


# 1.6.0: on a partitioned table the recipe's roles could not run status (permission denied for its DEFAULT
# partition, exit 69), and README offered prune row by row with DELETE on the parent, which cannot work.
def test_the_recipe_on_a_partitioned_table(pg: PgServer, redis_server: RedisServer,
                                          partitioned_roles: tuple[str, str]) -> None:
    writer, reader = partitioned_roles
    db = pg.dbname  # type: ignore[attr-defined]
    env = clean_env(DATABASE_URL=pg.url(user=writer, db=db), REDIS_URL=redis_server.url())
    assert cli(["once"], env).returncode == 0
    old = datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(days=40)
    pg.sql("INSERT INTO service_heartbeat (service_name, ip_address, report_time, created_at) "
           "VALUES ('redis', '10.0.0.1', %s, %s)", (old, old), db=db)  # backfilled: into the DEFAULT partition
    assert cli(["rollup"], env).returncode == 0
    for role in (writer, reader):
        status = cli(["status"], clean_env(DATABASE_URL=pg.url(user=role, db=db)))
        assert status.returncode == 0 and "fresh" in status.stdout, status.stdout + status.stderr
        assert status.stderr.startswith("1 row(s) in the DEFAULT partition service_heartbeat_default"), status.stderr
    # Every partition grants what the table does, so the daemon's writes read and go into only the partition
    # of their rows.
    now = datetime.now(timezone.utc)
    assert ungranted(pg, writer, reader) == [] and ungranted(pg, writer, privilege="INSERT") == []
    conn = psycopg2.connect(pg.url(user=writer, db=db))
    conn.autocommit = True
    try:
        rows = [Row("redis", "10.9.9.9", now)]
        written = Writer(("service_heartbeat",), timeout=5.0)
        written.write(conn, rows)
        assert written._shape is not None
        filling = written._shape.filling(written._shape.values(rows, now))
        assert filling[READ] == filling[INTO] == f"public.service_heartbeat_p{now:%Y%m%d}"
    finally:
        conn.close()
    # prune as the table's owner, as README says; a partition it makes ahead gets the grants too.
    last = f"service_heartbeat_p{now + timedelta(days=7):%Y%m%d}"
    pg.sql(f"DROP TABLE {last}", db=db)
    pruned = cli(["prune", "--older-than", "30d"], clean_env(DATABASE_URL=pg.url(db=db)))
    assert pruned.returncode == 0 and f"made partition(s) ahead: {last}" in pruned.stdout, pruned.stdout + pruned.stderr
    assert pg.sql("SELECT count(*) FROM service_heartbeat", db=db) == [(4,)]
    assert ungranted(pg, writer, reader) == [] and ungranted(pg, writer, privilege="INSERT") == []


def ungranted(pg: PgServer, *roles: str, privilege: str = "SELECT") -> list[tuple[str, str]]:
    """(partition, role) of each partition of service_heartbeat that role may not read (or `privilege`)."""
    return pg.sql("SELECT i.inhrelid::regclass::text, r FROM pg_inherits i, unnest(%s::text[]) r "
                  "WHERE i.inhparent = 'service_heartbeat'::regclass AND NOT has_table_privilege(r, i.inhrelid, %s)",
                  (list(roles), privilege), db=pg.dbname)  # type: ignore[attr-defined]


# A table with row security: its partitions read by themselves would show what its policies hide, so
# init-db gives them nothing, and writes read through the table, the policies applied, even where a
# partition was granted before (found in review: the writer read the partition then).
def test_no_partition_of_a_table_with_row_security_is_granted(pg: PgServer,
                                                             partitioned_roles: tuple[str, str]) -> None:
    writer, reader = partitioned_roles
    db = pg.dbname  # type: ignore[attr-defined]
    pg.sql(f"CREATE TABLE service_heartbeat_p20200101 PARTITION OF service_heartbeat FOR VALUES FROM "
           f"('2020-01-01') TO ('2020-01-02'); ALTER TABLE service_heartbeat ENABLE ROW LEVEL SECURITY", db=db)
    again = cli(["init-db", "--partitioned"], clean_env(DATABASE_URL=pg.url(db=db)))
    assert again.returncode == 0 and "granted" not in again.stdout, again.stdout + again.stderr
    assert ungranted(pg, writer, reader) == [("service_heartbeat_p20200101", writer),
                                             ("service_heartbeat_p20200101", reader)]
    pg.sql(f"CREATE POLICY everything ON service_heartbeat TO {writer} USING (true) WITH CHECK (true)", db=db)
    conn = psycopg2.connect(pg.url(user=writer, db=db))
    conn.autocommit = True
    try:
        now = datetime.now(timezone.utc)
        rows = [Row("redis", "10.9.9.9", now)]
        written = Writer(("service_heartbeat",), timeout=5.0)
        written.write(conn, rows)
        written.write(conn, rows, dedupe=True)
        assert written.inserted == 1 and written._shape is not None
        assert written._shape.filling(written._shape.values(rows, now))[READ] == '"service_heartbeat"'
    finally:
        conn.close()


# A partition another role owns (one a superuser made for later, say) is not the owner's to grant on:
# init-db and prune say so and give the rest their grants (found in review: init-db exited 1 there and
# prune said "partitions ahead not made" for a partition it had made, every partition after it ungranted).
def test_a_partition_of_another_owner_is_said_and_the_rest_granted(pg: PgServer) -> None:
    db = pg.dbname  # type: ignore[attr-defined]
    owner, reader = f"hb_o_{uuid.uuid4().hex[:8]}", f"hb_r_{uuid.uuid4().hex[:8]}"
    pg.sql(f"CREATE ROLE {owner} LOGIN; CREATE ROLE {reader}; GRANT CREATE, USAGE ON SCHEMA public TO {owner}",
           db=db)
    try:
        env = clean_env(DATABASE_URL=pg.url(user=owner, db=db))
        assert cli(["init-db", "--partitioned"], env).returncode == 0
        pg.sql(f"GRANT SELECT ON service_heartbeat TO {reader}; CREATE TABLE service_heartbeat_archive PARTITION OF "
               "service_heartbeat FOR VALUES FROM ('2099-01-01') TO ('2099-01-02')", db=db)  # the superuser's
        refused = ("SELECT not granted on partition public.service_heartbeat_archive as on table "
                   "public.service_heartbeat: owned by another role")
        again = cli(["init-db", "--partitioned"], env)
        assert again.returncode == 0, again.stdout + again.stderr
        assert refused in again.stdout and "granted SELECT on partition(s) public.service_heartbeat_default, " \
            "public.service_heartbeat_p" in again.stdout, again.stdout
        assert [part for part, _ in ungranted(pg, reader)] == ["service_heartbeat_archive"]
        pruned = cli(["prune", "--older-than", "30d"], env)
        assert pruned.returncode == 0 and refused in pruned.stdout, pruned.stdout + pruned.stderr
        assert "not made" not in pruned.stderr, pruned.stderr
    finally:
        for role in (owner, reader):
            pg.sql(f"DROP OWNED BY {role}", db=db)
            pg.sql(f"DROP ROLE {role}")


def test_a_role_without_select_is_a_failed_read_not_an_unreachable_database(pg: PgServer, tmp_path: Path) -> None:
    # 1.6.6 said 69, "database unreachable", to a role the server had let in and then refused the table.
    role, password = f"hb_n_{uuid.uuid4().hex[:8]}", "Pw-n0-s3lect"
    assert cli(["init-db"], clean_env(DATABASE_URL=pg.url(db=pg.dbname))).returncode == 0  # type: ignore[attr-defined]
    pg.sql(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
    try:
        env = clean_env(DATABASE_URL=pg.url(role, password, db=pg.dbname))  # type: ignore[attr-defined]
        for args in (["status"], ["report", "--since", "1d"]):
            result = cli(args, env, cwd=tmp_path)
            assert (result.returncode, result.stdout) == (1, ""), result
            lines = result.stderr.splitlines()
            assert len(lines) == 1 and re.fullmatch(
                rf"heartbeatd: {args[0]} failed: permission denied for table service_heartbeat(_hourly(_state)?)?", lines[0]), lines
            assert password not in result.stderr
        # No connection at all stays 69.
        result = cli(["status"], clean_env(DATABASE_URL=pg.url(role, "wrong", db="no_such_db")), cwd=tmp_path)
        assert result.returncode == 69, result.stderr
    finally:
        pg.sql(f"DROP OWNED BY {role}", db=pg.dbname)  # type: ignore[attr-defined]
        pg.sql(f"DROP ROLE {role}")
