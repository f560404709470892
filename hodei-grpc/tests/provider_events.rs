//! Providers come from the server's TOML config and are recorded on its
//! database (issue 5): a real `hodei-server` on PostgreSQL, checked with
//! the `hodei` CLI.
//!
//! - First start: `hodei provider list` shows the configured provider with
//!   its settings, and the audit trail holds one `ProviderRegistered` for
//!   it (kind and config in the payload, actor `system:config`).
//! - Restart on the same database with the same config: nothing new is
//!   recorded.
//! - Restart with a changed `max_workers`: one `ProviderUpdated` with the
//!   new config, and `provider list` shows the new value.
//!
//! The database is what carries the provider across restarts, so this
//! needs `HODEI_TEST_DATABASE_URL`; without it the test prints a notice and
//! passes, except under `CI=true`, where it fails.

mod e2e_support;
mod pg_support;

use std::process::{Command, Stdio};

use e2e_support::{CLI_BIN, stderr, stdout};
use pg_support::*;
use serde_json::Value;

fn config(server_id: &str, state_dir: &std::path::Path, max_workers: u32) -> String {
    format!(
        r#"server_id = "{server_id}"

[[providers]]
kind = "local"
name = "builders"
state_dir = "{state}"
max_workers = {max_workers}
warm_pool = 0
"#,
        state = state_dir.display()
    )
}

/// `hodei --output json ARGS` against the replica; its JSON output.
fn cli_json(replica: &Replica, args: &[&str]) -> Value {
    let out = Command::new(CLI_BIN)
        .args(["--output", "json"])
        .args(args)
        .env("HODEI_SERVER", replica.spec.url())
        .env_remove("HODEI_TOKEN")
        .stdin(Stdio::null())
        .output()
        .expect("run hodei");
    assert!(
        out.status.success(),
        "hodei {args:?} failed ({}): {}\nserver log:\n{}",
        out.status,
        stderr(&out),
        tail(&replica.log(), 40)
    );
    serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("hodei {args:?}: not JSON ({e}): {}", stdout(&out)))
}

/// The provider named `name` in `hodei provider list`.
fn listed(replica: &Replica, name: &str) -> Value {
    let v = cli_json(replica, &["provider", "list"]);
    let providers = v["providers"].as_array().expect("providers array");
    providers
        .iter()
        .find(|p| p["id"] == name)
        .unwrap_or_else(|| panic!("provider {name} not listed: {v}"))
        .clone()
}

/// The `event_type` events of provider `name` in the audit trail.
fn audited(replica: &Replica, event_type: &str, name: &str) -> Vec<Value> {
    let v = cli_json(
        replica,
        &["audit", "--event-type", event_type, "--limit", "100"],
    );
    v["events"]
        .as_array()
        .expect("events array")
        .iter()
        .filter(|e| {
            assert_eq!(e["event_type"], event_type, "the filter holds: {e}");
            e["aggregate_id"] == name
        })
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_providers_are_registered_then_updated_across_restarts() {
    let Some(db) = test_db().await else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    let mut spec = ReplicaSpec {
        server_id: "providers".into(),
        database_url: db.url.clone(),
        port: free_port(),
        dir: dir.path().join("server"),
        toml: String::new(),
    };
    spec.toml = config(&spec.server_id, &spec.state_dir(), 3);

    // First start: registered.
    let mut server = Replica::start(&spec);
    let p = listed(&server, "builders");
    assert_eq!(p["kind"], "local", "{p}");
    assert_eq!(p["config"]["max_workers"], 3, "{p}");
    let registered = audited(&server, "ProviderRegistered", "builders");
    assert_eq!(registered.len(), 1, "{registered:?}");
    let e = &registered[0];
    assert_eq!(e["aggregate_type"], "provider", "{e}");
    assert_eq!(e["actor"], "system:config", "{e}");
    assert_eq!(e["payload"]["provider"], "builders", "{e}");
    assert_eq!(e["payload"]["kind"], "local", "{e}");
    assert_eq!(e["payload"]["config"]["max_workers"], 3, "{e}");
    assert!(audited(&server, "ProviderUpdated", "builders").is_empty());
    server.stop();

    // Same config again: nothing to record.
    let mut server = Replica::start(&spec);
    assert_eq!(listed(&server, "builders")["config"]["max_workers"], 3);
    assert_eq!(
        audited(&server, "ProviderRegistered", "builders").len(),
        1,
        "registered once, not at every start"
    );
    assert!(
        audited(&server, "ProviderUpdated", "builders").is_empty(),
        "an unchanged config is no update"
    );
    server.stop();

    // A changed max_workers: updated.
    spec.toml = config(&spec.server_id, &spec.state_dir(), 5);
    let server = Replica::start(&spec);
    let p = listed(&server, "builders");
    assert_eq!(p["config"]["max_workers"], 5, "{p}");
    let updated = audited(&server, "ProviderUpdated", "builders");
    assert_eq!(updated.len(), 1, "{updated:?}");
    let e = &updated[0];
    assert_eq!(e["aggregate_type"], "provider", "{e}");
    assert_eq!(e["actor"], "system:config", "{e}");
    assert_eq!(e["payload"]["provider"], "builders", "{e}");
    assert_eq!(e["payload"]["config"]["max_workers"], 5, "{e}");
    assert_eq!(
        audited(&server, "ProviderRegistered", "builders").len(),
        1,
        "still registered once"
    );
    // The update comes after the registration in the trail.
    let seq = |e: &Value| e["sequence"].as_u64().expect("sequence");
    assert!(seq(e) > seq(&registered[0]));
    drop(server);
}
