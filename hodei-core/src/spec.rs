//! Job specifications: the raw input as submitted, and the validated
//! [`JobSpec`] it parses into ("parse, don't validate").
//!
//! A [`JobSpec`] can only be built by [`JobSpec::parse`], so every spec the
//! rest of the system sees satisfies the rules below. Each rejection is a
//! [`SpecError`] naming the field, the problem and what is accepted.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::SpecError;
use crate::ids::ProviderId;

/// A job spec exactly as a client sent it (JSON over HTTP, or mapped from
/// proto). Unknown fields are rejected.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJobSpec {
    /// Human-readable name; defaults to the program's first word.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// argv of the program to run. Exactly one of `command`/`script`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// A script, run by its shebang or `sh`. Exactly one of `command`/`script`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script: Option<String>,
    /// Image for providers that run images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Environment of the job process.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Names of secrets from the secret store to expose to the job.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    /// Working directory, created when missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// Wall-clock limit of one attempt, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// Attempts in total, including the first (1..=100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Higher runs first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    /// Free-form labels, used for affinity and filtering.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Provider to run on; any healthy provider when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// Resources requested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<RawResources>,
    /// Client key that makes a submission idempotent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Retry attempts that exit non-zero (off by default: a non-zero exit
    /// is a permanent failure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_on_failure: Option<bool>,
}

/// Requested resources, as submitted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawResources {
    /// CPUs (fractions allowed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<f64>,
    /// Memory in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
}

/// Limits applied when parsing a spec. Configurable by the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecLimits {
    /// Timeout used when the spec gives none.
    pub default_timeout_secs: u64,
    /// Largest accepted timeout.
    pub max_timeout_secs: u64,
    /// Largest script, in bytes.
    pub max_script_bytes: usize,
    /// Most argv entries.
    pub max_command_args: usize,
    /// Most env entries.
    pub max_env: usize,
    /// Most labels.
    pub max_labels: usize,
    /// Most secrets.
    pub max_secrets: usize,
    /// Largest spec as a whole (sum of all strings), in bytes.
    pub max_spec_bytes: usize,
    /// Longest single string value (env value, label value, argument).
    pub max_value_bytes: usize,
}

impl Default for SpecLimits {
    fn default() -> Self {
        Self {
            default_timeout_secs: 3600,
            max_timeout_secs: 7 * 24 * 3600,
            max_script_bytes: 1024 * 1024,
            max_command_args: 4096,
            max_env: 256,
            max_labels: 64,
            max_secrets: 64,
            max_spec_bytes: 2 * 1024 * 1024,
            max_value_bytes: 128 * 1024,
        }
    }
}

impl SpecLimits {
    /// The absolute ceilings, used when reading specs back from storage
    /// (they were validated when submitted, perhaps under other limits).
    pub fn permissive() -> Self {
        Self {
            default_timeout_secs: 3600,
            max_timeout_secs: u64::MAX / 1000,
            max_script_bytes: usize::MAX,
            max_command_args: usize::MAX,
            max_env: usize::MAX,
            max_labels: usize::MAX,
            max_secrets: usize::MAX,
            max_spec_bytes: usize::MAX,
            max_value_bytes: usize::MAX,
        }
    }
}

/// What a job runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Program {
    /// argv; the first entry is resolved through `PATH`.
    Command(Vec<String>),
    /// A script, run by its shebang or `sh`.
    Script(String),
}

/// Validated resources.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Resources {
    /// CPUs, > 0 when set.
    pub cpu: Option<f64>,
    /// Memory in MiB, > 0 when set.
    pub memory_mb: Option<u64>,
}

/// A validated job spec. Build it with [`JobSpec::parse`].
#[derive(Debug, Clone, PartialEq)]
pub struct JobSpec {
    name: String,
    program: Program,
    image: Option<String>,
    env: BTreeMap<String, String>,
    secrets: Vec<String>,
    working_dir: Option<String>,
    timeout: Duration,
    max_attempts: u32,
    priority: i32,
    labels: BTreeMap<String, String>,
    provider: Option<ProviderId>,
    resources: Resources,
    idempotency_key: Option<String>,
    retry_on_failure: bool,
}

