"""URLs and secrets (issue 24, items 7-9): libpq's own defaults, valid URLs accepted, every secret masked.

The PostgreSQL here listens on 127.0.0.2 on a free port, never 5432: where heartbeatd wrongly
filled in port 5432 it meets nothing (the machine's shared server listens on 127.0.0.1 only).
"""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest

from conftest import DaemonProcess, clean_env, cli
from heartbeatd import conninfo
from heartbeatd.config import SECRET_OPTIONS, load, mask_url
from heartbeatd.pg import parse
from servers import PgServer, RedisServer

HOST = "127.0.0.2"
SCRAM_USER, SCRAM_PW = "hb_scram", "Pw9x-sCr4m"  # the password only .pgpass holds
ODD_USER, ODD_PW = "hb_odd", "p@ss/w?rd#Qx7"  # a password that must be percent-encoded in a URL
ODD_ENCODED = "p%40ss%2Fw%3Frd%23Qx7"
KEY_PW, REDIS_KEY_PW, REDIS_PW = "SslKeyPw7q", "RedisKeyPw3z", "RedisPw5k"


@pytest.fixture(scope="module")
def server() -> Iterator[PgServer]:
    """A private PostgreSQL on 127.0.0.2 whose two roles log in with SCRAM passwords."""
    pg = PgServer(host=HOST)
    pg.extra_opts += " -c password_encryption=scram-sha-256"
    with open(pg.data / "pg_hba.conf", "w") as hba:
        hba.write(f"local all all trust\nhost all postgres 127.0.0.0/8 trust\n"
                  f"host all {SCRAM_USER},{ODD_USER} 127.0.0.0/8 scram-sha-256\n")
    pg.start()
    for user, password in ((SCRAM_USER, SCRAM_PW), (ODD_USER, ODD_PW)):
        pg.sql(f"CREATE ROLE {user} LOGIN SUPERUSER PASSWORD '{password}'")
    yield pg
    pg.destroy()


@pytest.fixture
def db(server: PgServer) -> Iterator[str]:
    """A fresh database on the server, for one test."""
    name = "u_" + uuid.uuid4().hex[:10]
    server.sql(f"CREATE DATABASE {name}")
    yield name
    server.sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _has_table(server: PgServer, db: str) -> bool:
    return bool(server.sql("SELECT to_regclass('service_heartbeat') IS NOT NULL", db=db)[0][0])


def _init_db(env: dict[str, str], tmp: Path) -> str:
    result = cli(["init-db"], env, cwd=tmp)
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


# --- item 7: what the URL leaves out, libpq fills in as for psql ----------------------------------

def test_pgport_fills_in_a_url_without_a_port(server: PgServer, db: str, tmp_path: Path) -> None:
    env = clean_env(DATABASE_URL=f"postgresql://postgres@{HOST}/{db}", PGPORT=str(server.port))
    _init_db(env, tmp_path)
    assert _has_table(server, db)


def test_pghost_pgport_pguser_pgdatabase_fill_in_an_empty_url(server: PgServer, db: str, tmp_path: Path) -> None:
    env = clean_env(DATABASE_URL="postgresql://", PGHOST=HOST, PGPORT=str(server.port), PGUSER="postgres",
                    PGDATABASE=db)
    _init_db(env, tmp_path)
    assert _has_table(server, db)


def test_a_service_file_gives_host_port_and_database(server: PgServer, db: str, tmp_path: Path) -> None:
    services = tmp_path / "pg_service.conf"
    services.write_text(f"[hb]\nhost={HOST}\nport={server.port}\ndbname={db}\nuser=postgres\n")
    env = clean_env(DATABASE_URL="postgresql:///?service=hb", PGSERVICEFILE=str(services))
    _init_db(env, tmp_path)
    assert _has_table(server, db)
    # PGSERVICE names the service as well as `?service=` does.
    server.sql("DROP TABLE service_heartbeat", db=db)
    _init_db(clean_env(DATABASE_URL="postgresql://", PGSERVICE="hb", PGSERVICEFILE=str(services)), tmp_path)
    assert _has_table(server, db)


def test_an_unknown_service_is_one_line_and_78(tmp_path: Path) -> None:
    services = tmp_path / "pg_service.conf"
    services.write_text("[other]\nport=1\n")
    result = cli(["check-config"], clean_env(DATABASE_URL="postgresql:///?service=hb", PGSERVICEFILE=str(services)),
                 cwd=tmp_path)
    assert result.returncode == 78, result.stderr
    assert result.stderr.splitlines() == ['heartbeatd: DATABASE_URL: definition of service "hb" not found']


