//! The queue of messages for the server that must survive reconnects.
//!
//! Jobs push log batches and results into the [`Outbox`]; the session's
//! request stream ([`SessionStream`]) pops them only when tonic polls it, so
//! whatever was not yet handed to a stream when a connection dies is still
//! queued and goes out on the next session. The queue is bounded: a full
//! outbox makes [`Outbox::push`] wait, which stops the job's log batcher,
//! which stops reading the job's pipes, which blocks the job's writes.
//!
//! A result handed to a stream is kept until the server acknowledges it
//! (`ResultAck`): a connection that dies takes with it what it had not
//! delivered yet, so results not acknowledged when a session starts are
//! sent again on it, first (the server ignores a result for an attempt it
//! already decided). At most [`UNACKED_LIMIT`] are kept (a server that
//! never acknowledges, from before `ResultAck`, must not grow it forever).
//!
//! Log batches handed to a stream are kept too, until their attempt's
//! result is acknowledged (the newest [`SENT_LOG_BYTES`] of them): the
//! batches a dying connection took without delivering are sent again on
//! the next session, ahead of the unacknowledged results (so an attempt's
//! lines still come before its result). The server ignores lines it
//! already stored (they are keyed by the agent's sequence numbers), so a
//! reconnect loses no line and duplicates none.
//!
//! The outbox also tracks the attempts the server has not acknowledged a
//! result for yet, and the highest log sequence handed to a stream for
//! each, which is what `Hello.running` reports on reconnect.

