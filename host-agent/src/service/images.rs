//! A tenant's guest images, registered by host path: only regular files in
//! the operator's image directories or the tenant's own uploads, checked
//! again each time a VM starts from one (a path that became a symlink
//! elsewhere since is refused, so the jail never mounts a file the tenant
//! may not use).

use nubis_api::{Image, ImageCreate};

use super::{Result, Scope, ServiceError, Services};
use crate::store::{ImageRow, VmRow};
use crate::validate;

impl From<ImageRow> for Image {
    fn from(row: ImageRow) -> Self {
        Image {
            id: row.id,
            tenant_id: row.tenant_id,
            name: row.name,
            kernel: row.kernel,
            rootfs: row.rootfs,
            initrd: row.initrd,
            cmdline: row.cmdline,
            rootfs_bytes: row.rootfs_bytes,
            created_at: row.created_at,
        }
    }
}

/// Registers `request` for `tenant_id` (see [`register`]); in cluster
/// mode this host records first that it holds resources of the tenant.
pub async fn create(svc: &Services, tenant_id: &str, request: ImageCreate) -> Result<Image> {
    let _hold = svc.hold_tenant(tenant_id).await?;
    register(svc, tenant_id, request)
}

/// Registers `request` for `tenant_id`, storing the files' resolved paths
/// (a symlink changed later does not redirect the image).
pub fn register(svc: &Services, tenant_id: &str, mut request: ImageCreate) -> Result<Image> {
    validate::name("name", &request.name, true)?;
    validate::kernel_args("cmdline", &request.cmdline)?;
    request.kernel = regular_file(svc, Some(tenant_id), "kernel", &request.kernel)?.0;
    let (rootfs, rootfs_bytes) = regular_file(svc, Some(tenant_id), "rootfs", &request.rootfs)?;
    request.rootfs = rootfs;
    if rootfs_bytes < 512 {
        return Err(ServiceError::unprocessable(
            "rootfs",
            format!(
                "{} is {rootfs_bytes} bytes: a root disk image holds at least one sector (512)",
                request.rootfs
            ),
        ));
    }
    if let Some(initrd) = &request.initrd {
        request.initrd = Some(regular_file(svc, Some(tenant_id), "initrd", initrd)?.0);
    }
    let image = svc.store.create_image(tenant_id, &request, rootfs_bytes)?;
    tracing::info!(tenant = tenant_id, image = %image.id, "image registered");
    Ok(image.into())
}

/// The images `scope` sees.
pub fn list(svc: &Services, scope: Scope<'_>) -> Result<Vec<Image>> {
    let rows = match scope.tenant() {
        Some(tenant) => svc.store.list_images(tenant)?,
        None => {
            let mut all = Vec::new();
            for tenant in svc.store.list_tenants()? {
                all.extend(svc.store.list_images(&tenant.id)?);
            }
            all
        }
    };
    Ok(rows.into_iter().map(Image::from).collect())
}

/// Image `id` (id or name) as `scope` sees it.
pub fn get(svc: &Services, scope: Scope<'_>, id: &str) -> Result<Image> {
    find(svc, scope, id).map(Image::from)
}

/// The stored image `id` (id or name) as `scope` sees it.
fn find(svc: &Services, scope: Scope<'_>, id: &str) -> Result<ImageRow> {
    let found = match scope.tenant() {
        Some(tenant) => svc.store.get_image(tenant, id)?,
        None => {
            let mut found = None;
            for tenant in svc.store.list_tenants()? {
                if let Some(image) = svc.store.get_image(&tenant.id, id)? {
                    found = Some(image);
                    break;
                }
            }
            found
        }
    };
    found.ok_or_else(|| ServiceError::not_found("image", id))
}

/// Deletes image `id` (id or name); one a VM uses is refused by the store.
pub fn delete(svc: &Services, scope: Scope<'_>, id: &str) -> Result<()> {
    let image = find(svc, scope, id)?;
    svc.store.delete_image(&image.tenant_id, &image.id)?;
    Ok(())
}

/// The image `vm` starts from, with its files checked again.
pub fn usable_image(svc: &Services, vm: &VmRow) -> Result<ImageRow> {
    let image = svc
        .store
        .get_image(&vm.tenant_id, &vm.image_id)?
        .ok_or_else(|| ServiceError::Unprocessable {
            field: None,
            message: "the VM's image is gone".to_string(),
        })?;
    let mut files = vec![("kernel", &image.kernel), ("rootfs", &image.rootfs)];
    if let Some(initrd) = &image.initrd {
        files.push(("initrd", initrd));
    }
    for (field, path) in files {
        regular_file(svc, Some(&image.tenant_id), field, path).map_err(|err| {
            let field = match &err {
                ServiceError::Invalid { field, .. } | ServiceError::Unprocessable { field, .. } => {
                    field.clone()
                }
                _ => None,
            };
            ServiceError::Unprocessable {
                field,
                message: format!("image {}: {err}", image.id),
            }
        })?;
    }
    Ok(image)
}

/// The file at `path` must be a regular file inside one of the image
/// directories or `caller_uploads`' own uploads (after resolving
/// symlinks); its resolved path and size.
fn regular_file(
    svc: &Services,
    caller_uploads: Option<&str>,
    field: &str,
    path: &str,
) -> Result<(String, u64)> {
    validate::absolute_path(field, path)?;
    let resolved = std::fs::canonicalize(path)
        .map_err(|err| ServiceError::unprocessable(field, format!("cannot use {path}: {err}")))?;
    // The operator's image directories, and the caller's own uploads.
    let own_uploads = caller_uploads.map(|tenant| crate::quota::uploads_dir(&svc.data_dir, tenant));
    let allowed = svc
        .image_dirs
        .iter()
        .chain(own_uploads.iter())
        .any(|dir| std::fs::canonicalize(dir).is_ok_and(|dir| resolved.starts_with(dir)));
    // Another tenant's uploads stay out of reach even under a broad
    // operator image directory.
    let uploads_root = std::fs::canonicalize(svc.data_dir.join("uploads")).ok();
    let own = own_uploads.and_then(|dir| std::fs::canonicalize(dir).ok());
    let foreign_upload = uploads_root.is_some_and(|root| resolved.starts_with(&root))
        && !own.is_some_and(|own| resolved.starts_with(own));
    let allowed = allowed && !foreign_upload;
    if !allowed {
        // Well-formed (the document's pattern), but not a file this
        // tenant may use here: as for a missing one, a 422.
        return Err(ServiceError::unprocessable(
            field,
            format!("{path} is outside the agent's image directories"),
        ));
    }
    match std::fs::metadata(&resolved) {
        Ok(meta) if meta.is_file() => Ok((resolved.display().to_string(), meta.len())),
        Ok(_) => Err(ServiceError::unprocessable(
            field,
            format!("{path} is not a regular file"),
        )),
        Err(err) => Err(ServiceError::unprocessable(
            field,
            format!("cannot use {path}: {err}"),
        )),
    }
}
