//! A VM's cgroups: one per VM under a parent (`/nubis/<vm-id>`), in the
//! unified (v2) hierarchy when it has the controllers, else in the v1
//! hierarchies that do (hosts that still mount v1 controllers, this
//! project's CI machines among them, have them only there).
//!
//! Settings are given in v2 terms (`cpu.max`, `memory.max`, `pids.max`,
//! `io.max`); on v1 each is written as its equivalent.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The default parent cgroup of every VM's cgroup.
pub const DEFAULT_PARENT: &str = "nubis";

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroup setting {0:?} is not FILE=VALUE")]
    Syntax(String),
    #[error("cgroup setting {file}: unknown (known: cpu.max, memory.max, pids.max, io.max)")]
    Unknown { file: String },
    #[error("cgroup setting {file}={value}: {reason}")]
    BadValue {
        file: String,
        value: String,
        reason: &'static str,
    },
    #[error("cgroup name {0:?}: only letters, digits, '-', '_' and '/' between names")]
    BadName(String),
    #[error("no cgroup hierarchy on this host has the {0} controller")]
    NoController(String),
    #[error("cannot read /proc/self/mountinfo: {0}")]
    Mountinfo(std::io::Error),
    #[error("cgroup {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A v1 controller and the files (with values) of one setting there.
pub type V1Files = (&'static str, Vec<(String, String)>);

/// One limit, as the agent asks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    pub file: String,
    pub value: String,
}

impl Setting {
    /// `FILE=VALUE`, checked against the files this module knows.
    pub fn parse(text: &str) -> Result<Self, CgroupError> {
        let (file, value) = text
            .split_once('=')
            .ok_or_else(|| CgroupError::Syntax(text.to_string()))?;
        let setting = Self {
            file: file.to_string(),
            value: value.to_string(),
        };
        setting.v1_files()?;
        Ok(setting)
    }

    /// The controller the setting belongs to.
    pub fn controller(&self) -> &str {
        self.file.split('.').next().unwrap_or("")
    }

    fn bad(&self, reason: &'static str) -> CgroupError {
        CgroupError::BadValue {
            file: self.file.clone(),
            value: self.value.clone(),
            reason,
        }
    }

    /// The v1 controller and the files with their values that say the same.
    pub fn v1_files(&self) -> Result<V1Files, CgroupError> {
        let number = |text: &str| text.parse::<u64>().is_ok();
        match self.file.as_str() {
            "cpu.max" => {
                let mut parts = self.value.split_whitespace();
                let quota = parts.next().unwrap_or("");
                let period = parts.next().unwrap_or("100000");
                if parts.next().is_some() || !(quota == "max" || number(quota)) || !number(period) {
                    return Err(self.bad("expected \"QUOTA|max [PERIOD]\" in microseconds"));
                }
                let quota = if quota == "max" { "-1" } else { quota };
                Ok((
                    "cpu",
                    vec![
                        ("cpu.cfs_period_us".into(), period.into()),
                        ("cpu.cfs_quota_us".into(), quota.into()),
                    ],
                ))
            }
            "memory.max" => {
                if !number(&self.value) {
                    return Err(self.bad("expected a number of bytes"));
                }
                Ok((
                    "memory",
                    vec![("memory.limit_in_bytes".into(), self.value.clone())],
                ))
            }
            "pids.max" => {
                if !(self.value == "max" || number(&self.value)) {
                    return Err(self.bad("expected a number or max"));
                }
                Ok(("pids", vec![("pids.max".into(), self.value.clone())]))
            }
            "io.max" => {
                // "MAJ:MIN rbps=N wbps=N riops=N wiops=N" (any of the four).
                let mut parts = self.value.split_whitespace();
                let device = parts.next().unwrap_or("");
                let valid_device = device
                    .split_once(':')
                    .is_some_and(|(major, minor)| number(major) && number(minor));
                if !valid_device {
                    return Err(self.bad("expected \"MAJ:MIN KEY=N...\""));
                }
                let mut files = Vec::new();
                for part in parts {
                    let (key, amount) = part
                        .split_once('=')
                        .ok_or_else(|| self.bad("expected KEY=N after the device"))?;
                    if !number(amount) {
                        return Err(self.bad("limits are numbers"));
                    }
                    let file = match key {
                        "rbps" => "blkio.throttle.read_bps_device",
                        "wbps" => "blkio.throttle.write_bps_device",
                        "riops" => "blkio.throttle.read_iops_device",
                        "wiops" => "blkio.throttle.write_iops_device",
                        _ => return Err(self.bad("keys are rbps, wbps, riops and wiops")),
                    };
                    files.push((file.to_string(), format!("{device} {amount}")));
                }
                if files.is_empty() {
                    return Err(self.bad("no limit after the device"));
                }
                Ok(("blkio", files))
            }
            _ => Err(CgroupError::Unknown {
                file: self.file.clone(),
            }),
        }
    }
}

