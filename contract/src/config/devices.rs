//! The configuration of the VM's virtio devices (disks, NICs, consoles) and
//! the `key=value,...` syntax of their command-line flags.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::ConfigError;
use crate::RateLimit;

/// The serial a disk reports (GET_ID) holds at most this many bytes.
pub const MAX_DISK_ID_LEN: usize = 20;

/// Splits `key=value,key=value` into pairs; `invalid` explains a bad part.
fn key_values<'a>(
    value: &'a str,
    invalid: &impl Fn(String) -> ConfigError,
) -> Result<Vec<(&'a str, &'a str)>, ConfigError> {
    value
        .split(',')
        .map(|part| {
            part.split_once('=')
                .filter(|(key, val)| !key.is_empty() && !val.is_empty())
                .ok_or_else(|| invalid(format!("'{part}' is not key=value")))
        })
        .collect()
}

fn positive_number(
    key: &str,
    value: &str,
    invalid: &impl Fn(String) -> ConfigError,
) -> Result<u64, ConfigError> {
    match value.parse::<u64>() {
        Ok(number) if number > 0 => Ok(number),
        _ => Err(invalid(format!(
            "{key} must be a positive integer, got '{value}'"
        ))),
    }
}

/// One virtio-blk disk backed by a raw image file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
    /// The serial the guest reads (GET_ID), at most 20 bytes; also the name
    /// the control socket knows the disk by. Default `nubis-diskN`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "RateLimit::is_unlimited")]
    pub rate_limit: RateLimit,
}

impl FromStr for DiskConfig {
    type Err = ConfigError;

    /// `path=FILE[,ro=on|off][,id=NAME][,bw=BYTES_PER_S][,iops=N]`
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: String| ConfigError::InvalidDisk {
            value: value.to_string(),
            reason,
        };
        let mut path = None;
        let mut read_only = false;
        let mut id = None;
        let mut rate_limit = RateLimit::default();
        for (key, val) in key_values(value, &invalid)? {
            match key {
                "path" => path = Some(PathBuf::from(val)),
                "ro" => {
                    read_only = match val {
                        "on" => true,
                        "off" => false,
                        _ => return Err(invalid("ro must be on or off".into())),
                    }
                }
                "id" => id = Some(val.to_string()),
                "bw" => rate_limit.bytes_per_s = Some(positive_number(key, val, &invalid)?),
                "iops" => rate_limit.ops_per_s = Some(positive_number(key, val, &invalid)?),
                _ => return Err(invalid(format!("unknown key '{key}'"))),
            }
        }
        Ok(Self {
            path: path.ok_or_else(|| invalid("path is missing".into()))?,
            read_only,
            id,
            rate_limit,
        })
    }
}

/// A MAC address, written `aa:bb:cc:dd:ee:ff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    pub fn is_unicast(&self) -> bool {
        self.0[0] & 1 == 0 && self.0 != [0; 6]
    }
}

impl FromStr for MacAddr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || format!("'{text}' is not a MAC address like 02:00:00:00:00:01");
        let mut bytes = [0u8; 6];
        let mut parts = text.split(':');
        for byte in &mut bytes {
            let part = parts
                .next()
                .filter(|part| part.len() == 2)
                .ok_or_else(bad)?;
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Self(bytes))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Longest interface name, with its NUL (Linux's IFNAMSIZ).
const IFNAMSIZ: usize = 16;

/// Whether `name` is acceptable as an interface name.
pub fn valid_tap_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < IFNAMSIZ
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// One virtio-net NIC on a tap device: named (`tap`, attached to or
/// created) or an inherited open descriptor (`fd`, as the agent passes it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fd: Option<i32>,
    /// The guest's MAC; a random locally administered one by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddr>,
    /// The name the control socket knows the NIC by. Default `nubis-netN`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Applies to each direction separately (`pps` is `ops_per_s`).
    #[serde(default, skip_serializing_if = "RateLimit::is_unlimited")]
    pub rate_limit: RateLimit,
    /// The MTU the guest is told to use (VIRTIO_NET_F_MTU), e.g. lowered
    /// for an overlay's encapsulation; the guest's own default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
}

/// The MTUs a NIC may be given: IPv4's minimum up to a jumbo frame.
pub const NET_MTU_RANGE: std::ops::RangeInclusive<u16> = 68..=9000;

