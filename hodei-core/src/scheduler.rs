//! Scheduling: which worker takes a job, and which provider creates one
//! when none is free. Pure functions over snapshots.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::{JobId, ProviderId, WorkerId};
use crate::spec::JobSpec;
use crate::worker::Worker;

/// How a worker is chosen among those that can take a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerSelection {
    /// The first eligible worker in id order.
    FirstAvailable,
    /// The eligible worker with the fewest jobs.
    #[default]
    LeastLoaded,
    /// Eligible workers in turn.
    RoundRobin,
    /// The eligible worker with the most free slots.
    MostCapacity,
    /// The eligible worker sharing the most labels with the job.
    Affinity,
}

/// Whether `worker` may run `job` at all (state, capacity, reservation,
/// provider, image).
pub fn is_eligible(worker: &Worker, job: JobId, spec: &JobSpec) -> bool {
    worker.accepts(job)
        && spec.provider().is_none_or(|p| *p == worker.provider)
        && match spec.image() {
            Some(image) => worker.image.as_deref() == Some(image),
            None => true,
        }
}

/// Picks a worker for `job`. `cursor` is the round-robin position, kept by
/// the caller between calls.
pub fn select_worker<'a>(
    strategy: WorkerSelection,
    job: JobId,
    spec: &JobSpec,
    workers: impl IntoIterator<Item = &'a Worker>,
    cursor: &mut u64,
) -> Option<WorkerId> {
    // One pass, no allocation (placement is on the engine's hot path),
    // except round robin, which needs to count the eligible first. Ties
    // cannot happen: every key ends with the (unique) worker id.
    let mut reserved: Option<&Worker> = None;
    let mut pick: Option<&Worker> = None;
    let mut in_turn: Vec<&Worker> = Vec::new();
    for w in workers {
        if !is_eligible(w, job, spec) {
            continue;
        }
        // A worker provisioned for this very job always wins.
        if w.reserved_for == Some(job) && reserved.is_none() {
            reserved = Some(w);
        }
        pick = match (strategy, pick) {
            (WorkerSelection::RoundRobin, _) => {
                in_turn.push(w);
                None
            }
            (_, None) => Some(w),
            (WorkerSelection::FirstAvailable, Some(p)) => Some(p),
            (WorkerSelection::LeastLoaded, Some(p)) => {
                Some(if (w.jobs.len(), w.id) < (p.jobs.len(), p.id) {
                    w
                } else {
                    p
                })
            }
            (WorkerSelection::MostCapacity, Some(p)) => Some(
                if (w.free_slots(), std::cmp::Reverse(w.id))
                    >= (p.free_slots(), std::cmp::Reverse(p.id))
                {
                    w
                } else {
                    p
                },
            ),
            (WorkerSelection::Affinity, Some(p)) => {
                let a = |x: &Worker| (affinity(spec.labels(), &x.labels), std::cmp::Reverse(x.id));
                Some(if a(w) >= a(p) { w } else { p })
            }
        };
    }
    if let Some(w) = reserved {
        return Some(w.id);
    }
    if strategy == WorkerSelection::RoundRobin && !in_turn.is_empty() {
        let w = in_turn[(*cursor % in_turn.len() as u64) as usize];
        *cursor = cursor.wrapping_add(1);
        return Some(w.id);
    }
    pick.map(|w| w.id)
}

/// Number of the job's labels the worker carries with the same value.
pub fn affinity(job: &BTreeMap<String, String>, worker: &BTreeMap<String, String>) -> usize {
    job.iter()
        .filter(|(k, v)| worker.get(*k) == Some(*v))
        .count()
}

/// What the scheduler knows of a provider.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderSnapshot {
    /// Name.
    pub id: ProviderId,
    /// Passing its health checks.
    pub healthy: bool,
    /// Workers it has now (not terminated).
    pub workers: u32,
    /// Most workers it may have.
    pub max_workers: u32,
    /// Whether it runs images (docker, kubernetes).
    pub runs_images: bool,
}

impl ProviderSnapshot {
    /// Whether it can create one more worker now.
    pub fn has_capacity(&self) -> bool {
        self.healthy && self.workers < self.max_workers
    }
}

/// Why no provider was chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoProvider {
    /// The spec names a provider that is not configured (permanent).
    Unknown(String),
    /// The spec needs an image and the provider cannot run images
    /// (permanent).
    CannotRunImages(ProviderId),
    /// Candidates exist but none is healthy with room now (wait).
    Busy,
}