/// Where cgroups can be made on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchies {
    /// The unified hierarchy at this mount point, with these controllers.
    V2 {
        root: PathBuf,
        controllers: Vec<String>,
    },
    /// v1 hierarchies: controller name to mount point.
    V1(BTreeMap<String, PathBuf>),
}

/// The cgroup mounts in a `/proc/self/mountinfo` text: the v2 mount point
/// (if any) and the v1 mount point of every controller.
pub fn parse_mountinfo(text: &str) -> (Option<PathBuf>, BTreeMap<String, PathBuf>) {
    let mut unified = None;
    let mut v1 = BTreeMap::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mount_point = left.split(' ').nth(4).map(unescape);
        let mut right = right.split(' ');
        let fstype = right.next().unwrap_or("");
        let options = right.nth(1).unwrap_or("");
        let Some(mount_point) = mount_point else {
            continue;
        };
        match fstype {
            "cgroup2" => {
                unified.get_or_insert(mount_point);
            }
            "cgroup" => {
                for option in options.split(',') {
                    if matches!(option, "cpu" | "memory" | "pids" | "blkio") {
                        v1.entry(option.to_string())
                            .or_insert_with(|| mount_point.clone());
                    }
                }
            }
            _ => {}
        }
    }
    (unified, v1)
}

/// mountinfo escapes spaces and such as `\040`.
fn unescape(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let octal = bytes.get(index + 1..index + 4).and_then(|digits| {
            std::str::from_utf8(digits)
                .ok()
                .and_then(|text| u8::from_str_radix(text, 8).ok())
        });
        match (bytes[index], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                index += 4;
            }
            (byte, _) => {
                out.push(byte);
                index += 1;
            }
        }
    }
    use std::os::unix::ffi::OsStringExt;
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

impl Hierarchies {
    /// This host's: v2 when it has every controller `needed`, else v1.
    pub fn detect(needed: &[&str]) -> Result<Self, CgroupError> {
        let text =
            std::fs::read_to_string("/proc/self/mountinfo").map_err(CgroupError::Mountinfo)?;
        let (unified, v1) = parse_mountinfo(&text);
        if let Some(root) = unified {
            let controllers: Vec<String> = std::fs::read_to_string(root.join("cgroup.controllers"))
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_string)
                .collect();
            if needed
                .iter()
                .all(|wanted| controllers.iter().any(|have| have == wanted))
            {
                return Ok(Self::V2 { root, controllers });
            }
        }
        for wanted in needed {
            let v1_name = if *wanted == "io" { "blkio" } else { wanted };
            if !v1.contains_key(v1_name) {
                return Err(CgroupError::NoController((*wanted).to_string()));
            }
        }
        Ok(Self::V1(v1))
    }

    /// The directories of VM `id`'s cgroup (one per v1 hierarchy in use).
    pub fn vm_dirs(&self, parent: &str, id: &str) -> Vec<PathBuf> {
        match self {
            Self::V2 { root, .. } => vec![root.join(parent).join(id)],
            Self::V1(mounts) => mounts
                .values()
                .map(|mount| mount.join(parent).join(id))
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect(),
        }
    }
}

