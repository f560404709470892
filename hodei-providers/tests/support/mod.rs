//! Helpers shared by the provider test suites.

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};

/// Writes an executable file (mode 0755) without this process ever holding
/// it open for writing: a child forked by another test's thread while it was
/// open would keep the handle until its exec, and running the file in that
/// window fails with ETXTBSY ("text file busy").
pub fn write_executable(path: &Path, text: &str) {
    let mut child = Command::new("sh")
        .args(["-c", "cat > \"$0\" && chmod 755 \"$0\""])
        .arg(path)
        .stdin(Stdio::piped())
        .spawn()
        .expect("sh");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(text.as_bytes()).expect("writing the file");
    drop(stdin);
    assert!(child.wait().expect("sh").success(), "writing {path:?}");
}
