-- Service readiness incidents (docs/alerts.md): the fleet-health flow checks the
-- readiness URLs of the services (by default those `camfleet up` started) and opens a
-- row when one stops answering, resolving it when it answers again. As for devices
-- (0130), the partial unique index makes "one open incident per service" a database
-- fact: a service down for an hour is one "not ready" and one "ready", not sixty.

CREATE TABLE service_alerts (
    alert_id     bigserial PRIMARY KEY,
    service      text NOT NULL,
    opened_at    timestamptz NOT NULL DEFAULT now(),
    resolved_at  timestamptz,
    details      jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE UNIQUE INDEX service_alerts_open_uniq ON service_alerts (service) WHERE resolved_at IS NULL;
