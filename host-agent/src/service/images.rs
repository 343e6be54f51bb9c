//! A tenant's guest images, registered by host path: only regular files in
//! the operator's image directories or the tenant's own uploads, checked
//! again each time a VM starts from one (a path that became a symlink
//! elsewhere since is refused, so the jail never mounts a file the tenant
//! may not use).

use std::collections::HashSet;
use std::path::PathBuf;

use nubis_api::{Image, ImageCreate};

use super::{Result, Scope, ServiceError, Services};
use crate::cluster::images::{ImageFiles, ImageRecord};
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
/// mode this host records first that it holds resources of the tenant,
/// and the image is defined in the cluster with its files' hashes.
pub async fn create(svc: &Services, tenant_id: &str, request: ImageCreate) -> Result<Image> {
    let _hold = svc.hold_tenant(tenant_id).await?;
    let image = register(svc, tenant_id, request)?;
    if let Some(cluster) = &svc.cluster {
        let defined = match hashes(&image).await {
            Ok(sha256) => cluster
                .define_image(&ImageRecord {
                    image: image.clone(),
                    sha256,
                    host: cluster.host_name().to_string(),
                })
                .await
                .map_err(ServiceError::from),
            Err(err) => Err(err),
        };
        if let Err(err) = defined {
            svc.store.delete_image(tenant_id, &image.id)?;
            return Err(err);
        }
    }
    Ok(image)
}

/// The SHA-256 of `image`'s files.
async fn hashes(image: &Image) -> Result<ImageFiles> {
    Ok(ImageFiles {
        kernel: sha256_of(&image.kernel).await?,
        rootfs: sha256_of(&image.rootfs).await?,
        initrd: match &image.initrd {
            Some(path) => Some(sha256_of(path).await?),
            None => None,
        },
    })
}

