//! End to end over real processes (`hodei-server`, local provider,
//! `hodei-worker` agents, the `hodei` CLI): log messages stay under the
//! gRPC message limits whatever the line sizes, so big output arrives
//! complete and in order; and a cancel reaches the job's process group
//! within a second.

mod e2e_support;

use std::time::{SystemTime, UNIX_EPOCH};

use e2e_support::*;
use hodei_grpc::proto;
use hodei_grpc::server::LOG_MESSAGE_BYTES;
use prost::Message;
use proto::JobState;

/// Lines of ~60 KB: 600 of them are ~36 MB, which 1,000-line follow chunks
/// or 5,000-line pages would carry as one message (over the server's 16 MiB).
const BIG_LINES: usize = 600;
const BIG_LINE_BYTES: usize = 60_000;

/// The job's output, line by line: `00001-aaa...` (the letter changes from
/// line to line, so a reordering shows), then a short tail.
fn expected_output() -> Vec<String> {
    let mut lines: Vec<String> = (1..=BIG_LINES)
        .map(|i| {
            let letter = char::from(b'a' + (i % 26) as u8);
            format!("{i:05}-{}", letter.to_string().repeat(BIG_LINE_BYTES))
        })
        .collect();
    lines.extend(["tail-1", "tail-2", "tail-3"].map(String::from));
    lines
}

/// A script printing [`expected_output`] (POSIX awk, no per-line forks).
fn big_output_script() -> String {
    format!(
        r#"awk 'BEGIN {{ s = "x"; while (length(s) < {len}) s = s s; s = substr(s, 1, {len});
  for (c = 0; c < 26; c++) {{ r = s; gsub(/x/, substr("abcdefghijklmnopqrstuvwxyz", c + 1, 1), r); row[c] = r }}
  for (i = 1; i <= {n}; i++) printf "%05d-%s\n", i, row[i % 26] }}'
echo tail-1; echo tail-2; echo tail-3"#,
        len = BIG_LINE_BYTES,
        n = BIG_LINES
    )
}

/// Asserts that `lines` are the job's whole output, numbered 1..=n.
fn assert_complete(what: &str, lines: &[proto::LogLine], expected: &[String]) {
    assert_eq!(lines.len(), expected.len(), "{what}: line count");
    for (i, (line, want)) in lines.iter().zip(expected).enumerate() {
        assert_eq!(line.seq, i as u64 + 1, "{what}: sequence of line {i}");
        assert!(
            line.text == *want,
            "{what}: line {} differs (len {} vs {}, starts {:?})",
            i + 1,
            line.text.len(),
            want.len(),
            &line.text[..line.text.len().min(12)]
        );
    }
}

/// The encoded size of a message's repeated lines (what the caps bound).
fn lines_bytes(lines: &[proto::LogLine]) -> usize {
    proto::LogChunk {
        lines: lines.to_vec(),
    }
    .encoded_len()
}

