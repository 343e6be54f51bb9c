//! `/v1/uploads`: a tenant's uploaded image files (kernels, root disks,
//! initrds), streamed to `DATA_DIR/uploads/TENANT/NAME`, from where the
//! tenant (and only that tenant) registers images. Registered by path,
//! images otherwise come from the operator's `image_dirs`.

use axum::body::Body as RequestBody;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::routing::{get, put};
use axum::{Json, Router};

use super::responses::{Authenticated, Invalid};
use super::{AppState, Caller, Path, Result};
use crate::service::uploads;
pub use crate::service::uploads::Upload;

pub fn routes() -> Router<AppState> {
    Router::new().route("/v1/uploads", get(list)).route(
        "/v1/uploads/{name}",
        put(upload)
            .delete(remove)
            .layer(DefaultBodyLimit::disable()),
    )
}

#[utoipa::path(
    put,
    path = "/v1/uploads/{name}",
    tag = "images",
    params(("name" = String, Path, description = "file name: 1 to 63 of [a-z0-9-.], starting with a letter or digit", pattern = r"^[a-z0-9][a-z0-9.-]{0,62}$")),
    request_body(content = Option<Vec<u8>>, content_type = "application/octet-stream", description = "the file; none is an empty file"),
    responses(
        (status = 201, description = "stored; register an image with its path", body = Upload),
        Invalid,
        Authenticated,
        (status = 403, description = "operator token", body = nubis_api::ApiError),
        (status = 409, description = "a file of that name exists", body = nubis_api::ApiError),
        (status = 429, description = "larger than the upload limit or the tenant's storage quota", body = nubis_api::ApiError),
        (status = 507, description = "the host's disk would go below its reserve", body = nubis_api::ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn upload(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    body: RequestBody,
) -> Result<(StatusCode, Json<Upload>)> {
    let tenant = caller.tenant()?;
    let upload = uploads::upload(&state.services, tenant, &name, body.into_data_stream()).await?;
    Ok((StatusCode::CREATED, Json(upload)))
}

#[utoipa::path(
    get,
    path = "/v1/uploads",
    tag = "images",
    responses(
        (status = 200, description = "the tenant's uploads", body = Vec<Upload>),
        Authenticated,
        (status = 403, description = "operator token", body = nubis_api::ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<Upload>>> {
    let tenant = caller.tenant()?;
    Ok(Json(uploads::list(&state.services, tenant).await))
}

#[utoipa::path(
    delete,
    path = "/v1/uploads/{name}",
    tag = "images",
    params(("name" = String, Path, description = "file name: 1 to 63 of [a-z0-9-.], starting with a letter or digit", pattern = r"^[a-z0-9][a-z0-9.-]{0,62}$")),
    responses(
        (status = 204, description = "deleted"),
        (status = 400, description = "not a valid file name", body = nubis_api::ApiError),
        Authenticated,
        (status = 404, description = "no such upload", body = nubis_api::ApiError),
        (status = 409, description = "an image uses it", body = nubis_api::ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn remove(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode> {
    let tenant = caller.tenant()?;
    uploads::delete(&state.services, tenant, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}
