-- Assembler replicas (issue 15, docs/mqtt-ingest.md "Several assemblers"): devices are
-- split into a fixed number of partitions (crc32(device id) mod P) and each partition
-- is leased by at most one live `camfleet assembler`.  A replica renews its leases
-- every second; a SIGKILLed replica's leases lapse after their TTL and the others
-- claim them (UPDATE ... WHERE lease_until < now(), FOR UPDATE SKIP LOCKED).  Times are
-- the database's clock, so replicas on different machines never compare their own.

CREATE TABLE assembler_partition_leases (
    partition    integer PRIMARY KEY CHECK (partition >= 0),
    owner        text,
    lease_until  timestamptz NOT NULL DEFAULT '-infinity',
    claimed_at   timestamptz
);

-- Live replicas, so that each takes its fair share (ceil(P / live)) and no more.
CREATE TABLE assembler_replicas (
    replica_id   text PRIMARY KEY,
    seen_until   timestamptz NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now()
);
