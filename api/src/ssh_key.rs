//! A tenant's SSH public keys: registered once, chosen per VM at creation
//! (`VmCreate::ssh_keys`), and handed to the guest by the metadata service
//! (`/latest/meta-data/public-keys/`). A VM keeps the keys it was created
//! with: deleting a key does not take it from running VMs.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The most keys a tenant may hold.
pub const MAX_SSH_KEYS_PER_TENANT: usize = 64;
/// The longest public key line, in characters.
pub const MAX_PUBLIC_KEY: usize = 8192;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SshKeyCreate {
    /// 1 to 63 characters: lower-case letters, digits and '-'.
    #[schema(pattern = r"^[a-z0-9][a-z0-9-]{0,62}$")]
    pub name: String,
    /// One OpenSSH public key line (`ssh-ed25519 AAAA... comment`): its
    /// type one of ssh-ed25519, ssh-rsa, ecdsa-sha2-nistp256/384/521,
    /// sk-ssh-ed25519@openssh.com or sk-ecdsa-sha2-nistp256@openssh.com,
    /// its key base64 naming the same type, the comment printable ASCII;
    /// at most 8192 characters.
    #[schema(
        max_length = 8192,
        pattern = r"^ *(?:ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp256|ecdsa-sha2-nistp384|ecdsa-sha2-nistp521|sk-ssh-ed25519@openssh\.com|sk-ecdsa-sha2-nistp256@openssh\.com) +[A-Za-z0-9+/]+={0,2}(?: [ -~]*)?$"
    )]
    pub public_key: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SshKey {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    /// As registered, normalized to `type key [comment]`.
    pub public_key: String,
    /// `SHA256:` and the unpadded base64 of the key's SHA-256, as
    /// `ssh-keygen -l` shows it.
    pub fingerprint: String,
    pub created_at: u64,
}
