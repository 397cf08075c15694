"""Configuration: sources, precedence, validation, masking; the CLI's exit statuses for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import clean_env, cli
from heartbeatd import __version__
from heartbeatd.config import ConfigError, load, mask_url

SECRET = "s3cr3t-Pa55w0rd"


def test_defaults_match_spec(tmp_path: Path) -> None:
    config = load({}, cwd=tmp_path)
    assert config.database_url == "postgresql://localhost:5432/postgres"
    assert config.redis_url == "redis://localhost:6379/0"
    assert (config.interval, config.timeout) == (30.0, 5.0)
    assert config.backend_ip is None
    assert config.table == ("service_heartbeat",)
    assert config.spool_path == tmp_path / "heartbeatd-spool.db"  # absolute: messages name the real place
    assert config.spool_max_rows == 100000
    assert config.log_level == "INFO"


def test_state_directory_holds_the_spool(tmp_path: Path) -> None:
    assert load({"STATE_DIRECTORY": "/var/lib/heartbeatd"}, cwd=tmp_path).spool_path == Path("/var/lib/heartbeatd/spool.db")


def test_precedence_env_over_dotenv_and_env_file_over_env(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("HEARTBEAT_INTERVAL=7\nHEARTBEAT_TIMEOUT=3\n")
    config = load({"HEARTBEAT_INTERVAL": "9"}, cwd=tmp_path)
    assert (config.interval, config.timeout) == (9.0, 3.0)  # the real environment wins over .env
    explicit = tmp_path / "explicit.env"
    explicit.write_text("HEARTBEAT_INTERVAL=11\n")
    config = load({"HEARTBEAT_INTERVAL": "9"}, env_file=explicit, cwd=tmp_path)
    assert config.interval == 11.0  # an explicit --env-file wins over the environment
    assert config.timeout == 5.0  # and .env is not read when --env-file is given


def test_dollar_in_password_is_not_interpolated(tmp_path: Path) -> None:
    env_file = tmp_path / "h.env"
    env_file.write_text("DATABASE_URL=postgresql://u:pa$HOME@db/x\n")
    assert load({"HOME": "/root"}, env_file=env_file).database_url == "postgresql://u:pa$HOME@db/x"


def test_credentials_replace_variables(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "database_url").write_text(f"postgresql://app:{SECRET}@db.internal/app\n")
    (creds / "redis_url").write_text("redis://:pw@cache:6380/2")
    config = load({"CREDENTIALS_DIRECTORY": str(creds), "DATABASE_URL": "postgresql://x/y"}, cwd=tmp_path)
    assert config.database_url == f"postgresql://app:{SECRET}@db.internal/app"
    assert config.redis_url == "redis://:pw@cache:6380/2"
    assert SECRET in config.secrets


@pytest.mark.parametrize("name, value, fragment", [
    ("DATABASE_URL", "mysql://db/x", "scheme must be postgresql://"),
    ("DATABASE_URL", "localhost:5432", "scheme must be postgresql://"),
    ("REDIS_URL", "http://cache:6379", "scheme must be redis://"),
    ("REDIS_URL", "redis://cache:0/0", "bad port '0'"),
    ("REDIS_URL", "redis://cache:6379/db", "database must be a number"),
    ("REDIS_URL", "unix://", "needs a socket path"),
    ("HEARTBEAT_INTERVAL", "soon", "not a number"),
    ("HEARTBEAT_INTERVAL", "0", "must be a number of seconds > 0"),
    ("HEARTBEAT_INTERVAL", "-5", "must be a number of seconds > 0"),
    ("HEARTBEAT_INTERVAL", "nan", "must be a number of seconds > 0"),
    ("HEARTBEAT_TIMEOUT", "0", "must be a number of seconds > 0"),
    ("HEARTBEAT_TIMEOUT", "fast", "not a number"),
    ("HEARTBEAT_LOG_LEVEL", "LOUD", "must be one of DEBUG, INFO, WARNING, ERROR"),
    ("HEARTBEAT_BACKEND_IP", "10.0.0.300", "not an IP address"),
    ("HEARTBEAT_TABLE", "a.b.c", "must be table or schema.table"),
    ("HEARTBEAT_TABLE", 'x"y', "must be table or schema.table"),
    ("HEARTBEAT_TABLE", "beats%x", "no quotes or %"),
    ("HEARTBEAT_SPOOL_MAX_ROWS", "-1", "must be a whole number from 1 to"),
])
def test_each_bad_value_is_named(tmp_path: Path, name: str, value: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load({name: value}, cwd=tmp_path)
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(f"{name}: ")
    assert fragment in info.value.problems[0]


def test_all_problems_are_reported_together(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load({"HEARTBEAT_INTERVAL": "x", "HEARTBEAT_TIMEOUT": "-1", "REDIS_URL": "ftp://a"}, cwd=tmp_path)
    assert [p.split(":")[0] for p in info.value.problems] == ["REDIS_URL", "HEARTBEAT_INTERVAL", "HEARTBEAT_TIMEOUT"]


def test_fractional_interval_and_schema_table(tmp_path: Path) -> None:
    config = load({"HEARTBEAT_INTERVAL": "0.05", "HEARTBEAT_TABLE": "ops.beats", "HEARTBEAT_LOG_LEVEL": "debug"}, cwd=tmp_path)
    assert config.interval == 0.05
    assert config.table == ("ops", "beats")
    assert config.log_level == "DEBUG"


@pytest.mark.parametrize("url, masked", [
    (f"postgresql://app:{SECRET}@db:5432/app", "postgresql://app:***@db:5432/app"),
    (f"postgresql://app@db/app?sslmode=require&password={SECRET}", "postgresql://app@db/app?sslmode=require&password=***"),
    (f"redis://:{SECRET}@cache:6379/0", "redis://:***@cache:6379/0"),
    (f"rediss://default:{SECRET}@cache:6380/1", "rediss://default:***@cache:6380/1"),
    ("postgresql://db1:5432,db2:5433/app", "postgresql://db1:5432,db2:5433/app"),
])
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


# --- through the real command line ------------------------------------------------------------

def test_check_config_prints_masked_config(tmp_path: Path) -> None:
    env = clean_env(DATABASE_URL=f"postgresql://app:{SECRET}@db:5432/app", REDIS_URL=f"redis://:{SECRET}@cache:6379/0")
    result = cli(["check-config"], env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "DATABASE_URL=postgresql://app:***@db:5432/app" in result.stdout
    assert "REDIS_URL=redis://:***@cache:6379/0" in result.stdout
    assert SECRET not in result.stdout + result.stderr


@pytest.mark.parametrize("command", ["run", "once", "init-db", "check-config"])
def test_bad_config_is_one_line_and_78_for_every_command(tmp_path: Path, command: str) -> None:
    env = clean_env(DATABASE_URL=f"mysql://app:{SECRET}@db/app")
    result = cli([command], env, cwd=tmp_path)
    assert result.returncode == 78
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("heartbeatd: DATABASE_URL: scheme must be postgresql://")
    assert "Traceback" not in result.stderr
    assert SECRET not in result.stderr
    assert "mysql://app:***@db/app" in lines[0]


def test_env_file_flag_works_and_missing_file_is_78(tmp_path: Path) -> None:
    env_file = tmp_path / "custom.env"
    env_file.write_text("HEARTBEAT_INTERVAL=12.5\n")
    result = cli(["check-config", "--env-file", str(env_file)], clean_env(HEARTBEAT_INTERVAL="3"), cwd=tmp_path)
    assert result.returncode == 0
    assert "HEARTBEAT_INTERVAL=12.5" in result.stdout
    result = cli(["--env-file", str(tmp_path / "nope.env"), "check-config"], clean_env(), cwd=tmp_path)
    assert result.returncode == 78
    assert result.stderr.strip() == f"heartbeatd: --env-file {tmp_path / 'nope.env'}: cannot read it: no such file"


def test_dotenv_in_working_directory_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("HEARTBEAT_TABLE=ops.beats\n")
    result = cli(["check-config"], clean_env(), cwd=tmp_path)
    assert "HEARTBEAT_TABLE=ops.beats" in result.stdout


def test_version() -> None:
    result = cli(["--version"], clean_env())
    assert result.returncode == 0
    assert result.stdout.strip() == f"heartbeatd {__version__}"


def test_unknown_command_is_one_line_and_64(tmp_path: Path) -> None:
    result = cli(["launch"], clean_env(), cwd=tmp_path)
    assert result.returncode == 64
    assert len(result.stderr.splitlines()) == 1
    assert "invalid choice: 'launch'" in result.stderr


def test_unwritable_spool_directory_is_78(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    env = clean_env(HEARTBEAT_SPOOL_PATH=str(blocker / "sub" / "spool.db"), DATABASE_URL="postgresql://127.0.0.1:1/x",
                    REDIS_URL="redis://127.0.0.1:1/0")
    result = cli(["run"], env, cwd=tmp_path)
    assert result.returncode == 78
    assert result.stderr.strip().startswith("heartbeatd: HEARTBEAT_SPOOL_PATH: cannot create directory")
    assert "Traceback" not in result.stderr


def test_watchdog_shorter_than_worst_case_cycle_is_78(tmp_path: Path) -> None:
    env = clean_env(HEARTBEAT_TIMEOUT="5", WATCHDOG_USEC="20000000", HEARTBEAT_SPOOL_PATH=str(tmp_path / "s.db"))
    result = cli(["run"], env, cwd=tmp_path)
    assert result.returncode == 78
    line = result.stderr.strip()
    assert "HEARTBEAT_TIMEOUT=5" in line and "WATCHDOG_USEC=20000000" in line and "15s" in line


def test_help_says_commands_variables_defaults_statuses_and_env_file() -> None:
    result = cli(["--help"], clean_env())
    assert result.returncode == 0
    text = result.stdout
    for command in ("run", "once", "init-db", "check-config", "rejected"):
        assert f"\n  {command} " in text, command
    from heartbeatd.config import DEFAULTS
    for name in DEFAULTS:
        assert f"\n  {name} " in text, name
    assert "default: 30" in text and "default: postgresql://localhost:5432/postgres" in text
    assert "/etc/heartbeatd/heartbeatd.env" in text
    for status in ("64 bad arguments", "69 database unreachable", "70 internal error", "78 bad configuration"):
        assert status in text


def test_every_variable_is_documented_in_readme_man_page_and_env_file() -> None:
    from heartbeatd.config import DEFAULTS
    top = Path(__file__).resolve().parent.parent
    for doc in ("README.md", "packaging/heartbeatd.8", "packaging/heartbeatd.env"):
        text = (top / doc).read_text()
        missing = [name for name in DEFAULTS if name not in text]
        assert missing == [], (doc, missing)
