-- Failed authentications per source address, shared by every API process (a limit kept in
-- one process's memory is as many limits as there are processes). Counted in 10-second
-- buckets; only credentials presented and wrong count, and a right one is never refused.
CREATE TABLE auth_failures (
    source   text NOT NULL,
    bucket   timestamptz NOT NULL,
    failures integer NOT NULL,
    PRIMARY KEY (source, bucket)
);
CREATE INDEX auth_failures_bucket ON auth_failures (bucket);
