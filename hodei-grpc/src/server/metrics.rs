//! Counts gRPC requests in the shared Prometheus registry of
//! [`hodei_http::metrics::Metrics`], as `hodei_grpc_requests_total{method,code}`
//! and `hodei_grpc_request_duration_seconds{method}`.
//!
//! A call is counted once, when its status is known: from the response
//! headers (`grpc-status`) for calls that fail before sending a body
//! (tonic's "trailers-only" answers), else from the trailers at the end of
//! the response body, so a server stream that ends with an error counts
//! with that error, not as `OK`. A response body dropped before its
//! trailers (the client went away, the connection broke) counts as
//! `CANCELLED`. The duration is the time to the response headers, so a
//! server stream counts its set-up, not its life.

use std::pin::Pin;
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
    RB: http_body::Body + Send + 'static,
{
    type Response = http::Response<MeteredBody<RB>>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let start = Instant::now();
        // Counted as CANCELLED if the call is dropped before it answers
        // (its client went away while the handler ran).
        let mut guard = Unanswered(
            self.metrics.clone().map(|metrics| Pending {
                metrics,
                method: req.uri().path().to_owned(),
                secs: 0.0,
            }),
            start,
        );
        let fut = self.inner.call(req);
        Box::pin(async move {
            let answer = fut.await;
            let mut pending = guard.0.take().map(|mut p| {
                p.secs = start.elapsed().as_secs_f64();
                p
            });
            let (parts, body) = match answer {
                Ok(resp) => resp.into_parts(),
                Err(e) => {
                    if let Some(p) = pending.take() {
                        p.finish(code_name(tonic::Code::Unknown));
                    }
                    return Err(e);
                }
            };
            // A status in the headers is the call's status: no trailers
            // will follow.
            if let Some(status) = parts.headers.get("grpc-status")
                && let Some(p) = pending.take()
            {
                p.finish(status_label(Some(status)));
            }
            Ok(http::Response::from_parts(
                parts,
                MeteredBody {
                    inner: Box::pin(body),
                    pending,
                },
            ))
        })
    }
}

/// A call waiting for its status.
struct Pending {
    metrics: Metrics,
    method: String,
    secs: f64,
}

impl Pending {
    fn finish(self, code: &'static str) {
        self.metrics.record_grpc(&self.method, code, self.secs);
    }
}

/// A call whose handler has not answered yet: dropped (the client went
/// away, the connection closed), it counts as `CANCELLED` with the time it
/// ran.
struct Unanswered(Option<Pending>, Instant);

impl Drop for Unanswered {
    fn drop(&mut self) {
        if let Some(mut p) = self.0.take() {
            p.secs = self.1.elapsed().as_secs_f64();
            p.finish(code_name(tonic::Code::Cancelled));
        }
    }
}

/// A response body that records its call when the trailers pass (or when
/// it is dropped before them, as `CANCELLED`).
pub struct MeteredBody<B: http_body::Body> {
    inner: Pin<Box<B>>,
    pending: Option<Pending>,
}

