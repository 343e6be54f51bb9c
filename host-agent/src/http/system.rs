//! `/healthz`: liveness, without authentication.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};

use super::{AppState, Result};

pub fn routes() -> Router<AppState> {
    Router::new().route("/healthz", get(health))
}

async fn health(State(state): State<AppState>) -> Result<Json<serde_json::Value>> {
    let schema = state.store.schema_version()?;
    Ok(Json(
        serde_json::json!({ "status": "ok", "schema_version": schema }),
    ))
}
