-- Rate limits shared by all replicas as GCRA: one row per limit holding its theoretical arrival
-- time (TAT, epoch microseconds of the database clock). A request conforms when
-- GREATEST(tat, now) - now <= tolerance; it then moves tat to GREATEST(tat, now) + interval.
-- Replaces the token bucket `rate_buckets`, which admitted up to twice its capacity in one
-- minute (a full bucket plus a minute of refill). `rate_buckets` is left in place for replicas
-- of the previous version during a rolling update; nothing reads it any more.
CREATE TABLE rate_limits (
    name text PRIMARY KEY,
    tat_us bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
