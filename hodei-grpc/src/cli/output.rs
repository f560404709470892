//! How `hodei` prints results: aligned text for people, JSON for programs.
//! The JSON documents are those of the HTTP API (`hodei_http::dto`), so a
//! script can switch between `hodei --output json` and `/api/v1`.

use std::io::Write;

use serde_json::{Value, json};

use hodei_http::dto;

use super::{CliError, OutputFormat, exit};
use crate::convert;
use crate::proto;

/// Prints command results in the chosen format.
pub(super) struct Printer {
    format: OutputFormat,
}

fn write_err(e: std::io::Error) -> CliError {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        // The reader went away (`| head`): stop quietly, as a shell's
        // SIGPIPE death would.
        return CliError::new(exit::BROKEN_PIPE, "");
    }
    CliError::new(exit::ERROR, format!("cannot write output: {e}"))
}

fn bad_reply(e: convert::ConvertError) -> CliError {
    CliError::new(
        exit::ERROR,
        format!("unexpected reply from the server: {e}"),
    )
}

fn to_value<T: serde::Serialize>(v: T) -> Result<Value, CliError> {
    serde_json::to_value(v).map_err(|e| CliError::new(exit::ERROR, e.to_string()))
}

fn job_dto(job: &proto::Job) -> Result<dto::JobDto, CliError> {
    Ok(dto::JobDto::from(
        convert::job_from_proto(job).map_err(bad_reply)?,
    ))
}

fn job_value(job: &proto::Job) -> Result<Value, CliError> {
    to_value(job_dto(job)?)
}

/// `job list --output json`: the document of `GET /api/v1/jobs`, whose
/// `next_cursor` is absent (not `null`) on the last page.
fn jobs_page(resp: &proto::ListJobsResponse) -> Result<dto::JobPageDto, CliError> {
    Ok(dto::JobPageDto {
        jobs: resp.jobs.iter().map(job_dto).collect::<Result<_, _>>()?,
        next_cursor: (!resp.next_cursor.is_empty()).then(|| resp.next_cursor.clone()),
    })
}

fn event_dto(e: &proto::Event) -> Result<dto::EventDto, CliError> {
    let event_id = e
        .event_id
        .parse()
        .map_err(|_| CliError::new(exit::ERROR, format!("unexpected event id {:?}", e.event_id)))?;
    let occurred_at = convert::from_timestamp(
        "occurred_at",
        e.occurred_at
            .as_ref()
            .unwrap_or(&prost_types::Timestamp::default()),
    )
    .map_err(bad_reply)?;
    Ok(dto::EventDto {
        event_id,
        sequence: e.sequence,
        occurred_at,
        event_type: e.event_type.clone(),
        aggregate_type: e.aggregate_type.clone(),
        aggregate_id: e.aggregate_id.clone(),
        correlation_id: e.correlation_id.clone(),
        actor: e.actor.clone(),
        payload: serde_json::from_str(&e.payload_json).unwrap_or(Value::Null),
    })
}

fn ts(t: Option<&prost_types::Timestamp>) -> String {
    t.and_then(|t| convert::from_timestamp("t", t).ok())
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| "-".into())
}

fn state_name(value: i32) -> String {
    convert::job_state_from_proto("state", value)
        .ok()
        .flatten()
        .map(|s| s.as_str().to_owned())
        .unwrap_or_else(|| "UNKNOWN".into())
}

