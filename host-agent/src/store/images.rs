//! Images, owned by a tenant, found by id or name.

use nubis_api::ImageCreate;
use rusqlite::{params, OptionalExtension, Row};

use super::{exists_or, new_id, now, Store, StoreError};

const IMAGE_COLUMNS: &str =
    "id, tenant_id, name, kernel, rootfs, initrd, cmdline, rootfs_bytes, created_at";

/// An image as stored (the API's `Image` is made from it by the service
/// layer, `service::images`; the supervisor starts VMs from it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRow {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    /// Host paths of the image's files.
    pub kernel: String,
    pub rootfs: String,
    pub initrd: Option<String>,
    pub cmdline: String,
    pub rootfs_bytes: u64,
    /// Seconds since the epoch.
    pub created_at: u64,
}

fn image_from_row(row: &Row) -> rusqlite::Result<ImageRow> {
    Ok(ImageRow {
        id: row.get(0)?,
        tenant_id: row.get(1)?,
        name: row.get(2)?,
        kernel: row.get(3)?,
        rootfs: row.get(4)?,
        initrd: row.get(5)?,
        cmdline: row.get(6)?,
        rootfs_bytes: row.get(7)?,
        created_at: row.get(8)?,
    })
}

impl Store {
    pub fn create_image(
        &self,
        tenant_id: &str,
        request: &ImageCreate,
        rootfs_bytes: u64,
    ) -> Result<ImageRow, StoreError> {
        let image = ImageRow {
            id: new_id("img")?,
            tenant_id: tenant_id.to_string(),
            name: request.name.clone(),
            kernel: request.kernel.clone(),
            rootfs: request.rootfs.clone(),
            initrd: request.initrd.clone(),
            cmdline: request.cmdline.clone(),
            rootfs_bytes,
            created_at: now(),
        };
        self.insert_image(&image)?;
        Ok(image)
    }

    /// Stores `image` as it is (an image of the cluster, with its id).
    pub fn insert_image(&self, image: &ImageRow) -> Result<(), StoreError> {
        self.conn()
            .execute(
                &format!("INSERT INTO images ({IMAGE_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"),
                params![
                    image.id,
                    image.tenant_id,
                    image.name,
                    image.kernel,
                    image.rootfs,
                    image.initrd,
                    image.cmdline,
                    image.rootfs_bytes,
                    image.created_at
                ],
            )
            .map_err(|err| exists_or(err, || format!("image '{}'", image.name)))?;
        Ok(())
    }

    /// The tenant's image with this id or name.
    pub fn get_image(
        &self,
        tenant_id: &str,
        id_or_name: &str,
    ) -> Result<Option<ImageRow>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                &format!(
                    "SELECT {IMAGE_COLUMNS} FROM images
                     WHERE tenant_id = ?1 AND (id = ?2 OR name = ?2)"
                ),
                [tenant_id, id_or_name],
                image_from_row,
            )
            .optional()?)
    }

    pub fn list_images(&self, tenant_id: &str) -> Result<Vec<ImageRow>, StoreError> {
        let conn = self.conn();
        let mut statement = conn.prepare(&format!(
            "SELECT {IMAGE_COLUMNS} FROM images WHERE tenant_id = ?1 ORDER BY created_at, id"
        ))?;
        let images = statement
            .query_map([tenant_id], image_from_row)?
            .collect::<Result<_, _>>()?;
        Ok(images)
    }

    /// Deletes an image; refused while a VM was made from it.
    pub fn delete_image(&self, tenant_id: &str, id: &str) -> Result<bool, StoreError> {
        let conn = self.conn();
        let users: u32 = conn.query_row(
            "SELECT COUNT(*) FROM vms WHERE image_id = ?1",
            [id],
            |row| row.get(0),
        )?;
        if users > 0 {
            return Err(StoreError::InUse(format!(
                "image {id} is used by {users} VM(s): delete them first"
            )));
        }
        Ok(conn.execute(
            "DELETE FROM images WHERE id = ?1 AND tenant_id = ?2",
            [id, tenant_id],
        )? > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nubis_api::Quota;

    pub(crate) fn image_request(name: &str) -> ImageCreate {
        ImageCreate {
            name: name.to_string(),
            kernel: "/images/vmlinux".into(),
            rootfs: "/images/rootfs.ext4".into(),
            initrd: None,
            cmdline: "console=ttyS0".into(),
        }
    }

    #[test]
    fn images_belong_to_one_tenant() {
        let store = Store::open_in_memory().unwrap();
        let acme = store.create_tenant("acme", Quota::default()).unwrap();
        let globex = store.create_tenant("globex", Quota::default()).unwrap();
        let image = store
            .create_image(&acme.id, &image_request("debian"), 4096)
            .unwrap();
        assert_eq!(
            store.get_image(&acme.id, "debian").unwrap(),
            Some(image.clone())
        );
        assert_eq!(
            store.get_image(&acme.id, &image.id).unwrap(),
            Some(image.clone())
        );
        assert_eq!(store.get_image(&globex.id, &image.id).unwrap(), None);
        assert!(store.list_images(&globex.id).unwrap().is_empty());
        // The same name is fine for another tenant, not twice for one.
        store
            .create_image(&globex.id, &image_request("debian"), 1)
            .unwrap();
        assert!(matches!(
            store.create_image(&acme.id, &image_request("debian"), 1),
            Err(StoreError::Exists(_))
        ));
        assert!(!store.delete_image(&globex.id, &image.id).unwrap());
        assert!(store.delete_image(&acme.id, &image.id).unwrap());
    }
}