/// Follows a job's log from the start to its end with tonic's default
/// 4 MiB receive limit; returns the lines and the number of chunks, each
/// checked to be non-empty and within [`LOG_MESSAGE_BYTES`].
async fn follow_all(client: &Client, job_id: &str) -> (Vec<proto::LogLine>, usize) {
    let mut follow = proto::log_service_client::LogServiceClient::new(client.channel.clone())
        .follow(proto::FollowLogsRequest {
            job_id: job_id.to_owned(),
            after: 0,
        })
        .await
        .expect("follow")
        .into_inner();
    let mut lines = Vec::new();
    let mut chunks = 0;
    while let Some(chunk) = follow.message().await.expect("follow chunk") {
        assert!(!chunk.lines.is_empty(), "empty follow chunk");
        assert!(
            lines_bytes(&chunk.lines) <= LOG_MESSAGE_BYTES,
            "follow chunk of {} bytes ({} lines)",
            lines_bytes(&chunk.lines),
            chunk.lines.len()
        );
        chunks += 1;
        lines.extend(chunk.lines);
    }
    (lines, chunks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_lines_arrive_complete_and_in_order_via_pages_and_follow() {
    let server = TestServer::start();
    let client = server.client().await;
    let expected = expected_output();
    let job = client.submit(sh(&big_output_script())).await;

    // Follow from the start while the job runs, with tonic's default 4 MiB
    // receive limit: every chunk must fit in it.
    let (followed, chunks) = follow_all(&client, &job.job_id).await;
    assert_complete("live follow", &followed, &expected);
    assert!(chunks >= 36_000_000 / LOG_MESSAGE_BYTES, "{chunks} chunks");
    let done = client.wait_terminal(&job.job_id).await;
    assert_eq!(done.state, JobState::Succeeded as i32);
    // Following a finished job replays the stored lines: all are ready at
    // once, so chunks are as full as they may be.
    let (replayed, chunks) = follow_all(&client, &job.job_id).await;
    assert_complete("replayed follow", &replayed, &expected);
    assert!(chunks >= 36_000_000 / LOG_MESSAGE_BYTES, "{chunks} chunks");

    // Pages of up to 10,000 lines, also with the default receive limit:
    // each is cut at 1 MiB and the next one continues after it.
    let mut logs = proto::log_service_client::LogServiceClient::new(client.channel.clone());
    let mut paged: Vec<proto::LogLine> = Vec::new();
    let mut pages = 0;
    loop {
        let page = logs
            .page(proto::PageLogsRequest {
                job_id: job.job_id.clone(),
                after: paged.last().map_or(0, |l| l.seq),
                limit: 10_000,
            })
            .await
            .expect("page")
            .into_inner();
        if page.lines.is_empty() {
            break;
        }
        assert!(lines_bytes(&page.lines) <= LOG_MESSAGE_BYTES);
        pages += 1;
        paged.extend(page.lines);
    }
    assert_complete("pages", &paged, &expected);
    assert!(pages >= 36_000_000 / LOG_MESSAGE_BYTES, "{pages} pages");
    // Small lines still come many to a page.
    let tail = logs
        .page(proto::PageLogsRequest {
            job_id: job.job_id.clone(),
            after: BIG_LINES as u64,
            limit: 0,
        })
        .await
        .expect("tail page")
        .into_inner();
    assert_eq!(tail.lines.len(), 3);

    // The CLI, paging (`job logs`) and following (`job logs --follow`).
    let mut text = expected.join("\n");
    text.push('\n');
    for args in [
        &["job", "logs", &job.job_id][..],
        &["job", "logs", "--follow", &job.job_id][..],
    ] {
        let out = server.cli(args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        assert!(
            out.stdout == text.as_bytes(),
            "{args:?}: output differs ({} bytes, expected {})",
            out.stdout.len(),
            text.len()
        );
    }
}

/// Nanoseconds since the epoch in a file a job wrote with `date +%s%N`.
fn read_stamp(path: &std::path::Path) -> Option<u128> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_reaches_the_job_group_within_a_second() {
    let server = TestServer::start();
    let client = server.client().await;
    let leader = server.path("leader-term");
    let member = server.path("member-term");
    // The job's shell and a background member of its process group record
    // when SIGTERM reaches them, then exit.
    let script = format!(
        "sh -c 'trap \"date +%s%N > {member}; exit 1\" TERM; echo member-ready; \
         while :; do sleep 0.05; done' &
         trap 'date +%s%N > {leader}; exit 143' TERM
         echo leader-ready
         while :; do sleep 0.05; done",
        member = member.display(),
        leader = leader.display()
    );
    let job = client.submit(sh(&script)).await;
    wait_for("both traps installed", DEADLINE, || async {
        let lines = client.logs_of(&job.job_id).await;
        let ready = |t: &str| lines.iter().any(|l| l.text == t);
        (ready("leader-ready") && ready("member-ready")).then_some(())
    })
    .await;

    let requested = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    client
        .jobs()
        .cancel(proto::CancelJobRequest {
            job_id: job.job_id.clone(),
        })
        .await
        .expect("cancel");
    let done = client.wait_terminal(&job.job_id).await;
    assert_eq!(done.state, JobState::Cancelled as i32);
    for (what, path) in [("job shell", &leader), ("group member", &member)] {
        let at = wait_for(&format!("the {what}'s SIGTERM stamp"), DEADLINE, || async {
            read_stamp(path)
        })
        .await;
        assert!(at >= requested, "{what}: SIGTERM before the cancel?");
        let after_ms = (at - requested) / 1_000_000;
        assert!(
            after_ms < 1000,
            "{what} got SIGTERM {after_ms} ms after the cancel request"
        );
    }
}