/// Chooses a provider for `spec`: the one it names if any, else the first
/// of `preference` (then the rest in name order) that is healthy, has
/// room and can run the spec's image.
pub fn select_provider(
    spec: &JobSpec,
    providers: &[ProviderSnapshot],
    preference: &[ProviderId],
) -> Result<ProviderId, NoProvider> {
    if let Some(wanted) = spec.provider() {
        let p = providers
            .iter()
            .find(|p| p.id == *wanted)
            .ok_or_else(|| NoProvider::Unknown(wanted.to_string()))?;
        if spec.image().is_some() && !p.runs_images {
            return Err(NoProvider::CannotRunImages(p.id.clone()));
        }
        return if p.has_capacity() {
            Ok(p.id.clone())
        } else {
            Err(NoProvider::Busy)
        };
    }
    let rank = |p: &ProviderSnapshot| {
        preference
            .iter()
            .position(|id| *id == p.id)
            .unwrap_or(usize::MAX)
    };
    let mut candidates: Vec<&ProviderSnapshot> = providers
        .iter()
        .filter(|p| spec.image().is_none() || p.runs_images)
        .collect();
    if candidates.is_empty() {
        return Err(match providers.first() {
            Some(p) => NoProvider::CannotRunImages(p.id.clone()),
            None => NoProvider::Unknown("(none configured)".into()),
        });
    }
    candidates.sort_by(|a, b| rank(a).cmp(&rank(b)).then(a.id.cmp(&b.id)));
    candidates
        .into_iter()
        .find(|p| p.has_capacity())
        .map(|p| p.id.clone())
        .ok_or(NoProvider::Busy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{RawJobSpec, SpecLimits};
    use crate::time::epoch;
    use crate::worker::WorkerState;

    fn spec(labels: &[(&str, &str)], provider: Option<&str>) -> JobSpec {
        JobSpec::parse(
            RawJobSpec {
                command: Some(vec!["true".into()]),
                labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                provider: provider.map(str::to_owned),
                ..Default::default()
            },
            &SpecLimits::default(),
        )
        .unwrap()
    }

    fn worker(n: u64, jobs: usize, capacity: u32, labels: &[(&str, &str)]) -> Worker {
        Worker {
            id: WorkerId::from_u64_pair(0, n),
            provider: ProviderId::new("local"),
            state: if jobs == 0 {
                WorkerState::Ready
            } else {
                WorkerState::Busy
            },
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            image: None,
            capacity,
            jobs: (0..jobs)
                .map(|i| JobId::from_u64_pair(9, i as u64))
                .collect(),
            ephemeral: false,
            reserved_for: None,
            connected: true,
            last_seen: epoch(),
            created_at: epoch(),
        }
    }

    const JOB: JobId = JobId::from_u64_pair(1, 1);

    #[test]
    fn strategies_pick_as_named() {
        let ws = [
            worker(1, 1, 4, &[]),
            worker(2, 0, 2, &[("team", "ci")]),
            worker(3, 0, 8, &[]),
        ];
        let s = spec(&[("team", "ci")], None);
        let mut c = 0;
        let id = |n| Some(WorkerId::from_u64_pair(0, n));
        assert_eq!(
            select_worker(WorkerSelection::FirstAvailable, JOB, &s, &ws, &mut c),
            id(1)
        );
        assert_eq!(
            select_worker(WorkerSelection::LeastLoaded, JOB, &s, &ws, &mut c),
            id(2)
        );
        assert_eq!(
            select_worker(WorkerSelection::MostCapacity, JOB, &s, &ws, &mut c),
            id(3)
        );
        assert_eq!(
            select_worker(WorkerSelection::Affinity, JOB, &s, &ws, &mut c),
            id(2)
        );
        let picks: Vec<_> = (0..3)
            .map(|_| select_worker(WorkerSelection::RoundRobin, JOB, &s, &ws, &mut c))
            .collect();
        assert_eq!(picks, vec![id(1), id(2), id(3)]);
    }

    #[test]
    fn full_disconnected_and_reserved_workers_are_skipped() {
        let mut full = worker(1, 1, 1, &[]);
        full.state = WorkerState::Busy;
        let mut gone = worker(2, 0, 1, &[]);
        gone.connected = false;
        let mut reserved = worker(3, 0, 1, &[]);
        reserved.reserved_for = Some(JobId::from_u64_pair(7, 7));
        let s = spec(&[], None);
        let mut c = 0;
        assert_eq!(
            select_worker(
                WorkerSelection::FirstAvailable,
                JOB,
                &s,
                &[full, gone, reserved.clone()],
                &mut c
            ),
            None
        );
        reserved.reserved_for = Some(JOB);
        assert_eq!(
            select_worker(
                WorkerSelection::FirstAvailable,
                JOB,
                &s,
                &[reserved],
                &mut c
            ),
            Some(WorkerId::from_u64_pair(0, 3))
        );
    }

    fn prov(id: &str, healthy: bool, workers: u32, max: u32) -> ProviderSnapshot {
        ProviderSnapshot {
            id: ProviderId::new(id),
            healthy,
            workers,
            max_workers: max,
            runs_images: id == "docker",
        }
    }

    #[test]
    fn provider_honours_spec_health_capacity_and_preference() {
        let ps = [prov("docker", true, 0, 4), prov("local", true, 0, 4)];
        let pref = [ProviderId::new("local")];
        assert_eq!(
            select_provider(&spec(&[], None), &ps, &pref),
            Ok(ProviderId::new("local"))
        );
        assert_eq!(
            select_provider(&spec(&[], Some("docker")), &ps, &pref),
            Ok(ProviderId::new("docker"))
        );
        assert_eq!(
            select_provider(&spec(&[], Some("k8s")), &ps, &pref),
            Err(NoProvider::Unknown("k8s".into()))
        );
        let ps = [prov("docker", true, 0, 4), prov("local", false, 0, 4)];
        assert_eq!(
            select_provider(&spec(&[], None), &ps, &pref),
            Ok(ProviderId::new("docker"))
        );
        let ps = [prov("docker", true, 4, 4), prov("local", false, 0, 4)];
        assert_eq!(
            select_provider(&spec(&[], None), &ps, &pref),
            Err(NoProvider::Busy)
        );
    }
}
