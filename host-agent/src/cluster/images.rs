//! Images in the cluster: their metadata and the SHA-256 of their files
//! live in etcd (`images/{id}`), so that every host lists the same images
//! and a VM's definition names one image whatever host defines it. The
//! files stay where they were registered; a host that must start a VM
//! whose image it lacks fetches the files from the host that has them and
//! checks their hashes before using them (`service::images::ensure`):
//! content, not a path, is what the cluster agrees on.

use etcd_client::{Txn, TxnOp};
use nubis_api::Image;
use serde::{Deserialize, Serialize};

use super::{Cluster, ClusterError, NamedRecord};

/// The SHA-256 (hex) of an image's files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageFiles {
    pub kernel: String,
    pub rootfs: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
}

/// `images/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// As the API shows it; its paths are those on `host`.
    pub image: Image,
    pub sha256: ImageFiles,
    /// The member that has the files.
    pub host: String,
}

impl Cluster {
    /// Every image of the cluster.
    pub async fn images(&self) -> Result<Vec<ImageRecord>, ClusterError> {
        let prefix = self.inner.keys.images();
        let mut images: Vec<ImageRecord> = self
            .inner
            .etcd
            .list(&prefix)
            .await?
            .into_iter()
            .map(|(_, record)| record)
            .collect();
        images.sort_by(|a, b| {
            (a.image.created_at, &a.image.id).cmp(&(b.image.created_at, &b.image.id))
        });
        Ok(images)
    }

    /// Image `wanted` (id or name) of `tenant` (any tenant's by id for
    /// None).
    pub async fn image(
        &self,
        tenant: Option<&str>,
        wanted: &str,
    ) -> Result<Option<ImageRecord>, ClusterError> {
        Ok(self.images().await?.into_iter().find(|record| {
            let image = &record.image;
            match tenant {
                Some(tenant) => {
                    image.tenant_id == tenant && (image.id == wanted || image.name == wanted)
                }
                None => image.id == wanted,
            }
        }))
    }

    /// Defines `record`: refused when its tenant is gone or the name is
    /// taken.
    pub async fn define_image(&self, record: &ImageRecord) -> Result<(), ClusterError> {
        let keys = &self.inner.keys;
        let image = &record.image;
        self.define_named(
            NamedRecord {
                what: "image",
                id: &image.id,
                tenant: &image.tenant_id,
                name: &image.name,
            },
            (&keys.image(&image.id), record),
            &keys.image_name(&image.tenant_id, &image.name),
        )
        .await
    }

    /// Deletes image `record` (the caller checked that no VM names it).
    pub async fn delete_image(&self, record: &ImageRecord) -> Result<(), ClusterError> {
        let keys = &self.inner.keys;
        let image = &record.image;
        let txn = Txn::new().and_then([
            TxnOp::delete(keys.image(&image.id), None),
            TxnOp::delete(keys.image_name(&image.tenant_id, &image.name), None),
        ]);
        self.inner
            .etcd
            .txn(&format!("delete image {}", image.id), txn)
            .await?;
        Ok(())
    }
}
