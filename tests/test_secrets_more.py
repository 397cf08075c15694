"""Secrets hidden however they are written: an option name percent-encoded, a key=value string, a NUL byte."""

from __future__ import annotations

from conftest import cli, clean_env


def test_a_percent_encoded_password_option_is_masked() -> None:
    # libpq decodes a URI query's keywords: ?%70assword=X is password=X (psycopg2's parse_dsn says so).
    done = cli(["check-config"], clean_env(DATABASE_URL="postgresql://u@h/db?%70assword=TOPSECRET"))
    assert "TOPSECRET" not in done.stdout + done.stderr, done.stdout
    assert done.returncode == 0 and "%70assword=***" in done.stdout, done.stdout


def test_a_key_value_dsn_refused_does_not_echo_its_password() -> None:
    done = cli(["check-config"], clean_env(DATABASE_URL="host=db user=u password=TOPSECRET"))
    assert done.returncode == 78 and "got no scheme" in done.stderr, done.stderr
    assert "TOPSECRET" not in done.stdout + done.stderr, done.stderr


def test_a_nul_byte_in_an_env_file_password_is_refused_without_showing_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # libpq (and parse_dsn) read a C string: `postgresql://u:PW` then the port is "PW", shown unmasked.
    env_file = tmp_path / "hb.env"
    env_file.write_bytes(b"DATABASE_URL=postgresql://u:TOPSECRET\x00X@h/db\n")
    done = cli(["check-config", "--env-file", str(env_file)], clean_env())
    assert "TOPSECRET" not in done.stdout + done.stderr, done.stderr
    assert done.returncode == 78 and f"{env_file}, line 1: holds a NUL byte" in done.stderr, done.stderr