impl FromStr for NetConfig {
    type Err = ConfigError;

    /// `tap=NAME|fd=N[,mac=MAC][,id=NAME][,bw=BYTES_PER_S][,pps=N][,mtu=N]`
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: String| ConfigError::InvalidNet {
            value: value.to_string(),
            reason,
        };
        let mut net = NetConfig {
            tap: None,
            fd: None,
            mac: None,
            id: None,
            rate_limit: RateLimit::default(),
            mtu: None,
        };
        for (key, val) in key_values(value, &invalid)? {
            match key {
                "tap" => net.tap = Some(val.to_string()),
                "fd" => {
                    net.fd = Some(val.parse().map_err(|_| {
                        invalid(format!("fd must be a descriptor number, got '{val}'"))
                    })?)
                }
                "mac" => net.mac = Some(val.parse().map_err(invalid)?),
                "id" => net.id = Some(val.to_string()),
                "bw" => net.rate_limit.bytes_per_s = Some(positive_number(key, val, &invalid)?),
                "pps" => net.rate_limit.ops_per_s = Some(positive_number(key, val, &invalid)?),
                "mtu" => {
                    net.mtu = Some(val.parse().map_err(|_| {
                        invalid(format!("mtu must be a number of bytes, got '{val}'"))
                    })?)
                }
                _ => return Err(invalid(format!("unknown key '{key}'"))),
            }
        }
        net.check().map_err(invalid)?;
        Ok(net)
    }
}

impl NetConfig {
    /// Checks what does not depend on the rest of the VM.
    pub fn check(&self) -> Result<(), String> {
        match (&self.tap, self.fd) {
            (None, None) => return Err("one of tap=NAME or fd=N is required".into()),
            (Some(_), Some(_)) => return Err("tap and fd exclude each other".into()),
            (Some(name), None) if !valid_tap_name(name) => {
                return Err(format!(
                    "tap name '{name}' must be 1 to 15 letters, digits, '-', '_' or '.'"
                ))
            }
            (None, Some(fd)) if fd < 3 => {
                return Err(format!("fd {fd} is stdin, stdout or stderr, not a tap"))
            }
            _ => {}
        }
        if let Some(mac) = self.mac.filter(|mac| !mac.is_unicast()) {
            return Err(format!("mac {mac} is not a unicast address"));
        }
        if let Some(mtu) = self.mtu.filter(|mtu| !NET_MTU_RANGE.contains(mtu)) {
            return Err(format!(
                "mtu {mtu} is outside {}..={}",
                NET_MTU_RANGE.start(),
                NET_MTU_RANGE.end()
            ));
        }
        Ok(())
    }
}

/// One virtio-console port: an inherited descriptor (`fd`, a socket or
/// pipe the guest also reads from, or a file) or a file the guest's output
/// is appended to (`file`). The first is `/dev/hvc0` in a Linux guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fd: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
}

impl FromStr for ConsoleConfig {
    type Err = ConfigError;

    /// `fd=N|file=PATH`
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: String| ConfigError::InvalidConsole {
            value: value.to_string(),
            reason,
        };
        let mut console = ConsoleConfig {
            fd: None,
            file: None,
        };
        for (key, val) in key_values(value, &invalid)? {
            match key {
                "fd" => {
                    console.fd = Some(val.parse().map_err(|_| {
                        invalid(format!("fd must be a descriptor number, got '{val}'"))
                    })?)
                }
                "file" => console.file = Some(PathBuf::from(val)),
                _ => return Err(invalid(format!("unknown key '{key}'"))),
            }
        }
        console.check().map_err(invalid)?;
        Ok(console)
    }
}

impl ConsoleConfig {
    /// Checks what does not depend on the rest of the VM.
    pub fn check(&self) -> Result<(), String> {
        match (self.fd, &self.file) {
            (None, None) => Err("one of fd=N or file=PATH is required".into()),
            (Some(_), Some(_)) => Err("fd and file exclude each other".into()),
            (Some(fd), None) if fd < 3 => Err(format!(
                "fd {fd} is stdin, stdout or stderr, which the VMM keeps for itself"
            )),
            _ => Ok(()),
        }
    }
}

