//! The store conformance suite (the same checks the in-memory store
//! passes) against PostgreSQL, one fresh database per check.

mod common;

hodei_core::store_conformance_tests!(common::store);
