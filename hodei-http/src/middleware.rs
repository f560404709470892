//! Middleware: correlation id, request metrics, authentication.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hodei_core::ids::{Actor, CorrelationId};
use hodei_core::ports::RequestContext;
use hodei_core::runtime::new_correlation_id;

use crate::{AppState, HttpError};

/// The header carrying the correlation id, both ways.
pub(crate) const CORRELATION_HEADER: HeaderName = HeaderName::from_static("x-correlation-id");

/// Actor of every request when no token is configured.
pub(crate) const ANONYMOUS: &str = "anonymous";

/// Reads `x-correlation-id` (or generates one), stores it in the request
/// extensions and echoes it on the response, whatever the outcome.
pub(crate) async fn correlate(mut req: Request, next: Next) -> Response {
    let given = req.headers().get(&CORRELATION_HEADER).cloned();
    let (id, rejected) = match given {
        None => (new_correlation_id(), None),
        Some(v) => match v.to_str().ok().filter(|s| valid_correlation_id(s)) {
            Some(s) => (CorrelationId::new(s), None),
            None => (
                new_correlation_id(),
                Some(HttpError::InvalidArgument(
                    "invalid x-correlation-id header; accepted: 1 to 128 printable ASCII characters without spaces"
                        .into(),
                )),
            ),
        },
    };
    let mut response = match rejected {
        Some(e) => e.into_response(),
        None => {
            req.extensions_mut().insert(id.clone());
            next.run(req).await
        }
    };
    // Invariant: the id is printable ASCII (checked above, or a UUID).
    if let Ok(v) = HeaderValue::from_str(id.as_str()) {
        response.headers_mut().insert(CORRELATION_HEADER, v);
    }
    response
}

fn valid_correlation_id(s: &str) -> bool {
    (1..=128).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_graphic())
}

/// Counts the request in `hodei_http_requests_total` and times it in
/// `hodei_http_request_duration_seconds`, labelled with the route pattern
/// (not the raw path, whose ids would explode the label set).
pub(crate) async fn record_metrics(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    let start = Instant::now();
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(req).await;
    state.config.metrics.record_http(
        method.as_str(),
        &route,
        response.status().as_u16(),
        start.elapsed().as_secs_f64(),
    );
    response
}

/// Authenticates `/api/v1` requests with a bearer token (or the
/// `access_token` query parameter, for EventSource which cannot send
/// headers) and puts the [`RequestContext`] into the request extensions.
pub(crate) async fn authenticate(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let correlation_id = req
        .extensions()
        .get::<CorrelationId>()
        .cloned()
        .unwrap_or_else(new_correlation_id);
    let path = req.uri().path();
    let protected = path == "/api/v1" || path.starts_with("/api/v1/");
    let tokens = &state.config.api_tokens;
    let actor = if !protected || tokens.is_empty() {
        Actor::new(ANONYMOUS)
    } else {
        let presented = bearer(&req).or_else(|| query_token(&req));
        match presented {
            None => {
                return HttpError::Unauthenticated(
                    "missing bearer token; send `Authorization: Bearer <token>` (or `?access_token=<token>` for event streams)"
                        .into(),
                )
                .into_response();
            }
            Some(Err(e)) => return e.into_response(),
            Some(Ok(token)) => match find_token(tokens, &token) {
                Some(name) => Actor::new(name),
                None => {
                    return HttpError::Unauthenticated("invalid bearer token".into())
                        .into_response();
                }
            },
        }
    };
    req.extensions_mut().insert(RequestContext {
        correlation_id,
        actor,
    });
    next.run(req).await
}

fn bearer(req: &Request) -> Option<Result<String, HttpError>> {
    let value = req.headers().get(header::AUTHORIZATION)?;
    let parsed = value
        .to_str()
        .ok()
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| token.trim().to_owned())
        })
        .filter(|t| !t.is_empty());
    Some(parsed.ok_or_else(|| {
        HttpError::Unauthenticated(
            "malformed Authorization header; accepted: `Authorization: Bearer <token>`".into(),
        )
    }))
}

fn query_token(req: &Request) -> Option<Result<String, HttpError>> {
    let query = req.uri().query()?;
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k == "access_token" {
            return Some(Ok(percent_decode(v)));
        }
    }
    None
}

/// Compares against every configured token in time independent of where
/// the first difference is, so that response times do not leak a prefix.
fn find_token(
    tokens: &std::collections::BTreeMap<String, String>,
    presented: &str,
) -> Option<String> {
    let mut found = None;
    for (token, name) in tokens {
        if constant_time_eq(token.as_bytes(), presented.as_bytes()) {
            found = Some(name.clone());
        }
    }
    found
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Decodes `%XX` escapes and `+` (form encoding) of a query value.
pub(crate) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b+c"), "a b c");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("end%2"), "end%2");
        assert_eq!(percent_decode("x%41"), "xA");
    }

    #[test]
    fn correlation_ids() {
        assert!(valid_correlation_id("req-1"));
        assert!(!valid_correlation_id(""));
        assert!(!valid_correlation_id("a b"));
        assert!(!valid_correlation_id(&"x".repeat(129)));
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