/// The guest's context ids 0-2 are the hypervisor's, the local loopback
/// and the host's; `u32::MAX` is "any".
pub const VSOCK_CID_RANGE: std::ops::RangeInclusive<u32> = 3..=u32::MAX - 1;
/// The longest socket path (`sun_path` less room for `_<port>` and NUL).
pub const MAX_VSOCK_SOCKET_LEN: usize = 108 - 12;

/// The virtio-vsock device: the guest's context id, and the Unix socket
/// host processes connect to (`CONNECT <port>`); guest connections to host
/// port P go to `<socket>_P`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    pub cid: u32,
    pub socket: PathBuf,
}

impl FromStr for VsockConfig {
    type Err = ConfigError;

    /// `cid=N,socket=PATH`
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: String| ConfigError::InvalidVsock {
            value: value.to_string(),
            reason,
        };
        let (mut cid, mut socket) = (None, None);
        for (key, val) in key_values(value, &invalid)? {
            match key {
                "cid" => {
                    cid = Some(
                        val.parse()
                            .map_err(|_| invalid(format!("cid must be a number, got '{val}'")))?,
                    )
                }
                "socket" => socket = Some(PathBuf::from(val)),
                _ => return Err(invalid(format!("unknown key '{key}'"))),
            }
        }
        let vsock = VsockConfig {
            cid: cid.ok_or_else(|| invalid("cid=N is required".into()))?,
            socket: socket.ok_or_else(|| invalid("socket=PATH is required".into()))?,
        };
        vsock.check().map_err(invalid)?;
        Ok(vsock)
    }
}