/// Accepted range of `max_attempts`.
pub const MAX_ATTEMPTS_RANGE: std::ops::RangeInclusive<u32> = 1..=100;

impl JobSpec {
    /// Parses a raw spec under `limits`. The first problem found is returned.
    pub fn parse(raw: RawJobSpec, limits: &SpecLimits) -> Result<Self, SpecError> {
        let total = raw_size(&raw);
        if total > limits.max_spec_bytes {
            return Err(SpecError::new(
                "spec",
                format!("is {total} bytes"),
                format!("at most {} bytes in total", limits.max_spec_bytes),
            ));
        }
        let program = match (raw.command, raw.script) {
            (Some(_), Some(_)) => {
                return Err(SpecError::new(
                    "command",
                    "and `script` are both set",
                    "exactly one of `command` (argv list) or `script` (text)",
                ));
            }
            (None, None) => {
                return Err(SpecError::new(
                    "command",
                    "is missing (and so is `script`)",
                    "exactly one of `command` (argv list) or `script` (text)",
                ));
            }
            (Some(argv), None) => {
                if argv.is_empty() || argv[0].trim().is_empty() {
                    return Err(SpecError::new(
                        "command",
                        "is empty",
                        "a non-empty argv list whose first entry names a program",
                    ));
                }
                if argv.len() > limits.max_command_args {
                    return Err(SpecError::new(
                        "command",
                        format!("has {} arguments", argv.len()),
                        format!("at most {} arguments", limits.max_command_args),
                    ));
                }
                for (i, arg) in argv.iter().enumerate() {
                    check_value(&format!("command[{i}]"), arg, limits)?;
                }
                Program::Command(argv)
            }
            (None, Some(script)) => {
                if script.trim().is_empty() {
                    return Err(SpecError::new(
                        "script",
                        "is empty",
                        "a non-empty script, run by its shebang or sh",
                    ));
                }
                if script.len() > limits.max_script_bytes {
                    return Err(SpecError::new(
                        "script",
                        format!("is {} bytes", script.len()),
                        format!("at most {} bytes", limits.max_script_bytes),
                    ));
                }
                if script.contains('\0') {
                    return Err(SpecError::new(
                        "script",
                        "contains a NUL byte",
                        "text without NUL bytes",
                    ));
                }
                Program::Script(script)
            }
        };

        let name = match raw.name {
            Some(name) => {
                let trimmed = name.trim();
                if trimmed.is_empty()
                    || trimmed.len() > 256
                    || trimmed.chars().any(char::is_control)
                {
                    return Err(SpecError::new(
                        "name",
                        "is empty, too long or has control characters",
                        "1 to 256 printable characters",
                    ));
                }
                trimmed.to_owned()
            }
            None => default_name(&program),
        };

        let image = match raw.image {
            Some(image) => {
                if image.is_empty()
                    || image.len() > 512
                    || image.chars().any(|c| c.is_whitespace() || c.is_control())
                {
                    return Err(SpecError::new(
                        "image",
                        format!("{image:?} is not an image reference"),
                        "a reference such as `busybox:latest` (1-512 chars, no spaces)",
                    ));
                }
                Some(image)
            }
            None => None,
        };

        if raw.env.len() > limits.max_env {
            return Err(SpecError::new(
                "env",
                format!("has {} entries", raw.env.len()),
                format!("at most {} entries", limits.max_env),
            ));
        }
        for (key, value) in &raw.env {
            if !is_env_name(key) {
                return Err(SpecError::new(
                    format!("env.{key}"),
                    "is not a valid variable name",
                    "names matching [A-Za-z_][A-Za-z0-9_]* (at most 256 chars)",
                ));
            }
            if key.starts_with("HODEI_") {
                return Err(SpecError::new(
                    format!("env.{key}"),
                    "uses the reserved prefix HODEI_",
                    "names not starting with HODEI_",
                ));
            }
            check_value(&format!("env.{key}"), value, limits)?;
            if value.contains('\0') {
                return Err(SpecError::new(
                    format!("env.{key}"),
                    "contains a NUL byte",
                    "values without NUL bytes",
                ));
            }
        }

        if raw.secrets.len() > limits.max_secrets {
            return Err(SpecError::new(
                "secrets",
                format!("has {} entries", raw.secrets.len()),
                format!("at most {} secrets", limits.max_secrets),
            ));
        }
        let mut secrets = Vec::with_capacity(raw.secrets.len());
        for (i, secret) in raw.secrets.into_iter().enumerate() {
            if !is_env_name(&secret) {
                return Err(SpecError::new(
                    format!("secrets[{i}]"),
                    format!("{secret:?} is not a valid secret name"),
                    "names matching [A-Za-z_][A-Za-z0-9_]* (at most 256 chars)",
                ));
            }
            if raw.env.contains_key(&secret) {
                return Err(SpecError::new(
                    format!("secrets[{i}]"),
                    format!("{secret:?} is also set in env"),
                    "a secret name that is not also an env name",
                ));
            }
            if secrets.contains(&secret) {
                return Err(SpecError::new(
                    format!("secrets[{i}]"),
                    format!("{secret:?} is listed twice"),
                    "each secret once",
                ));
            }
            secrets.push(secret);
        }

        let working_dir = match raw.working_dir {
            Some(dir) => {
                if dir.is_empty() || dir.contains('\0') || dir.len() > 4096 {
                    return Err(SpecError::new(
                        "working_dir",
                        "is empty, too long or contains NUL",
                        "a path of 1 to 4096 bytes",
                    ));
                }
                Some(dir)
            }
            None => None,
        };

        let timeout_secs = raw.timeout_secs.unwrap_or(limits.default_timeout_secs);
        if timeout_secs == 0 || timeout_secs > limits.max_timeout_secs {
            return Err(SpecError::new(
                "timeout_secs",
                format!("is {timeout_secs}"),
                format!("1..={} seconds", limits.max_timeout_secs),
            ));
        }

        let max_attempts = raw.max_attempts.unwrap_or(1);
        if !MAX_ATTEMPTS_RANGE.contains(&max_attempts) {
            return Err(SpecError::new(
                "max_attempts",
                format!("is {max_attempts}"),
                format!(
                    "{}..={}",
                    MAX_ATTEMPTS_RANGE.start(),
                    MAX_ATTEMPTS_RANGE.end()
                ),
            ));
        }

        let priority = raw.priority.unwrap_or(0);
        if !(-1000..=1000).contains(&priority) {
            return Err(SpecError::new(
                "priority",
                format!("is {priority}"),
                "-1000..=1000 (higher runs first)",
            ));
        }

        if raw.labels.len() > limits.max_labels {
            return Err(SpecError::new(
                "labels",
                format!("has {} entries", raw.labels.len()),
                format!("at most {} labels", limits.max_labels),
            ));
        }
        for (key, value) in &raw.labels {
            if !is_label_key(key) {
                return Err(SpecError::new(
                    format!("labels.{key}"),
                    "is not a valid label key",
                    "1-63 chars of [A-Za-z0-9._/-], starting with a letter or digit",
                ));
            }
            if value.len() > 256 || value.chars().any(char::is_control) {
                return Err(SpecError::new(
                    format!("labels.{key}"),
                    "value is too long or has control characters",
                    "at most 256 printable characters",
                ));
            }
        }

        let provider = match raw.provider {
            Some(p) => {
                if !is_label_key(&p) {
                    return Err(SpecError::new(
                        "provider",
                        format!("{p:?} is not a provider name"),
                        "a configured provider name such as `local` or `docker`",
                    ));
                }
                Some(ProviderId::new(p))
            }
            None => None,
        };

        let resources = match raw.resources {
            Some(r) => {
                if let Some(cpu) = r.cpu
                    && !(cpu.is_finite() && cpu > 0.0 && cpu <= 1024.0)
                {
                    return Err(SpecError::new(
                        "resources.cpu",
                        format!("is {cpu}"),
                        "a number of CPUs > 0 and <= 1024, e.g. 0.5",
                    ));
                }
                if let Some(mem) = r.memory_mb
                    && (mem == 0 || mem > 4 * 1024 * 1024)
                {
                    return Err(SpecError::new(
                        "resources.memory_mb",
                        format!("is {mem}"),
                        "1..=4194304 MiB",
                    ));
                }
                Resources {
                    cpu: r.cpu,
                    memory_mb: r.memory_mb,
                }
            }
            None => Resources::default(),
        };

        let idempotency_key = match raw.idempotency_key {
            Some(k) => {
                if k.is_empty() || k.len() > 256 || k.chars().any(char::is_control) {
                    return Err(SpecError::new(
                        "idempotency_key",
                        "is empty, too long or has control characters",
                        "1 to 256 printable characters",
                    ));
                }
                Some(k)
            }
            None => None,
        };

        Ok(Self {
            name,
            program,
            image,
            env: raw.env,
            secrets,
            working_dir,
            timeout: Duration::from_secs(timeout_secs),
            max_attempts,
            priority,
            labels: raw.labels,
            provider,
            resources,
            idempotency_key,
            retry_on_failure: raw.retry_on_failure.unwrap_or(false),
        })
    }

