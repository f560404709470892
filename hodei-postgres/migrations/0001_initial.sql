-- Hodei schema, version 1.
--
-- Timestamps are `timestamptz` (microsecond precision). Counters that are
-- `u64` in Rust are `bigint` here. Full documents that the domain owns
-- (job spec, job status, attempt history, worker record) are `jsonb`; the
-- columns next to them exist for querying and for the queue.

-- Jobs, and the queue: a job is queued while `state = 'PENDING'`.
CREATE SEQUENCE job_queue_order AS bigint;

CREATE TABLE jobs (
    id               uuid PRIMARY KEY,
    spec             jsonb       NOT NULL,
    status           jsonb       NOT NULL,
    attempts         jsonb       NOT NULL DEFAULT '[]',
    state            text        NOT NULL,
    priority         integer     NOT NULL,
    not_before       timestamptz,
    deadline         timestamptz,
    attempt          integer     NOT NULL,
    version          bigint      NOT NULL,
    correlation_id   text        NOT NULL,
    submitted_by     text        NOT NULL,
    idempotency_key  text UNIQUE,
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL,
    -- FIFO position within a priority; renewed when the job re-enters the
    -- queue, NULL outside PENDING.
    queue_order      bigint,
    -- Claim: which replica holds the pending job, and until when.
    claim_owner      text,
    claim_until      timestamptz
);

CREATE INDEX jobs_queue_idx ON jobs (priority DESC, queue_order) WHERE state = 'PENDING';
CREATE INDEX jobs_not_before_idx ON jobs (not_before) WHERE state = 'PENDING';
CREATE INDEX jobs_deadline_idx ON jobs (deadline)
    WHERE state IN ('SCHEDULED', 'ASSIGNED', 'RUNNING');
CREATE INDEX jobs_created_idx ON jobs (created_at DESC, id DESC);
CREATE INDEX jobs_state_created_idx ON jobs (state, created_at DESC, id DESC);

-- The event log: audit trail and outbox of the event bus. `sequence` is
-- allocated with CACHE 1 (the default) on purpose: the subscription's safe
-- horizon relies on `pg_sequence_last_value` being an upper bound of every
-- value handed out. `xid` is the writing transaction, kept for diagnosis.
CREATE TABLE events (
    sequence        bigserial PRIMARY KEY,
    event_id        uuid        NOT NULL UNIQUE,
    event_type      text        NOT NULL,
    aggregate_type  text        NOT NULL,
    aggregate_id    text        NOT NULL,
    correlation_id  text        NOT NULL,
    actor           text        NOT NULL,
    occurred_at     timestamptz NOT NULL,
    job_id          uuid,
    payload         jsonb       NOT NULL,
    xid             xid8        NOT NULL DEFAULT pg_current_xact_id()
);

CREATE INDEX events_correlation_idx ON events (correlation_id, sequence);
CREATE INDEX events_type_idx ON events (event_type, sequence);
CREATE INDEX events_actor_idx ON events (actor, sequence);
CREATE INDEX events_occurred_idx ON events (occurred_at);
CREATE INDEX events_job_idx ON events (job_id, sequence) WHERE job_id IS NOT NULL;

-- Job output. One row per appended batch: lines `first_seq..=last_seq` of
-- the job, all of one attempt, as a JSON array. `log_heads` holds the last
-- sequence per job (its row lock serialises appends, so sequences have no
-- gaps and commit in order) and whether the log is finished.
CREATE TABLE log_heads (
    job_id    uuid PRIMARY KEY,
    last_seq  bigint  NOT NULL DEFAULT 0,
    finished  boolean NOT NULL DEFAULT false
);

CREATE TABLE log_chunks (
    job_id       uuid    NOT NULL,
    first_seq    bigint  NOT NULL,
    last_seq     bigint  NOT NULL,
    attempt      integer NOT NULL,
    agent_first  bigint  NOT NULL,
    agent_last   bigint  NOT NULL,
    lines        jsonb   NOT NULL,
    PRIMARY KEY (job_id, first_seq)
);

CREATE INDEX log_chunks_last_idx ON log_chunks (job_id, last_seq);
CREATE INDEX log_chunks_agent_idx ON log_chunks (job_id, attempt, agent_last);

-- Secrets, AES-256-GCM encrypted; `key_id` is a fingerprint of the key
-- that encrypted the value (never the key).
CREATE TABLE secrets (
    name        text PRIMARY KEY,
    nonce       bytea       NOT NULL,
    ciphertext  bytea       NOT NULL,
    key_id      text        NOT NULL,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL
);

-- Workers and their one-time registration tokens (SHA-256 of the token).
CREATE TABLE workers (
    id          uuid PRIMARY KEY,
    state       text        NOT NULL,
    record      jsonb       NOT NULL,
    last_seen   timestamptz NOT NULL,
    created_at  timestamptz NOT NULL
);

CREATE TABLE worker_tokens (
    token_sha256  bytea PRIMARY KEY,
    worker_id     uuid        NOT NULL,
    expires_at    timestamptz NOT NULL,
    used_at       timestamptz
);

CREATE TABLE providers (
    id              text PRIMARY KEY,
    kind            text        NOT NULL,
    config          jsonb       NOT NULL,
    healthy         boolean     NOT NULL,
    health_message  text        NOT NULL,
    updated_at      timestamptz NOT NULL
);