impl VsockConfig {
    /// Checks what does not depend on the rest of the VM.
    pub fn check(&self) -> Result<(), String> {
        if !VSOCK_CID_RANGE.contains(&self.cid) {
            return Err(format!(
                "cid {} is reserved (a guest's is {} to {})",
                self.cid,
                VSOCK_CID_RANGE.start(),
                VSOCK_CID_RANGE.end()
            ));
        }
        let len = self.socket.as_os_str().len();
        if len == 0 || len > MAX_VSOCK_SOCKET_LEN {
            return Err(format!(
                "the socket path must be 1 to {MAX_VSOCK_SOCKET_LEN} bytes, got {len}"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vsock_flag_syntax() {
        let vsock: VsockConfig = "cid=3,socket=/vm/v.sock".parse().unwrap();
        assert_eq!(
            vsock,
            VsockConfig {
                cid: 3,
                socket: "/vm/v.sock".into()
            }
        );
        let long = format!("cid=3,socket=/{}", "x".repeat(MAX_VSOCK_SOCKET_LEN));
        for bad in [
            "cid=2,socket=/s",
            "cid=0,socket=/s",
            "cid=4294967295,socket=/s",
            "cid=4294967296,socket=/s",
            "cid=x,socket=/s",
            "socket=/s",
            "cid=3",
            "cid=3,socket=/s,port=5",
            long.as_str(),
        ] {
            assert!(bad.parse::<VsockConfig>().is_err(), "{bad}");
        }
    }

    #[test]
    fn disk_flag_syntax() {
        let disk: DiskConfig = "path=/img/root.ext4,ro=on,id=root,bw=1048576,iops=100"
            .parse()
            .unwrap();
        assert_eq!(
            disk,
            DiskConfig {
                path: "/img/root.ext4".into(),
                read_only: true,
                id: Some("root".into()),
                rate_limit: RateLimit {
                    bytes_per_s: Some(1 << 20),
                    ops_per_s: Some(100)
                },
            }
        );
        let disk: DiskConfig = "path=/d".parse().unwrap();
        assert!(!disk.read_only);
        assert!(disk.rate_limit.is_unlimited());
        for bad in [
            "",
            "/d",
            "ro=on",
            "path=",
            "path=/d,ro=yes",
            "path=/d,bw=0",
            "path=/d,iops=-1",
            "path=/d,bw=1k",
            "path=/d,pps=1",
            "path=/d,id=",
        ] {
            assert!(bad.parse::<DiskConfig>().is_err(), "accepted {bad}");
        }
    }

    #[test]
    fn net_flag_syntax() {
        let net: NetConfig =
            "tap=nbtap0,mac=02:aa:bb:cc:dd:0e,id=eth0,bw=6250000,pps=1000,mtu=1450"
                .parse()
                .unwrap();
        assert_eq!(net.mtu, Some(1450));
        assert_eq!(net.tap.as_deref(), Some("nbtap0"));
        assert_eq!(net.mac, Some(MacAddr([2, 0xaa, 0xbb, 0xcc, 0xdd, 0x0e])));
        assert_eq!(net.id.as_deref(), Some("eth0"));
        assert_eq!(net.rate_limit.bytes_per_s, Some(6_250_000));
        assert_eq!(net.rate_limit.ops_per_s, Some(1000));
        let net: NetConfig = "fd=7".parse().unwrap();
        assert_eq!(net.fd, Some(7));
        for (bad, why) in [
            ("", "not key=value"),
            ("mac=02:00:00:00:00:01", "required"),
            ("tap=a,fd=5", "exclude"),
            ("tap=this-name-is-too-long", "1 to 15"),
            ("tap=a b", "1 to 15"),
            ("fd=1", "stdout"),
            ("fd=x", "descriptor number"),
            ("tap=t,mac=01:00:5e:00:00:01", "unicast"),
            ("tap=t,mac=00:00:00:00:00:00", "unicast"),
            ("tap=t,mac=02:00:00:00:00", "MAC address"),
            ("tap=t,mac=02:00:00:00:00:01:02", "MAC address"),
            ("tap=t,mac=0g:00:00:00:00:01", "MAC address"),
            ("tap=t,bw=0", "positive"),
            ("tap=t,iops=5", "unknown key 'iops'"),
            ("tap=t,mtu=67", "outside 68..=9000"),
            ("tap=t,mtu=9001", "outside 68..=9000"),
            ("tap=t,mtu=big", "number of bytes"),
        ] {
            let err = bad.parse::<NetConfig>().unwrap_err().to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn console_flag_syntax() {
        let console: ConsoleConfig = "fd=5".parse().unwrap();
        assert_eq!(console.fd, Some(5));
        let console: ConsoleConfig = "file=/tmp/out".parse().unwrap();
        assert_eq!(
            console.file.as_deref(),
            Some(std::path::Path::new("/tmp/out"))
        );
        for (bad, why) in [
            ("", "not key=value"),
            ("fd=5,file=/x", "exclude"),
            ("fd=2", "stderr"),
            ("fd=x", "descriptor number"),
            ("path=/x", "unknown key 'path'"),
        ] {
            let err = bad.parse::<ConsoleConfig>().unwrap_err().to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
        assert!(serde_json::from_str::<ConsoleConfig>(r#"{"fd":4,"tty":true}"#).is_err());
    }

    #[test]
    fn mac_addresses_round_trip() {
        let mac: MacAddr = "02:0a:FF:00:10:01".parse().unwrap();
        assert_eq!(mac.to_string(), "02:0a:ff:00:10:01");
        let json = serde_json::to_string(&mac).unwrap();
        assert_eq!(json, "\"02:0a:ff:00:10:01\"");
        assert_eq!(serde_json::from_str::<MacAddr>(&json).unwrap(), mac);
        assert!(serde_json::from_str::<MacAddr>("\"nope\"").is_err());
    }

    #[test]
    fn tap_names_are_checked() {
        for good in ["tap0", "nb-vm_1.0", "a", "x23456789012345"] {
            assert!(valid_tap_name(good), "{good}");
        }
        for bad in [
            "",
            "x234567890123456",
            "tap 0",
            "tap/0",
            "..",
            ".",
            "tap\0",
            "tapé",
        ] {
            assert!(!valid_tap_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn nics_in_documents() {
        let net: NetConfig = serde_json::from_str(
            r#"{"tap":"t0","mac":"02:00:00:00:00:01","rate_limit":{"bytes_per_s":1000}}"#,
        )
        .unwrap();
        assert_eq!(net.rate_limit.bytes_per_s, Some(1000));
        assert!(serde_json::from_str::<NetConfig>(r#"{"tap":"t0","bw":1}"#).is_err());
        assert!(serde_json::from_str::<NetConfig>(
            r#"{"tap":"t0","rate_limit":{"bytes_per_s":1,"burst":2}}"#
        )
        .is_err());
    }
}
