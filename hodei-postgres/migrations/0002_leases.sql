-- Hodei schema, version 2: leases on singleton duties (deadline sweep,
-- retention, removal of a server's leftover workers). One row per duty:
-- who holds it and until when. A holder renews by acquiring again; once
-- `expires_at` has passed, any replica may take the duty over.
CREATE TABLE leases (
    duty        text PRIMARY KEY,
    holder      text        NOT NULL,
    expires_at  timestamptz NOT NULL,
    -- When the current holder took it (kept across renewals), for diagnosis.
    acquired_at timestamptz NOT NULL
);
