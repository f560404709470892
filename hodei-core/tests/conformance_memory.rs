//! The store conformance suite against the in-memory store.

#![cfg(feature = "runtime")]

use std::sync::Arc;

use hodei_core::memory::MemoryStore;

async fn fixture() -> Option<(Arc<MemoryStore>, ())> {
    Some((Arc::new(MemoryStore::new()), ()))
}

hodei_core::store_conformance_tests!(fixture);
