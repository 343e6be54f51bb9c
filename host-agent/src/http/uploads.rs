//! `/v1/uploads`: a tenant's uploaded image files (kernels, root disks,
//! initrds), streamed to `DATA_DIR/uploads/TENANT/NAME`, from where the
//! tenant (and only that tenant) registers images. Registered by path,
//! images otherwise come from the operator's `image_dirs`.

use axum::body::Body as RequestBody;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::routing::{get, put};
use axum::{Json, Router};
use futures_util::StreamExt;
use nubis_api::ErrorCode;
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use utoipa::ToSchema;

use super::{AppState, Caller, HttpError, Path, Result};
use crate::validate;

/// Largest upload accepted: 64 GiB.
pub const MAX_UPLOAD_BYTES: u64 = 64 << 30;

/// An uploaded file.
#[derive(Debug, Serialize, ToSchema)]
pub struct Upload {
    pub name: String,
    /// The host path to register images with.
    pub path: String,
    pub bytes: u64,
}

pub fn routes() -> Router<AppState> {
    Router::new().route("/v1/uploads", get(list)).route(
        "/v1/uploads/{name}",
        put(upload)
            .delete(remove)
            .layer(DefaultBodyLimit::disable()),
    )
}

/// A tenant's upload directory.
pub fn tenant_dir(state: &AppState, tenant: &str) -> std::path::PathBuf {
    state.data_dir.join("uploads").join(tenant)
}

fn internal(what: &str, err: impl std::fmt::Display) -> HttpError {
    HttpError::new(ErrorCode::Internal, format!("{what}: {err}"))
}

#[utoipa::path(
    put,
    path = "/v1/uploads/{name}",
    tag = "images",
    params(("name" = String, Path, description = "file name: 1 to 63 of [a-z0-9-.], starting with a letter or digit", pattern = r"^[a-z0-9][a-z0-9.-]{0,62}$")),
    request_body(content = Option<Vec<u8>>, content_type = "application/octet-stream", description = "the file; none is an empty file"),
    responses(
        (status = 201, description = "stored; register an image with its path", body = Upload),
        (status = 400, description = "invalid input", body = nubis_api::ApiError),
        (status = 401, description = "no or unknown token", body = nubis_api::ApiError),
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
    let tenant = caller.tenant()?.to_string();
    validate::name("name", &name, true)?;
    let dir = tenant_dir(&state, &tenant);
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|err| internal("cannot create the upload directory", err))?;
    let path = dir.join(&name);
    let exists = || {
        HttpError::new(
            ErrorCode::Conflict,
            format!("an upload named '{name}' exists: delete it first"),
        )
    };
    if tokio::fs::symlink_metadata(&path).await.is_ok() {
        return Err(exists());
    }
    // What is left of the tenant's storage quota bounds this upload.
    let quota = state
        .store
        .get_tenant(&tenant)?
        .ok_or_else(|| HttpError::new(ErrorCode::Unauthorized, "the token's tenant is gone"))?
        .quota;
    let left = crate::quota::storage_left_bytes(&state.store, &state.data_dir, &tenant, &quota)?;
    // And what the host can spare above its reserve.
    let reserve_bytes = state
        .supervisor
        .config()
        .reserved_disk_mib
        .saturating_mul(1 << 20);
    let spare = crate::quota::free_bytes(&state.data_dir)?.saturating_sub(reserve_bytes);
    let limit = left.min(MAX_UPLOAD_BYTES).min(spare);
    // Each upload writes its own partial file (two uploads of one name
    // never share one), created new, never through an existing path.
    let partial = dir.join(format!(".{name}.{}.partial", crate::store::random_hex(8)?));
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&partial)
        .await
        .map_err(|err| internal("cannot create the upload", err))?;
    let mut stream = body.into_data_stream();
    let mut bytes = 0u64;
    let result: Result<()> = async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|err| {
                HttpError::new(
                    ErrorCode::InvalidInput,
                    format!("the upload was cut off: {err}"),
                )
            })?;
            bytes += chunk.len() as u64;
            if bytes > limit {
                return Err(if limit == spare && spare < left.min(MAX_UPLOAD_BYTES) {
                    HttpError::new(
                        ErrorCode::HostFull,
                        format!("the host's disk keeps its reserve: {limit} bytes fit"),
                    )
                } else if limit < MAX_UPLOAD_BYTES {
                    HttpError::new(
                        ErrorCode::QuotaExceeded,
                        format!(
                            "the upload exceeds the tenant's storage quota ({limit} bytes left)"
                        ),
                    )
                } else {
                    HttpError::new(
                        ErrorCode::QuotaExceeded,
                        format!("uploads are limited to {MAX_UPLOAD_BYTES} bytes"),
                    )
                });
            }
            file.write_all(&chunk)
                .await
                .map_err(|err| internal("cannot write the upload", err))?;
        }
        file.sync_all()
            .await
            .map_err(|err| internal("cannot write the upload", err))
    }
    .await;
    if let Err(err) = result {
        let _ = tokio::fs::remove_file(&partial).await;
        return Err(err);
    }
    // A link, not a rename: it fails rather than replace an upload of the
    // same name that finished first.
    let linked = tokio::fs::hard_link(&partial, &path).await;
    let _ = tokio::fs::remove_file(&partial).await;
    match linked {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => return Err(exists()),
        Err(err) => return Err(internal("cannot store the upload", err)),
    }
    tracing::info!(tenant, name, bytes, "file uploaded");
    Ok((
        StatusCode::CREATED,
        Json(Upload {
            name,
            path: path.display().to_string(),
            bytes,
        }),
    ))
}

