//! What kind of KVM this host has.
//!
//! On nested `kvm_pvm` hosts guest ring-0 code runs through KVM's instruction
//! emulator, which cannot run some instructions (cmpxchg16b, xsave, popcnt,
//! smap's clac/stac, ...). The VMM hides those features from the guest's
//! CPUID there, so that a guest kernel never selects them. On VMX/SVM hosts
//! nothing is hidden.

use std::path::Path;

/// The KVM implementation behind `/dev/kvm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmFlavor {
    /// Hardware virtualization (VMX or SVM).
    Hardware,
    /// The PVM module (nested, no VMX/SVM in the host).
    Pvm,
}

impl KvmFlavor {
    /// Detects the flavor by the presence of `/sys/module/kvm_pvm`.
    pub fn detect() -> Self {
        Self::from_sysfs(Path::new("/sys/module"))
    }

    fn from_sysfs(modules: &Path) -> Self {
        if modules.join("kvm_pvm").exists() {
            Self::Pvm
        } else {
            Self::Hardware
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detection_by_module_directory() {
        let dir = std::env::temp_dir().join(format!("nubis-platform-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(KvmFlavor::from_sysfs(&dir), KvmFlavor::Hardware);
        std::fs::create_dir_all(dir.join("kvm_pvm")).unwrap();
        assert_eq!(KvmFlavor::from_sysfs(&dir), KvmFlavor::Pvm);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
