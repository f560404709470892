//! The route table: every route the router serves is one row here, so the
//! OpenAPI document can be checked against the router (see the tests).

use std::collections::BTreeMap;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::handler::Handler;
use axum::http::Method;
use axum::routing::{MethodFilter, MethodRouter, on};

use crate::{AppState, api, middleware, ui};

/// A route the router serves: method and path (axum syntax, `{id}` for a
/// path parameter).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RouteInfo {
    /// `GET` or `POST`.
    pub method: Method,
    /// E.g. `/api/v1/jobs/{id}`.
    pub path: &'static str,
}

/// Every route of [`router`](crate::router), in table order. The router is
/// built from this table and nothing else (besides its fallbacks, which
/// answer 404 and 405 in the error shape).
pub fn route_table() -> Vec<RouteInfo> {
    table()
        .into_iter()
        .map(|r| RouteInfo {
            method: r.method,
            path: r.path,
        })
        .collect()
}

struct Route {
    method: Method,
    path: &'static str,
    handler: MethodRouter<AppState>,
}

fn table() -> Vec<Route> {
    vec![
        // /api/v1
        route(Method::POST, "/api/v1/jobs", api::submit_job),
        route(Method::GET, "/api/v1/jobs", api::list_jobs),
        route(Method::GET, "/api/v1/jobs/{id}", api::get_job),
        route(Method::POST, "/api/v1/jobs/{id}/cancel", api::cancel_job),
        route(Method::GET, "/api/v1/jobs/{id}/logs", api::job_logs),
        route(Method::GET, "/api/v1/jobs/{id}/events", api::job_events),
        route(Method::GET, "/api/v1/workers", api::list_workers),
        route(
            Method::POST,
            "/api/v1/workers/{id}/drain",
            api::drain_worker,
        ),
        route(Method::GET, "/api/v1/providers", api::list_providers),
        route(Method::GET, "/api/v1/audit", api::audit),
        route(Method::GET, "/api/v1/openapi.json", api::openapi_v1),
        // Outside /api/v1.
        route(Method::GET, "/openapi.json", api::openapi_root),
        route(Method::GET, "/metrics", api::metrics),
        route(Method::GET, "/healthz", api::healthz),
        route(Method::GET, "/readyz", api::readyz),
        // The dashboard.
        route(Method::GET, "/", ui::index),
        route(Method::GET, "/ui/app.js", ui::app_js),
        route(Method::GET, "/ui/app.css", ui::app_css),
    ]
}

fn route<H, T>(method: Method, path: &'static str, handler: H) -> Route
where
    H: Handler<T, AppState>,
    T: 'static,
{
    // Invariant: the table only uses GET and POST, which MethodFilter has.
    let filter = MethodFilter::try_from(method.clone()).expect("a standard method");
    Route {
        method,
        path,
        handler: on(filter, handler),
    }
}

/// The router: the table, JSON fallbacks, then the middleware (outermost
/// last): authentication of `/api/v1`, request metrics, correlation id.
pub(crate) fn build(state: AppState) -> Router {
    let mut paths: BTreeMap<&'static str, MethodRouter<AppState>> = BTreeMap::new();
    for r in table() {
        let merged = match paths.remove(r.path) {
            Some(existing) => existing.merge(r.handler),
            None => r.handler,
        };
        paths.insert(r.path, merged);
    }
    let mut router = Router::new();
    for (path, handler) in paths {
        router = router.route(path, handler.fallback(api::method_not_allowed));
    }
    let max_body = state.config.max_body_bytes;
    router
        .fallback(api::route_not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::authenticate,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::record_metrics,
        ))
        .layer(axum::middleware::from_fn(middleware::correlate))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}
