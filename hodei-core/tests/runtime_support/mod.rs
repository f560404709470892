//! Pieces shared by the runtime tests (`runtime_*.rs`): a worker link over
//! a channel, a job store that can hold writes back like a slow
//! database, and a fake worker provider with the start of a control plane
//! around it (`provider`).
#![allow(dead_code)] // each test file uses part of it

mod provider;

#[allow(unused_imports)] // used by some test files only
pub use provider::start_control_plane_with;
pub use provider::{FakeProvider, start_control_plane};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use hodei_core::event::DomainEvent;
use hodei_core::ids::JobId;
use hodei_core::job::Job;
use hodei_core::memory::MemoryStore;
use hodei_core::ports::{
    CreateAnswers, Created, JobFilter, JobPage, JobStore, JobUpdate, NewJob, StoreError, ToWorker,
    UpdateAnswers, WorkerLink,
};
use tokio::sync::{Notify, mpsc, watch};

/// A worker link that hands every message to the test.
pub struct ChanLink(pub mpsc::UnboundedSender<ToWorker>);

#[async_trait]
impl WorkerLink for ChanLink {
    async fn send(&self, message: ToWorker) -> Result<(), String> {
        self.0.send(message).map_err(|_| "closed".to_owned())
    }
}

/// The in-memory job store, with writes held back while a switch is on:
/// `hold_creates` holds job creations, `hold_endings` holds updates that
/// end a job. `held` fires each time a write starts waiting. With
/// `batching` on it says it batches updates and creations
/// (`JobStore::batches_updates`, `batches_creates`) and records the size of
/// each `update_many` call in `batches`, of each `create_many` call in
/// `create_batches`.
pub struct HeldJobs {
    pub inner: Arc<MemoryStore>,
    pub hold_creates: watch::Sender<bool>,
    pub hold_endings: watch::Sender<bool>,
    pub held: Notify,
    pub batching: AtomicBool,
    pub batches: Mutex<Vec<usize>>,
    pub create_batches: Mutex<Vec<usize>>,
}

impl HeldJobs {
    pub fn new(inner: Arc<MemoryStore>) -> Self {
        Self {
            inner,
            hold_creates: watch::Sender::new(false),
            hold_endings: watch::Sender::new(false),
            held: Notify::new(),
            batching: AtomicBool::new(false),
            batches: Mutex::new(Vec::new()),
            create_batches: Mutex::new(Vec::new()),
        }
    }

    async fn pass(&self, switch: &watch::Sender<bool>) {
        let mut hold = switch.subscribe();
        if *hold.borrow() {
            self.held.notify_one();
            let _ = hold.wait_for(|h| !*h).await;
        }
    }
}

#[async_trait]
impl JobStore for HeldJobs {
    async fn create(&self, job: &Job, events: Vec<DomainEvent>) -> Result<Created, StoreError> {
        self.pass(&self.hold_creates).await;
        self.inner.create(job, events).await
    }
    async fn update(
        &self,
        job: &Job,
        expected_version: u64,
        events: Vec<DomainEvent>,
    ) -> Result<Vec<DomainEvent>, StoreError> {
        if job.is_terminal() {
            self.pass(&self.hold_endings).await;
        }
        self.inner.update(job, expected_version, events).await
    }
    async fn get(&self, id: JobId) -> Result<Option<Job>, StoreError> {
        JobStore::get(&*self.inner, id).await
    }
    async fn list(&self, filter: &JobFilter) -> Result<JobPage, StoreError> {
        JobStore::list(&*self.inner, filter).await
    }
    fn batches_updates(&self) -> bool {
        self.batching.load(Ordering::SeqCst)
    }
    fn batches_creates(&self) -> bool {
        self.batching.load(Ordering::SeqCst)
    }
    async fn create_many(&self, jobs: Vec<NewJob>) -> Result<CreateAnswers, StoreError> {
        self.create_batches.lock().unwrap().push(jobs.len());
        self.pass(&self.hold_creates).await;
        let mut answers = Vec::with_capacity(jobs.len());
        for j in jobs {
            answers.push(self.inner.create(&j.job, j.events).await);
        }
        Ok(answers)
    }
    async fn update_many(&self, updates: Vec<JobUpdate>) -> Result<UpdateAnswers, StoreError> {
        self.batches.lock().unwrap().push(updates.len());
        if updates.iter().any(|u| u.job.is_terminal()) {
            self.pass(&self.hold_endings).await;
        }
        let mut answers = Vec::with_capacity(updates.len());
        for u in updates {
            assert!(u.workers.is_empty(), "this store does not save workers");
            answers.push(
                self.inner
                    .update(&u.job, u.expected_version, u.events)
                    .await,
            );
        }
        Ok(answers)
    }
}
