//! The web dashboard: one HTML page, one script and one stylesheet,
//! compiled into the binary (no build step). The script is a small
//! single-page app over `/api/v1`; see `docs/HTTP.md`.

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

const INDEX_HTML: &str = include_str!("ui/index.html");
const APP_JS: &str = include_str!("ui/app.js");
const APP_CSS: &str = include_str!("ui/app.css");

/// Everything the page loads comes from this server; nothing inline runs.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// The dashboard page.
#[utoipa::path(
    get,
    path = "/",
    tag = "ui",
    responses((status = 200, description = "The dashboard", content_type = "text/html", body = String)),
)]
pub(crate) async fn index() -> Response {
    asset(INDEX_HTML, "text/html; charset=utf-8")
}

/// The dashboard's script.
#[utoipa::path(
    get,
    path = "/ui/app.js",
    tag = "ui",
    responses((status = 200, description = "Script", content_type = "text/javascript", body = String)),
)]
pub(crate) async fn app_js() -> Response {
    asset(APP_JS, "text/javascript; charset=utf-8")
}

/// The dashboard's stylesheet.
#[utoipa::path(
    get,
    path = "/ui/app.css",
    tag = "ui",
    responses((status = 200, description = "Stylesheet", content_type = "text/css", body = String)),
)]
pub(crate) async fn app_css() -> Response {
    asset(APP_CSS, "text/css; charset=utf-8")
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}
