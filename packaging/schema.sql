-- heartbeatd: the table `heartbeatd init-db` creates (for HEARTBEAT_TABLE=service_heartbeat).
-- report_time: when the check ran, UTC; created_at: when the row was written, UTC.
-- Apply by hand with: psql "$DATABASE_URL" -f /usr/share/heartbeatd/schema.sql
CREATE TABLE IF NOT EXISTS service_heartbeat (
    id           bigserial PRIMARY KEY,
    service_name varchar(50) NOT NULL,
    ip_address   varchar(64) NOT NULL,
    report_time  timestamp   NOT NULL,
    created_at   timestamp   NOT NULL DEFAULT (now() AT TIME ZONE 'utc')
);
CREATE INDEX IF NOT EXISTS service_heartbeat_service_name_report_time_idx ON service_heartbeat (service_name, report_time);
-- What `heartbeatd status` and `report` read by (init-db builds it CONCURRENTLY on a table with rows):
CREATE INDEX IF NOT EXISTS service_heartbeat_service_ip_time_idx ON service_heartbeat (service_name, ip_address, report_time);
