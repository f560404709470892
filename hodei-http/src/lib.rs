//! # hodei-http
//!
//! Hodei's HTTP edge: the REST API under `/api/v1` (with live logs as
//! Server-Sent Events), the web dashboard at `/`, Prometheus metrics at
//! `/metrics` and the health probes `/healthz` and `/readyz`. It holds no
//! state of its own: every handler is a thin translation between HTTP and
//! the [`ControlPlane`] of `hodei-core`.
//!
//! ## How the parts fit
//! - [`router`] builds an [`axum::Router`] from one route table
//!   (`routes.rs`): every route the server answers is a row there, so the
//!   OpenAPI document ([`openapi::ApiDoc`]) can be checked against it.
//! - Middleware, outermost first: the correlation id (read from
//!   `x-correlation-id` or generated, echoed on every response), request
//!   metrics, then bearer-token authentication of `/api/v1`. Handlers get a
//!   [`RequestContext`](hodei_core::ports::RequestContext) carrying both.
//! - `api.rs` holds the `/api/v1` handlers, `dto.rs` the JSON shapes (each
//!   with a `ToSchema`), [`HttpError`] the one error type, rendered as
//!   `{"error": {"code", "message"}}`.
//! - [`metrics::Metrics`] is the Prometheus registry; the gRPC server records
//!   into the same one ([`metrics::Metrics::record_grpc`]).
//! - `ui.rs` serves the dashboard: static HTML/JS/CSS compiled into the
//!   binary, talking to the same `/api/v1`.
//! - [`serve`] runs a router on a listener until a shutdown future resolves.
//!
//! ```no_run
//! # async fn run(cp: hodei_core::runtime::ControlPlane) -> std::io::Result<()> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! let router = hodei_http::router(cp, hodei_http::HttpConfig::default());
//! hodei_http::serve(listener, router, async {
//!     let _ = tokio::signal::ctrl_c().await;
//! })
//! .await
//! # }
//! ```

#![warn(missing_docs)]

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hodei_core::runtime::ControlPlane;
use tokio::net::TcpListener;

mod api;
pub mod dto;
mod error;
pub mod metrics;
mod middleware;
pub mod openapi;
mod routes;
mod ui;

pub use error::HttpError;
pub use routes::{RouteInfo, route_table};

/// Settings of the HTTP edge.
#[derive(Clone)]
pub struct HttpConfig {
    /// Bearer tokens accepted on `/api/v1`, each mapped to the name used as
    /// the actor of what its holder does. Empty: no authentication, and
    /// every caller is the actor `anonymous`.
    pub api_tokens: BTreeMap<String, String>,
    /// Largest request body accepted, in bytes (413 above). Default
    /// [`body_limit_for_spec`] of the default spec limits (4 MiB + 64 KiB), so
    /// that every spec the control plane accepts also fits through HTTP.
    pub max_body_bytes: usize,
    /// The metrics registry served at `/metrics`. Share a clone with the
    /// gRPC server so that its requests are counted in the same registry.
    pub metrics: metrics::Metrics,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            api_tokens: BTreeMap::new(),
            max_body_bytes: body_limit_for_spec(
                hodei_core::spec::SpecLimits::default().max_spec_bytes,
            ),
            metrics: metrics::Metrics::new(),
        }
    }
}

/// The request body limit that lets through every spec of at most
/// `max_spec_bytes` (the control plane's `SpecLimits::max_spec_bytes`):
/// twice that, for JSON escaping, plus 64 KiB for the envelope. The spec's
/// own limits are checked after parsing, with a field-specific message.
pub fn body_limit_for_spec(max_spec_bytes: usize) -> usize {
    max_spec_bytes.saturating_mul(2).saturating_add(64 * 1024)
}

impl std::fmt::Debug for HttpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The tokens are secrets: only their names are shown.
        f.debug_struct("HttpConfig")
            .field(
                "api_token_names",
                &self.api_tokens.values().collect::<Vec<_>>(),
            )
            .field("max_body_bytes", &self.max_body_bytes)
            .finish_non_exhaustive()
    }
}

/// How long [`serve`] lets open connections (live log streams above all)
/// finish after the shutdown future resolved, before it drops them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Builds the router: `/api/v1`, `/openapi.json`, `/metrics`, `/healthz`,
/// `/readyz` and the dashboard at `/`.
///
/// Call it inside a tokio runtime: it starts the task that follows the
/// event bus for the job histograms of [`metrics::Metrics`] (otherwise that
/// task starts on the first request).
pub fn router(cp: ControlPlane, config: HttpConfig) -> Router {
    config.metrics.attach(&cp);
    let state = AppState {
        cp,
        config: Arc::new(config),
        openapi: Arc::new(openapi::document_json()),
    };
    routes::build(state)
}

/// Serves `router` on `listener` until `shutdown` resolves, then stops
/// accepting connections and waits up to [`SHUTDOWN_GRACE`] for open ones
/// (live log streams can be long) before returning.
pub async fn serve<F>(listener: TcpListener, router: Router, shutdown: F) -> std::io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    use axum::serve::ListenerExt;
    // Small writes (SSE lines, short JSON answers) go out at once rather
    // than waiting on Nagle's algorithm and the peer's delayed ACK.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "http: could not set TCP_NODELAY");
        }
    });
    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, router).with_graceful_shutdown(async move {
        shutdown.await;
        let _ = stopping_tx.send(());
    });
    let grace = async move {
        match stopping_rx.await {
            Ok(()) => tokio::time::sleep(SHUTDOWN_GRACE).await,
            // The server ended on its own; let its branch report how.
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        r = server => r,
        () = grace => {
            tracing::info!("http: connections still open after the shutdown grace; closing them");
            Ok(())
        }
    }
}

/// What every handler shares.
#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) cp: ControlPlane,
    pub(crate) config: Arc<HttpConfig>,
    /// The OpenAPI document, rendered once.
    pub(crate) openapi: Arc<String>,
}
