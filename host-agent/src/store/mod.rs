//! The agent's state in an embedded SQLite database (`DATA_DIR/agent.db`):
//! tenants, hashed tokens, images, VMs and their event logs, networks and
//! the peer hosts they span.
//!
//! The schema is migrated forward at open, one numbered step at a time,
//! recorded in `PRAGMA user_version`: an older agent's database opens in a
//! newer agent, and a newer one is refused rather than misread. One
//! connection behind a mutex: every operation is a short statement, and
//! SQLite serializes writers anyway.

mod images;
mod jail_users;
mod networks;
mod ownership;
mod peers;
mod port_forwards;
mod snapshots;
mod ssh_keys;
mod tenants;
mod vms;

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use rusqlite::Connection;

pub use images::ImageRow;
pub use networks::{random_overlay_vni, NetworkRow, RESERVED};
pub use peers::PeerRow;
pub use port_forwards::PortForwardRow;
pub use snapshots::{SavedVm, SnapshotRow};
pub use tenants::{token_hash, TenantRow};
pub use vms::{NewVm, Usage, VmRow};

/// The schema, one migration per entry; entry N brings the database from
/// version N to N + 1.
const MIGRATIONS: &[&str] = &[
    // 1: tenants, tokens, images, VMs, events.
    "CREATE TABLE tenants (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        max_vcpus INTEGER NOT NULL,
        max_memory_mib INTEGER NOT NULL,
        max_vms INTEGER NOT NULL,
        created_at INTEGER NOT NULL
     );
     CREATE TABLE tokens (
        id TEXT PRIMARY KEY,
        tenant_id TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
        hash TEXT NOT NULL UNIQUE,
        created_at INTEGER NOT NULL
     );
     CREATE TABLE images (
        id TEXT PRIMARY KEY,
        tenant_id TEXT NOT NULL REFERENCES tenants(id),
        name TEXT NOT NULL,
        kernel TEXT NOT NULL,
        rootfs TEXT NOT NULL,
        initrd TEXT,
        cmdline TEXT NOT NULL,
        rootfs_bytes INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        UNIQUE (tenant_id, name)
     );
     CREATE TABLE vms (
        id TEXT PRIMARY KEY,
        tenant_id TEXT NOT NULL REFERENCES tenants(id),
        name TEXT NOT NULL,
        image_id TEXT NOT NULL REFERENCES images(id),
        state TEXT NOT NULL,
        vcpus INTEGER NOT NULL,
        memory_mib INTEGER NOT NULL,
        kernel_args TEXT NOT NULL,
        spec TEXT NOT NULL,
        pid INTEGER,
        last_exit TEXT,
        created_at INTEGER NOT NULL,
        UNIQUE (tenant_id, name)
     );
     CREATE TABLE vm_events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        vm_id TEXT NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
        at INTEGER NOT NULL,
        kind TEXT NOT NULL,
        message TEXT NOT NULL
     );
     CREATE INDEX vm_events_by_vm ON vm_events (vm_id, seq);",
    // 2: each tenant's /24 for its bridge, allocated at its first NIC.
    "CREATE TABLE tenant_subnets (
        tenant_id TEXT PRIMARY KEY REFERENCES tenants(id) ON DELETE CASCADE,
        subnet INTEGER NOT NULL UNIQUE
     );",
    // 3: tenant virtual networks.
    "CREATE TABLE networks (
        id TEXT PRIMARY KEY,
        tenant_id TEXT NOT NULL REFERENCES tenants(id),
        name TEXT NOT NULL,
        cidr TEXT NOT NULL,
        nat INTEGER NOT NULL,
        vni INTEGER NOT NULL UNIQUE,
        created_at INTEGER NOT NULL,
        UNIQUE (tenant_id, name)
     );",
    // 4: DHCP, DNS and MTU of networks; port forwards to VMs.
    "ALTER TABLE networks ADD COLUMN dhcp INTEGER NOT NULL DEFAULT 1;
     ALTER TABLE networks ADD COLUMN dns TEXT NOT NULL DEFAULT '';
     ALTER TABLE networks ADD COLUMN mtu INTEGER NOT NULL DEFAULT 1500;
     CREATE TABLE port_forwards (
        id TEXT PRIMARY KEY,
        tenant_id TEXT NOT NULL REFERENCES tenants(id),
        vm_id TEXT NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
        nic INTEGER NOT NULL,
        protocol TEXT NOT NULL,
        host_port INTEGER NOT NULL,
        vm_port INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        UNIQUE (protocol, host_port)
     );",
    // 5: peer hosts and overlay networks: a network's home host and member
    // hosts (underlay addresses); addresses the home granted to peers' VMs.
    "CREATE TABLE hosts (
        name TEXT PRIMARY KEY,
        address TEXT NOT NULL UNIQUE,
        api_url TEXT NOT NULL,
        token TEXT NOT NULL,
        created_at INTEGER NOT NULL
     );
     ALTER TABLE networks ADD COLUMN overlay_home TEXT;
     ALTER TABLE networks ADD COLUMN overlay_hosts TEXT NOT NULL DEFAULT '';
     CREATE TABLE address_grants (
        network_id TEXT NOT NULL REFERENCES networks(id) ON DELETE CASCADE,
        address TEXT NOT NULL,
        host TEXT NOT NULL,
        vm TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (network_id, address)
     );",
    // 6: snapshots of VMs (their files are in DATA_DIR/snapshots/ID).
    "CREATE TABLE snapshots (
        id TEXT PRIMARY KEY,
        tenant_id TEXT NOT NULL REFERENCES tenants(id),
        vm_id TEXT NOT NULL,
        vm_name TEXT NOT NULL,
        image_id TEXT NOT NULL,
        vcpus INTEGER NOT NULL,
        memory_mib INTEGER NOT NULL,
        kernel_args TEXT NOT NULL,
        spec TEXT NOT NULL,
        size_bytes INTEGER NOT NULL,
        created_at INTEGER NOT NULL
     );",
    // 7: each VM's own unprivileged user in its jail (uid = gid).
    "CREATE TABLE jail_users (
        vm_id TEXT PRIMARY KEY,
        uid INTEGER NOT NULL UNIQUE
     );",
    // 8: quotas for everything else that costs the host (defaults as in
    // nubis_api::Quota).
    "ALTER TABLE tenants ADD COLUMN max_networks INTEGER NOT NULL DEFAULT 8;
     ALTER TABLE tenants ADD COLUMN max_port_forwards INTEGER NOT NULL DEFAULT 16;
     ALTER TABLE tenants ADD COLUMN max_snapshots INTEGER NOT NULL DEFAULT 16;
     ALTER TABLE tenants ADD COLUMN max_storage_mib INTEGER NOT NULL DEFAULT 65536;",
    // 9: peers authenticate by certificate (mutual TLS), not by token:
    // peers registered before have no fingerprint and are dropped (their
    // operators register them again by fingerprint).
    "DELETE FROM hosts;
     UPDATE hosts SET token = '';
     ALTER TABLE hosts ADD COLUMN peer_port INTEGER NOT NULL DEFAULT 7443;
     ALTER TABLE hosts ADD COLUMN fingerprint TEXT NOT NULL DEFAULT '';
     CREATE UNIQUE INDEX hosts_by_fingerprint ON hosts (fingerprint);",
    // 10: in a cluster, the ownership generation of each VM's record this
    // host holds it at (fencing).
    "CREATE TABLE vm_ownership (
        vm_id TEXT PRIMARY KEY REFERENCES vms(id) ON DELETE CASCADE,
        generation INTEGER NOT NULL
     );",
    // 11: tenants' SSH public keys (standalone; a cluster keeps them in
    // etcd).
    "CREATE TABLE ssh_keys (
        id TEXT PRIMARY KEY,
        tenant_id TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        public_key TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        UNIQUE (tenant_id, name)
     );",
];

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the database {path}: {source}")]
    Open {
        path: String,
        source: rusqlite::Error,
    },
    #[error("cannot make the database {path} private: {message}")]
    Permissions { path: String, message: String },
    #[error("the database is at schema version {found}; this agent knows up to {known}")]
    TooNew { found: u32, known: u32 },
    #[error("database migration to version {version} failed: {source}")]
    Migration {
        version: u32,
        source: rusqlite::Error,
    },
    #[error("{0} already exists")]
    Exists(String),
    #[error("{0}")]
    InUse(String),
    #[error("{0}")]
    Quota(String),
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
    #[error("the kernel gave no random bytes (getrandom): {0}")]
    Random(std::io::Error),
    #[error("database error: {0}")]
    Sql(#[from] rusqlite::Error),
}

/// The database.
pub struct Store {
    conn: Mutex<Connection>,
}

impl Store {
    /// Opens (or creates) the database at `path` and migrates it.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path).map_err(|source| StoreError::Open {
            path: path.display().to_string(),
            source,
        })?;
        // Peers' operator tokens live here (see `hosts.rs`): root only.
        // SQLite gives its -wal and -shm files the database's mode.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|err| {
            StoreError::Permissions {
                path: path.display().to_string(),
                message: err.to_string(),
            }
        })?;
        Self::init(conn)
    }

    /// A private database in memory, for tests.
    pub fn open_in_memory() -> Result<Self, StoreError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> Result<Self, StoreError> {
        conn.execute_batch(
            "PRAGMA foreign_keys = ON; PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;",
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrate(&conn)?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The schema version.
    pub fn schema_version(&self) -> Result<u32, StoreError> {
        Ok(self
            .conn()
            .query_row("PRAGMA user_version", [], |row| row.get(0))?)
    }
}

fn migrate(conn: &Connection) -> Result<(), StoreError> {
    let found: u32 = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    let known = MIGRATIONS.len() as u32;
    if found > known {
        return Err(StoreError::TooNew { found, known });
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let version = index as u32 + 1;
        let step = || -> rusqlite::Result<()> {
            let tx = conn.unchecked_transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", version)?;
            tx.commit()
        };
        step().map_err(|source| StoreError::Migration { version, source })?;
    }
    Ok(())
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or_default()
}

/// A new random id: `prefix` and 16 hex digits.
pub fn new_id(prefix: &str) -> Result<String, StoreError> {
    Ok(format!("{prefix}-{}", random_hex(8)?))
}

/// `bytes` random bytes from the kernel, as hex. Fails closed: ids and
/// tokens are never made from anything guessable (getrandom does not fail
/// on Linux >= 3.17 once the pool is ready; if it does, nothing is made).
pub fn random_hex(bytes: usize) -> Result<String, StoreError> {
    let mut buf = vec![0u8; bytes];
    random_fill(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// Fills `buf` with random bytes from the kernel (failing closed, as
/// [`random_hex`]).
pub fn random_fill(buf: &mut [u8]) -> Result<(), StoreError> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into `rest`,
        // a live, writable buffer of that length.
        let got = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if got > 0 {
            filled += got as usize;
            continue;
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(StoreError::Random(err));
        }
    }
    Ok(())
}

/// Maps a UNIQUE-constraint failure to [`StoreError::Exists`].
fn exists_or(err: rusqlite::Error, what: impl FnOnce() -> String) -> StoreError {
    match err {
        rusqlite::Error::SqliteFailure(code, _)
            if code.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            StoreError::Exists(what())
        }
        other => StoreError::Sql(other),
    }
}

/// For other modules' tests: a store in memory with tenant "acme" (default
/// quota) and its image "img"; returns (store, tenant id, image id).
#[cfg(test)]
pub(crate) fn fixture() -> (Store, String, String) {
    let store = Store::open_in_memory().unwrap();
    let tenant = store
        .create_tenant("acme", nubis_api::Quota::default())
        .unwrap();
    let image = store
        .create_image(
            &tenant.id,
            &nubis_api::ImageCreate {
                name: "img".into(),
                kernel: "/k".into(),
                rootfs: "/r".into(),
                initrd: None,
                cmdline: String::new(),
            },
            1,
        )
        .unwrap();
    (store, tenant.id, image.id)
}

/// For other modules' tests: VM `name` of `tenant` from `image` (1 vCPU,
/// 128 MiB, no disks), with `nics`.
#[cfg(test)]
pub(crate) fn fixture_vm(
    store: &Store,
    tenant: &str,
    image: &str,
    name: &str,
    nics: Vec<nubis_api::VmNic>,
) -> VmRow {
    store
        .create_vm(
            &NewVm {
                tenant_id: tenant.to_string(),
                name: name.into(),
                image_id: image.to_string(),
                vcpus: 1,
                memory_mib: 128,
                kernel_args: String::new(),
                root_rate_limit: nubis_api::RateLimit::default(),
                disks: vec![],
                nics,
                restore_from: None,
                restore_as_clone: false,
                metadata: Default::default(),
            },
            nubis_api::Quota::default(),
        )
        .unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_database_is_at_the_latest_version_and_reopens() {
        let dir = std::env::temp_dir().join(format!("nubis-store-{}", random_hex(4).unwrap()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent.db");
        let store = Store::open(&path).unwrap();
        assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len() as u32);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        drop(store);
        let store = Store::open(&path).unwrap();
        assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len() as u32);
        drop(store);
        // A database from a newer agent is refused, not misread.
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        assert!(matches!(
            Store::open(&path),
            Err(StoreError::TooNew { found: 99, .. })
        ));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn ids_are_prefixed_and_distinct() {
        let a = new_id("vm").unwrap();
        let b = new_id("vm").unwrap();
        assert!(a.starts_with("vm-") && a.len() == 19, "{a}");
        assert_ne!(a, b);
    }
}
