//! Guest images: a kernel and a root disk (and optionally an initrd) that
//! VMs boot from. Registered by host path; VMs get copy-on-write clones of
//! the root disk, never the image itself.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageCreate {
    /// 1 to 63 characters: lower-case letters, digits, '-' and '.'.
    #[schema(pattern = r"^[a-z0-9][a-z0-9.-]{0,62}$")]
    pub name: String,
    /// Absolute host path (no '..') of an ELF vmlinux or bzImage, in one of
    /// the agent's image directories or the tenant's uploads.
    #[schema(pattern = r"^(?:/(?:|\.|[^/\x00.][^/\x00]*|\.[^/\x00.][^/\x00]*|\.\.[^/\x00]+))+$")]
    pub kernel: String,
    /// Absolute host path of a raw root disk image (it becomes /dev/vda),
    /// at least 512 bytes, where `kernel` may be.
    #[schema(pattern = r"^(?:/(?:|\.|[^/\x00.][^/\x00]*|\.[^/\x00.][^/\x00]*|\.\.[^/\x00]+))+$")]
    pub rootfs: String,
    #[serde(default)]
    #[schema(pattern = r"^(?:/(?:|\.|[^/\x00.][^/\x00]*|\.[^/\x00.][^/\x00]*|\.\.[^/\x00]+))+$")]
    pub initrd: Option<String>,
    /// Kernel arguments the image needs (console, root=...); VMs add theirs.
    /// Printable ASCII, at most 1024 bytes.
    #[serde(default)]
    #[schema(pattern = r"^[ -~]*$", max_length = 1024)]
    pub cmdline: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Image {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    pub kernel: String,
    pub rootfs: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    pub cmdline: String,
    /// Size of the root disk image in bytes.
    pub rootfs_bytes: u64,
    pub created_at: u64,
}
