//! Counts gRPC requests in the shared Prometheus registry of
//! [`hodei_http::metrics::Metrics`], as `hodei_grpc_requests_total{method,code}`
//! and `hodei_grpc_request_duration_seconds{method}`.
//!
//! The code is read from the response headers (`grpc-status`), which is
//! where tonic puts it for calls that fail before sending a body; calls
//! that answered normally report `OK`. The duration is the time to the
//! response headers, so a server stream counts its set-up, not its life.

use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;
use hodei_http::metrics::Metrics;
use tonic::codegen::http;

/// A tower layer that records every gRPC request in `Metrics`, when set.
#[derive(Clone, Default)]
pub struct GrpcMetricsLayer(pub Option<Metrics>);

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics {
            inner,
            metrics: self.0.clone(),
        }
    }
}

/// The service of [`GrpcMetricsLayer`].
#[derive(Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
    metrics: Option<Metrics>,
}

impl<S, B, RB> tower::Service<http::Request<B>> for GrpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = req.uri().path().to_owned();
        let start = Instant::now();
        let fut = self.inner.call(req);
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let result = fut.await;
            if let (Some(m), Ok(resp)) = (&metrics, &result) {
                let code = status_label(resp.headers().get("grpc-status"));
                m.record_grpc(&method, code, start.elapsed().as_secs_f64());
            }
            result
        })
    }
}

/// The `code` label of a response: the canonical name of its `grpc-status`
/// header, `OK` without one (the status of a normal answer comes in the
/// trailers, after the headers this layer sees), `UNKNOWN` for a value that
/// is not a status number.
fn status_label(header: Option<&http::HeaderValue>) -> &'static str {
    let Some(value) = header else {
        return code_name(tonic::Code::Ok);
    };
    match value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<i32>().ok())
    {
        // `from_i32` maps numbers outside 0..=16 to `Unknown`.
        Some(n) => code_name(tonic::Code::from_i32(n)),
        None => code_name(tonic::Code::Unknown),
    }
}

/// The canonical upper-case name of a gRPC status code, as the gRPC
/// specification and `grpc-status` tooling spell it (`OK`, `NOT_FOUND`).
/// Written out rather than derived from `Debug`, which says `NotFound`.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_its_canonical_name() {
        let expected = [
            "OK",
            "CANCELLED",
            "UNKNOWN",
            "INVALID_ARGUMENT",
            "DEADLINE_EXCEEDED",
            "NOT_FOUND",
            "ALREADY_EXISTS",
            "PERMISSION_DENIED",
            "RESOURCE_EXHAUSTED",
            "FAILED_PRECONDITION",
            "ABORTED",
            "OUT_OF_RANGE",
            "UNIMPLEMENTED",
            "INTERNAL",
            "UNAVAILABLE",
            "DATA_LOSS",
            "UNAUTHENTICATED",
        ];
        // The numbers are the wire values of the gRPC specification.
        for (n, name) in expected.iter().enumerate() {
            let code = tonic::Code::from_i32(n as i32);
            assert_eq!(code as i32, n as i32);
            assert_eq!(code_name(code), *name, "code {n}");
        }
    }

    #[test]
    fn labels_come_from_the_grpc_status_header() {
        let label = |v: &'static str| status_label(Some(&http::HeaderValue::from_static(v)));
        assert_eq!(status_label(None), "OK");
        assert_eq!(label("0"), "OK");
        assert_eq!(label("5"), "NOT_FOUND");
        assert_eq!(label("16"), "UNAUTHENTICATED");
        assert_eq!(label("99"), "UNKNOWN");
        assert_eq!(label("not-a-number"), "UNKNOWN");
    }

    /// Answers `NOT_FOUND` in the headers (as tonic does for a failed
    /// unary call) on paths ending in `/Get`, a plain response otherwise.
    struct Answer;

    impl tower::Service<http::Request<()>> for Answer {
        type Response = http::Response<()>;
        type Error = std::convert::Infallible;
        type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: http::Request<()>) -> Self::Future {
            let mut resp = http::Response::new(());
            if req.uri().path().ends_with("/Get") {
                resp.headers_mut()
                    .insert("grpc-status", http::HeaderValue::from_static("5"));
            }
            std::future::ready(Ok(resp))
        }
    }

    #[tokio::test]
    async fn the_layer_records_canonical_codes() {
        use tower::{Layer, Service};
        let metrics = Metrics::new();
        let mut svc = GrpcMetricsLayer(Some(metrics.clone())).layer(Answer);
        for path in ["/hodei.v1.JobService/Submit", "/hodei.v1.JobService/Get"] {
            futures::future::poll_fn(|cx| svc.poll_ready(cx))
                .await
                .unwrap();
            let req = http::Request::builder().uri(path).body(()).unwrap();
            svc.call(req).await.unwrap();
        }
        let text = metrics.render().await;
        for series in [
            r#"hodei_grpc_requests_total{method="/hodei.v1.JobService/Submit",code="OK"} 1"#,
            r#"hodei_grpc_requests_total{method="/hodei.v1.JobService/Get",code="NOT_FOUND"} 1"#,
        ] {
            assert!(text.contains(series), "{series} missing from:\n{text}");
        }
    }
}