impl<B: http_body::Body> http_body::Body for MeteredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let polled = this.inner.as_mut().poll_frame(cx);
        let code = match &polled {
            Poll::Ready(Some(Ok(frame))) => frame
                .trailers_ref()
                .map(|t| status_label(t.get("grpc-status"))),
            // The body failed: the stream is reset, no status arrives.
            Poll::Ready(Some(Err(_))) => Some(code_name(tonic::Code::Unknown)),
            // Ended without trailers: nothing said otherwise.
            Poll::Ready(None) => Some(code_name(tonic::Code::Ok)),
            Poll::Pending => None,
        };
        if let Some(code) = code
            && let Some(p) = this.pending.take()
        {
            p.finish(code);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl<B: http_body::Body> Drop for MeteredBody<B> {
    fn drop(&mut self) {
        if let Some(p) = self.pending.take() {
            // Never polled to its end: cancelled, unless there was nothing
            // more to read (an empty body that ended without trailers).
            let code = if self.inner.is_end_stream() {
                tonic::Code::Ok
            } else {
                tonic::Code::Cancelled
            };
            p.finish(code_name(code));
        }
    }
}

/// The `code` label of a `grpc-status` value (headers or trailers): its
/// canonical name, `OK` without one, `UNKNOWN` for a value that is not a
/// status number.
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

    /// A response body of given frames.
    struct Frames(std::collections::VecDeque<http_body::Frame<bytes::Bytes>>);

    impl http_body::Body for Frames {
        type Data = bytes::Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
            Poll::Ready(self.get_mut().0.pop_front().map(Ok))
        }
    }

    fn trailers(code: &'static str) -> http_body::Frame<bytes::Bytes> {
        let mut t = http::HeaderMap::new();
        t.insert("grpc-status", http::HeaderValue::from_static(code));
        http_body::Frame::trailers(t)
    }

    /// Answers like tonic: `NOT_FOUND` in the headers on `/Get` (a failed
    /// unary call), else a message and the status in the trailers: `OK`
    /// on `/Submit`, `INTERNAL` on `/Watch` (a stream that failed later),
    /// none yet on `/Follow` (a stream the client drops).
    struct Answer;

    impl tower::Service<http::Request<()>> for Answer {
        type Response = http::Response<Frames>;
        type Error = std::convert::Infallible;
        type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: http::Request<()>) -> Self::Future {
            let path = req.uri().path();
            let data = http_body::Frame::data(bytes::Bytes::from_static(b"msg"));
            let frames = match path.rsplit('/').next() {
                Some("Get") => vec![],
                Some("Submit") => vec![data, trailers("0")],
                Some("Watch") => vec![data, trailers("13")],
                _ => vec![data],
            };
            let mut resp = http::Response::new(Frames(frames.into()));
            if path.ends_with("/Get") {
                resp.headers_mut()
                    .insert("grpc-status", http::HeaderValue::from_static("5"));
            }
            std::future::ready(Ok(resp))
        }
    }

    /// Never answers.
    struct Stuck;

    impl tower::Service<http::Request<()>> for Stuck {
        type Response = http::Response<Frames>;
        type Error = std::convert::Infallible;
        type Future = std::future::Pending<Result<Self::Response, Self::Error>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<()>) -> Self::Future {
            std::future::pending()
        }
    }

    #[tokio::test]
    async fn a_call_dropped_before_it_answers_counts_as_cancelled() {
        use tower::{Layer, Service};
        let metrics = Metrics::new();
        let mut svc = GrpcMetricsLayer(Some(metrics.clone())).layer(Stuck);
        let req = http::Request::builder()
            .uri("/hodei.v1.JobService/Slow")
            .body(())
            .unwrap();
        let call = svc.call(req);
        let text = metrics.render().await;
        assert!(!text.contains("JobService/Slow"), "{text}");
        drop(call);
        let text = metrics.render().await;
        assert!(text.contains(&series("Slow", "CANCELLED")), "{text}");
    }

    fn series(method: &str, code: &str) -> String {
        format!(
            r#"hodei_grpc_requests_total{{method="/hodei.v1.JobService/{method}",code="{code}"}} 1"#
        )
    }

    #[tokio::test]
    async fn the_layer_records_each_call_once_with_its_final_status() {
        use http_body::Body as _;
        use tower::{Layer, Service};
        let metrics = Metrics::new();
        let mut svc = GrpcMetricsLayer(Some(metrics.clone())).layer(Answer);
        let mut bodies = Vec::new();
        for method in ["Get", "Submit", "Watch", "Follow"] {
            futures::future::poll_fn(|cx| svc.poll_ready(cx))
                .await
                .unwrap();
            let req = http::Request::builder()
                .uri(format!("/hodei.v1.JobService/{method}"))
                .body(())
                .unwrap();
            bodies.push((method, svc.call(req).await.unwrap().into_body()));
        }
        // A status in the headers counts at once; the others wait for
        // their trailers.
        let text = metrics.render().await;
        assert!(text.contains(&series("Get", "NOT_FOUND")), "{text}");
        assert!(!text.contains("JobService/Submit"), "{text}");
        for (method, body) in &mut bodies {
            if *method == "Follow" {
                // One message, then the client goes away.
                let frame =
                    futures::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await;
                assert!(frame.is_some_and(|f| f.unwrap().is_data()));
                continue;
            }
            while futures::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx))
                .await
                .is_some()
            {}
        }
        let text = metrics.render().await;
        assert!(text.contains(&series("Submit", "OK")), "{text}");
        assert!(text.contains(&series("Watch", "INTERNAL")), "{text}");
        assert!(!text.contains(&series("Watch", "OK")), "{text}");
        assert!(!text.contains("JobService/Follow"), "{text}");
        drop(bodies);
        let text = metrics.render().await;
        assert!(text.contains(&series("Follow", "CANCELLED")), "{text}");
        // Each call once.
        assert!(text.contains(&series("Get", "NOT_FOUND")), "{text}");
        assert!(!text.contains("code=\"OK\"} 2"), "{text}");
    }
}