    /// Parses a spec from JSON text, mapping JSON errors to a [`SpecError`]
    /// that says where the input was wrong.
    pub fn from_json(text: &str, limits: &SpecLimits) -> Result<Self, SpecError> {
        if text.len() > limits.max_spec_bytes {
            return Err(SpecError::new(
                "spec",
                format!("is {} bytes", text.len()),
                format!("at most {} bytes in total", limits.max_spec_bytes),
            ));
        }
        // serde would also map an array onto the fields in order
        // (`[null, ["true"]]`): only the object form is a spec.
        if text.trim_start().starts_with('[') {
            return Err(SpecError::new(
                "spec",
                "is a JSON array",
                format!(
                    "a JSON object with the fields {}",
                    RAW_SPEC_FIELDS
                        .iter()
                        .map(|(f, _)| *f)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        let mut de = serde_json::Deserializer::from_str(text);
        let raw: RawJobSpec = serde_path_to_error::deserialize(&mut de)
            .map_err(|e| json_error(&e.path().to_string(), e.inner()))?;
        de.end().map_err(|e| json_error(".", &e))?;
        Self::parse(raw, limits)
    }

    /// The raw form, for storage and the wire. `parse(to_raw())` round-trips.
    pub fn to_raw(&self) -> RawJobSpec {
        let (command, script) = match &self.program {
            Program::Command(argv) => (Some(argv.clone()), None),
            Program::Script(s) => (None, Some(s.clone())),
        };
        RawJobSpec {
            name: Some(self.name.clone()),
            command,
            script,
            image: self.image.clone(),
            env: self.env.clone(),
            secrets: self.secrets.clone(),
            working_dir: self.working_dir.clone(),
            timeout_secs: Some(self.timeout.as_secs()),
            max_attempts: Some(self.max_attempts),
            priority: Some(self.priority),
            labels: self.labels.clone(),
            provider: self.provider.as_ref().map(|p| p.as_str().to_owned()),
            resources: if self.resources == Resources::default() {
                None
            } else {
                Some(RawResources {
                    cpu: self.resources.cpu,
                    memory_mb: self.resources.memory_mb,
                })
            },
            idempotency_key: self.idempotency_key.clone(),
            retry_on_failure: self.retry_on_failure.then_some(true),
        }
    }

    /// Display name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// What runs.
    pub fn program(&self) -> &Program {
        &self.program
    }
    /// Requested image.
    pub fn image(&self) -> Option<&str> {
        self.image.as_deref()
    }
    /// Environment of the job process.
    pub fn env(&self) -> &BTreeMap<String, String> {
        &self.env
    }
    /// Secret names.
    pub fn secrets(&self) -> &[String] {
        &self.secrets
    }
    /// Working directory.
    pub fn working_dir(&self) -> Option<&str> {
        self.working_dir.as_deref()
    }
    /// Limit of one attempt.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
    /// Attempts in total.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }
    /// Priority, higher first.
    pub fn priority(&self) -> i32 {
        self.priority
    }
    /// Labels.
    pub fn labels(&self) -> &BTreeMap<String, String> {
        &self.labels
    }
    /// Requested provider.
    pub fn provider(&self) -> Option<&ProviderId> {
        self.provider.as_ref()
    }
    /// Requested resources.
    pub fn resources(&self) -> Resources {
        self.resources
    }
    /// Client idempotency key.
    pub fn idempotency_key(&self) -> Option<&str> {
        self.idempotency_key.as_deref()
    }
    /// Whether a non-zero exit is retried.
    pub fn retry_on_failure(&self) -> bool {
        self.retry_on_failure
    }
}

impl Serialize for JobSpec {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_raw().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for JobSpec {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = RawJobSpec::deserialize(deserializer)?;
        JobSpec::parse(raw, &SpecLimits::permissive()).map_err(serde::de::Error::custom)
    }
}

/// Parses a duration such as `30s`, `5m`, `1h30m` or a bare number of
/// seconds. Used by the CLI's `--timeout`.
pub fn parse_duration_secs(text: &str) -> Result<u64, SpecError> {
    let err = || {
        SpecError::new(
            "timeout",
            format!("{text:?} is not a duration"),
            "a number of seconds or units like 30s, 5m, 1h30m",
        )
    };
    let t = text.trim();
    if t.is_empty() {
        return Err(err());
    }
    if let Ok(n) = t.parse::<u64>() {
        return Ok(n);
    }
    let mut total: u64 = 0;
    let mut num = String::new();
    for c in t.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: u64 = num.parse().map_err(|_| err())?;
        num.clear();
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            _ => return Err(err()),
        };
        total = total
            .checked_add(n.checked_mul(unit).ok_or_else(err)?)
            .ok_or_else(err)?;
    }
    if !num.is_empty() {
        return Err(err());
    }
    Ok(total)
}

/// Parses a memory size such as `512Mi`, `2Gi`, `512M`, `1G` or a bare
/// number of MiB. Used by the CLI's `--memory`.
pub fn parse_memory_mb(text: &str) -> Result<u64, SpecError> {
    let err = || {
        SpecError::new(
            "memory",
            format!("{text:?} is not a memory size"),
            "a number of MiB or a size like 512Mi, 2Gi, 512M, 1G",
        )
    };
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().map_err(|_| err())?;
    let factor = match unit {
        "" | "Mi" | "M" | "MiB" | "MB" => 1,
        "Gi" | "G" | "GiB" | "GB" => 1024,
        _ => return Err(err()),
    };
    n.checked_mul(factor).ok_or_else(err)
}

fn default_name(program: &Program) -> String {
    let first = match program {
        Program::Command(argv) => argv[0].rsplit('/').next().unwrap_or("job"),
        Program::Script(_) => "script",
    };
    first.chars().take(64).collect()
}

fn check_value(field: &str, value: &str, limits: &SpecLimits) -> Result<(), SpecError> {
    if value.len() > limits.max_value_bytes {
        return Err(SpecError::new(
            field,
            format!("is {} bytes", value.len()),
            format!("at most {} bytes per value", limits.max_value_bytes),
        ));
    }
    Ok(())
}

fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 256
}

fn is_label_key(key: &str) -> bool {
    let mut chars = key.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '/' | '-'))
        && key.len() <= 63
}

