//! The README's first command, `cargo run --example quickstart`, run as a
//! test: it must exit 0 and show live logs, final states and event trails.
//!
//! The example binary is the one cargo built for this test run
//! (`cargo test --all-targets` builds examples); when it is missing (a test
//! run that did not build examples), the test builds it with cargo.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn example_binary() -> PathBuf {
    // target/<profile>/deps/quickstart-<hash> -> target/<profile>/examples/quickstart
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test binary lives in target/<profile>/deps");
    let built = profile_dir.join("examples").join("quickstart");
    if built.is_file() {
        return built;
    }
    // Not there: build it. The outer `cargo test` has released the build
    // directory's lock by the time tests run, so this does not wait on it.
    let status = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "--example", "quickstart"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("run cargo build --example quickstart");
    assert!(
        status.success(),
        "cargo build --example quickstart failed: {status}"
    );
    assert!(built.is_file(), "cargo built no {}", built.display());
    built
}

#[test]
fn quickstart_runs_three_jobs_end_to_end() {
    let bin = example_binary();
    let mut child = Command::new(&bin)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).expect("read stdout");
        s
    });
    let mut stderr = child.stderr.take().expect("stderr");
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        stderr.read_to_string(&mut s).expect("read stderr");
        s
    });

    // Poll with a generous deadline: the jobs themselves take a few seconds.
    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for quickstart") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "quickstart still running after 180 s; stdout so far:\n{}",
                reader.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = reader.join().expect("stdout reader");
    let err = err_reader.join().expect("stderr reader");
    assert!(
        status.success(),
        "quickstart exited with {status}\nstdout:\n{out}\nstderr:\n{err}"
    );

    for want in [
        // live logs of each job, with attempt numbers and streams
        "[hello #1 Stdout] step 3",
        "[hello #1 Stderr] a warning",
        "[flaky #1 Stderr] first attempt: failing",
        "[flaky #2 Stdout] second attempt: ok",
        "[long #1 Stdout] working for a long time...",
        // final states
        "(hello) -> SUCCEEDED after 1 attempt(s)",
        "(flaky) -> SUCCEEDED after 2 attempt(s)",
        "(long) -> CANCELLED",
        // event trails
        "JobCreated",
        "JobRetryScheduled",
        "JobCancelled",
        "correlation=quickstart-flaky",
        "all three jobs ended as expected.",
    ] {
        assert!(
            out.contains(want),
            "quickstart output lacks {want:?}:\n{out}"
        );
    }
    assert!(
        !out.contains("[long #1 Stdout] never"),
        "the cancelled job ran to its end:\n{out}"
    );
}
