//! The fake worker provider of the runtime tests, and the start of a
//! control plane with it as its one provider.

use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock};

use async_trait::async_trait;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use hodei_core::engine::ProviderConfig;
use hodei_core::ids::{ProviderId, WorkerId};
use hodei_core::ports::{
    ProviderError, ProviderHealth, ProvisionedWorker, WorkerExit, WorkerLaunch, WorkerProvider,
};
use hodei_core::runtime::{ControlPlane, ProviderSetup, RuntimeConfig, Stores};
use tokio::sync::{mpsc, watch};

/// An agent a [`FakeProvider`] starts for a launch: it gets the control
/// plane and the launch, and runs on its own task.
pub type Agent = Box<dyn Fn(ControlPlane, WorkerLaunch) -> BoxFuture<'static, ()> + Send + Sync>;

/// What a [`FakeProvider`] does with each worker it is asked to create.
pub enum OnLaunch {
    /// Nothing: the worker never starts.
    Nothing,
    /// Hands the launch to the test, which plays the agent.
    HandOver(mpsc::UnboundedSender<WorkerLaunch>),
    /// Spawns the agent with the control plane [`start_control_plane`]
    /// gave the provider.
    Spawn(Agent),
}

/// A worker provider whose id and kind are the same name, that is always
/// healthy and reports no exits. It creates workers as its [`OnLaunch`]
/// says, answers `list` with its `fleet` (empty unless set), and records
/// every worker the control plane destroys (`destroyed`) and how often it
/// listed the fleet (`lists`).
pub struct FakeProvider {
    id: ProviderId,
    kind: &'static str,
    on_launch: OnLaunch,
    fleet: Vec<ProvisionedWorker>,
    /// The control plane the agents of [`OnLaunch::Spawn`] talk to; set
    /// by [`start_control_plane`].
    cp: OnceLock<ControlPlane>,
    /// Every worker destroyed, in order.
    pub destroyed: Mutex<Vec<WorkerId>>,
    /// How many times the fleet was listed.
    pub lists: watch::Sender<usize>,
}

impl FakeProvider {
    /// A provider named `kind`, of that kind, that starts no worker and
    /// has an empty fleet.
    pub fn new(kind: &'static str) -> Self {
        Self {
            id: ProviderId::new(kind),
            kind,
            on_launch: OnLaunch::Nothing,
            fleet: Vec::new(),
            cp: OnceLock::new(),
            destroyed: Mutex::new(Vec::new()),
            lists: watch::Sender::new(0),
        }
    }

    /// Hands every launch to the test through `launches`.
    pub fn handing_launches_to(mut self, launches: mpsc::UnboundedSender<WorkerLaunch>) -> Self {
        self.on_launch = OnLaunch::HandOver(launches);
        self
    }

    /// Runs `agent(control plane, launch)` on its own task for every
    /// launch (the control plane is the one [`start_control_plane`]
    /// started with this provider).
    pub fn spawning<F, Fut>(mut self, agent: F) -> Self
    where
        F: Fn(ControlPlane, WorkerLaunch) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.on_launch = OnLaunch::Spawn(Box::new(move |cp, launch| agent(cp, launch).boxed()));
        self
    }

    /// Answers `list` with `fleet`.
    pub fn with_fleet(mut self, fleet: Vec<ProvisionedWorker>) -> Self {
        self.fleet = fleet;
        self
    }
}

#[async_trait]
impl WorkerProvider for FakeProvider {
    fn id(&self) -> &ProviderId {
        &self.id
    }
    fn kind(&self) -> &'static str {
        self.kind
    }
    fn runs_images(&self) -> bool {
        false
    }
    async fn create(&self, launch: WorkerLaunch) -> Result<(), ProviderError> {
        match &self.on_launch {
            OnLaunch::Nothing => {}
            OnLaunch::HandOver(launches) => {
                let _ = launches.send(launch);
            }
            OnLaunch::Spawn(agent) => {
                let cp = self.cp.get().expect("control plane set").clone();
                tokio::spawn(agent(cp, launch));
            }
        }
        Ok(())
    }
    async fn destroy(&self, worker: WorkerId) -> Result<(), ProviderError> {
        self.destroyed.lock().unwrap().push(worker);
        Ok(())
    }
    async fn health(&self) -> ProviderHealth {
        ProviderHealth {
            healthy: true,
            message: "ok".into(),
        }
    }
    async fn list(&self) -> Result<Vec<ProvisionedWorker>, ProviderError> {
        let fleet = self.fleet.clone();
        self.lists.send_modify(|n| *n += 1);
        Ok(fleet)
    }
    fn exits(&self) -> BoxStream<'static, WorkerExit> {
        futures::stream::pending().boxed()
    }
}

/// Starts a control plane with `config` and `stores` whose one provider is
/// `provider`, of one-job workers, at most `max_workers` of them; then
/// gives the provider the control plane for the agents it spawns.
pub async fn start_control_plane(
    config: RuntimeConfig,
    stores: Stores,
    provider: Arc<FakeProvider>,
    max_workers: u32,
) -> ControlPlane {
    let setup = ProviderConfig::ephemeral(provider.kind, provider.kind, false, max_workers);
    start_control_plane_with(config, stores, provider, setup).await
}

/// [`start_control_plane`] with the provider configured by `setup`.
pub async fn start_control_plane_with(
    config: RuntimeConfig,
    stores: Stores,
    provider: Arc<FakeProvider>,
    setup: ProviderConfig,
) -> ControlPlane {
    let cp = ControlPlane::start(
        config,
        stores,
        vec![ProviderSetup {
            config: setup,
            provider: provider.clone(),
        }],
    )
    .await
    .unwrap();
    provider
        .cp
        .set(cp.clone())
        .unwrap_or_else(|_| panic!("the provider serves one control plane"));
    cp
}
