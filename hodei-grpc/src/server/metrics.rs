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
                let code = resp
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map(|c| format!("{:?}", tonic::Code::from_i32(c)))
                    .unwrap_or_else(|| "Ok".to_owned());
                m.record_grpc(&method, &code, start.elapsed().as_secs_f64());
            }
            result
        })
    }
}