/// Quotes an argv for display like a shell would need it.
fn shell_words(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let last = cells.len() - 1;
        for (i, c) in cells.iter().enumerate() {
            if i == last {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        out.push('\n');
    };
    line(headers.to_vec(), &mut out);
    for row in &rows {
        line(row.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

fn event_summary(e: &proto::Event) -> String {
    let payload: Value = serde_json::from_str(&e.payload_json).unwrap_or(Value::Null);
    let Value::Object(map) = payload else {
        return String::new();
    };
    map.iter()
        .filter(|(k, _)| !matches!(k.as_str(), "job_id" | "spec"))
        .map(|(k, v)| match v {
            Value::String(s) => format!("{k}={s}"),
            other => format!("{k}={other}"),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

impl Printer {
    pub(super) fn new(format: OutputFormat) -> Self {
        Self { format }
    }

    fn json(&self, v: &Value) -> Result<(), CliError> {
        let mut out = std::io::stdout().lock();
        serde_json::to_writer_pretty(&mut out, v).map_err(|e| write_err(e.into()))?;
        writeln!(out).map_err(write_err)
    }

    fn json_line(&self, v: &Value) -> Result<(), CliError> {
        let mut out = std::io::stdout().lock();
        serde_json::to_writer(&mut out, v).map_err(|e| write_err(e.into()))?;
        writeln!(out).map_err(write_err)
    }

    fn text(&self, s: &str) -> Result<(), CliError> {
        let mut out = std::io::stdout().lock();
        out.write_all(s.as_bytes()).map_err(write_err)?;
        out.flush().map_err(write_err)
    }

    /// `job submit`: the id (text), or the job with `"replayed": bool`
    /// (JSON; `true` when an earlier job with the same idempotency key was
    /// returned).
    pub(super) fn submitted(&self, job: &proto::Job, replayed: bool) -> Result<(), CliError> {
        match self.format {
            OutputFormat::Text => self.text(&format!("{}\n", job.job_id)),
            OutputFormat::Json => {
                let mut v = job_value(job)?;
                if let Value::Object(m) = &mut v {
                    m.insert("replayed".into(), Value::Bool(replayed));
                }
                self.json(&v)
            }
        }
    }

    /// `job run` after the submission (nothing in text: stdout is the
    /// job's).
    pub(super) fn run_started(&self, _job: &proto::Job) {}

    /// `job run` at the end: the final job as a JSON line.
    pub(super) fn run_finished(&self, job: &proto::Job) -> Result<(), CliError> {
        match self.format {
            OutputFormat::Text => Ok(()),
            OutputFormat::Json => self.json_line(&json!({ "job": job_value(job)? })),
        }
    }

    /// `job get`.
    pub(super) fn job(&self, job: &proto::Job) -> Result<(), CliError> {
        if self.format == OutputFormat::Json {
            return self.json(&job_value(job)?);
        }
        use proto::job_status::State;
        let mut rows: Vec<(&str, String)> = Vec::new();
        let spec = job.spec.clone().unwrap_or_default();
        rows.push(("id", job.job_id.clone()));
        rows.push(("name", spec.name.clone()));
        rows.push(("state", state_name(job.state)));
        rows.push((
            "attempt",
            format!("{} of {}", job.attempt, spec.max_attempts.unwrap_or(1)),
        ));
        match job.status.as_ref().and_then(|s| s.state.as_ref()) {
            Some(State::Pending(p)) if p.not_before.is_some() => {
                rows.push(("not before", ts(p.not_before.as_ref())));
            }
            Some(State::Pending(_)) => {}
            Some(State::Scheduled(s)) => {
                rows.push(("provider", s.provider.clone()));
                rows.push(("worker", s.worker_id.clone()));
                rows.push(("deadline", ts(s.deadline.as_ref())));
            }
            Some(State::Assigned(a)) => {
                rows.push(("worker", a.worker_id.clone()));
                rows.push(("deadline", ts(a.deadline.as_ref())));
            }
            Some(State::Running(r)) => {
                rows.push(("worker", r.worker_id.clone()));
                rows.push(("started", ts(r.started_at.as_ref())));
                rows.push(("deadline", ts(r.deadline.as_ref())));
            }
            Some(State::Succeeded(s)) => rows.push(("exit code", s.exit_code.to_string())),
            Some(State::Failed(f)) => {
                let f = f.failure.clone().unwrap_or_default();
                rows.push(("failure", format!("{} ({})", f.message, f.kind)));
                if let Some(c) = f.exit_code {
                    rows.push(("exit code", c.to_string()));
                }
                if let Some(s) = f.signal {
                    rows.push(("signal", s.to_string()));
                }
            }
            Some(State::Cancelled(c)) => rows.push(("reason", c.reason.clone())),
            Some(State::TimedOut(t)) => rows.push(("timed out in", state_name(t.during))),
            None => {}
        }
        if spec.command.is_empty() {
            let len = spec.script.as_ref().map_or(0, String::len);
            rows.push(("script", format!("{len} bytes")));
        } else {
            rows.push(("command", shell_words(&spec.command)));
        }
        if let Some(i) = &spec.image {
            rows.push(("image", i.clone()));
        }
        if let Some(p) = &spec.provider {
            rows.push(("provider", p.clone()));
        }
        if !spec.labels.is_empty() {
            let mut labels: Vec<_> = spec
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            labels.sort();
            rows.push(("labels", labels.join(",")));
        }
        if !spec.secrets.is_empty() {
            rows.push(("secrets", spec.secrets.join(",")));
        }
        if let Some(t) = spec.timeout_secs {
            rows.push(("timeout", format!("{t}s")));
        }
        rows.push(("correlation id", job.correlation_id.clone()));
        rows.push(("submitted by", job.submitted_by.clone()));
        rows.push(("created", ts(job.created_at.as_ref())));
        rows.push(("updated", ts(job.updated_at.as_ref())));
        let mut out = String::new();
        for (k, v) in rows {
            out.push_str(&format!("{:<15} {v}\n", format!("{k}:")));
        }
        if !job.attempts.is_empty() {
            out.push_str("attempts:\n");
            for a in &job.attempts {
                let how = match &a.failure {
                    Some(f) => format!("{}: {}", a.outcome, f.message),
                    None => a.outcome.clone(),
                };
                let worker = a.worker_id.as_deref().unwrap_or("-");
                out.push_str(&format!(
                    "  #{} {how} (worker {worker}, ended {})\n",
                    a.number,
                    ts(a.finished_at.as_ref())
                ));
            }
        }
        self.text(&out)
    }

    /// `job list`.
    pub(super) fn jobs(&self, resp: &proto::ListJobsResponse) -> Result<(), CliError> {
        if self.format == OutputFormat::Json {
            return self.json(&to_value(jobs_page(resp)?)?);
        }
        let rows = resp
            .jobs
            .iter()
            .map(|j| {
                vec![
                    j.job_id.clone(),
                    state_name(j.state),
                    j.attempt.to_string(),
                    ts(j.created_at.as_ref()),
                    j.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default(),
                ]
            })
            .collect();
        let mut out = table(&["ID", "STATE", "ATTEMPT", "CREATED", "NAME"], rows);
        if !resp.next_cursor.is_empty() {
            out.push_str(&format!("(more: --cursor {})\n", resp.next_cursor));
        }
        self.text(&out)
    }

    /// `job cancel`.
    pub(super) fn cancelled(&self, job: &proto::Job) -> Result<(), CliError> {
        match self.format {
            OutputFormat::Json => self.json(&job_value(job)?),
            OutputFormat::Text => self.text(&format!(
                "job {} is {}\n",
                job.job_id,
                state_name(job.state)
            )),
        }
    }

    /// Log lines: stdout lines to stdout, stderr lines to stderr (text),
    /// or one JSON object per line.
    pub(super) fn log_lines(&self, lines: &[proto::LogLine]) -> Result<(), CliError> {
        match self.format {
            OutputFormat::Json => {
                let mut out = std::io::stdout().lock();
                for l in lines {
                    let line =
                        dto::LogLineDto::from(convert::log_line_from_proto(l).map_err(bad_reply)?);
                    serde_json::to_writer(&mut out, &json!({ "log": line }))
                        .map_err(|e| write_err(e.into()))?;
                    out.write_all(b"\n").map_err(write_err)?;
                }
                out.flush().map_err(write_err)
            }
            OutputFormat::Text => {
                let mut out = std::io::stdout().lock();
                let mut err = std::io::stderr().lock();
                for l in lines {
                    if convert::log_stream_from_proto(l.stream)
                        == hodei_core::ports::LogStream::Stderr
                    {
                        out.flush().map_err(write_err)?;
                        err.write_all(l.text.as_bytes()).map_err(write_err)?;
                        err.write_all(b"\n").map_err(write_err)?;
                    } else {
                        out.write_all(l.text.as_bytes()).map_err(write_err)?;
                        out.write_all(b"\n").map_err(write_err)?;
                    }
                }
                out.flush().map_err(write_err)?;
                err.flush().map_err(write_err)
            }
        }
    }

    /// Events (`job events`; `audit` with the total, limit and offset).
    pub(super) fn events(
        &self,
        events: &[proto::Event],
        page: Option<(u64, u32, u32)>,
    ) -> Result<(), CliError> {
        if self.format == OutputFormat::Json {
            let events = events
                .iter()
                .map(event_dto)
                .collect::<Result<Vec<_>, _>>()?;
            return match page {
                Some((total, limit, offset)) => self.json(&to_value(dto::AuditPageDto {
                    events,
                    total,
                    limit,
                    offset: u64::from(offset),
                })?),
                None => self.json(&to_value(dto::JobEventsDto { events })?),
            };
        }
        let total = page.map(|(t, _, _)| t);
        let rows = events
            .iter()
            .map(|e| {
                vec![
                    e.sequence.to_string(),
                    ts(e.occurred_at.as_ref()),
                    e.event_type.clone(),
                    e.actor.clone(),
                    e.correlation_id.clone(),
                    event_summary(e),
                ]
            })
            .collect();
        let mut out = table(
            &["SEQ", "TIME", "TYPE", "ACTOR", "CORRELATION", "DETAILS"],
            rows,
        );
        if let Some(total) = total {
            out.push_str(&format!("({} of {total} matching events)\n", events.len()));
        }
        self.text(&out)
    }

    /// `worker list`.
    pub(super) fn workers(&self, workers: &[proto::Worker]) -> Result<(), CliError> {
        if self.format == OutputFormat::Json {
            let workers = workers
                .iter()
                .map(|w| {
                    Ok(dto::WorkerDto::from(
                        convert::worker_from_proto(w).map_err(bad_reply)?,
                    ))
                })
                .collect::<Result<Vec<_>, CliError>>()?;
            return self.json(&to_value(dto::WorkersDto { workers })?);
        }
        let rows = workers
            .iter()
            .map(|w| {
                vec![
                    w.worker_id.clone(),
                    w.provider.clone(),
                    w.state.clone(),
                    if w.connected { "yes" } else { "no" }.into(),
                    format!("{}/{}", w.jobs.len(), w.capacity),
                    ts(w.last_seen.as_ref()),
                ]
            })
            .collect();
        self.text(&table(
            &["ID", "PROVIDER", "STATE", "CONNECTED", "JOBS", "LAST SEEN"],
            rows,
        ))
    }

    /// `provider list`.
    pub(super) fn providers(&self, providers: &[proto::Provider]) -> Result<(), CliError> {
        if self.format == OutputFormat::Json {
            let providers = providers
                .iter()
                .map(|p| {
                    Ok(dto::ProviderDto::from(
                        convert::provider_from_proto(p).map_err(bad_reply)?,
                    ))
                })
                .collect::<Result<Vec<_>, CliError>>()?;
            return self.json(&to_value(dto::ProvidersDto { providers })?);
        }
        let rows = providers
            .iter()
            .map(|p| {
                vec![
                    p.provider_id.clone(),
                    p.kind.clone(),
                    if p.healthy { "yes" } else { "no" }.into(),
                    p.health_message.clone(),
                ]
            })
            .collect();
        self.text(&table(&["NAME", "KIND", "HEALTHY", "MESSAGE"], rows))
    }

    /// `secret list`.
    pub(super) fn secrets(&self, secrets: &[proto::SecretMeta]) -> Result<(), CliError> {
        if self.format == OutputFormat::Json {
            let secrets = secrets
                .iter()
                .map(|s| convert::secret_meta_from_proto(s).map_err(bad_reply))
                .collect::<Result<Vec<_>, _>>()?;
            return self.json(&json!({ "secrets": secrets }));
        }
        let rows = secrets
            .iter()
            .map(|s| {
                vec![
                    s.name.clone(),
                    ts(s.created_at.as_ref()),
                    ts(s.updated_at.as_ref()),
                ]
            })
            .collect();
        self.text(&table(&["NAME", "CREATED", "UPDATED"], rows))
    }

    /// `worker token`.
    pub(super) fn token(&self, t: &proto::IssueTokenResponse) -> Result<(), CliError> {
        match self.format {
            OutputFormat::Json => self.json(&json!({
                "worker_id": t.worker_id,
                "token": t.token,
                "expires_at": ts(t.expires_at.as_ref()),
            })),
            OutputFormat::Text => self.text(&format!(
                "HODEI_WORKER_ID={}\nHODEI_WORKER_TOKEN={}\n# expires {}\n",
                t.worker_id,
                t.token,
                ts(t.expires_at.as_ref())
            )),
        }
    }

    /// A command that changed one named thing.
    pub(super) fn done(&self, key: &str, id: &str, what: &str) -> Result<(), CliError> {
        match self.format {
            OutputFormat::Json => self.json(&json!({ key: id, "status": what })),
            OutputFormat::Text => {
                let noun = if key == "worker_id" {
                    "worker"
                } else {
                    "secret"
                };
                self.text(&format!("{noun} {id} {what}\n"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_words_quote_what_needs_it() {
        let argv = vec!["sh".to_string(), "-c".into(), "echo 'hi'".into()];
        assert_eq!(shell_words(&argv), r"sh -c 'echo '\''hi'\'''");
    }

    #[test]
    fn job_list_json_has_next_cursor_only_when_there_is_a_next_page() {
        let last = proto::ListJobsResponse {
            jobs: Vec::new(),
            next_cursor: String::new(),
        };
        let v = to_value(jobs_page(&last).unwrap()).unwrap();
        assert_eq!(v, json!({ "jobs": [] }));
        assert!(v.get("next_cursor").is_none(), "{v}");
        let more = proto::ListJobsResponse {
            jobs: Vec::new(),
            next_cursor: "50".into(),
        };
        let v = to_value(jobs_page(&more).unwrap()).unwrap();
        assert_eq!(v, json!({ "jobs": [], "next_cursor": "50" }));
    }

    #[test]
    fn tables_align_columns() {
        let t = table(&["A", "BB"], vec![vec!["xxx".into(), "y".into()]]);
        assert_eq!(t, "A    BB\nxxx  y\n");
    }
}