/// A cgroup name under the hierarchy root: no `..`, no absolute path.
pub fn check_name(name: &str) -> Result<(), CgroupError> {
    let valid = !name.is_empty()
        && name.split('/').all(|part| {
            !part.is_empty()
                && part != "."
                && part != ".."
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        });
    if valid {
        Ok(())
    } else {
        Err(CgroupError::BadName(name.to_string()))
    }
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(|source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn make_dir(path: &Path) -> Result<(), CgroupError> {
    std::fs::create_dir_all(path).map_err(|source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// VM `id`'s cgroup with `settings` applied; returns the `cgroup.procs`
/// files a process writes itself into to join it.
pub fn create(
    hierarchies: &Hierarchies,
    parent: &str,
    id: &str,
    settings: &[Setting],
) -> Result<Vec<PathBuf>, CgroupError> {
    check_name(parent)?;
    check_name(id)?;
    match hierarchies {
        Hierarchies::V2 { root, controllers } => {
            // Each level down to the VM's must hand the controllers on.
            let wanted: Vec<&str> = settings
                .iter()
                .map(Setting::controller)
                .filter(|name| controllers.iter().any(|have| have == name))
                .collect();
            let enable = wanted
                .iter()
                .map(|name| format!("+{name}"))
                .collect::<Vec<_>>()
                .join(" ");
            let mut level = root.clone();
            for part in parent.split('/') {
                if !enable.is_empty() {
                    write(&level.join("cgroup.subtree_control"), &enable)?;
                }
                level = level.join(part);
                make_dir(&level)?;
            }
            if !enable.is_empty() {
                write(&level.join("cgroup.subtree_control"), &enable)?;
            }
            let dir = level.join(id);
            make_dir(&dir)?;
            for setting in settings {
                write(&dir.join(&setting.file), &setting.value)?;
            }
            Ok(vec![dir.join("cgroup.procs")])
        }
        Hierarchies::V1(mounts) => {
            let mut procs = Vec::new();
            for dir in hierarchies.vm_dirs(parent, id) {
                make_dir(&dir)?;
                procs.push(dir.join("cgroup.procs"));
            }
            for setting in settings {
                let (controller, files) = setting.v1_files()?;
                let mount = mounts
                    .get(controller)
                    .ok_or_else(|| CgroupError::NoController(controller.to_string()))?;
                let dir = mount.join(parent).join(id);
                for (file, value) in files {
                    write(&dir.join(file), &value)?;
                }
            }
            procs.sort();
            procs.dedup();
            Ok(procs)
        }
    }
}

/// Moves the calling process into the cgroups (`0` means "myself", in any
/// PID namespace).
pub fn join(procs: &[PathBuf]) -> Result<(), CgroupError> {
    for file in procs {
        write(file, "0")?;
    }
    Ok(())
}

/// Removes VM `id`'s cgroups once their processes are gone; a cgroup that
/// does not exist is fine. Retries briefly: a process that just exited can
/// keep its cgroup busy for a moment.
pub fn remove(hierarchies: &Hierarchies, parent: &str, id: &str) -> Result<(), CgroupError> {
    check_name(parent)?;
    check_name(id)?;
    for dir in hierarchies.vm_dirs(parent, id) {
        let mut attempts = 0;
        loop {
            match std::fs::remove_dir(&dir) {
                Ok(()) => break,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => break,
                Err(err) if err.raw_os_error() == Some(libc::EBUSY) && attempts < 50 => {
                    attempts += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(source) => return Err(CgroupError::Io { path: dir, source }),
            }
        }
    }
    Ok(())
}

/// Removes VM `id`'s cgroups from every hierarchy of this host, v2 and
/// v1 alike (the cleanup does not know which the jail used).
pub fn remove_everywhere(parent: &str, id: &str) -> Result<(), CgroupError> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").map_err(CgroupError::Mountinfo)?;
    let (unified, v1) = parse_mountinfo(&text);
    if let Some(root) = unified {
        remove(
            &Hierarchies::V2 {
                root,
                controllers: Vec::new(),
            },
            parent,
            id,
        )?;
    }
    remove(&Hierarchies::V1(v1), parent, id)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
35 25 0:30 / /sys/fs/cgroup rw,relatime shared:8 - tmpfs tmpfs rw,mode=755
36 35 0:31 / /sys/fs/cgroup/cpu rw,relatime shared:9 - cgroup cgroup rw,cpu
37 35 0:32 / /sys/fs/cgroup/memory rw,relatime shared:10 - cgroup cgroup rw,memory
38 35 0:33 / /sys/fs/cgroup/pids rw,relatime shared:11 - cgroup cgroup rw,pids
39 35 0:34 / /sys/fs/cgroup/blkio rw,relatime shared:12 - cgroup cgroup rw,blkio
40 35 0:35 / /sys/fs/cgroup/unified rw,relatime shared:13 - cgroup2 cgroup2 rw
";

    #[test]
    fn mountinfo_finds_v1_controllers_and_the_unified_mount() {
        let (unified, v1) = parse_mountinfo(HYBRID);
        assert_eq!(unified, Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(v1["memory"], PathBuf::from("/sys/fs/cgroup/memory"));
        assert_eq!(v1["blkio"], PathBuf::from("/sys/fs/cgroup/blkio"));
        assert_eq!(v1.len(), 4);
        let (unified, v1) =
            parse_mountinfo("30 1 0:26 / /sys/fs/cgroup rw shared:4 - cgroup2 cgroup2 rw\n");
        assert_eq!(unified, Some(PathBuf::from("/sys/fs/cgroup")));
        assert!(v1.is_empty());
        let (_, v1) = parse_mountinfo(
            "36 35 0:31 / /sys/fs/cgroup/cpu\\040x rw - cgroup cgroup rw,cpu,cpuacct\n",
        );
        assert_eq!(v1["cpu"], PathBuf::from("/sys/fs/cgroup/cpu x"));
    }

    #[test]
    fn settings_translate_to_v1() {
        let cpu = Setting::parse("cpu.max=200000 100000").unwrap();
        assert_eq!(
            cpu.v1_files().unwrap(),
            (
                "cpu",
                vec![
                    ("cpu.cfs_period_us".to_string(), "100000".to_string()),
                    ("cpu.cfs_quota_us".to_string(), "200000".to_string())
                ]
            )
        );
        let unlimited = Setting::parse("cpu.max=max").unwrap();
        assert_eq!(unlimited.v1_files().unwrap().1[1].1, "-1");
        let memory = Setting::parse("memory.max=134217728").unwrap();
        assert_eq!(memory.v1_files().unwrap().1[0].0, "memory.limit_in_bytes");
        let io = Setting::parse("io.max=8:0 rbps=1000 wiops=20").unwrap();
        assert_eq!(
            io.v1_files().unwrap().1,
            vec![
                (
                    "blkio.throttle.read_bps_device".to_string(),
                    "8:0 1000".to_string()
                ),
                (
                    "blkio.throttle.write_iops_device".to_string(),
                    "8:0 20".to_string()
                )
            ]
        );
        assert_eq!(Setting::parse("pids.max=40").unwrap().controller(), "pids");
    }

    #[test]
    fn bad_settings_are_refused_with_their_value() {
        for bad in [
            "cpu.max",
            "cpu.max=lots",
            "cpu.max=1 2 3",
            "memory.max=-1",
            "memory.max=1G",
            "pids.max=many",
            "io.max=sda rbps=1",
            "io.max=8:0",
            "io.max=8:0 speed=1",
            "io.max=8:0 rbps=fast",
            "cpuset.cpus=0",
        ] {
            let err = Setting::parse(bad).unwrap_err().to_string();
            assert!(err.contains(bad.split('=').next().unwrap()), "{bad}: {err}");
        }
    }

    #[test]
    fn names_stay_below_the_hierarchy_root() {
        assert!(check_name("nubis").is_ok());
        assert!(check_name("nubis/tenants").is_ok());
        assert!(check_name("vm-0123_ab").is_ok());
        for bad in ["", "/nubis", "nubis/", "..", "a/../b", "a b", "a/./b"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn v1_dirs_are_one_per_hierarchy() {
        let (_, v1) = parse_mountinfo(HYBRID);
        let dirs = Hierarchies::V1(v1).vm_dirs("nubis", "vm1");
        assert_eq!(dirs.len(), 4);
        assert!(dirs.contains(&PathBuf::from("/sys/fs/cgroup/memory/nubis/vm1")));
        let v2 = Hierarchies::V2 {
            root: PathBuf::from("/sys/fs/cgroup"),
            controllers: vec!["cpu".into()],
        };
        assert_eq!(
            v2.vm_dirs("nubis", "vm1"),
            vec![PathBuf::from("/sys/fs/cgroup/nubis/vm1")]
        );
    }
}