def test_a_pgpass_password_logs_in_a_scram_user_and_is_never_shown(
        server: PgServer, db: str, tmp_path: Path) -> None:
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"{HOST}:{server.port}:*:{SCRAM_USER}:{SCRAM_PW}\n")
    passfile.chmod(0o600)
    env = clean_env(DATABASE_URL=f"postgresql://{SCRAM_USER}@{HOST}/{db}", PGPORT=str(server.port),
                    PGPASSFILE=str(passfile), HEARTBEAT_LOG_LEVEL="DEBUG")
    output = _init_db(env, tmp_path)
    assert _has_table(server, db)
    assert SCRAM_PW not in output
    # passfile= in the URL works as PGPASSFILE does; a wrong password is refused by the server.
    passfile.write_text(f"*:*:*:{SCRAM_USER}:wrong\n")
    env = clean_env(DATABASE_URL=f"postgresql://{SCRAM_USER}@{HOST}:{server.port}/{db}?passfile={passfile}")
    result = cli(["init-db"], env, cwd=tmp_path)
    assert result.returncode == 69 and "password authentication failed" in result.stderr, result.stderr


def test_the_hosts_tried_are_libpqs_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGPORT", "6543")
    monkeypatch.setenv("PGHOST", "db1,db2")
    options, hosts = parse("postgresql:///app?user=app")
    assert [(h.host, h.port) for h in hosts] == [("db1", "6543"), ("db2", "6543")]
    assert options == {"dbname": "app", "user": "app"}
    # An empty entry of a port list is libpq's compiled-in port, not PGPORT.
    _, hosts = parse("postgresql://a:7,b/app?port=7,")
    assert [(h.host, h.port) for h in hosts] == [("a", "7"), ("b", conninfo.compiled_default("port"))]
    monkeypatch.setenv("PGHOSTADDR", "10.0.0.9")
    monkeypatch.setenv("PGHOST", "db.internal")
    _, hosts = parse("postgresql:///app")
    assert [(h.host, h.port, h.hostaddr) for h in hosts] == [("db.internal", "6543", "10.0.0.9")]


