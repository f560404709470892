//! The crate's one error type and its JSON rendering.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hodei_core::runtime::ApiError;

use crate::dto::{ErrorBody, ErrorDetail};

/// Why a request failed. Rendered as `{"error": {"code", "message"}}` with
/// the status of the variant; the message says what was wrong and what is
/// accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    /// Bad input: 400, code `invalid_argument`.
    #[error("{0}")]
    InvalidArgument(String),
    /// Missing or wrong credentials: 401, code `unauthenticated`.
    #[error("{0}")]
    Unauthenticated(String),
    /// Unknown id or route: 404, code `not_found`.
    #[error("{0}")]
    NotFound(String),
    /// The route exists but not with this method: 405, code `method_not_allowed`.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// Valid input the current state refuses (e.g. cancelling a finished
    /// job): 409, code `failed_precondition`.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The body is larger than allowed: 413, code `payload_too_large`.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// A dependency is down; retry later: 503, code `unavailable`.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or an unexpected failure: 500, code `internal`.
    #[error("{0}")]
    Internal(String),
}

impl HttpError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            HttpError::InvalidArgument(_) => StatusCode::BAD_REQUEST,
            HttpError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            HttpError::NotFound(_) => StatusCode::NOT_FOUND,
            HttpError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            HttpError::FailedPrecondition(_) => StatusCode::CONFLICT,
            HttpError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            HttpError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            HttpError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            HttpError::InvalidArgument(_) => "invalid_argument",
            HttpError::Unauthenticated(_) => "unauthenticated",
            HttpError::NotFound(_) => "not_found",
            HttpError::MethodNotAllowed(_) => "method_not_allowed",
            HttpError::FailedPrecondition(_) => "failed_precondition",
            HttpError::PayloadTooLarge(_) => "payload_too_large",
            HttpError::Unavailable(_) => "unavailable",
            HttpError::Internal(_) => "internal",
        }
    }
}

impl From<ApiError> for HttpError {
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::InvalidArgument(m) => HttpError::InvalidArgument(m),
            ApiError::NotFound(m) => HttpError::NotFound(m),
            ApiError::FailedPrecondition(m) => HttpError::FailedPrecondition(m),
            ApiError::Unauthenticated(m) => HttpError::Unauthenticated(m),
            ApiError::Unavailable(m) => HttpError::Unavailable(m),
            ApiError::Internal(m) => HttpError::Internal(m),
        }
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(code = self.code(), error = %self, "http request failed");
        }
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code().to_owned(),
                message: self.to_string(),
            },
        };
        let mut response = (status, Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"hodei\""),
            );
        }
        response
    }
}
