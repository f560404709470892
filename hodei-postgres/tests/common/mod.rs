//! Test databases: one fresh database per test, created from
//! `HODEI_TEST_DATABASE_URL` and dropped afterwards, so tests run in
//! parallel. Without the variable the tests print a notice and pass, except
//! under `CI=true`, where a missing database fails them.

#![allow(dead_code)]

use std::sync::Arc;

use hodei_postgres::{PgStore, PgStoreOptions, SecretKey, SecretKeySource};
use sqlx::{Connection, Executor, PgConnection};

/// The key the tests encrypt secrets with.
pub const TEST_KEY: [u8; 32] = [0x42; 32];

/// A database that is dropped with this guard.
pub struct TestDb {
    admin_url: String,
    name: String,
    /// URL of the test database.
    pub url: String,
}

fn in_ci() -> bool {
    matches!(
        std::env::var("CI").as_deref(),
        Ok("true" | "TRUE" | "True" | "1" | "yes")
    )
}

/// A fresh database, or `None` (with a notice) when no server is
/// configured outside CI.
pub async fn test_db() -> Option<TestDb> {
    let admin_url = match std::env::var("HODEI_TEST_DATABASE_URL") {
        Ok(url) if !url.trim().is_empty() => url,
        _ => {
            assert!(
                !in_ci(),
                "CI=true but HODEI_TEST_DATABASE_URL is unset: the PostgreSQL tests must run in CI \
                 (start a server with `scripts/pg start $(mktemp -d)`)"
            );
            skip_notice();
            return None;
        }
    };
    let name = format!("hodei_t_{}", uuid::Uuid::new_v4().simple());
    let mut admin = PgConnection::connect(&admin_url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to HODEI_TEST_DATABASE_URL: {e}"));
    admin
        .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .await
        .expect("create test database");
    admin.close().await.ok();
    let url = with_database(&admin_url, &name);
    Some(TestDb {
        admin_url,
        name,
        url,
    })
}

/// Says once per test binary, uncaptured (the harness captures `eprintln!`),
/// that the PostgreSQL tests are skipped.
fn skip_notice() {
    use std::io::Write;
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = writeln!(
            std::io::stderr(),
            "note: skipping PostgreSQL tests: HODEI_TEST_DATABASE_URL is unset \
             (start a server with `scripts/pg start $(mktemp -d)`)"
        );
    });
}

/// A store on a fresh database with the test key.
pub async fn store() -> Option<(Arc<PgStore>, TestDb)> {
    store_with(PgStoreOptions::default().with_secret_key(SecretKey::from_bytes(TEST_KEY))).await
}

/// A store on a fresh database.
pub async fn store_with(options: PgStoreOptions) -> Option<(Arc<PgStore>, TestDb)> {
    let db = test_db().await?;
    let store = PgStore::connect(&db.url, options).await.expect("connect");
    Some((Arc::new(store), db))
}

/// Options without a secret key.
pub fn no_key() -> PgStoreOptions {
    PgStoreOptions {
        secret_key: SecretKeySource::None,
        ..Default::default()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // Drop may run inside the test's runtime: use a thread of our own.
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let mut admin = PgConnection::connect(&admin_url).await?;
                admin
                    .execute(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .await?;
                admin.close().await
            })
        })
        .join();
        if let Ok(Err(e)) = dropped {
            eprintln!("could not drop test database {}: {e}", self.name);
        }
    }
}

/// `url` with its database replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}
