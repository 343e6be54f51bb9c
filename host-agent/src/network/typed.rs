//! Typed values for what reaches `nft` scripts and `ip` command lines: a
//! MAC address and a Linux interface name. The packet filter is rendered
//! from these only, never from a stored or received string, so that no text
//! a tenant or a peer sent can end a rule and start another.

use std::fmt;
use std::str::FromStr;

/// Errors in parsing a MAC address or an interface name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TypedError {
    #[error("'{0}' is not a MAC address (six hex pairs separated by ':')")]
    Mac(String),
    #[error("'{0}' is not a unicast MAC address")]
    MulticastMac(String),
    #[error(
        "'{0}' is not an interface name: 1 to 15 of letters, digits, '_', '.' and '-', starting with a letter or digit"
    )]
    Interface(String),
}

/// An Ethernet MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr([u8; 6]);

impl MacAddr {
    pub const fn new(bytes: [u8; 6]) -> Self {
        Self(bytes)
    }

    pub fn octets(&self) -> [u8; 6] {
        self.0
    }

    /// A unicast address (the group bit clear): what a NIC may send from.
    pub fn is_unicast(&self) -> bool {
        self.0[0] & 1 == 0
    }

    /// Parses a MAC that a NIC may own: unicast.
    pub fn parse_unicast(text: &str) -> Result<Self, TypedError> {
        let mac: Self = text.parse()?;
        if mac.is_unicast() {
            Ok(mac)
        } else {
            Err(TypedError::MulticastMac(text.to_string()))
        }
    }
}

impl FromStr for MacAddr {
    type Err = TypedError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || TypedError::Mac(text.chars().take(64).collect());
        let mut bytes = [0u8; 6];
        let mut parts = text.split(':');
        for byte in &mut bytes {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
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

/// A Linux network interface name (IFNAMSIZ less the NUL: 15 bytes),
/// limited to characters that need no quoting anywhere they go.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IfName(String);

impl IfName {
    pub const MAX_LEN: usize = 15;

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A name the agent derives (`prefix` and an id's or a number's
    /// text): only ASCII letters and digits of `suffix` are kept, and the
    /// whole is cut to the kernel's limit, so it is always a valid name.
    pub fn generated(prefix: &str, suffix: &str) -> Self {
        let name: String = prefix
            .chars()
            .chain(suffix.chars())
            .filter(char::is_ascii_alphanumeric)
            .take(Self::MAX_LEN)
            .collect();
        if name.is_empty() {
            return Self("x".to_string());
        }
        Self(name)
    }
}

impl FromStr for IfName {
    type Err = TypedError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let ok = !text.is_empty()
            && text.len() <= Self::MAX_LEN
            && text.as_bytes()[0].is_ascii_alphanumeric()
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if ok {
            Ok(Self(text.to_string()))
        } else {
            Err(TypedError::Interface(text.chars().take(64).collect()))
        }
    }
}

impl fmt::Display for IfName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for IfName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn macs_parse_and_print_canonically() {
        let mac: MacAddr = "02:4E:42:0a:00:ff".parse().unwrap();
        assert_eq!(mac.to_string(), "02:4e:42:0a:00:ff");
        assert_eq!(mac.octets(), [2, 0x4e, 0x42, 0x0a, 0, 0xff]);
        assert!(mac.is_unicast());
        for bad in [
            "",
            "02:4e:42:00:00",
            "02:4e:42:00:00:01:02",
            "02:4e:42:00:00:1",
            "02-4e-42-00-00-01",
            "02:4e:42:00:00:0g",
            "02:00:00:00:00:01 } } table inet x {",
            "+2:00:00:00:00:01",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        assert_eq!(
            MacAddr::parse_unicast("03:00:00:00:00:01"),
            Err(TypedError::MulticastMac("03:00:00:00:00:01".into()))
        );
        assert!(MacAddr::parse_unicast("ff:ff:ff:ff:ff:ff").is_err());
    }

    #[test]
    fn interface_names_are_short_and_plain() {
        for good in ["nbt0123abcd0", "nbn4096", "eth0", "veth-a", "br_0.1", "a"] {
            assert_eq!(good.parse::<IfName>().unwrap().as_str(), good);
        }
        for bad in [
            "",
            "-x",
            ".",
            "..",
            "a b",
            "a\"b",
            "nbt\" accept",
            "sixteen-chars-xx",
            "a/b",
            "é",
        ] {
            assert!(bad.parse::<IfName>().is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn nothing_parsed_carries_script_syntax(text in ".{0,40}") {
            for rendered in [
                text.parse::<MacAddr>().map(|mac| mac.to_string()).ok(),
                text.parse::<IfName>().map(|name| name.to_string()).ok(),
            ]
            .into_iter()
            .flatten()
            {
                prop_assert!(rendered.bytes().all(|b| b.is_ascii_alphanumeric() || b":_.-".contains(&b)));
            }
        }

        #[test]
        fn macs_round_trip(bytes in any::<[u8; 6]>()) {
            let mac = MacAddr::new(bytes);
            prop_assert_eq!(mac.to_string().parse::<MacAddr>().unwrap(), mac);
        }
    }
}
