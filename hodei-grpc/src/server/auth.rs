//! The edge of every API call: bearer-token authentication, the caller's
//! identity, and the correlation id (read from `x-correlation-id` or
//! generated here, then echoed in the response metadata).

use std::sync::Arc;

use hodei_core::ids::{Actor, CorrelationId};
use hodei_core::ports::RequestContext;
use hodei_core::runtime::ApiError;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};

use crate::config::ApiToken;

/// Metadata key of the correlation id.
pub const CORRELATION_HEADER: &str = "x-correlation-id";
/// Metadata key naming the spec field a rejection is about.
pub const ERROR_FIELD_HEADER: &str = "x-hodei-error-field";
/// Identity of callers when no API tokens are configured.
pub const ANONYMOUS: &str = "anonymous";

/// Authenticates API calls and stamps them with a [`RequestContext`].
#[derive(Clone)]
pub struct Auth {
    tokens: Arc<Vec<ApiToken>>,
}

impl Auth {
    /// With no tokens every caller is [`ANONYMOUS`].
    pub fn new(tokens: Vec<ApiToken>) -> Self {
        Self {
            tokens: Arc::new(tokens),
        }
    }

    fn identify(&self, req: &Request<()>) -> Result<Actor, String> {
        if self.tokens.is_empty() {
            return Ok(Actor::new(ANONYMOUS));
        }
        let header = req
            .metadata()
            .get("authorization")
            .ok_or("missing bearer token (authorization: Bearer <token>)")?;
        let header = header
            .to_str()
            .map_err(|_| "malformed authorization header")?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or("authorization must be `Bearer <token>`")?
            .trim();
        // Compare against every token so that timing does not reveal which
        // prefix matched.
        let mut found = None;
        for t in self.tokens.iter() {
            if constant_time_eq(t.token.as_bytes(), token.as_bytes()) {
                found = Some(t.name.clone());
            }
        }
        found
            .map(Actor::new)
            .ok_or_else(|| "unknown API token".to_owned())
    }
}

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let correlation_id = correlation_from(&req);
        match self.identify(&req) {
            Ok(actor) => {
                req.extensions_mut().insert(RequestContext {
                    correlation_id,
                    actor,
                });
                Ok(req)
            }
            Err(reason) => {
                let mut status = Status::unauthenticated(reason);
                set_correlation(status.metadata_mut(), &correlation_id);
                Err(status)
            }
        }
    }
}

/// The context the interceptor stored on a request.
pub fn context<T>(req: &Request<T>) -> RequestContext {
    req.extensions()
        .get::<RequestContext>()
        .cloned()
        .unwrap_or_else(|| RequestContext {
            correlation_id: correlation_from(req),
            actor: Actor::new(ANONYMOUS),
        })
}

/// A response carrying the correlation id.
pub fn reply<T>(ctx: &RequestContext, message: T) -> Response<T> {
    let mut resp = Response::new(message);
    set_correlation(resp.metadata_mut(), &ctx.correlation_id);
    resp
}

/// The gRPC status of an API error, carrying the correlation id.
pub fn status(ctx: &RequestContext, err: ApiError) -> Status {
    let mut s = match err {
        ApiError::InvalidArgument(m) => Status::invalid_argument(m),
        ApiError::NotFound(m) => Status::not_found(m),
        ApiError::FailedPrecondition(m) => Status::failed_precondition(m),
        ApiError::Unauthenticated(m) => Status::unauthenticated(m),
        ApiError::Unavailable(m) => Status::unavailable(m),
        ApiError::Internal(m) => Status::internal(m),
        #[allow(unreachable_patterns)]
        other => Status::internal(other.to_string()),
    };
    set_correlation(s.metadata_mut(), &ctx.correlation_id);
    s
}

/// An INVALID_ARGUMENT status naming `field`.
pub fn invalid(ctx: &RequestContext, field: &str, message: String) -> Status {
    let mut s = Status::invalid_argument(message);
    set_correlation(s.metadata_mut(), &ctx.correlation_id);
    if let Ok(v) = MetadataValue::try_from(field) {
        s.metadata_mut().insert(ERROR_FIELD_HEADER, v);
    }
    s
}

fn correlation_from<T>(req: &Request<T>) -> CorrelationId {
    req.metadata()
        .get(CORRELATION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| is_valid_correlation_id(v))
        .map(CorrelationId::new)
        .unwrap_or_else(|| CorrelationId::new(uuid::Uuid::new_v4().to_string()))
}

/// Whether a client-supplied correlation id is kept (1 to 128 printable
/// ASCII characters); otherwise a fresh one is generated.
pub fn is_valid_correlation_id(v: &str) -> bool {
    !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic())
}

fn set_correlation(md: &mut tonic::metadata::MetadataMap, id: &CorrelationId) {
    if let Ok(v) = MetadataValue::try_from(id.as_str()) {
        md.insert(CORRELATION_HEADER, v);
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    fn token(name: &str, token: &str) -> ApiToken {
        ApiToken {
            name: name.into(),
            token: token.into(),
        }
    }

    #[test]
    fn no_tokens_means_anonymous_and_a_generated_correlation_id() {
        let mut auth = Auth::new(vec![]);
        let req = auth.call(Request::new(())).unwrap();
        let ctx = context(&req);
        assert_eq!(ctx.actor.as_str(), ANONYMOUS);
        assert!(!ctx.correlation_id.as_str().is_empty());
    }

    #[test]
    fn the_token_name_is_the_actor() {
        let mut auth = Auth::new(vec![token("ci", "abcdefgh"), token("ops", "12345678")]);
        let mut req = Request::new(());
        req.metadata_mut()
            .insert("authorization", "Bearer 12345678".parse().unwrap());
        req.metadata_mut()
            .insert(CORRELATION_HEADER, "corr-1".parse().unwrap());
        let ctx = context(&auth.call(req).unwrap());
        assert_eq!(ctx.actor.as_str(), "ops");
        assert_eq!(ctx.correlation_id.as_str(), "corr-1");
    }

    #[test]
    fn bad_or_missing_tokens_are_refused_with_the_correlation_id() {
        let mut auth = Auth::new(vec![token("ci", "abcdefgh")]);
        let err = auth.call(Request::new(())).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert!(err.metadata().get(CORRELATION_HEADER).is_some());
        let mut req = Request::new(());
        req.metadata_mut()
            .insert("authorization", "Bearer wrongwrong".parse().unwrap());
        assert_eq!(
            auth.call(req).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    }
}
