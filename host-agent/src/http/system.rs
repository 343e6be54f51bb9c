//! `/healthz`: liveness, without authentication.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};

use super::{AppState, Result};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(health))
        .route("/v1/openapi.json", get(openapi))
}

#[utoipa::path(get, path = "/healthz", tag = "system", responses((status = 200, description = "the agent is up")))]
pub(crate) async fn health(State(state): State<AppState>) -> Result<Json<serde_json::Value>> {
    let schema = state.store.schema_version()?;
    Ok(Json(
        serde_json::json!({ "status": "ok", "schema_version": schema }),
    ))
}

/// The OpenAPI document, without authentication (it holds no secrets).
async fn openapi() -> impl axum::response::IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        super::openapi::document(),
    )
}
