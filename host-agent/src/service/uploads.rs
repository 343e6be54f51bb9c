//! A tenant's uploaded image files (kernels, root disks, initrds), streamed
//! to `DATA_DIR/uploads/TENANT/NAME`, from where the tenant (and only that
//! tenant) registers images. An upload is bounded by what is left of the
//! tenant's storage quota and by what the host spares above its reserve;
//! it is written to a partial file of its own and linked into place only
//! when whole, so a failed one leaves nothing.

use futures_util::{Stream, StreamExt};
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use utoipa::ToSchema;

use super::{Result, ServiceError, Services};
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

fn internal(what: &str, err: impl std::fmt::Display) -> ServiceError {
    ServiceError::Internal(format!("{what}: {err}"))
}

/// Stores `body` as tenant `tenant_id`'s upload `name`.
pub async fn upload<S, B, E>(svc: &Services, tenant_id: &str, name: &str, body: S) -> Result<Upload>
where
    S: Stream<Item = std::result::Result<B, E>> + Unpin,
    B: AsRef<[u8]>,
    E: std::fmt::Display,
{
    validate::name("name", name, true)?;
    let dir = crate::quota::uploads_dir(&svc.data_dir, tenant_id);
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|err| internal("cannot create the upload directory", err))?;
    let path = dir.join(name);
    let exists =
        || ServiceError::Conflict(format!("an upload named '{name}' exists: delete it first"));
    if tokio::fs::symlink_metadata(&path).await.is_ok() {
        return Err(exists());
    }
    // What is left of the tenant's storage quota bounds this upload.
    let quota = svc
        .store
        .get_tenant(tenant_id)?
        .ok_or_else(|| ServiceError::Unauthorized("the token's tenant is gone".to_string()))?
        .quota;
    let left = crate::quota::storage_left_bytes(&svc.store, &svc.data_dir, tenant_id, &quota)?;
    // And what the host can spare above its reserve.
    let reserve_bytes = svc
        .supervisor
        .config()
        .reserved_disk_mib
        .saturating_mul(1 << 20);
    let spare = crate::quota::free_bytes(&svc.data_dir)?.saturating_sub(reserve_bytes);
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
    let mut body = body;
    let mut bytes = 0u64;
    let result: Result<()> = async {
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|err| ServiceError::Invalid {
                field: None,
                message: format!("the upload was cut off: {err}"),
            })?;
            let chunk = chunk.as_ref();
            bytes += chunk.len() as u64;
            if bytes > limit {
                return Err(if limit == spare && spare < left.min(MAX_UPLOAD_BYTES) {
                    ServiceError::HostFull(format!(
                        "the host's disk keeps its reserve: {limit} bytes fit"
                    ))
                } else if limit < MAX_UPLOAD_BYTES {
                    ServiceError::Exhausted(format!(
                        "the upload exceeds the tenant's storage quota ({limit} bytes left)"
                    ))
                } else {
                    ServiceError::Exhausted(format!(
                        "uploads are limited to {MAX_UPLOAD_BYTES} bytes"
                    ))
                });
            }
            file.write_all(chunk)
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
    tracing::info!(tenant = tenant_id, name, bytes, "file uploaded");
    Ok(Upload {
        name: name.to_string(),
        path: path.display().to_string(),
        bytes,
    })
}

/// Tenant `tenant_id`'s uploads, by name (partial ones left out).
pub async fn list(svc: &Services, tenant_id: &str) -> Vec<Upload> {
    let dir = crate::quota::uploads_dir(&svc.data_dir, tenant_id);
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
    uploads
}

/// Deletes tenant `tenant_id`'s upload `name`, unless an image uses it.
pub async fn delete(svc: &Services, tenant_id: &str, name: &str) -> Result<()> {
    validate::name("name", name, true)?;
    let path = crate::quota::uploads_dir(&svc.data_dir, tenant_id).join(name);
    let path_text = path.display().to_string();
    let in_use = svc.store.list_images(tenant_id)?.into_iter().any(|image| {
        image.kernel == path_text
            || image.rootfs == path_text
            || image.initrd.as_deref() == Some(&path_text)
    });
    if in_use {
        return Err(ServiceError::Conflict(format!(
            "an image uses upload '{name}': delete the image first"
        )));
    }
    match tokio::fs::remove_file(&path).await {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            Err(ServiceError::not_found("upload", name))
        }
        Err(err) => Err(internal("cannot delete the upload", err)),
    }
}
