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

list_handler!(list, "/v1/images", "images", "success", Image, images::list);

show_handler!(
    show,
    "/v1/images/{id}",
    "images",
    "id (or name)",
    Image,
    images::get,
    TenantResource
);

delete_handler!(remove, "/v1/images/{id}", "images", "id (or name)", "deleted",
    sync images::delete, TenantChange);