/// The SHA-256 (hex) of the file at `path`, read off the async runtime.
async fn sha256_of(path: &str) -> Result<String> {
    let owned = PathBuf::from(path);
    tokio::task::spawn_blocking(move || -> std::io::Result<String> {
        use sha2::{Digest, Sha256};
        let mut file = std::fs::File::open(&owned)?;
        let mut hasher = Sha256::new();
        std::io::copy(&mut file, &mut hasher)?;
        Ok(hex(&hasher.finalize()))
    })
    .await
    .map_err(|err| ServiceError::Internal(format!("hashing {path} stopped: {err}")))?
    .map_err(|err| ServiceError::Internal(format!("cannot hash {path}: {err}")))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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

/// The images `scope` sees (in a cluster, the cluster's).
pub async fn list(svc: &Services, scope: Scope<'_>) -> Result<Vec<Image>> {
    if let Some(cluster) = &svc.cluster {
        return Ok(cluster
            .images()
            .await?
            .into_iter()
            .map(|record| record.image)
            .filter(|image| {
                scope
                    .tenant()
                    .is_none_or(|tenant| image.tenant_id == tenant)
            })
            .collect());
    }
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

/// Image `id` (id or name) as `scope` sees it (in a cluster, the
/// cluster's).
pub async fn get(svc: &Services, scope: Scope<'_>, id: &str) -> Result<Image> {
    if let Some(cluster) = &svc.cluster {
        return cluster
            .image(scope.tenant(), id)
            .await?
            .map(|record| record.image)
            .ok_or_else(|| ServiceError::not_found("image", id));
    }
    get_here(svc, scope, id)
}

/// Image `id` (id or name) of this host's store.
pub fn get_here(svc: &Services, scope: Scope<'_>, id: &str) -> Result<Image> {
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

/// Deletes image `id` (id or name); one a VM uses is refused (by the
/// store here; in a cluster, while any VM record names it; the other
/// hosts drop their copies as they sweep, `sweep_copies`).
pub async fn delete(svc: &Services, scope: Scope<'_>, id: &str) -> Result<()> {
    let Some(cluster) = &svc.cluster else {
        let image = find(svc, scope, id)?;
        svc.store.delete_image(&image.tenant_id, &image.id)?;
        return Ok(());
    };
    let record = cluster
        .image(scope.tenant(), id)
        .await?
        .ok_or_else(|| ServiceError::not_found("image", id))?;
    let image = &record.image;
    let users = cluster
        .vms()
        .await?
        .0
        .iter()
        .filter(|vm| vm.record.spec.image == image.id)
        .count();
    if users > 0 {
        return Err(ServiceError::Conflict(format!(
            "image {} is used by {users} VM(s) in the cluster: delete them first",
            image.id
        )));
    }
    if svc.store.get_image(&image.tenant_id, &image.id)?.is_some() {
        svc.store.delete_image(&image.tenant_id, &image.id)?;
    }
    cluster.delete_image(&record).await?;
    Ok(())
}

/// Where fetched image files are kept, by their SHA-256.
pub fn cache_dir(svc: &Services) -> PathBuf {
    svc.data_dir.join("image-cache")
}

/// Makes image `id` of the cluster usable here before a VM is defined
/// from it: a copy this host has already, the same files at the same
/// paths (hosts that share an image directory), or the files fetched
/// from the host that registered it, each checked against its SHA-256.
pub async fn ensure(svc: &Services, tenant_id: &str, id: &str) -> Result<()> {
    let Some(cluster) = &svc.cluster else {
        return Ok(());
    };
    if svc.store.get_image(tenant_id, id)?.is_some() {
        return Ok(());
    }
    let record = cluster
        .image(Some(tenant_id), id)
        .await?
        .filter(|record| record.image.id == id)
        .ok_or_else(|| ServiceError::unprocessable("image", format!("no image '{id}'")))?;
    let image = &record.image;
    let mut row = ImageRow {
        id: image.id.clone(),
        tenant_id: image.tenant_id.clone(),
        name: image.name.clone(),
        kernel: image.kernel.clone(),
        rootfs: image.rootfs.clone(),
        initrd: image.initrd.clone(),
        cmdline: image.cmdline.clone(),
        rootfs_bytes: image.rootfs_bytes,
        created_at: image.created_at,
    };
    if !same_files_here(svc, &record).await {
        let cache = cache_dir(svc);
        std::fs::create_dir_all(&cache).map_err(|err| {
            ServiceError::Internal(format!("cannot create {}: {err}", cache.display()))
        })?;
        let sha = &record.sha256;
        row.kernel = fetch(svc, &record, "kernel", &sha.kernel).await?;
        row.rootfs = fetch(svc, &record, "rootfs", &sha.rootfs).await?;
        if let Some(initrd) = &sha.initrd {
            row.initrd = Some(fetch(svc, &record, "initrd", initrd).await?);
        }
    }
    match svc.store.insert_image(&row) {
        Ok(()) | Err(crate::store::StoreError::Exists(_)) => Ok(()),
        Err(err) => Err(err.into()),
    }
}

/// Whether this host has `record`'s files at the same paths, where its
/// tenant may use them, with the same content.
async fn same_files_here(svc: &Services, record: &ImageRecord) -> bool {
    let image = &record.image;
    let mut files = vec![
        ("kernel", &image.kernel, &record.sha256.kernel),
        ("rootfs", &image.rootfs, &record.sha256.rootfs),
    ];
    if let (Some(path), Some(sha)) = (&image.initrd, &record.sha256.initrd) {
        files.push(("initrd", path, sha));
    }
    for (field, path, sha) in files {
        if checked_file(svc, Some(&image.tenant_id), field, path, true).is_err() {
            return false;
        }
        if sha256_of(path).await.ok().as_deref() != Some(sha.as_str()) {
            return false;
        }
    }
    true
}

/// The largest image file fetched from a peer.
const MAX_FETCHED_BYTES: u64 = 64 << 30;

/// Fetches `which` file of `record` from the host that has it into the
/// cache (named by its hash; one fetched before is used again); its path.
async fn fetch(svc: &Services, record: &ImageRecord, which: &str, sha256: &str) -> Result<String> {
    if !crate::peer_tls::is_fingerprint(sha256) {
        return Err(ServiceError::Internal(format!(
            "image {}: '{sha256}' is not a SHA-256",
            record.image.id
        )));
    }
    let dest = cache_dir(svc).join(sha256);
    if dest.is_file()
        && sha256_of(&dest.display().to_string()).await.ok().as_deref() == Some(sha256)
    {
        return Ok(dest.display().to_string());
    }
    let peer = svc.peer_directory.get(&record.host)?.ok_or_else(|| {
        ServiceError::Unavailable(format!(
            "image {} is on host {}, which is not up",
            record.image.id, record.host
        ))
    })?;
    let path = format!("/v1/overlay/images/{}/files/{which}", record.image.id);
    let mut answer = svc
        .peers
        .forward(
            &peer,
            crate::peers::Forwarded {
                method: reqwest::Method::GET,
                path,
                headers: Default::default(),
                body: Vec::new(),
            },
        )
        .await?;
    let failed = |message: String| {
        ServiceError::PeerAnswer(format!(
            "image {} {which} from host {}: {message}",
            record.image.id, record.host
        ))
    };
    if !answer.status().is_success() {
        return Err(failed(format!("answered {}", answer.status())));
    }
    let part = dest.with_extension("part");
    let local = |err: std::io::Error| {
        ServiceError::Internal(format!("cannot write {}: {err}", part.display()))
    };
    let mut file = tokio::fs::File::create(&part).await.map_err(local)?;
    let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
    let mut written = 0u64;
    loop {
        let chunk = match answer.chunk().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(err) => {
                let _ = tokio::fs::remove_file(&part).await;
                return Err(failed(err.to_string()));
            }
        };
        written = written.saturating_add(chunk.len() as u64);
        if written > MAX_FETCHED_BYTES {
            let _ = tokio::fs::remove_file(&part).await;
            return Err(failed(format!("more than {MAX_FETCHED_BYTES} bytes")));
        }
        sha2::Digest::update(&mut hasher, &chunk);
        tokio::io::AsyncWriteExt::write_all(&mut file, &chunk)
            .await
            .map_err(local)?;
    }
    tokio::io::AsyncWriteExt::flush(&mut file)
        .await
        .map_err(local)?;
    file.sync_all().await.map_err(local)?;
    let got = hex(&sha2::Digest::finalize(hasher));
    if got != sha256 {
        let _ = tokio::fs::remove_file(&part).await;
        return Err(failed(format!(
            "its SHA-256 is {got}, not {sha256}: refused"
        )));
    }
    tokio::fs::rename(&part, &dest).await.map_err(local)?;
    tracing::info!(image = %record.image.id, which, bytes = written, host = %record.host, "image file fetched");
    Ok(dest.display().to_string())
}

/// The path of `which` file (kernel, rootfs, initrd) of image `id` of
/// this host's store, for a peer fetching it.
pub fn file_for_peer(svc: &Services, id: &str, which: &str) -> Result<PathBuf> {
    let image = find(svc, Scope::Operator, id)?;
    let path = match which {
        "kernel" => Some(image.kernel),
        "rootfs" => Some(image.rootfs),
        "initrd" => image.initrd,
        _ => None,
    };
    path.map(PathBuf::from)
        .ok_or_else(|| ServiceError::not_found("image file", format!("{id}/{which}")))
}

/// Defines in the cluster, as this host's, every image this host has that
/// the cluster lacks (its standalone past, as it joins for the first time).
pub async fn publish_standalone(svc: &Services, cluster: &crate::cluster::Cluster) -> Result<()> {
    let known: std::collections::HashSet<String> = cluster
        .images()
        .await?
        .into_iter()
        .map(|record| record.image.id)
        .collect();
    for tenant in svc.store.list_tenants()? {
        for row in svc.store.list_images(&tenant.id)? {
            if known.contains(&row.id) {
                continue;
            }
            let image = Image::from(row);
            let record = ImageRecord {
                sha256: hashes(&image).await?,
                image,
                host: cluster.host_name().to_string(),
            };
            match cluster.define_image(&record).await {
                Ok(()) => {
                    tracing::info!(image = %record.image.id, "image published to the cluster")
                }
                Err(crate::cluster::ClusterError::Exists(what)) => {
                    tracing::warn!(image = %record.image.id, "image not published: {what} exists in the cluster")
                }
                Err(err) => return Err(err.into()),
            }
        }
    }
    Ok(())
}

/// How old a copy must be before it may be swept, in seconds.
const SWEEP_AFTER_S: u64 = 60;

/// Drops this host's copies of images the cluster no longer has (deleted
/// through another host), unless a VM here still uses one. `seen`: the
/// images this host saw in the cluster since it started: one of those is
/// dropped at once, another (registered here a moment before it is in the
/// cluster) only [`SWEEP_AFTER_S`] after its creation.
pub async fn sweep_copies(svc: &Services, seen: &mut HashSet<String>) -> Result<()> {
    let Some(cluster) = &svc.cluster else {
        return Ok(());
    };
    let known: HashSet<String> = cluster
        .images()
        .await?
        .into_iter()
        .map(|record| record.image.id)
        .collect();
    seen.extend(known.iter().cloned());
    for tenant in svc.store.list_tenants()? {
        for image in svc.store.list_images(&tenant.id)? {
            // One being registered here is in the store a moment before
            // it is in the cluster.
            let settled = seen.contains(&image.id)
                || image.created_at.saturating_add(SWEEP_AFTER_S) < crate::store::now();
            if known.contains(&image.id) || !settled {
                continue;
            }
            match svc.store.delete_image(&tenant.id, &image.id) {
                Ok(_) => {
                    seen.remove(&image.id);
                    tracing::info!(image = %image.id, "image deleted from the cluster: copy dropped here")
                }
                Err(err) => tracing::debug!(image = %image.id, "copy kept: {err}"),
            }
        }
    }
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
        checked_file(svc, Some(&image.tenant_id), field, path, true).map_err(|err| {
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
    checked_file(svc, caller_uploads, field, path, false)
}

/// [`regular_file`], where `fetched` also allows the cache of files
/// fetched from other hosts (for images of the cluster; never for a path
/// a tenant names: the cache holds other tenants' files).
fn checked_file(
    svc: &Services,
    caller_uploads: Option<&str>,
    field: &str,
    path: &str,
    fetched: bool,
) -> Result<(String, u64)> {
    validate::absolute_path(field, path)?;
    let resolved = std::fs::canonicalize(path)
        .map_err(|err| ServiceError::unprocessable(field, format!("cannot use {path}: {err}")))?;
    // The operator's image directories, and the caller's own uploads.
    let own_uploads = caller_uploads.map(|tenant| crate::quota::uploads_dir(&svc.data_dir, tenant));
    // Files fetched from other hosts of the cluster, checked by hash.
    let cache = fetched.then(|| cache_dir(svc));
    let allowed = svc
        .image_dirs
        .iter()
        .chain(own_uploads.iter())
        .chain(cache.iter())
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
