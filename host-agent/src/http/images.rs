//! `/v1/images`: a tenant's guest images, registered by host path.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use nubis_api::{ApiError, Image, ImageCreate};

use super::responses::{Authenticated, Invalid, TenantChange, TenantOnly, TenantResource};
use super::{AppState, Body, Caller, Path, Result};
use crate::service::images;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/images", get(list).post(create))
        .route("/v1/images/{id}", get(show).delete(remove))
}

create_handler!(tenant create, "/v1/images", "images", ImageCreate, 201 "success", Image,
    async images::create, Invalid, TenantOnly,
    (status = 409, description = "the name exists", body = ApiError),
    (status = 422, description = "a file is missing, not a regular file, outside the image directories and the tenant's uploads, or a root disk under 512 bytes", body = ApiError),
    (status = 429, description = "the tenant's storage quota is used up", body = ApiError));

list_handler!(caller list, "/v1/images", "images", "success", Image, async images::list,
    Authenticated);

show_handler!(caller show, "/v1/images/{id}", "images", "id" = "id (or name)", "success", Image,
    async images::get, TenantResource);

delete_handler!(caller remove, "/v1/images/{id}", "images", "id" = "id (or name)", "deleted",
    async images::delete, TenantChange);