fn raw_size(raw: &RawJobSpec) -> usize {
    let strs =
        |m: &BTreeMap<String, String>| m.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
    raw.name.as_ref().map_or(0, String::len)
        + raw
            .command
            .as_ref()
            .map_or(0, |c| c.iter().map(String::len).sum())
        + raw.script.as_ref().map_or(0, String::len)
        + raw.image.as_ref().map_or(0, String::len)
        + strs(&raw.env)
        + strs(&raw.labels)
        + raw.secrets.iter().map(String::len).sum::<usize>()
        + raw.working_dir.as_ref().map_or(0, String::len)
}

/// Fields of [`RawJobSpec`] and what each accepts, for error messages
/// (also those of the HTTP API, which reads the same document).
pub const RAW_SPEC_FIELDS: &[(&str, &str)] = &[
    ("name", "a string"),
    ("command", "a list of strings (argv)"),
    ("script", "a string"),
    ("image", "a string"),
    ("env", "an object of string values"),
    ("secrets", "a list of secret names"),
    ("working_dir", "a string"),
    ("timeout_secs", "a whole number of seconds"),
    ("max_attempts", "a whole number 1..=100"),
    ("priority", "an integer -1000..=1000"),
    ("labels", "an object of string values"),
    ("provider", "a provider name"),
    (
        "resources",
        "an object {\"cpu\": number, \"memory_mb\": whole number}",
    ),
    ("idempotency_key", "a string"),
    ("retry_on_failure", "true or false"),
];

