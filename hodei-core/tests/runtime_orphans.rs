//! Orphan reconciliation through the control plane: a server removes its
//! own leftover workers, and adopts those of a server that is gone (its
//! orphan lease is free and the worker's record is in this deployment's
//! registry), but never those of a live server or of another deployment
//! sharing the provider.
#![cfg(feature = "runtime")]

mod runtime_support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use hodei_core::ids::{ProviderId, WorkerId};
use hodei_core::memory::MemoryStore;
use hodei_core::ports::{Leases, ProvisionedWorker, WorkerRegistry};
use hodei_core::runtime::{RuntimeConfig, Stores, now_utc, orphan_duty};
use hodei_core::worker::{Worker, WorkerState};
use runtime_support::{FakeProvider, start_control_plane};

fn leftover(worker: WorkerId, server: &str) -> ProvisionedWorker {
    ProvisionedWorker {
        worker,
        server_id: server.into(),
        alive: true,
    }
}

fn record(id: WorkerId) -> Worker {
    Worker {
        id,
        provider: ProviderId::new("docker"),
        state: WorkerState::Busy,
        labels: BTreeMap::new(),
        image: None,
        capacity: 1,
        jobs: Vec::new(),
        ephemeral: true,
        reserved_for: None,
        connected: true,
        last_seen: now_utc(),
        created_at: now_utc(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leftovers_of_a_server_that_is_gone_are_adopted_and_of_a_live_one_kept() {
    let mem = Arc::new(MemoryStore::new());
    let gone = WorkerId::from_u64_pair(1, 1); // server "srv-a", not running
    let live = WorkerId::from_u64_pair(1, 2); // server "srv-c", holds its lease
    let foreign = WorkerId::from_u64_pair(1, 3); // "srv-a" too, not in our registry
    let own = WorkerId::from_u64_pair(1, 4); // this server's leftover
    for w in [gone, live, own] {
        WorkerRegistry::upsert(&*mem, &record(w)).await.unwrap();
    }
    assert!(
        Leases::try_acquire(
            &*mem,
            &orphan_duty("srv-c"),
            "replica-c",
            Duration::from_secs(3600),
            now_utc()
        )
        .await
        .unwrap()
    );
    let provider = Arc::new(FakeProvider::new("docker").with_fleet(vec![
        leftover(gone, "srv-a"),
        leftover(live, "srv-c"),
        leftover(foreign, "srv-a"),
        leftover(own, "srv-b"),
    ]));
    let mut config = RuntimeConfig {
        server_id: "srv-b".into(),
        reconcile_interval: Duration::from_millis(50),
        ..RuntimeConfig::default()
    };
    config.engine.replica_id = "replica-b".into();
    config.engine.reconnect_grace = Duration::from_millis(10);
    let cp =
        start_control_plane(config, Stores::from_store(mem.clone()), provider.clone(), 4).await;

    // Three reconciliations after the first: enough for every decision.
    let mut lists = provider.lists.subscribe();
    tokio::time::timeout(Duration::from_secs(30), lists.wait_for(|n| *n >= 4))
        .await
        .expect("the provider is listed periodically")
        .unwrap();
    let destroyed = |w: WorkerId| provider.destroyed.lock().unwrap().contains(&w);
    // The removals run on their own tasks: poll for them.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !(destroyed(gone) && destroyed(own)) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "leftovers not removed: {:?}",
            provider.destroyed.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!destroyed(live), "a live server's worker was removed");
    assert!(
        !destroyed(foreign),
        "a worker unknown to this deployment's registry was removed"
    );
    cp.shutdown().await;

    // The gone server's lease was only borrowed: free again, so that
    // server takes its duty back as soon as it returns.
    assert!(
        Leases::try_acquire(
            &*mem,
            &orphan_duty("srv-a"),
            "replica-a",
            Duration::from_secs(60),
            now_utc()
        )
        .await
        .unwrap(),
        "the adopted server's orphan lease was given back"
    );
}
