"""Backend IP detection across real network namespaces: two test hosts joined by a veth pair.

`app` runs heartbeatd, `db` runs PostgreSQL and Redis. All traffic stays inside namespaces this
test creates; nothing is sent to any address outside them.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from conftest import clean_env
from servers import PgServer, RedisServer


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class Hosts:
    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.app, self.db = f"hb-app-{tag}", f"hb-db-{tag}"
        net = random.randint(1, 250)
        self.app_ip, self.db_ip = f"10.250.{net}.2", f"10.250.{net}.1"
        ip("netns", "add", self.app)
        ip("netns", "add", self.db)
        ip("link", "add", f"hba{tag}", "netns", self.app, "type", "veth", "peer", "name", f"hbd{tag}", "netns", self.db)
        for ns, dev, addr in ((self.app, f"hba{tag}", self.app_ip), (self.db, f"hbd{tag}", self.db_ip)):
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", self.app, "route", "add", "default", "via", self.db_ip)

    def remove(self) -> None:
        for ns in (self.app, self.db):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    if os.geteuid() != 0:
        pytest.fail("network namespace tests need root (CI runs as root)")
    made = Hosts()
    yield made
    made.remove()


def once_in_app(hosts: Hosts, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", hosts.app, sys.executable, "-m", "heartbeatd", "once"],
                          env=clean_env(**env), cwd=tmp_path, capture_output=True, text=True, timeout=60)


def test_backend_ip_is_the_namespace_address_toward_postgres(hosts: Hosts, tmp_path: Path) -> None:
    pg = PgServer(host=hosts.db_ip, netns=hosts.db).start()
    redis = RedisServer(host=hosts.db_ip, netns=hosts.db).start()
    try:
        pg.sql("CREATE TABLE service_heartbeat (service_name varchar(50) NOT NULL, ip_address varchar(64) NOT NULL,"
               " report_time timestamp NOT NULL, created_at timestamp NOT NULL)")
        result = once_in_app(hosts, tmp_path, DATABASE_URL=pg.url(), REDIS_URL=redis.url())
        assert result.returncode == 0, result.stderr
        found = dict(pg.sql("SELECT service_name, ip_address FROM service_heartbeat"))
        assert found == {"后端": hosts.app_ip, "postgres": hosts.db_ip, "redis": hosts.db_ip}
    finally:
        redis.destroy()
        pg.destroy()


def test_backend_ip_falls_back_to_default_route_interface(hosts: Hosts, tmp_path: Path) -> None:
    # PostgreSQL on loopback says nothing about this host's address: the default route's does.
    result = once_in_app(hosts, tmp_path, DATABASE_URL="postgresql://127.0.0.1:1/x", REDIS_URL="redis://127.0.0.1:1/0")
    assert result.returncode == 1
    assert result.stdout.splitlines()[0].split("\t")[:3] == ["后端", "up", hosts.app_ip]


def test_backend_ip_is_loopback_without_any_route(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("network namespace tests need root (CI runs as root)")
    ns = f"hb-empty-{uuid.uuid4().hex[:6]}"
    ip("netns", "add", ns)
    try:
        result = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "heartbeatd", "once"],
                                env=clean_env(DATABASE_URL="postgresql://127.0.0.1:1/x", REDIS_URL="redis://127.0.0.1:1/0"),
                                cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert result.stdout.splitlines()[0].split("\t")[:3] == ["后端", "up", "127.0.0.1"]
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