/// Fields of [`RawResources`] and what each accepts.
const RAW_RESOURCE_FIELDS: &[(&str, &str)] = &[
    ("cpu", "a number of CPUs, fractions allowed"),
    ("memory_mb", "a whole number of MiB"),
];

/// The [`SpecError`] for a JSON error at `path` (`serde_path_to_error`'s
/// form: `command`, `resources.cpu`, `secrets[1]`; `.` is the whole text).
fn json_error(path: &str, e: &serde_json::Error) -> SpecError {
    let names = |fields: &[(&str, &str)]| {
        fields
            .iter()
            .map(|(f, _)| *f)
            .collect::<Vec<_>>()
            .join(", ")
    };
    // The whole text (syntax, not an object) or the array form serde
    // would map onto the struct: no field of the spec to name.
    if path == "." || path.starts_with('[') {
        return SpecError::new(
            "spec",
            format!("is not valid JSON for a job spec ({e})"),
            format!("a JSON object with the fields {}", names(RAW_SPEC_FIELDS)),
        );
    }
    let in_resources = path.starts_with("resources.");
    let fields = if in_resources {
        RAW_RESOURCE_FIELDS
    } else {
        RAW_SPEC_FIELDS
    };
    if e.to_string().starts_with("unknown field") {
        let of = if in_resources {
            "`resources`"
        } else {
            "a job spec"
        };
        return SpecError::new(
            path,
            format!("is not a field of {of}"),
            format!("the fields {}", names(fields)),
        );
    }
    let top = if in_resources {
        path.trim_start_matches("resources.")
    } else {
        path
    };
    let top = top.split(['.', '[']).next().unwrap_or(top);
    let accepted = fields
        .iter()
        .find(|(f, _)| *f == top)
        .map_or("the type documented in DESIGN.md", |(_, a)| a);
    SpecError::new(path, format!("is not valid ({e})"), accepted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(argv: &[&str]) -> RawJobSpec {
        RawJobSpec {
            command: Some(argv.iter().map(|s| s.to_string()).collect()),
            ..Default::default()
        }
    }

    fn field_of(raw: RawJobSpec) -> String {
        JobSpec::parse(raw, &SpecLimits::default())
            .expect_err("spec must be rejected")
            .field
    }

    #[test]
    fn minimal_command_gets_defaults() {
        let spec = JobSpec::parse(cmd(&["/bin/echo", "hi"]), &SpecLimits::default()).unwrap();
        assert_eq!(spec.name(), "echo");
        assert_eq!(spec.timeout(), Duration::from_secs(3600));
        assert_eq!(spec.max_attempts(), 1);
        assert!(!spec.retry_on_failure());
    }

    #[test]
    fn exactly_one_of_command_and_script() {
        assert_eq!(field_of(RawJobSpec::default()), "command");
        let mut both = cmd(&["ls"]);
        both.script = Some("ls".into());
        let err = JobSpec::parse(both, &SpecLimits::default()).unwrap_err();
        assert!(err.to_string().contains("exactly one of"), "{err}");
        assert_eq!(field_of(cmd(&[])), "command");
        assert_eq!(field_of(cmd(&[" "])), "command");
    }

    #[test]
    fn rejections_name_their_field() {
        let mut r = cmd(&["ls"]);
        r.timeout_secs = Some(0);
        assert_eq!(field_of(r.clone()), "timeout_secs");
        r.timeout_secs = Some(10 * 24 * 3600);
        assert_eq!(field_of(r), "timeout_secs");

        let mut r = cmd(&["ls"]);
        r.max_attempts = Some(0);
        assert_eq!(field_of(r.clone()), "max_attempts");
        r.max_attempts = Some(101);
        assert_eq!(field_of(r), "max_attempts");

        let mut r = cmd(&["ls"]);
        r.env.insert("1BAD".into(), "x".into());
        assert_eq!(field_of(r), "env.1BAD");

        let mut r = cmd(&["ls"]);
        r.labels.insert("bad key".into(), "x".into());
        assert_eq!(field_of(r), "labels.bad key");

        let mut r = cmd(&["ls"]);
        r.secrets = vec!["not-valid".into()];
        assert_eq!(field_of(r), "secrets[0]");

        let mut r = cmd(&["ls"]);
        r.resources = Some(RawResources {
            cpu: Some(-1.0),
            memory_mb: None,
        });
        assert_eq!(field_of(r), "resources.cpu");

        let mut r = cmd(&["ls"]);
        r.resources = Some(RawResources {
            cpu: None,
            memory_mb: Some(0),
        });
        assert_eq!(field_of(r), "resources.memory_mb");
    }

    #[test]
    fn bounded_sizes() {
        let limits = SpecLimits {
            max_script_bytes: 10,
            max_env: 1,
            max_labels: 1,
            ..SpecLimits::default()
        };
        let r = RawJobSpec {
            script: Some("x".repeat(11)),
            ..Default::default()
        };
        assert_eq!(JobSpec::parse(r, &limits).unwrap_err().field, "script");
        let mut r = cmd(&["ls"]);
        r.env.insert("A".into(), "1".into());
        r.env.insert("B".into(), "1".into());
        assert_eq!(JobSpec::parse(r, &limits).unwrap_err().field, "env");
    }

    #[test]
    fn unknown_fields_and_wrong_types_are_rejected_by_json() {
        let e = JobSpec::from_json(r#"{"command":["ls"],"bogus":1}"#, &SpecLimits::default())
            .unwrap_err();
        assert_eq!(e.field, "bogus", "{e}");
        assert!(e.accepted.contains("command, script"), "{e}");
        let e = JobSpec::from_json(
            r#"{"command":["ls"],"resources":{"gpu":1}}"#,
            &SpecLimits::default(),
        )
        .unwrap_err();
        assert_eq!(e.field, "resources.gpu", "{e}");
        assert_eq!(e.accepted, "the fields cpu, memory_mb", "{e}");
        let e = JobSpec::from_json(r#"{"command":"ls"}"#, &SpecLimits::default()).unwrap_err();
        assert_eq!(e.field, "command", "{e}");
        assert!(e.problem.contains("invalid type"), "{e}");
        assert!(e.to_string().contains("`command`"), "{e}");
        assert_eq!(e.accepted, "a list of strings (argv)", "{e}");
        let e = JobSpec::from_json(r#"{"secrets":["A",2]}"#, &SpecLimits::default()).unwrap_err();
        assert_eq!(e.field, "secrets[1]", "{e}");
        let e = JobSpec::from_json(
            r#"{"command":["ls"],"resources":{"cpu":"two"}}"#,
            &SpecLimits::default(),
        )
        .unwrap_err();
        assert_eq!(e.field, "resources.cpu", "{e}");
        let e = JobSpec::from_json(r#"{"command":["ls"]} trailing"#, &SpecLimits::default())
            .unwrap_err();
        assert_eq!(e.field, "spec", "{e}");
        let e = JobSpec::from_json("[1]", &SpecLimits::default()).unwrap_err();
        assert_eq!(e.field, "spec", "{e}");
        // An array serde could map onto the fields is refused too.
        let e = JobSpec::from_json(r#" [null, ["true"]]"#, &SpecLimits::default()).unwrap_err();
        assert_eq!(e.field, "spec", "{e}");
        assert!(e.to_string().contains("is a JSON array"), "{e}");
        assert!(
            e.to_string().contains("a JSON object with the fields"),
            "{e}"
        );
    }

    #[test]
    fn error_field_tables_list_every_raw_field() {
        let full = RawJobSpec {
            name: Some("n".into()),
            command: Some(vec!["ls".into()]),
            script: Some("s".into()),
            image: Some("i".into()),
            env: [("K".to_owned(), "V".to_owned())].into(),
            secrets: vec!["S".into()],
            working_dir: Some("/".into()),
            timeout_secs: Some(1),
            max_attempts: Some(1),
            priority: Some(0),
            labels: [("K".to_owned(), "V".to_owned())].into(),
            provider: Some("local".into()),
            resources: Some(RawResources {
                cpu: Some(1.0),
                memory_mb: Some(1),
            }),
            idempotency_key: Some("k".into()),
            retry_on_failure: Some(true),
        };
        let v = serde_json::to_value(&full).unwrap();
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        let mut listed: Vec<&str> = RAW_SPEC_FIELDS.iter().map(|(f, _)| *f).collect();
        listed.sort_unstable();
        assert_eq!(keys, listed);
        let mut keys: Vec<&str> = v["resources"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        let mut listed: Vec<&str> = RAW_RESOURCE_FIELDS.iter().map(|(f, _)| *f).collect();
        listed.sort_unstable();
        assert_eq!(keys, listed);
    }

    #[test]
    fn raw_round_trip() {
        let mut r = cmd(&["sh", "-c", "make test"]);
        r.env.insert("K".into(), "V".into());
        r.labels.insert("team".into(), "ci".into());
        r.secrets = vec!["DEPLOY_KEY".into()];
        r.max_attempts = Some(3);
        r.resources = Some(RawResources {
            cpu: Some(1.0),
            memory_mb: Some(512),
        });
        let spec = JobSpec::parse(r, &SpecLimits::default()).unwrap();
        let json = serde_json::to_string(&spec).unwrap();
        let back: JobSpec = serde_json::from_str(&json).unwrap();
        assert_eq!(spec, back);
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration_secs("30s").unwrap(), 30);
        assert_eq!(parse_duration_secs("1h30m").unwrap(), 5400);
        assert_eq!(parse_duration_secs("45").unwrap(), 45);
        assert!(parse_duration_secs("10x").is_err());
        assert!(parse_duration_secs("s").is_err());
        assert_eq!(parse_memory_mb("512Mi").unwrap(), 512);
        assert_eq!(parse_memory_mb("2Gi").unwrap(), 2048);
        assert!(parse_memory_mb("12Ki").is_err());
    }
}
