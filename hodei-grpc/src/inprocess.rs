//! [`InProcessProvider`]: a worker provider whose workers are agents
//! running as tokio tasks inside the server process
//! ([`crate::agent::spawn`]).
//!
//! It needs no `hodei-worker` binary, which makes it the provider of
//! embedded control planes and of the quick start. The agents still talk
//! to the server over gRPC (the launch's server URL) and still run each job
//! as a separate process group, so the server sees them exactly like any
//! other worker. What it does not give is isolation between the agents
//! and the server: a crash of one is a crash of both. Its kind is `local`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use hodei_core::ids::{ProviderId, WorkerId};
use hodei_core::ports::{
    ProviderError, ProviderHealth, ProvisionedWorker, WorkerExit, WorkerLaunch, WorkerProvider,
};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::agent::{self, AgentConfig, AgentExit};

/// Adjusts the configuration of every agent before it starts.
pub type ConfigureAgent = Arc<dyn Fn(&mut AgentConfig) + Send + Sync>;

/// How long [`WorkerProvider::destroy`] waits for a killed agent.
const DESTROY_WAIT: Duration = Duration::from_secs(15);
/// How often an agent task is checked for its end.
const EXIT_POLL: Duration = Duration::from_millis(100);

/// Starts workers as in-process agents. See the [module docs](self).
pub struct InProcessProvider {
    id: ProviderId,
    agents: Arc<Mutex<HashMap<WorkerId, Agent>>>,
    exits_tx: mpsc::UnboundedSender<WorkerExit>,
    exits_rx: Mutex<Option<mpsc::UnboundedReceiver<WorkerExit>>>,
    configure: Option<ConfigureAgent>,
}

struct Agent {
    /// The server that created it.
    server_id: String,
    /// Asks the watcher to kill the agent; it answers once it is gone.
    kill: Option<oneshot::Sender<oneshot::Sender<()>>>,
}

impl std::fmt::Debug for InProcessProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcessProvider")
            .field("id", &self.id)
            .field("agents", &lock(&self.agents).len())
            .finish()
    }
}

impl InProcessProvider {
    /// A provider named `id`.
    pub fn new(id: impl Into<ProviderId>) -> Self {
        let (exits_tx, exits_rx) = mpsc::unbounded_channel();
        Self {
            id: id.into(),
            agents: Arc::new(Mutex::new(HashMap::new())),
            exits_tx,
            exits_rx: Mutex::new(Some(exits_rx)),
            configure: None,
        }
    }

    /// Adjusts every agent's configuration (capacity, drain grace, ...)
    /// before it starts.
    pub fn with_agent_config(mut self, configure: ConfigureAgent) -> Self {
        self.configure = Some(configure);
        self
    }

    /// Agents currently running.
    pub fn running(&self) -> usize {
        lock(&self.agents).len()
    }
}

impl Drop for InProcessProvider {
    fn drop(&mut self) {
        // Agents must not outlive the control plane that owns them.
        for (_, mut agent) in lock(&self.agents).drain() {
            if let Some(kill) = agent.kill.take() {
                let (tx, _rx) = oneshot::channel();
                let _ = kill.send(tx);
            }
        }
    }
}

#[async_trait]
impl WorkerProvider for InProcessProvider {
    fn id(&self) -> &ProviderId {
        &self.id
    }

    fn kind(&self) -> &'static str {
        "local"
    }

    fn runs_images(&self) -> bool {
        false
    }

    async fn create(&self, launch: WorkerLaunch) -> Result<(), ProviderError> {
        let worker = launch.worker;
        if lock(&self.agents).contains_key(&worker) {
            return Err(ProviderError::CreateFailed(format!(
                "worker {worker} already exists"
            )));
        }
        let mut config = AgentConfig::new(launch.server_url.clone(), launch.token.clone());
        config.worker_id = *worker.as_uuid();
        config.provider = self.id.to_string();
        config.labels = launch.labels.clone();
        config.image = launch.image.clone();
        config.capacity = launch.capacity.max(1);
        if let Some(configure) = &self.configure {
            configure(&mut config);
        }
        config
            .validate()
            .map_err(|e| ProviderError::CreateFailed(e.to_string()))?;

        let (kill_tx, mut kill_rx) = oneshot::channel::<oneshot::Sender<()>>();
        lock(&self.agents).insert(
            worker,
            Agent {
                server_id: launch.server_id.clone(),
                kill: Some(kill_tx),
            },
        );
        let mut handle = agent::spawn(config);
        let agents = self.agents.clone();
        let exits = self.exits_tx.clone();
        tokio::spawn(async move {
            let mut done_tx = None;
            let mut tick = tokio::time::interval(EXIT_POLL);
            loop {
                tokio::select! {
                    asked = &mut kill_rx, if done_tx.is_none() => {
                        match asked {
                            Ok(done) => {
                                handle.kill();
                                done_tx = Some(done);
                            }
                            // The provider is gone without asking: the
                            // agent keeps running until it ends itself.
                            Err(_) => done_tx = None,
                        }
                    }
                    _ = tick.tick() => {
                        if handle.is_finished() {
                            break;
                        }
                    }
                }
            }
            let reason = match handle.wait().await {
                Ok(AgentExit::Clean) => "agent exited cleanly".to_owned(),
                Ok(AgentExit::Forced) => "agent exited after cancelling its job".to_owned(),
                Err(e) => format!("agent failed: {e}"),
            };
            lock(&agents).remove(&worker);
            let _ = exits.send(WorkerExit {
                worker,
                reason,
                oom_killed: false,
            });
            if let Some(done) = done_tx {
                let _ = done.send(());
            }
        });
        Ok(())
    }

    async fn destroy(&self, worker: WorkerId) -> Result<(), ProviderError> {
        let kill = lock(&self.agents)
            .get_mut(&worker)
            .and_then(|a| a.kill.take());
        let Some(kill) = kill else {
            return Ok(());
        };
        let (done_tx, done_rx) = oneshot::channel();
        if kill.send(done_tx).is_err() {
            return Ok(());
        }
        match tokio::time::timeout(DESTROY_WAIT, done_rx).await {
            Ok(_) => Ok(()),
            Err(_) => Err(ProviderError::Other(format!(
                "agent {worker} did not stop within {}s",
                DESTROY_WAIT.as_secs()
            ))),
        }
    }

    async fn health(&self) -> ProviderHealth {
        ProviderHealth {
            healthy: true,
            message: format!("{} in-process agent(s)", self.running()),
        }
    }

    async fn list(&self) -> Result<Vec<ProvisionedWorker>, ProviderError> {
        Ok(lock(&self.agents)
            .iter()
            .map(|(w, a)| ProvisionedWorker {
                worker: *w,
                server_id: a.server_id.clone(),
                alive: true,
            })
            .collect())
    }

    fn exits(&self) -> BoxStream<'static, WorkerExit> {
        match lock(&self.exits_rx).take() {
            Some(rx) => UnboundedReceiverStream::new(rx).boxed(),
            None => futures::stream::empty().boxed(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock leaves a map that is still valid.
    m.lock().unwrap_or_else(|e| e.into_inner())
}
