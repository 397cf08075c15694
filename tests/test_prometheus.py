"""The ledger's view for Prometheus (`status --format prometheus`) and the example alert rules, with Debian's promtool."""

from __future__ import annotations

import stat
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from conftest import clean_env, cli, db_url, init_table
from servers import PgServer, RedisServer, free_port
from test_textfile import promtool_check, samples, tool

TOP = Path(__file__).resolve().parent.parent
RULES = TOP / "packaging" / "heartbeatd.rules.yml"


def test_status_prometheus_has_every_pair_age_and_staleness(pg: PgServer, redis_server: RedisServer,
                                                            tmp_path: Path) -> None:
    init_table(pg)
    db = pg.dbname  # type: ignore[attr-defined]
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    pg.sql("INSERT INTO service_heartbeat (service_name, ip_address, report_time) VALUES "
           "('后端', '10.60.0.1', %s), ('后端', '10.60.0.2', %s), ('redis', '10.1.0.1', %s)",
           (now - timedelta(seconds=5), now - timedelta(hours=3), now - timedelta(seconds=5)), db=db)
    env = clean_env(DATABASE_URL=db_url(pg), REDIS_URL=redis_server.url())
    result = cli(["status", "--format", "prometheus"], env)
    assert result.returncode == 0, result.stderr  # a stale pair is in the metrics, not the exit status
    promtool_check(result.stdout)
    found = samples(result.stdout)
    assert found['heartbeatd_ledger_stale{service="后端",ip="10.60.0.1"}'] == 0
    assert found['heartbeatd_ledger_stale{service="后端",ip="10.60.0.2"}'] == 1
    assert 3 * 3600 - 5 < found['heartbeatd_ledger_heartbeat_age_seconds{service="后端",ip="10.60.0.2"}'] < 3 * 3600 + 60
    assert abs(found['heartbeatd_ledger_last_heartbeat_timestamp_seconds{service="redis",ip="10.1.0.1"}']
               - (time.time() - 5)) < 30
    assert found["heartbeatd_ledger_stale_after_seconds"] == 65
    assert abs(found["heartbeatd_ledger_query_timestamp_seconds"] - time.time()) < 30
    assert "# TYPE heartbeatd_ledger_stale gauge" in result.stdout

    # --output: written atomically, 0644; the database unreachable leaves the old file as it was.
    out = tmp_path / "heartbeatd-ledger.prom"
    assert cli(["status", "--format", "prometheus", "--output", str(out)], env).returncode == 0
    kept = out.read_text()
    assert stat.S_IMODE(out.stat().st_mode) == 0o644 and "heartbeatd_ledger_stale{" in kept
    gone = clean_env(DATABASE_URL=f"postgresql://postgres@127.0.0.1:{free_port()}/x", REDIS_URL=redis_server.url())
    result = cli(["status", "--format", "prometheus", "--output", str(out)], gone)
    assert result.returncode == 69 and "Connection refused" in result.stderr and "Traceback" not in result.stderr
    assert out.read_text() == kept and [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    result = cli(["status", "--output", str(out)], env)
    assert result.returncode == 64 and "--output goes with --format prometheus" in result.stderr


def test_the_example_alert_rules_load_and_fire(tmp_path: Path) -> None:
    checked = subprocess.run([tool("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert checked.returncode == 0 and "SUCCESS: 7 rules found" in checked.stdout, checked.stdout + checked.stderr
    (tmp_path / "rules.test.yml").write_text(f"""\
rule_files: [{RULES}]
evaluation_interval: 30s
tests:
  - interval: 30s
    input_series:
      - series: 'heartbeatd_ledger_stale{{service="后端",ip="10.60.0.2"}}'
        values: '0 0 1 1 1 1 1'
      - series: 'heartbeatd_up{{service="redis",ip="10.1.0.1",instance="h1"}}'
        values: '1 0 0 0 0 0 0 0'
      - series: 'heartbeatd_spool_rows{{where="disk",instance="h1"}}'
        values: '0+3x60'
      - series: 'heartbeatd_rejected_rows{{instance="h1"}}'
        values: '0 0 1'
      - series: 'heartbeatd_cycle_timestamp_seconds{{instance="h1"}}'
        values: '0x40'
      - series: 'heartbeatd_ledger_query_timestamp_seconds'
        values: '0x40'
      - series: 'heartbeatd_ledger_default_partition_rows'
        values: '0 0 2 2 2'
    alert_rule_test:
      - eval_time: 2m30s
        alertname: HeartbeatdHostStale
        exp_alerts:
          - exp_labels: {{severity: critical, service: 后端, ip: 10.60.0.2}}
            exp_annotations: {{summary: 'No fresh 后端 heartbeat from 10.60.0.2 in the table'}}
      - eval_time: 30s
        alertname: HeartbeatdHostStale
        exp_alerts: []
      - eval_time: 3m
        alertname: HeartbeatdServiceDown
        exp_alerts:
          - exp_labels: {{severity: critical, service: redis, ip: 10.1.0.1, instance: h1}}
            exp_annotations: {{summary: 'redis (10.1.0.1) is down, seen from h1'}}
      - eval_time: 1m
        alertname: HeartbeatdServiceDown
        exp_alerts: []
      - eval_time: 25m
        alertname: HeartbeatdSpoolGrowing
        exp_alerts:
          - exp_labels: {{severity: warning, instance: h1}}
            exp_annotations: {{summary: 'h1: heartbeats pile up in the local spool'}}
      - eval_time: 1m
        alertname: HeartbeatdRowsRejected
        exp_alerts:
          - exp_labels: {{severity: warning, instance: h1}}
            exp_annotations: {{summary: 'h1: the table refused rows (`heartbeatd rejected` lists them)'}}
      - eval_time: 6m
        alertname: HeartbeatdTextfileStale
        exp_alerts:
          - exp_labels: {{severity: warning, instance: h1}}
            exp_annotations: {{summary: 'h1: heartbeatd''s textfile is 6m 0s old'}}
      - eval_time: 4m
        alertname: HeartbeatdTextfileStale
        exp_alerts: []
      - eval_time: 6m
        alertname: HeartbeatdLedgerViewStale
        exp_alerts:
          - exp_labels: {{severity: warning}}
            exp_annotations: {{summary: "the ledger's view of heartbeatd is 6m 0s old"}}
      - eval_time: 1m
        alertname: HeartbeatdDefaultPartitionRows
        exp_alerts:
          - exp_labels: {{severity: warning}}
            exp_annotations: {{summary: "2 heartbeat row(s) in the table's DEFAULT partition: a partition is missing"}}
      - eval_time: 30s
        alertname: HeartbeatdDefaultPartitionRows
        exp_alerts: []
""")
    result = subprocess.run([tool("promtool"), "test", "rules", str(tmp_path / "rules.test.yml")],
                            capture_output=True, text=True)
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr
