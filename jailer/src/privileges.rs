//! Giving up root: resource limits, then the VM's own user and group with
//! no supplementary groups, every capability gone (bounding set, ambient
//! set and, with the change of user, the rest) and `no_new_privs`, so that
//! nothing the VMM execs or is tricked into can gain them back.

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("{what}: {source}")]
    Call {
        what: String,
        source: std::io::Error,
    },
    #[error("uid/gid 0 for a VM: a jailed VMM never runs as root")]
    Root,
    #[error("capabilities left after dropping them: effective {effective:#x}, permitted {permitted:#x}, inheritable {inheritable:#x}")]
    CapabilitiesLeft {
        effective: u64,
        permitted: u64,
        inheritable: u64,
    },
    #[error("resource limit {0:?}: expected no-file=N, fsize=N or core=N")]
    BadLimit(String),
}

fn check(ret: libc::c_long, what: impl FnOnce() -> String) -> Result<(), PrivilegeError> {
    if ret == 0 {
        Ok(())
    } else {
        Err(PrivilegeError::Call {
            what: what(),
            source: std::io::Error::last_os_error(),
        })
    }
}

/// A resource limit the VMM runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceLimit {
    pub resource: libc::__rlimit_resource_t,
    pub name: &'static str,
    pub value: u64,
}

impl ResourceLimit {
    /// `no-file=N`, `fsize=N` (bytes) or `core=N` (bytes).
    pub fn parse(text: &str) -> Result<Self, PrivilegeError> {
        let bad = || PrivilegeError::BadLimit(text.to_string());
        let (name, value) = text.split_once('=').ok_or_else(bad)?;
        let value: u64 = value.parse().map_err(|_| bad())?;
        let (resource, name) = match name {
            "no-file" => (libc::RLIMIT_NOFILE, "no-file"),
            "fsize" => (libc::RLIMIT_FSIZE, "fsize"),
            "core" => (libc::RLIMIT_CORE, "core"),
            _ => return Err(bad()),
        };
        Ok(Self {
            resource,
            name,
            value,
        })
    }

    /// The limits every jailed VMM gets unless told otherwise: no core
    /// dumps (guest memory would land on the host's disk) and a bounded
    /// number of open files.
    pub fn defaults() -> Vec<Self> {
        vec![
            Self {
                resource: libc::RLIMIT_CORE,
                name: "core",
                value: 0,
            },
            Self {
                resource: libc::RLIMIT_NOFILE,
                name: "no-file",
                value: 2048,
            },
        ]
    }

    pub fn apply(&self) -> Result<(), PrivilegeError> {
        let limit = libc::rlimit {
            rlim_cur: self.value,
            rlim_max: self.value,
        };
        // SAFETY: setrlimit reads the rlimit struct, which lives on the stack
        // for the duration of the call.
        let ret = unsafe { libc::setrlimit(self.resource, &limit) };
        check(ret.into(), || {
            format!("setrlimit {}={}", self.name, self.value)
        })
    }
}

/// The highest capability number this kernel knows.
fn last_capability() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(63)
}

/// The calling thread's capability sets (effective, permitted, inheritable),
/// each as one 64-bit mask.
pub fn capabilities() -> Result<(u64, u64, u64), PrivilegeError> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget writes two `Data` entries (version 3) into `data` and
    // may update `header`; both live on the stack for the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut header as *mut Header,
            data.as_mut_ptr(),
        )
    };
    check(ret, || "capget".to_string())?;
    let join = |low: u32, high: u32| (u64::from(high) << 32) | u64::from(low);
    Ok((
        join(data[0].effective, data[1].effective),
        join(data[0].permitted, data[1].permitted),
        join(data[0].inheritable, data[1].inheritable),
    ))
}

/// Becomes `uid`/`gid` for good, with no capabilities left and
/// `no_new_privs` set. Must run while still root (it needs CAP_SETPCAP,
/// CAP_SETUID and CAP_SETGID to give them up).
pub fn drop_to(uid: u32, gid: u32) -> Result<(), PrivilegeError> {
    if uid == 0 || gid == 0 {
        return Err(PrivilegeError::Root);
    }
    for capability in 0..=last_capability() {
        // SAFETY: prctl with integer arguments only.
        let ret =
            unsafe { libc::prctl(libc::PR_CAPBSET_DROP, capability as libc::c_ulong, 0, 0, 0) };
        check(ret.into(), || {
            format!("drop capability {capability} from the bounding set")
        })?;
    }
    // SAFETY: prctl with integer arguments only.
    let ret = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    check(ret.into(), || "clear the ambient capabilities".to_string())?;
    // SAFETY: setgroups with a count of 0 reads no memory.
    let ret = unsafe { libc::setgroups(0, std::ptr::null()) };
    check(ret.into(), || "drop the supplementary groups".to_string())?;
    // SAFETY: setresgid/setresuid take integers only.
    let ret = unsafe { libc::setresgid(gid, gid, gid) };
    check(ret.into(), || format!("setresgid {gid}"))?;
    // SAFETY: as above.
    let ret = unsafe { libc::setresuid(uid, uid, uid) };
    check(ret.into(), || format!("setresuid {uid}"))?;
    // SAFETY: prctl with integer arguments only.
    let ret = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    check(ret.into(), || "set no_new_privs".to_string())?;
    // Leaving uid 0 clears the permitted and effective sets; make sure.
    let (effective, permitted, inheritable) = capabilities()?;
    if effective != 0 || permitted != 0 || inheritable != 0 {
        return Err(PrivilegeError::CapabilitiesLeft {
            effective,
            permitted,
            inheritable,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_limits_parse() {
        let files = ResourceLimit::parse("no-file=4096").unwrap();
        assert_eq!(files.resource, libc::RLIMIT_NOFILE);
        assert_eq!(files.value, 4096);
        assert_eq!(
            ResourceLimit::parse("fsize=1048576").unwrap().resource,
            libc::RLIMIT_FSIZE
        );
        for bad in ["no-file", "no-file=many", "stack=1", "=1"] {
            let err = ResourceLimit::parse(bad).unwrap_err().to_string();
            assert!(err.contains(bad), "{err}");
        }
        assert!(ResourceLimit::defaults()
            .iter()
            .any(|limit| limit.resource == libc::RLIMIT_CORE && limit.value == 0));
    }

    #[test]
    fn root_is_never_the_target() {
        assert!(matches!(drop_to(0, 1000), Err(PrivilegeError::Root)));
        assert!(matches!(drop_to(1000, 0), Err(PrivilegeError::Root)));
    }

    #[test]
    fn capabilities_can_be_read() {
        assert!(capabilities().is_ok());
    }
}
