//! Time as data. The core never reads a clock: every function that needs
//! the time takes a [`Timestamp`] argument.

use std::time::Duration;

/// A point in time, UTC. Callers pass it in; the core never reads a clock.
pub type Timestamp = chrono::DateTime<chrono::Utc>;

/// `t + d`, saturating at the end of representable time.
pub fn add(t: Timestamp, d: Duration) -> Timestamp {
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| t.checked_add_signed(d))
        .unwrap_or(chrono::DateTime::<chrono::Utc>::MAX_UTC)
}

/// The Unix epoch, the origin of virtual time in simulations.
pub fn epoch() -> Timestamp {
    chrono::DateTime::<chrono::Utc>::UNIX_EPOCH
}

/// Milliseconds after the epoch, for simulations and tests.
pub fn from_millis(ms: i64) -> Timestamp {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms).unwrap_or_else(epoch)
}
