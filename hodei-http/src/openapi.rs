//! The OpenAPI document, generated from the handlers' `#[utoipa::path]`
//! attributes and the DTOs' `ToSchema` derives. Served at
//! `/api/v1/openapi.json` and `/openapi.json`.

use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::api;
use crate::dto::{
    AttemptDto, AuditPageDto, DrainDto, ErrorBody, ErrorDetail, EventDto, FailureDto, HealthDto,
    JobDto, JobEventsDto, JobPageDto, JobSpecDto, JobStateDto, LogLineDto, LogPageDto, ProviderDto,
    ProvidersDto, ResourcesDto, WorkerDto, WorkerStateDto, WorkersDto,
};
use crate::ui;

/// The document. `ApiDoc::openapi()` builds it.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Hodei HTTP API",
        description = "Submit and follow jobs, inspect workers, providers and the audit trail. \
            Every /api/v1 route takes `Authorization: Bearer <token>` when the server has tokens \
            configured. Errors are `{\"error\": {\"code\", \"message\"}}`. Every response carries \
            `x-correlation-id` (the request's, or a generated one).",
        license(name = "Apache-2.0"),
    ),
    paths(
        api::submit_job,
        api::list_jobs,
        api::get_job,
        api::cancel_job,
        api::job_logs,
        api::job_events,
        api::list_workers,
        api::drain_worker,
        api::list_providers,
        api::audit,
        api::openapi_v1,
        api::openapi_root,
        api::metrics,
        api::healthz,
        api::readyz,
        ui::index,
        ui::app_js,
        ui::app_css,
    ),
    components(schemas(
        ErrorBody, ErrorDetail, JobSpecDto, ResourcesDto, JobDto, JobStateDto, AttemptDto,
        FailureDto, JobPageDto, LogLineDto, LogPageDto, EventDto, JobEventsDto, AuditPageDto,
        WorkerDto, WorkerStateDto, WorkersDto, DrainDto, ProviderDto, ProvidersDto, HealthDto,
    )),
    modifiers(&Security),
    tags(
        (name = "jobs", description = "Submit, list, follow and cancel jobs"),
        (name = "workers", description = "Workers and draining"),
        (name = "providers", description = "Configured worker providers"),
        (name = "audit", description = "The audit trail of domain events"),
        (name = "meta", description = "OpenAPI document, metrics, health probes"),
        (name = "ui", description = "The web dashboard"),
    ),
)]
pub struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "access_token",
            SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::with_description(
                "access_token",
                "The bearer token as a query parameter, for clients that cannot send headers (EventSource)",
            ))),
        );
    }
}

/// The document as JSON, with the crate's version.
pub fn document_json() -> String {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    // Invariant: the document is plain data; serializing it cannot fail.
    doc.to_pretty_json()
        .expect("the OpenAPI document serializes")
}
