//! `/v1/images`: a tenant's guest images, registered by host path.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use nubis_api::{ApiError, Image, ImageCreate};

use super::responses::{Authenticated, Invalid, TenantChange, TenantResource};
use super::{AppState, Body, Caller, Path, Result};
use crate::service::images;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/images", get(list).post(create))
        .route("/v1/images/{id}", get(show).delete(remove))
}

#[utoipa::path(
    post,
    path = "/v1/images",
    tag = "images",
    request_body = ImageCreate,
    responses(
        (status = 201, description = "success", body = Image),
        Invalid,
        Authenticated,
        (status = 403, description = "operator token", body = ApiError),
        (status = 409, description = "the name exists", body = ApiError),
        (status = 422, description = "a file is missing, not a regular file, outside the image directories and the tenant's uploads, or a root disk under 512 bytes", body = ApiError),
        (status = 429, description = "the tenant's storage quota is used up", body = ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Body(request): Body<ImageCreate>,
) -> Result<(StatusCode, Json<Image>)> {
    let tenant = caller.tenant()?;
    let image = images::create(&state.services, tenant, request)?;
    Ok((StatusCode::CREATED, Json(image)))
}

#[utoipa::path(
    get,
    path = "/v1/images",
    tag = "images",
    responses(
        (status = 200, description = "success", body = Vec<Image>),
        Authenticated
    ),
    security(("bearer" = []))
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<Image>>> {
    Ok(Json(images::list(&state.services, caller.service_scope())?))
}

#[utoipa::path(
    get,
    path = "/v1/images/{id}",
    tag = "images",
    params(("id" = String, Path, description = "id (or name)")),
    responses(
        (status = 200, description = "success", body = Image),
        TenantResource
    ),
    security(("bearer" = []))
)]
pub(crate) async fn show(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Image>> {
    Ok(Json(images::get(
        &state.services,
        caller.service_scope(),
        &id,
    )?))
}

#[utoipa::path(
    delete,
    path = "/v1/images/{id}",
    tag = "images",
    params(("id" = String, Path, description = "id (or name)")),
    responses(
        (status = 204, description = "deleted"),
        TenantChange
    ),
    security(("bearer" = []))
)]
pub(crate) async fn remove(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    images::delete(&state.services, caller.service_scope(), &id)?;
    Ok(StatusCode::NO_CONTENT)
}