#[utoipa::path(
    get,
    path = "/v1/uploads",
    tag = "images",
    responses(
        (status = 200, description = "the tenant's uploads", body = Vec<Upload>),
        (status = 401, description = "no or unknown token", body = nubis_api::ApiError),
        (status = 403, description = "operator token", body = nubis_api::ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<Upload>>> {
    let dir = tenant_dir(&state, caller.tenant()?);
    let mut uploads = Vec::new();
    if let Ok(mut entries) = tokio::fs::read_dir(&dir).await {
        while let Ok(Some(entry)) = entries.next_entry().await {
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with('.') {
                continue;
            }
            let bytes = entry.metadata().await.map(|meta| meta.len()).unwrap_or(0);
            uploads.push(Upload {
                path: entry.path().display().to_string(),
                name,
                bytes,
            });
        }
    }
    uploads.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Json(uploads))
}

#[utoipa::path(
    delete,
    path = "/v1/uploads/{name}",
    tag = "images",
    params(("name" = String, Path, description = "file name: 1 to 63 of [a-z0-9-.], starting with a letter or digit", pattern = r"^[a-z0-9][a-z0-9.-]{0,62}$")),
    responses(
        (status = 204, description = "deleted"),
        (status = 400, description = "not a valid file name", body = nubis_api::ApiError),
        (status = 401, description = "no or unknown token", body = nubis_api::ApiError),
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
    let tenant = caller.tenant()?.to_string();
    validate::name("name", &name, true)?;
    let path = tenant_dir(&state, &tenant).join(&name);
    let path_text = path.display().to_string();
    let in_use = state.store.list_images(&tenant)?.into_iter().any(|image| {
        image.kernel == path_text
            || image.rootfs == path_text
            || image.initrd.as_deref() == Some(&path_text)
    });
    if in_use {
        return Err(HttpError::new(
            ErrorCode::Conflict,
            format!("an image uses upload '{name}': delete the image first"),
        ));
    }
    match tokio::fs::remove_file(&path).await {
        Ok(()) => Ok(StatusCode::NO_CONTENT),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            Err(HttpError::not_found("upload", &name))
        }
        Err(err) => Err(internal("cannot delete the upload", err)),
    }
}