def test_pg_variables_apply_with_database_url_unset_or_empty(server: PgServer, db: str, tmp_path: Path) -> None:
    # The default URL spelt out localhost, 5432 and postgres, and so overrode every one of them.
    for number, unset in enumerate(({}, {"DATABASE_URL": ""}, {"DATABASE_URL": " "})):
        name = f"{db}_{number}"
        server.sql(f"CREATE DATABASE {name}")
        env = clean_env(PGHOST=HOST, PGPORT=str(server.port), PGUSER="postgres", PGDATABASE=name, **unset)
        shown = cli(["check-config"], env, cwd=tmp_path)
        # Asked first, without connecting: were it still the default, init-db would go to localhost:5432.
        assert f"libpq reads it as: host={HOST} port={server.port} dbname={name} user=postgres" in shown.stdout, shown
        _init_db(env, tmp_path)
        assert _has_table(server, name)
        server.sql(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.mark.parametrize("variables, used", [
    ({}, "host=localhost port=5432 dbname=postgres"),
    ({"PGPORT": "6543"}, "host=localhost port=6543 dbname=postgres"),
    ({"PGHOSTADDR": "10.0.0.9"}, "hostaddr=10.0.0.9 port=5432 dbname=postgres"),
    ({"PGHOST": "db.internal", "PGDATABASE": "app"}, "host=db.internal port=5432 dbname=app"),
])
def test_the_default_url_applies_where_libpq_has_nothing(tmp_path: Path, variables: dict[str, str], used: str) -> None:
    # Shown, never connected: the default is the machine's own localhost:5432.
    result = cli(["check-config"], clean_env(**variables), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].endswith("(unset: the default postgresql://localhost:5432/postgres, less what libpq's PG* "
                             "variables or service file give)")
    assert lines[1].startswith(f"  libpq reads it as: {used} user="), lines[1]


def test_a_service_file_fills_what_an_unset_database_url_leaves(tmp_path: Path) -> None:
    services = tmp_path / "pg_service.conf"
    services.write_text("[hb]\nhost=db.internal\nport=6000\n")
    result = cli(["check-config"], clean_env(PGSERVICE="hb", PGSERVICEFILE=str(services)), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].startswith(
        "  libpq reads it as: host=db.internal port=6000 dbname=postgres user="), result.stdout
    services.write_text("[hb]\nhost=db.internal\nport=no\n")
    result = cli(["check-config"], clean_env(PGSERVICE="hb", PGSERVICEFILE=str(services)), cwd=tmp_path)
    assert result.returncode == 78
    assert result.stderr.splitlines() == ["heartbeatd: service 'hb' (its service file): bad port 'no' (must be 1-65535)"]


@pytest.mark.parametrize("url", ["postgresql://app:Pw-s3cret@db/app", ""])
def test_pgport_that_is_no_port_is_78_and_named(tmp_path: Path, url: str) -> None:
    result = cli(["check-config"], clean_env(DATABASE_URL=url, PGPORT="x1"), cwd=tmp_path)
    assert result.returncode == 78
    assert result.stderr.splitlines() == ["heartbeatd: PGPORT: bad port 'x1' (must be 1-65535)"]
    assert "Pw-s3cret" not in result.stdout + result.stderr
    # Where the URL gives the port, the URL is named.
    result = cli(["check-config"], clean_env(DATABASE_URL="postgresql://app:Pw-s3cret@db:x2/app", PGPORT="x1"),
                 cwd=tmp_path)
    assert result.stderr.splitlines() == ["heartbeatd: DATABASE_URL: bad port 'x2' (must be 1-65535)"]


def test_libpq_judges_every_option_at_start(tmp_path: Path) -> None:
    result = cli(["check-config"], clean_env(DATABASE_URL="postgresql://db/app?sslmode=sometimes"), cwd=tmp_path)
    assert result.returncode == 78
    assert result.stderr.splitlines() == ['heartbeatd: DATABASE_URL: invalid sslmode value: "sometimes"']


@pytest.mark.parametrize("command", ["check-config", "status"])
def test_a_bad_target_session_attrs_is_refused_at_start(tmp_path: Path, command: str) -> None:
    # libpq checks it only once it has every other option: the probe that reads them stopped there
    # with a value of its own, so the operator's was first judged when connecting (exit 69).
    url = "postgresql://app:Pw-s3cret@127.0.0.1:1/x?target_session_attrs=bogus"
    result = cli([command], clean_env(DATABASE_URL=url), cwd=tmp_path)
    assert (result.returncode, result.stderr.splitlines()) == (
        78, ['heartbeatd: DATABASE_URL: invalid target_session_attrs value: "bogus"']), result.stderr
    result = cli([command], clean_env(DATABASE_URL="postgresql://app:Pw-s3cret@127.0.0.1:1/x",
                                      PGTARGETSESSIONATTRS="bogus"), cwd=tmp_path)
    assert (result.returncode, result.stderr.splitlines()) == (
        78, ['heartbeatd: PGTARGETSESSIONATTRS: invalid target_session_attrs value: "bogus"']), result.stderr
    assert "Pw-s3cret" not in result.stdout + result.stderr


def test_the_options_libpq_checks_last_are_judged_at_start(tmp_path: Path) -> None:
    for value in ("any", "read-write", "read-only", "primary", "standby", "prefer-standby"):
        env = clean_env(DATABASE_URL=f"postgresql://127.0.0.1:1/x?target_session_attrs={value}")
        assert cli(["check-config"], env, cwd=tmp_path).returncode == 0, value
    services = tmp_path / "pg_service.conf"
    services.write_text("[hb]\nhost=db.internal\ntarget_session_attrs=bogus\n")
    result = cli(["check-config"], clean_env(DATABASE_URL="postgresql:///?service=hb", PGSERVICEFILE=str(services)),
                 cwd=tmp_path)
    assert result.stderr.splitlines() == [
        'heartbeatd: service \'hb\' (its service file): invalid target_session_attrs value: "bogus"']
    if conninfo.compiled_default("load_balance_hosts"):  # libpq 16+, checked after target_session_attrs
        result = cli(["check-config"], clean_env(DATABASE_URL="postgresql://db/x?load_balance_hosts=often"),
                     cwd=tmp_path)
        assert result.stderr.splitlines() == ['heartbeatd: DATABASE_URL: invalid load_balance_hosts value: "often"']


# --- item 8: valid URLs are accepted -------------------------------------------------------------

def test_an_at_sign_in_the_query_is_not_a_password(server: PgServer, db: str, tmp_path: Path) -> None:
    url = f"postgresql://{HOST}:{server.port}/{db}?user=postgres&application_name=ops@host1"
    shown = cli(["check-config"], clean_env(DATABASE_URL=url), cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert f"DATABASE_URL={url}" in shown.stdout
    _init_db(clean_env(DATABASE_URL=url), tmp_path)
    assert _has_table(server, db)


def test_an_encoded_password_with_an_at_sign_in_the_query(server: PgServer, db: str, tmp_path: Path) -> None:
    url = f"postgresql://{ODD_USER}:{ODD_ENCODED}@{HOST}:{server.port}/{db}?application_name=ops@host1"
    output = _init_db(clean_env(DATABASE_URL=url, HEARTBEAT_LOG_LEVEL="DEBUG"), tmp_path)
    assert _has_table(server, db)
    assert f"postgresql://{ODD_USER}:***@{HOST}:{server.port}/{db}?application_name=ops@host1" in output
    assert ODD_ENCODED not in output and ODD_PW not in output


@pytest.mark.parametrize("url", [
    "postgresql://u:Zq9pw#x@127.0.0.1/x",  # libpq reads `#` and `?` in a password as they are
    "postgresql://u:Zq9pw?x@127.0.0.1/x",
    "redis://u:Zq9pw@x@127.0.0.1:6379/0",  # urlsplit (redis-py) takes the last `@` before the path
    "redis://:Zq9pw@127.0.0.1:6379/0?client_name=ops@host1",
    "redis://127.0.0.1:6379/0?client_name=ops@host1",
])
def test_what_the_driver_reads_right_is_accepted(tmp_path: Path, url: str) -> None:
    name = "DATABASE_URL" if url.startswith("postgresql") else "REDIS_URL"
    result = cli(["check-config"], clean_env(**{name: url}), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Zq9pw" not in result.stdout + result.stderr


@pytest.mark.parametrize("name, url, raw", [
    ("DATABASE_URL", "postgresql://u:Zq9pw@x@127.0.0.1/x", "'@'"),
    ("DATABASE_URL", "postgresql://u:12/Zq9pw@127.0.0.1/x", "'/'"),
    ("REDIS_URL", "redis://:Zq9pw/x@127.0.0.1:6379/0", "'/'"),
    ("REDIS_URL", "redis://u:12?Zq9pw@127.0.0.1:6379/0", "'?'"),
    ("REDIS_URL", "redis://:12#Zq9pw@127.0.0.1:6379/0", "'#'"),
    ("REDIS_URL", "redis+sentinel://:Zq9pw/x@127.0.0.1/mymaster", "'/'"),
])
def test_a_password_the_driver_would_cut_gets_the_hint(tmp_path: Path, name: str, url: str, raw: str) -> None:
    result = cli(["check-config"], clean_env(**{name: url}), cwd=tmp_path)
    assert result.returncode == 78
    assert result.stderr.splitlines() == [f"heartbeatd: {name}: the password holds a raw {raw}: percent-encode it "
                                          "(@ is %40, # is %23, / is %2F, ? is %3F)"]
    assert "Zq9pw" not in result.stdout


# --- item 9: every secret masked in every output --------------------------------------------------

def test_libpqs_own_secret_options_are_all_masked() -> None:
    assert conninfo.secret_keywords() <= set(SECRET_OPTIONS)


def test_check_config_masks_every_secret(tmp_path: Path) -> None:
    env = clean_env(DATABASE_URL=f"postgresql://app:{ODD_ENCODED}@db/app?sslmode=require&sslpassword={KEY_PW}",
                    REDIS_URL=f"rediss://:{REDIS_PW}@cache:6380/0?ssl_password={REDIS_KEY_PW}")
    result = cli(["check-config"], env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "DATABASE_URL=postgresql://app:***@db/app?sslmode=require&sslpassword=***" in result.stdout
    assert "REDIS_URL=rediss://:***@cache:6380/0?ssl_password=***" in result.stdout
    for secret in (ODD_ENCODED, ODD_PW, KEY_PW, REDIS_PW, REDIS_KEY_PW):
        assert secret not in result.stdout + result.stderr


def test_init_db_masks_sslpassword(server: PgServer, db: str, tmp_path: Path) -> None:
    url = f"postgresql://postgres@{HOST}:{server.port}/{db}?sslmode=disable&sslpassword={KEY_PW}"
    output = _init_db(clean_env(DATABASE_URL=url, HEARTBEAT_LOG_LEVEL="DEBUG"), tmp_path)
    assert "sslpassword=***" in output and KEY_PW not in output


@pytest.mark.parametrize("spec", [
    "https://admin:Zq9pw@127.0.0.1:8443/healthz",  # a user or password is refused
    "https://admin:Zq9pw@127.0.0.1:port/healthz",  # urlsplit refuses the port
    "tcp://admin:Zq9pw@127.0.0.1",  # no port
    "htps://admin:Zq9pw@127.0.0.1/healthz",  # a misspelt scheme
    "http://admin:Zq9pw@/healthz",  # no host
])
def test_a_refused_backend_check_never_shows_its_password(tmp_path: Path, spec: str) -> None:
    result = cli(["check-config"], clean_env(HEARTBEAT_BACKEND_CHECK=spec), cwd=tmp_path)
    assert result.returncode == 78
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("heartbeatd: HEARTBEAT_BACKEND_CHECK")
    assert "Zq9pw" not in result.stdout + result.stderr


def test_mask_url_hides_userinfo_of_any_scheme() -> None:
    assert mask_url("https://admin:Zq9pw@127.0.0.1/x") == "https://admin:***@127.0.0.1/x"
    assert mask_url("unix://:Zq9pw@/run/redis.sock?db=1") == "unix://:***@/run/redis.sock?db=1"
    assert mask_url("redis+sentinel://:a@h/m?sentinel_password=b") == "redis+sentinel://:***@h/m?sentinel_password=***"


def test_a_secret_in_a_refused_value_of_another_variable_is_masked(tmp_path: Path) -> None:
    config = load({"DATABASE_URL": f"postgresql://db/app?sslpassword={KEY_PW}"}, cwd=tmp_path)
    assert KEY_PW in config.secrets
    env = clean_env(DATABASE_URL=f"postgresql://db/app?sslpassword={KEY_PW}&sslmode={KEY_PW}")
    result = cli(["check-config"], env, cwd=tmp_path)
    assert result.returncode == 78 and result.stderr.count("\n") == 1, result.stderr
    assert KEY_PW not in result.stderr


def test_the_daemons_log_never_shows_a_secret(server: PgServer, db: str, tmp_path: Path,
                                               daemon: Callable[..., DaemonProcess]) -> None:
    redis = RedisServer(password=REDIS_PW).start()
    env_file = tmp_path / "hb.env"
    try:
        env_file.write_text(
            f"DATABASE_URL=postgresql://{ODD_USER}:{ODD_ENCODED}@{HOST}:{server.port}/{db}?sslpassword={KEY_PW}\n"
            # TLS to a plain Redis: every cycle fails, and says why.
            f"REDIS_URL=rediss://:{REDIS_PW}@127.0.0.1:{redis.port}/0?ssl_password={REDIS_KEY_PW}\n"
            "HEARTBEAT_INTERVAL=0.2\nHEARTBEAT_TIMEOUT=1\nHEARTBEAT_LOG_LEVEL=DEBUG\n"
            f"HEARTBEAT_SPOOL_PATH={tmp_path / 'spool.db'}\n")
        assert cli(["init-db", "--env-file", str(env_file)], clean_env(), cwd=tmp_path).returncode == 0
        proc = daemon(clean_env(), ["--env-file", str(env_file)])
        proc.wait_log("记录心跳成功 - 服务: postgres", count=2)
        proc.wait_log("Redis连接测试失败")
        # A reload refused: its line names the values, masked.
        env_file.write_text(f"DATABASE_URL=mysql://db/app?sslpassword={KEY_PW}\n"
                            f"REDIS_URL=redis://cache:6379/0?ssl_password={REDIS_KEY_PW}&socket_timeout=soon\n")
        proc.signal(signal.SIGHUP)
        proc.wait_log("重新加载配置失败")
        proc.wait_log("记录心跳成功 - 服务: postgres", count=4)
        assert proc.stop() == 0
        log = proc.log()
    finally:
        redis.destroy()
    assert "sslpassword=***" in log
    for secret in (ODD_ENCODED, ODD_PW, KEY_PW, REDIS_PW, REDIS_KEY_PW):
        assert secret not in log, secret
