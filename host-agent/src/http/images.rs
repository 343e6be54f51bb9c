//! `/v1/images`: a tenant's guest images, registered by host path.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use nubis_api::{ApiError, ErrorCode, Image, ImageCreate};

use super::{AppState, Body, Caller, HttpError, Path, Result};
use crate::validate;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/images", get(list).post(create))
        .route("/v1/images/{id}", get(show).delete(remove))
}

fn unprocessable(field: &str, message: String) -> HttpError {
    HttpError(ApiError {
        error: nubis_api::error::ErrorBody {
            code: ErrorCode::Unprocessable,
            message,
            field: Some(field.to_string()),
        },
    })
}

/// The image VM `vm` starts from, with its files checked again: a file
/// that became a symlink out of the image directories (or into another
/// tenant's uploads) since it was registered is refused, so the jail never
/// mounts a file the tenant may not use.
pub(crate) fn usable_image(state: &AppState, vm: &nubis_api::Vm) -> Result<Image> {
    let image = state
        .store
        .get_image(&vm.tenant_id, &vm.image_id)?
        .ok_or_else(|| HttpError::new(ErrorCode::Unprocessable, "the VM's image is gone"))?;
    let mut files = vec![("kernel", &image.kernel), ("rootfs", &image.rootfs)];
    if let Some(initrd) = &image.initrd {
        files.push(("initrd", initrd));
    }
    for (field, path) in files {
        regular_file(state, Some(&image.tenant_id), field, path).map_err(|HttpError(err)| {
            HttpError(ApiError {
                error: nubis_api::error::ErrorBody {
                    code: ErrorCode::Unprocessable,
                    message: format!("image {}: {}", image.id, err.error.message),
                    field: err.error.field,
                },
            })
        })?;
    }
    Ok(image)
}

/// The file at `path` must be a regular file inside one of the image
/// directories (after resolving symlinks); its resolved path and size.
fn regular_file(
    state: &AppState,
    caller_uploads: Option<&str>,
    field: &str,
    path: &str,
) -> Result<(String, u64)> {
    validate::absolute_path(field, path)?;
    let resolved = std::fs::canonicalize(path)
        .map_err(|err| unprocessable(field, format!("cannot use {path}: {err}")))?;
    // The operator's image directories, and the caller's own uploads.
    let own_uploads = caller_uploads.map(|tenant| super::uploads::tenant_dir(state, tenant));
    let allowed = state
        .image_dirs
        .iter()
        .chain(own_uploads.iter())
        .any(|dir| std::fs::canonicalize(dir).is_ok_and(|dir| resolved.starts_with(dir)));
    // Another tenant's uploads stay out of reach even under a broad
    // operator image directory.
    let uploads_root = std::fs::canonicalize(state.data_dir.join("uploads")).ok();
    let own = own_uploads.and_then(|dir| std::fs::canonicalize(dir).ok());
    let foreign_upload = uploads_root.is_some_and(|root| resolved.starts_with(&root))
        && !own.is_some_and(|own| resolved.starts_with(own));
    let allowed = allowed && !foreign_upload;
    if !allowed {
        // Well-formed (the document's pattern), but not a file this
        // tenant may use here: as for a missing one, a 422.
        return Err(unprocessable(
            field,
            format!("{path} is outside the agent's image directories"),
        ));
    }
    match std::fs::metadata(&resolved) {
        Ok(meta) if meta.is_file() => Ok((resolved.display().to_string(), meta.len())),
        Ok(_) => Err(unprocessable(
            field,
            format!("{path} is not a regular file"),
        )),
        Err(err) => Err(unprocessable(field, format!("cannot use {path}: {err}"))),
    }
}

#[utoipa::path(
    post,
    path = "/v1/images",
    tag = "images",
    request_body = ImageCreate,
    responses(
        (status = 201, description = "success", body = Image),
        (status = 400, description = "invalid input", body = ApiError),
        (status = 401, description = "no or unknown token", body = ApiError),
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
    Body(mut request): Body<ImageCreate>,
) -> Result<(StatusCode, Json<Image>)> {
    let tenant = caller.tenant()?;
    validate::name("name", &request.name, true)?;
    validate::kernel_args("cmdline", &request.cmdline)?;
    // The resolved paths are stored: a symlink changed later does not
    // redirect the image.
    request.kernel = regular_file(&state, Some(tenant), "kernel", &request.kernel)?.0;
    let (rootfs, rootfs_bytes) = regular_file(&state, Some(tenant), "rootfs", &request.rootfs)?;
    request.rootfs = rootfs;
    if rootfs_bytes < 512 {
        return Err(unprocessable(
            "rootfs",
            format!(
                "{} is {rootfs_bytes} bytes: a root disk image holds at least one sector (512)",
                request.rootfs
            ),
        ));
    }
    if let Some(initrd) = &request.initrd {
        request.initrd = Some(regular_file(&state, Some(tenant), "initrd", initrd)?.0);
    }
    let image = state.store.create_image(tenant, &request, rootfs_bytes)?;
    tracing::info!(tenant, image = %image.id, "image registered");
    Ok((StatusCode::CREATED, Json(image)))
}

#[utoipa::path(
    get,
    path = "/v1/images",
    tag = "images",
    responses(
        (status = 200, description = "success", body = Vec<Image>),
        (status = 401, description = "no or unknown token", body = ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<Image>>> {
    let images = match caller.scope() {
        Some(tenant) => state.store.list_images(tenant)?,
        None => {
            let mut all = Vec::new();
            for tenant in state.store.list_tenants()? {
                all.extend(state.store.list_images(&tenant.id)?);
            }
            all
        }
    };
    Ok(Json(images))
}

/// The caller's image `id` (any tenant's for the operator).
pub fn find(state: &AppState, caller: &Caller, id: &str) -> Result<Image> {
    let found = match caller.scope() {
        Some(tenant) => state.store.get_image(tenant, id)?,
        None => {
            let mut found = None;
            for tenant in state.store.list_tenants()? {
                if let Some(image) = state.store.get_image(&tenant.id, id)? {
                    found = Some(image);
                    break;
                }
            }
            found
        }
    };
    found.ok_or_else(|| HttpError::not_found("image", id))
}

#[utoipa::path(
    get,
    path = "/v1/images/{id}",
    tag = "images",
    params(("id" = String, Path, description = "id (or name)")),
    responses(
        (status = 200, description = "success", body = Image),
        (status = 401, description = "no or unknown token", body = ApiError),
        (status = 404, description = "no such resource (or another tenant's)", body = ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn show(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Image>> {
    Ok(Json(find(&state, &caller, &id)?))
}

#[utoipa::path(
    delete,
    path = "/v1/images/{id}",
    tag = "images",
    params(("id" = String, Path, description = "id (or name)")),
    responses(
        (status = 204, description = "deleted"),
        (status = 401, description = "no or unknown token", body = ApiError),
        (status = 404, description = "no such resource (or another tenant's)", body = ApiError),
        (status = 409, description = "wrong state or already exists", body = ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn remove(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    let image = find(&state, &caller, &id)?;
    state.store.delete_image(&image.tenant_id, &image.id)?;
    Ok(StatusCode::NO_CONTENT)
}
