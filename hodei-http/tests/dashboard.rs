//! The web dashboard in headless Chromium, driven over WebDriver
//! (chromedriver, spoken to directly with reqwest), against a real server
//! whose jobs are real processes.
//!
//! Needs `chromium` and `chromedriver` (Debian: `chromium chromium-driver`;
//! `HODEI_TEST_CHROMIUM` / `HODEI_TEST_CHROMEDRIVER` override the paths).
//! Missing, the test fails when `CI=true` and skips with a notice otherwise.
//! With `HODEI_UI_SCREENSHOTS=DIR` it saves PNG screenshots of each page.

mod support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hodei_http::HttpConfig;
use serde_json::{Value, json};
use support::{Server, eventually, tokens};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

#[tokio::test]
async fn the_dashboard_lists_follows_and_cancels_jobs() {
    let Some(tools) = browser_tools() else {
        return;
    };
    let s = Server::start(HttpConfig {
        api_tokens: tokens(&[("ui-token", "ui-user")]),
        ..HttpConfig::default()
    })
    .await;
    let d = Driver::start(&tools).await;

    // The list, behind a token typed into the header.
    d.goto(&s.url("/")).await;
    d.wait_text("#banner", "Authentication needed", 20)
        .await
        .unwrap();
    d.type_into("#token-input", "ui-token").await;
    d.click("#token-form button").await;
    d.wait_text("#jobs-status", "updated", 20).await.unwrap();
    d.screenshot("jobs-empty").await;

    // A job submitted elsewhere shows up by itself (live refresh).
    let api_job: Value = s
        .http
        .post(s.url("/api/v1/jobs"))
        .bearer_auth("ui-token")
        .json(&json!({"name": "from-api", "command": ["true"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let api_id = api_job["id"].as_str().unwrap().to_owned();
    let row = format!("#jobs-table tr[data-job-id=\"{api_id}\"]");
    d.wait_text(&row, "from-api", 20).await.unwrap();
    d.wait_text(&format!("{row} .state"), "SUCCEEDED", 20)
        .await
        .unwrap();

    // Submit a script from the form; the page moves to the job.
    d.click("nav a[data-nav=submit]").await;
    d.wait_present("#submit-form").await;
    d.type_into("#spec-name", "ticker").await;
    d.click("#mode-script").await;
    // It prints a line, then waits for the test to create $FLAG before the
    // next one: that one can only reach the page live.
    let flag = std::env::temp_dir().join(format!("hodei-ui-flag-{}", uuid::Uuid::new_v4()));
    d.type_into(
        "#spec-script",
        "echo first-line; while [ ! -e \"$FLAG\" ]; do sleep 0.1; done; echo second-line; sleep 60",
    )
    .await;
    d.type_into("#spec-env", &format!("FLAG={}", flag.display()))
        .await;
    d.screenshot("submit-form").await;
    d.click("#submit-button").await;
    let id = eventually(20, "the job page", || async {
        let url = d.current_url().await;
        url.split("#/jobs/")
            .nth(1)
            .filter(|id| id.len() == 36)
            .map(str::to_owned)
    })
    .await;

    // Its log lines arrive while it runs (EventSource with the token).
    d.wait_text("#logs", "first-line", 20).await.unwrap();
    d.wait_text("#job-state", "RUNNING", 20).await.unwrap();
    assert!(!d.text("#logs").await.contains("second-line"));
    std::fs::write(&flag, b"").unwrap();
    d.wait_text("#logs", "second-line", 20).await.unwrap();
    let _ = std::fs::remove_file(&flag);
    d.wait_text("#job-state", "RUNNING", 20).await.unwrap();
    assert_eq!(d.text("#logs-status").await, "live");
    d.wait_text("#events", "JobStarted", 20).await.unwrap();
    d.screenshot("job-running").await;

    // Cancel from the page.
    d.click("#cancel-button").await;
    d.accept_alert().await;
    d.wait_text("#job-state", "CANCELLED", 20).await.unwrap();
    d.wait_text("#logs-status", "complete", 20).await.unwrap();
    d.wait_text("#events", "JobCancelled", 20).await.unwrap();
    d.wait_text("#job-details", "cancelled by ui-user", 20)
        .await
        .unwrap();
    d.screenshot("job-cancelled").await;
    let job = s.cp.job(id.parse().unwrap()).await.unwrap();
    assert_eq!(job.state(), hodei_core::job::JobState::Cancelled);

    // Back to the list: both jobs, and the state filter.
    d.click("nav a[data-nav=jobs]").await;
    let ui_row = format!("#jobs-table tr[data-job-id=\"{id}\"]");
    d.wait_text(&format!("{ui_row} .state"), "CANCELLED", 20)
        .await
        .unwrap();
    d.wait_text(&row, "from-api", 20).await.unwrap();
    d.click("#state-filter option[value=CANCELLED]").await;
    d.wait_absent(&row, 20).await;
    d.wait_text(&ui_row, "ticker", 20).await.unwrap();
    d.click("#state-filter option[value=SUCCEEDED]").await;
    d.wait_absent(&ui_row, 20).await;
    d.wait_text(&row, "from-api", 20).await.unwrap();
    d.screenshot("jobs-filtered").await;
    d.click("#state-filter option[value='']").await;

    // Workers, providers, audit.
    d.click("nav a[data-nav=workers]").await;
    d.wait_text("#workers-table tbody", "local", 20)
        .await
        .unwrap();
    d.screenshot("workers").await;
    d.click("nav a[data-nav=providers]").await;
    d.wait_text("#providers-table tr[data-provider=local]", "healthy", 20)
        .await
        .unwrap();
    d.screenshot("providers").await;
    // The submission's flow by its correlation id (linked from the job page);
    // the cancellation was another request, found by type and actor.
    d.goto(&s.url(&format!("/#/audit?correlation_id={}", job.correlation_id)))
        .await;
    d.wait_text("#audit-table tbody", "JobStarted", 20)
        .await
        .unwrap();
    d.wait_text("#audit-total", "matching event", 20)
        .await
        .unwrap();
    d.screenshot("audit").await;
    d.click("nav a[data-nav=audit]").await;
    d.click("#audit-event-type option[value=JobCancelled]")
        .await;
    d.type_into("#audit-actor", "ui-user").await;
    d.click("#audit-search").await;
    d.wait_text("#audit-total", "1 matching event", 20)
        .await
        .unwrap();
    d.wait_text("#audit-table tbody", &id[..8], 20)
        .await
        .unwrap();
    // A bad timestamp shows the server's message.
    d.type_into("#audit-since", "yesterday").await;
    d.click("#audit-search").await;
    d.wait_text("#audit-error", "RFC 3339", 20).await.unwrap();

    // A command line is split like a shell would; server errors are shown.
    d.click("nav a[data-nav=submit]").await;
    d.type_into("#spec-command", "sh -c 'echo \"quoted words\"; exit 4'")
        .await;
    d.type_into("#spec-env", "1BAD=x").await;
    d.click("#submit-button").await;
    d.wait_text(
        "#submit-error",
        "`env.1BAD` is not a valid variable name",
        20,
    )
    .await
    .unwrap();
    d.type_into("#spec-env", "GOOD=x").await;
    d.click("#submit-button").await;
    d.wait_text("#logs", "quoted words", 20).await.unwrap();
    d.wait_text("#job-state", "FAILED", 20).await.unwrap();
    d.wait_text("#job-details", "non_zero_exit", 20)
        .await
        .unwrap();
    // Its one attempt, in the attempts table: number, outcome, worker and
    // why it failed.
    let failed_id = d
        .current_url()
        .await
        .split("#/jobs/")
        .nth(1)
        .map(str::to_owned)
        .expect("on the job's page");
    let failed: Value = s
        .http
        .get(s.url(&format!("/api/v1/jobs/{failed_id}")))
        .bearer_auth("ui-token")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let worker = failed["attempts"][0]["worker_id"]
        .as_str()
        .unwrap_or_else(|| panic!("the attempt ran on a worker: {failed}"))
        .to_owned();
    let rows = d.attempt_rows(1).await;
    assert_eq!(
        rows[0][..3],
        ["1".to_owned(), "FAILED".to_owned(), worker[..8].to_owned()]
    );
    assert_eq!(rows[0][5], "non_zero_exit: exited with code 4");
    d.screenshot("job-failed").await;

    // A job retried after a failure shows each failed attempt.
    let retried: Value = s
        .http
        .post(s.url("/api/v1/jobs"))
        .bearer_auth("ui-token")
        .json(&json!({
            "name": "retried",
            "command": ["sh", "-c", "exit 3"],
            "max_attempts": 2,
            "retry_on_failure": true,
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let retried = retried["id"].as_str().unwrap().to_owned();
    d.goto(&s.url(&format!("/#/jobs/{retried}"))).await;
    d.wait_text("#job-state", "FAILED", 20).await.unwrap();
    let rows = d.attempt_rows(2).await;
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row[0], (i + 1).to_string(), "{rows:?}");
        assert_eq!(row[1], "FAILED", "{rows:?}");
        assert_eq!(row[5], "non_zero_exit: exited with code 3", "{rows:?}");
    }
    d.screenshot("job-retried").await;

    d.quit().await;
}

// ---------------------------------------------------------------- the tools

struct Tools {
    chromium: PathBuf,
    chromedriver: PathBuf,
}

fn browser_tools() -> Option<Tools> {
    let chromium = std::env::var_os("HODEI_TEST_CHROMIUM")
        .map(PathBuf::from)
        .or_else(|| {
            ["chromium", "chromium-browser", "google-chrome"]
                .iter()
                .find_map(|c| which(c))
        });
    let chromedriver = std::env::var_os("HODEI_TEST_CHROMEDRIVER")
        .map(PathBuf::from)
        .or_else(|| which("chromedriver"));
    match (chromium, chromedriver) {
        (Some(chromium), Some(chromedriver)) => Some(Tools {
            chromium,
            chromedriver,
        }),
        (chromium, chromedriver) => {
            let missing = format!(
                "chromium {} and chromedriver {}",
                if chromium.is_some() {
                    "found"
                } else {
                    "missing"
                },
                if chromedriver.is_some() {
                    "found"
                } else {
                    "missing"
                }
            );
            if matches!(
                std::env::var("CI").as_deref(),
                Ok("true" | "TRUE" | "True" | "1" | "yes")
            ) {
                panic!(
                    "{missing}: the dashboard test needs them in CI (apt-get install chromium chromium-driver)"
                );
            }
            eprintln!(
                "SKIPPED the dashboard test: {missing} (apt-get install chromium chromium-driver)"
            );
            None
        }
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// A chromedriver process and one browser session, spoken to over the W3C
/// WebDriver protocol.
struct Driver {
    child: Child,
    base: String,
    http: reqwest::Client,
    screenshots: Option<PathBuf>,
    _profile: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    async fn start(tools: &Tools) -> Driver {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let child = Command::new(&tools.chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let profile =
            TempDir(std::env::temp_dir().join(format!("hodei-ui-{}-{port}", std::process::id())));
        let mut d = Driver {
            child,
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
            screenshots: std::env::var_os("HODEI_UI_SCREENSHOTS").map(PathBuf::from),
            _profile: profile,
        };
        let status = format!("{}/status", d.base);
        eventually(20, "chromedriver to listen", || async {
            let r = d.http.get(&status).send().await.ok()?;
            let v: Value = r.json().await.ok()?;
            v["value"]["ready"].as_bool().filter(|r| *r)
        })
        .await;
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "unhandledPromptBehavior": "ignore",
            "goog:chromeOptions": {
                "binary": tools.chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1400,1000", "--no-first-run", "--disable-extensions",
                    format!("--user-data-dir={}", d._profile.0.display()),
                ],
            },
        }}});
        let r = d
            .http
            .post(format!("{}/session", d.base))
            .json(&caps)
            .send()
            .await
            .unwrap();
        let v: Value = r.json().await.unwrap();
        let session = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {v}"))
            .to_owned();
        d.base = format!("{}/session/{session}", d.base);
        d
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.map_err(|e| e.to_string())?;
        let ok = r.status().is_success();
        let v: Value = r.json().await.map_err(|e| e.to_string())?;
        if ok {
            Ok(v["value"].clone())
        } else {
            Err(v["value"].to_string())
        }
    }

    async fn post(&self, path: &str, body: Value) -> Result<Value, String> {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    async fn goto(&self, url: &str) {
        self.post("/url", json!({"url": url})).await.unwrap();
    }

    async fn current_url(&self) -> String {
        self.call(reqwest::Method::GET, "/url", None)
            .await
            .unwrap()
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    async fn element(&self, css: &str) -> String {
        let v = eventually(20, css, || async {
            self.post("/element", json!({"using": "css selector", "value": css}))
                .await
                .ok()
        })
        .await;
        v[ELEMENT].as_str().unwrap().to_owned()
    }

    async fn wait_present(&self, css: &str) {
        self.element(css).await;
    }

    async fn click(&self, css: &str) {
        let e = self.element(css).await;
        self.post(&format!("/element/{e}/click"), json!({}))
            .await
            .unwrap_or_else(|err| panic!("click {css}: {err}"));
    }

    async fn type_into(&self, css: &str, text: &str) {
        let e = self.element(css).await;
        self.post(&format!("/element/{e}/clear"), json!({}))
            .await
            .ok();
        self.post(&format!("/element/{e}/value"), json!({"text": text}))
            .await
            .unwrap_or_else(|err| panic!("type into {css}: {err}"));
    }

    async fn accept_alert(&self) {
        eventually(10, "the confirm dialog", || async {
            self.post("/alert/accept", json!({})).await.ok()
        })
        .await;
    }

    /// `textContent` of the first match, or "" when there is none.
    async fn text(&self, css: &str) -> String {
        let script =
            "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;";
        let v = self
            .post("/execute/sync", json!({"script": script, "args": [css]}))
            .await
            .unwrap();
        v.as_str().unwrap_or_default().to_owned()
    }

    async fn wait_text(&self, css: &str, needle: &str, secs: u64) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let t = self.text(css).await;
            if t.contains(needle) {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                self.screenshot("failure").await;
                return Err(format!(
                    "{css} never contained {needle:?}; last text: {t:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The cells' text of the rows of `#attempts`, once it shows `n`
    /// finished attempts (before any, it has one placeholder row of one
    /// cell).
    async fn attempt_rows(&self, n: usize) -> Vec<Vec<String>> {
        let script = "return Array.from(document.querySelectorAll(arguments[0]))\
            .map((r) => Array.from(r.cells).map((c) => c.textContent));";
        eventually(20, &format!("{n} attempt(s) in #attempts"), || async {
            let v = self
                .post(
                    "/execute/sync",
                    json!({"script": script, "args": ["#attempts tbody tr"]}),
                )
                .await
                .ok()?;
            let rows: Vec<Vec<String>> = serde_json::from_value(v).ok()?;
            (rows.len() == n && rows.iter().all(|r| r.len() == 6)).then_some(rows)
        })
        .await
    }

    async fn wait_absent(&self, css: &str, secs: u64) {
        let script = "return document.querySelector(arguments[0]) === null;";
        eventually(secs, &format!("{css} to go away"), || async {
            let v = self
                .post("/execute/sync", json!({"script": script, "args": [css]}))
                .await
                .ok()?;
            v.as_bool().filter(|gone| *gone)
        })
        .await;
    }

    async fn screenshot(&self, name: &str) {
        let Some(dir) = &self.screenshots else { return };
        let Ok(v) = self.call(reqwest::Method::GET, "/screenshot", None).await else {
            return;
        };
        if let Some(png) = v.as_str().and_then(base64_decode) {
            let _ = std::fs::create_dir_all(dir);
            let _ = std::fs::write(dir.join(format!("{name}.png")), png);
        }
    }

    async fn quit(&self) {
        let _ = self.call(reqwest::Method::DELETE, "", None).await;
    }
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter(|c| !c.is_ascii_whitespace() && *c != b'=') {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}