use std::collections::{BTreeMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use futures::Stream;
use tokio::sync::{Notify, Semaphore, mpsc};

use crate::proto::worker_message::Kind;
use crate::proto::{RunningAttempt, WorkerMessage};

/// Identifies one attempt of one job.
pub(crate) type AttemptKey = (String, u32);

/// Most results kept for a resend while unacknowledged.
pub(crate) const UNACKED_LIMIT: usize = 256;

/// Most memory (line text plus [`LINE_OVERHEAD`] a line) kept in log
/// batches for a resend: about 32,000 lines of 100 bytes (3 MB of text),
/// more than a connection holds undelivered (HTTP/2 windows and socket
/// buffers).
pub(crate) const SENT_LOG_BYTES: usize = 6 << 20;

/// What a kept line costs besides its text (the line's struct, its
/// string's header and allocation).
const LINE_OVERHEAD: usize = 96;

/// Bounded FIFO of messages for the server, shared by jobs and sessions.
pub(crate) struct Outbox {
    state: Mutex<State>,
    /// One permit per free slot.
    slots: Semaphore,
    /// Signalled whenever the queue becomes empty.
    emptied: Notify,
}

struct State {
    queue: VecDeque<WorkerMessage>,
    /// Generation of the session allowed to pop; bumped at every session
    /// start and end so a stale stream never takes messages.
    generation: u64,
    /// Waker of the current session's stream, waiting for a message.
    waker: Option<Waker>,
    /// Attempts without an acknowledged result, with the highest log
    /// sequence handed to a stream so far.
    open: BTreeMap<AttemptKey, u64>,
    /// Results handed to a stream and not acknowledged, oldest first.
    unacked: VecDeque<(AttemptKey, WorkerMessage)>,
    /// Log batches of open attempts handed to a stream, oldest first, with
    /// their size; at most [`SENT_LOG_BYTES`] in all.
    sent_logs: VecDeque<(AttemptKey, WorkerMessage, usize)>,
    sent_log_bytes: usize,
    /// Log batches and results of earlier sessions that may not have
    /// arrived, sent again before the queue (they hold no slot).
    resend: VecDeque<(AttemptKey, WorkerMessage)>,
}

impl Outbox {
    pub(crate) fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                generation: 0,
                waker: None,
                open: BTreeMap::new(),
                unacked: VecDeque::new(),
                sent_logs: VecDeque::new(),
                sent_log_bytes: 0,
                resend: VecDeque::new(),
            }),
            slots: Semaphore::new(capacity.max(1)),
            emptied: Notify::new(),
        })
    }

    /// Queues `msg`, waiting for a free slot.
    pub(crate) async fn push(&self, msg: WorkerMessage) {
        // The semaphore is never closed, so acquiring only fails if it were.
        if let Ok(permit) = self.slots.acquire().await {
            permit.forget();
        }
        let waker = {
            let mut state = self.lock();
            state.queue.push_back(msg);
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Number of messages waiting for a stream (queued or to resend).
    pub(crate) fn len(&self) -> usize {
        let state = self.lock();
        state.queue.len() + state.resend.len()
    }

    /// The server acknowledged the result of `key`: forget it.
    pub(crate) fn acked(&self, key: &AttemptKey) {
        let mut state = self.lock();
        state.open.remove(key);
        state.unacked.retain(|(k, _)| k != key);
        state.resend.retain(|(k, _)| k != key);
        let mut freed = 0;
        state.sent_logs.retain(|(k, _, size)| {
            let keep = k != key;
            if !keep {
                freed += size;
            }
            keep
        });
        state.sent_log_bytes -= freed;
        let empty = state.queue.is_empty() && state.resend.is_empty();
        drop(state);
        if empty {
            self.emptied.notify_waiters();
        }
    }

    /// Waits until the queue is empty.
    pub(crate) async fn wait_empty(&self) {
        loop {
            let notified = self.emptied.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.len() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Records an accepted attempt (reported in `Hello.running` until its
    /// result has been acknowledged).
    pub(crate) fn open_attempt(&self, key: AttemptKey) {
        self.lock().open.entry(key).or_insert(0);
    }

    /// Whether `key` was accepted and its result not yet acknowledged.
    pub(crate) fn is_open(&self, key: &AttemptKey) -> bool {
        self.lock().open.contains_key(key)
    }

    /// Attempts to report in `Hello.running`.
    pub(crate) fn running(&self) -> Vec<RunningAttempt> {
        self.lock()
            .open
            .iter()
            .map(|((job_id, attempt), seq)| RunningAttempt {
                job_id: job_id.clone(),
                attempt: *attempt,
                last_log_seq: *seq,
            })
            .collect()
    }

    /// Starts a session: returns the stream that feeds it, which first
    /// yields the `control` messages and, once [`Control::OpenOutbox`] was
    /// received, the queued messages. The previous session's stream stops
    /// taking messages.
    pub(crate) fn session_stream(
        self: &Arc<Self>,
        control: mpsc::UnboundedReceiver<Control>,
    ) -> SessionStream {
        let generation = self.next_generation();
        SessionStream {
            outbox: Arc::clone(self),
            generation,
            control,
            outbox_open: false,
        }
    }

    /// Ends the current session: its stream takes no more messages.
    pub(crate) fn end_session(&self) {
        self.next_generation();
    }

    fn next_generation(&self) -> u64 {
        let mut state = self.lock();
        state.generation += 1;
        state.waker = None;
        // What the ended session took without an acknowledgement may not
        // have arrived: the next session sends it again, first: its log
        // batches, then its results (an attempt's result comes after its
        // lines), then what it had not re-sent yet of an earlier session
        // (a session takes from the queue only once that is empty, so this
        // is what came after all of the above).
        state.sent_log_bytes = 0;
        let logs = std::mem::take(&mut state.sent_logs)
            .into_iter()
            .map(|(k, m, _)| (k, m));
        let unacked = std::mem::take(&mut state.unacked);
        let earlier = std::mem::take(&mut state.resend);
        state.resend = logs.chain(unacked).chain(earlier).collect();
        state.generation
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves the state consistent (every
        // critical section is a few infallible collection operations).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Pops the next message for the session of `generation`, or registers
    /// `waker`. `None` when that session is over.
    fn poll_pop(&self, generation: u64, waker: &Waker) -> Poll<Option<WorkerMessage>> {
        let mut state = self.lock();
        if state.generation != generation {
            return Poll::Ready(None);
        }
        let (msg, from_queue) = match state.resend.pop_front() {
            Some((_, msg)) => (msg, false),
            None => match state.queue.pop_front() {
                Some(msg) => (msg, true),
                None => {
                    state.waker = Some(waker.clone());
                    return Poll::Pending;
                }
            },
        };
        match &msg.kind {
            Some(Kind::Logs(batch)) => {
                let key = (batch.job_id.clone(), batch.attempt);
                if let (Some(seq), Some(last)) = (state.open.get_mut(&key), batch.lines.last()) {
                    *seq = (*seq).max(last.seq);
                }
                // Kept until the attempt's result is acknowledged.
                if state.open.contains_key(&key) {
                    let size = batch
                        .lines
                        .iter()
                        .map(|l| l.text.len() + LINE_OVERHEAD)
                        .sum::<usize>();
                    state.sent_logs.push_back((key, msg.clone(), size));
                    state.sent_log_bytes += size;
                    while state.sent_log_bytes > SENT_LOG_BYTES
                        && let Some((_, _, size)) = state.sent_logs.pop_front()
                    {
                        state.sent_log_bytes -= size;
                    }
                }
            }
            Some(Kind::Result(result)) => {
                // Kept (and its attempt reported open) until acknowledged.
                let key = (result.job_id.clone(), result.attempt);
                state.unacked.retain(|(k, _)| *k != key);
                state.unacked.push_back((key, msg.clone()));
                if state.unacked.len() > UNACKED_LIMIT
                    && let Some((oldest, _)) = state.unacked.pop_front()
                {
                    state.open.remove(&oldest);
                }
            }
            _ => {}
        }
        let empty = state.queue.is_empty() && state.resend.is_empty();
        drop(state);
        if from_queue {
            self.slots.add_permits(1);
        }
        if empty {
            self.emptied.notify_waiters();
        }
        Poll::Ready(Some(msg))
    }
}

/// What the agent tells one session's stream.
#[derive(Debug)]
pub(crate) enum Control {
    /// Send this message ahead of the queued ones.
    Send(WorkerMessage),
    /// The session was welcomed: start sending queued messages.
    OpenOutbox,
}

/// The request stream of one session. Ends when its control sender is
/// dropped or a newer session started.
pub(crate) struct SessionStream {
    outbox: Arc<Outbox>,
    generation: u64,
    control: mpsc::UnboundedReceiver<Control>,
    outbox_open: bool,
}

impl Stream for SessionStream {
    type Item = WorkerMessage;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            match self.control.poll_recv(cx) {
                Poll::Ready(Some(Control::Send(msg))) => return Poll::Ready(Some(msg)),
                Poll::Ready(Some(Control::OpenOutbox)) => self.outbox_open = true,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => break,
            }
        }
        if !self.outbox_open {
            return Poll::Pending;
        }
        self.outbox.poll_pop(self.generation, cx.waker())
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;
    use crate::proto::{JobResult, LogBatch, LogLine};

    fn batch(job: &str, seqs: &[u64]) -> WorkerMessage {
        WorkerMessage {
            kind: Some(Kind::Logs(LogBatch {
                job_id: job.to_owned(),
                attempt: 1,
                lines: seqs
                    .iter()
                    .map(|&seq| LogLine {
                        seq,
                        ..LogLine::default()
                    })
                    .collect(),
            })),
        }
    }

    /// A new session whose outbox is open: its control sender and stream.
    fn open_session(outbox: &Arc<Outbox>) -> (mpsc::UnboundedSender<Control>, SessionStream) {
        let (tx, rx) = mpsc::unbounded_channel();
        let stream = outbox.session_stream(rx);
        tx.send(Control::OpenOutbox).unwrap();
        (tx, stream)
    }

    fn result(job: &str) -> WorkerMessage {
        WorkerMessage {
            kind: Some(Kind::Result(JobResult {
                job_id: job.to_owned(),
                attempt: 1,
                ..JobResult::default()
            })),
        }
    }

    #[tokio::test]
    async fn unsent_messages_survive_a_session_and_sequences_are_tracked() {
        let outbox = Outbox::new(8);
        outbox.open_attempt(("j".to_owned(), 1));
        outbox.push(batch("j", &[1, 2])).await;
        outbox.push(batch("j", &[3])).await;
        outbox.push(result("j")).await;

        let (tx, mut first) = open_session(&outbox);
        assert!(first.next().await.is_some());
        assert_eq!(outbox.running()[0].last_log_seq, 2);

        // A new session: the old stream is finished, the rest is still queued.
        let (tx2, rx2) = mpsc::unbounded_channel();
        let mut second = outbox.session_stream(rx2);
        assert!(first.next().await.is_none());
        tx2.send(Control::Send(WorkerMessage::default())).unwrap();
        tx2.send(Control::OpenOutbox).unwrap();
        assert_eq!(second.next().await, Some(WorkerMessage::default()));
        // The batch the first session took is sent again (it may not have
        // arrived), then the rest.
        assert_eq!(second.next().await, Some(batch("j", &[1, 2])));
        assert_eq!(second.next().await, Some(batch("j", &[3])));
        assert_eq!(outbox.running()[0].last_log_seq, 3);
        assert_eq!(second.next().await, Some(result("j")));
        // Reported until the server acknowledges the result.
        assert_eq!(outbox.running().len(), 1);
        outbox.wait_empty().await;
        outbox.acked(&("j".to_owned(), 1));
        assert!(outbox.running().is_empty());
        drop(tx);
        drop(tx2);
        assert!(second.next().await.is_none());
    }

    /// A result the dead connection took is sent again on the next session,
    /// ahead of what is queued, until the server acknowledges it.
    #[tokio::test]
    async fn unacknowledged_results_are_sent_again_on_the_next_session() {
        let outbox = Outbox::new(8);
        outbox.open_attempt(("j".to_owned(), 1));
        outbox.open_attempt(("k".to_owned(), 1));
        outbox.push(result("j")).await;
        outbox.push(result("k")).await;
        let (tx, mut first) = open_session(&outbox);
        assert_eq!(first.next().await, Some(result("j")));
        assert_eq!(first.next().await, Some(result("k")));
        outbox.wait_empty().await;
        // The server acknowledged k only; the connection dies.
        outbox.acked(&("k".to_owned(), 1));
        outbox.end_session();
        let running: Vec<String> = outbox.running().into_iter().map(|r| r.job_id).collect();
        assert_eq!(running, ["j"], "reported in Hello.running");
        assert_eq!(outbox.len(), 1);
        outbox.push(batch("m", &[1])).await;

        let (tx2, mut second) = open_session(&outbox);
        assert_eq!(second.next().await, Some(result("j")), "resent first");
        assert_eq!(second.next().await, Some(batch("m", &[1])));
        // Still unacknowledged: once more on a third session.
        let (tx3, mut third) = open_session(&outbox);
        assert_eq!(third.next().await, Some(result("j")));
        outbox.acked(&("j".to_owned(), 1));
        assert!(outbox.running().is_empty());
        let (tx4, mut fourth) = open_session(&outbox);
        drop(tx4);
        assert!(fourth.next().await.is_none(), "nothing left to resend");
        drop((tx, tx2, tx3));
    }

    /// Log batches a dead connection took are sent again on the next
    /// session, before the results, until their attempt's result is
    /// acknowledged.
    #[tokio::test]
    async fn log_batches_are_sent_again_until_their_result_is_acknowledged() {
        let outbox = Outbox::new(8);
        outbox.open_attempt(("j".to_owned(), 1));
        outbox.open_attempt(("k".to_owned(), 1));
        outbox.push(batch("j", &[1, 2])).await;
        outbox.push(batch("k", &[1])).await;
        outbox.push(result("k")).await;
        outbox.push(batch("j", &[3])).await;
        let (tx, mut first) = open_session(&outbox);
        for _ in 0..3 {
            assert!(first.next().await.is_some());
        }
        // The connection dies with j's [3] still queued.
        outbox.end_session();
        let (tx2, mut second) = open_session(&outbox);
        assert_eq!(second.next().await, Some(batch("j", &[1, 2])));
        assert_eq!(second.next().await, Some(batch("k", &[1])));
        assert_eq!(second.next().await, Some(result("k")), "after its lines");
        assert_eq!(second.next().await, Some(batch("j", &[3])));
        // k's result is acknowledged: its lines are not sent again; j's
        // are, all of them, in order.
        outbox.acked(&("k".to_owned(), 1));
        outbox.end_session();
        let (tx3, mut third) = open_session(&outbox);
        assert_eq!(third.next().await, Some(batch("j", &[1, 2])));
        assert_eq!(third.next().await, Some(batch("j", &[3])));
        assert_eq!(outbox.len(), 0);
        outbox.acked(&("j".to_owned(), 1));
        outbox.end_session();
        assert_eq!(outbox.len(), 0, "nothing kept once acknowledged");
        drop((tx, tx2, tx3));
    }

    /// A session that died while re-sending: what it re-sent goes again,
    /// then what it had not reached, in the original order.
    #[tokio::test]
    async fn a_resend_cut_short_keeps_each_attempt_s_order() {
        let outbox = Outbox::new(8);
        outbox.open_attempt(("j".to_owned(), 1));
        outbox.push(batch("j", &[1])).await;
        outbox.push(batch("j", &[2])).await;
        outbox.push(result("j")).await;
        let (tx, mut first) = open_session(&outbox);
        for _ in 0..3 {
            assert!(first.next().await.is_some());
        }
        outbox.end_session();
        // The second session re-sends one batch, then dies too.
        let (tx2, mut second) = open_session(&outbox);
        assert_eq!(second.next().await, Some(batch("j", &[1])));
        outbox.end_session();
        let (tx3, mut third) = open_session(&outbox);
        assert_eq!(third.next().await, Some(batch("j", &[1])));
        assert_eq!(third.next().await, Some(batch("j", &[2])));
        assert_eq!(third.next().await, Some(result("j")));
        drop((tx, tx2, tx3));
    }

    #[tokio::test]
    async fn sent_log_batches_kept_are_bounded() {
        let outbox = Outbox::new(4);
        outbox.open_attempt(("j".to_owned(), 1));
        let (tx, mut stream) = open_session(&outbox);
        let line = "x".repeat(64 * 1024);
        let big = |seq: u64| WorkerMessage {
            kind: Some(Kind::Logs(LogBatch {
                job_id: "j".to_owned(),
                attempt: 1,
                lines: vec![LogLine {
                    seq,
                    text: line.clone(),
                    ..LogLine::default()
                }],
            })),
        };
        let n = SENT_LOG_BYTES / (64 * 1024) + 20;
        for seq in 1..=n as u64 {
            outbox.push(big(seq)).await;
            assert!(stream.next().await.is_some());
        }
        outbox.end_session();
        let kept = outbox.len();
        assert!(kept < n && kept >= n - 21, "kept {kept} of {n}");
        // The newest are the ones kept.
        let (tx2, mut again) = open_session(&outbox);
        let mut last = 0;
        for _ in 0..kept {
            let Some(WorkerMessage {
                kind: Some(Kind::Logs(b)),
            }) = again.next().await
            else {
                panic!("a log batch");
            };
            last = b.lines[0].seq;
        }
        assert_eq!(last, n as u64);
        drop((tx, tx2));
    }

    #[tokio::test]
    async fn unacknowledged_results_are_bounded() {
        let outbox = Outbox::new(4);
        let (_tx, mut stream) = open_session(&outbox);
        for i in 0..UNACKED_LIMIT + 10 {
            let job = format!("j{i}");
            outbox.open_attempt((job.clone(), 1));
            outbox.push(result(&job)).await;
            assert_eq!(stream.next().await, Some(result(&job)));
        }
        assert_eq!(outbox.running().len(), UNACKED_LIMIT);
        outbox.end_session();
        assert_eq!(outbox.len(), UNACKED_LIMIT);
    }

    #[tokio::test]
    async fn push_waits_for_a_free_slot() {
        let outbox = Outbox::new(1);
        outbox.push(batch("j", &[1])).await;
        let blocked = {
            let outbox = Arc::clone(&outbox);
            tokio::spawn(async move { outbox.push(batch("j", &[2])).await })
        };
        tokio::task::yield_now().await;
        assert!(!blocked.is_finished());
        let (_tx, mut stream) = open_session(&outbox);
        assert_eq!(stream.next().await, Some(batch("j", &[1])));
        blocked.await.unwrap();
        assert_eq!(stream.next().await, Some(batch("j", &[2])));
    }
}
