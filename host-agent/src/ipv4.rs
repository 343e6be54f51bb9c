//! IPv4 networks in CIDR notation: parsing, overlap, and address
//! allocation inside a network (IPAM): the first host address is the
//! gateway, the last is broadcast, the rest go to NICs lowest-first.

use std::collections::HashSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// Smallest and largest prefix a tenant network may have.
pub const MIN_PREFIX: u8 = 16;
pub const MAX_PREFIX: u8 = 29;

/// An IPv4 network: its base address and prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    base: u32,
    prefix: u8,
}

impl Cidr {
    fn mask(&self) -> u32 {
        u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0)
    }

    /// The network of `address` with `prefix` (host bits cleared).
    pub fn of(address: Ipv4Addr, prefix: u8) -> Self {
        let mut cidr = Cidr {
            base: u32::from(address),
            prefix: prefix.min(32),
        };
        cidr.base &= cidr.mask();
        cidr
    }

    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.mask())
    }

    pub fn base(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.base)
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether two networks share any address.
    pub fn overlaps(&self, other: &Cidr) -> bool {
        let mask = self.mask() & other.mask();
        self.base & mask == other.base & mask
    }

    pub fn contains(&self, address: Ipv4Addr) -> bool {
        u32::from(address) & self.mask() == self.base
    }

    /// The gateway: the first host address.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.base + 1)
    }

    fn broadcast(&self) -> u32 {
        self.base | !self.mask()
    }

    /// The network's broadcast address.
    pub fn broadcast_address(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.broadcast())
    }

    /// The lowest address for a NIC not in `used` (never the network,
    /// gateway or broadcast address).
    pub fn allocate(&self, used: &HashSet<Ipv4Addr>) -> Option<Ipv4Addr> {
        (self.base + 2..self.broadcast())
            .map(Ipv4Addr::from)
            .find(|address| !used.contains(address))
    }
}

/// The regular expression (ECMA-262 and Rust alike, no look-around) of the
/// tenant networks [`Cidr::from_str`] takes and the agent does not refuse
/// for every host (`ALWAYS_PROTECTED`): a first octet of 1 to 223 but 127,
/// no 169.254/16, a prefix of /16 to /29 and no host bits set. It is the
/// OpenAPI document's pattern for `cidr`, so a client that follows the
/// document never sends a network refused as malformed.
pub fn tenant_cidr_pattern() -> String {
    const OCTET: &str = "(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])";
    // 1-126, 128-168, 170-223; then 169 with any second octet but 254.
    const FIRST: &str = "(?:[1-9]|[1-9][0-9]|1[01][0-9]|12[0-689]|1[3-5][0-9]|16[0-8]|1[7-9][0-9]|2[01][0-9]|22[0-3])";
    const LINK_LOCAL_NEIGHBOURS: &str = "169\\.(?:25[0-35]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])";
    // The multiples of `step` below 256, as an alternation.
    let multiples = |step: u32| -> String {
        if step == 1 {
            return OCTET.to_string();
        }
        let values: Vec<String> = (0..256)
            .step_by(step as usize)
            .rev()
            .map(|value| value.to_string())
            .collect();
        format!("(?:{})", values.join("|"))
    };
    let mut tails = Vec::new();
    for prefix in MIN_PREFIX..=MAX_PREFIX {
        let tail = if prefix <= 24 {
            format!("{}\\.0", multiples(1 << (24 - prefix)))
        } else {
            format!("{OCTET}\\.{}", multiples(1 << (32 - prefix)))
        };
        tails.push(format!("{tail}/{prefix}"));
    }
    format!(
        "^(?:{FIRST}\\.{OCTET}|{LINK_LOCAL_NEIGHBOURS})\\.(?:{})$",
        tails.join("|")
    )
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (address, prefix) = text
            .split_once('/')
            .ok_or_else(|| format!("'{text}' is not in CIDR notation (like 10.10.0.0/24)"))?;
        let address: Ipv4Addr = address
            .parse()
            .map_err(|_| format!("'{address}' is not an IPv4 address"))?;
        // Digits only, without leading zeros: "/024" or "/+24" are not
        // CIDR notation (and not what the document's pattern allows).
        let canonical = !prefix.is_empty()
            && prefix.bytes().all(|b| b.is_ascii_digit())
            && (prefix == "0" || !prefix.starts_with('0'));
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|_| canonical)
            .ok_or_else(|| format!("'{prefix}' is not a prefix length"))?;
        if !(MIN_PREFIX..=MAX_PREFIX).contains(&prefix) {
            return Err(format!(
                "prefix /{prefix} is outside /{MIN_PREFIX} to /{MAX_PREFIX}"
            ));
        }
        let cidr = Cidr {
            base: u32::from(address),
            prefix,
        };
        if cidr.base & !cidr.mask() != 0 {
            let base = Ipv4Addr::from(cidr.base & cidr.mask());
            return Err(format!(
                "{address} has host bits set for /{prefix}: did you mean {base}/{prefix}?"
            ));
        }
        if address.is_loopback()
            || address.is_multicast()
            || address.is_broadcast()
            || address.is_unspecified()
        {
            return Err(format!("{text} is not a usable unicast network"));
        }
        Ok(cidr)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.base(), self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the agent takes for every host: parsed, and clear of the
    /// networks it always refuses.
    fn taken(text: &str) -> bool {
        text.parse::<Cidr>().is_ok_and(|cidr| {
            crate::network::host::ALWAYS_PROTECTED
                .iter()
                .all(|(_, octets, prefix)| {
                    !Cidr::of(Ipv4Addr::from(*octets), *prefix).overlaps(&cidr)
                })
        })
    }

    #[test]
    fn the_documented_pattern_is_what_is_taken() {
        let pattern = regex::Regex::new(&tenant_cidr_pattern()).unwrap();
        let check = |text: &str| {
            assert_eq!(pattern.is_match(text), taken(text), "{text}");
        };
        for first in 0..=255u32 {
            for second in [0, 1, 254, 255] {
                check(&format!("{first}.{second}.0.0/16"));
            }
        }
        for third in 0..=255u32 {
            for fourth in 0..=255u32 {
                for prefix in 14..=31 {
                    check(&format!("10.20.{third}.{fourth}/{prefix}"));
                }
            }
        }
        for odd in [
            "10.0.0.0/024",
            "10.0.0.0/+24",
            "10.0.0.0/",
            "10.0.0.0",
            "010.0.0.0/16",
            "10.0.0.0/24 ",
            " 10.0.0.0/24",
            "10.0.0.0/24\n",
            "10.0.0/24",
            "10.0.0.0.0/24",
            "",
            "/24",
            "1.2.3.256/29",
        ] {
            check(odd);
        }
    }

    #[test]
    fn parsing_and_errors() {
        let cidr: Cidr = "10.10.0.0/24".parse().unwrap();
        assert_eq!(cidr.to_string(), "10.10.0.0/24");
        assert_eq!(cidr.gateway(), Ipv4Addr::new(10, 10, 0, 1));
        for (bad, why) in [
            ("10.10.0.0", "CIDR notation"),
            ("10.10.0/24", "IPv4 address"),
            ("10.10.0.0/x", "prefix length"),
            ("10.0.0.0/8", "outside"),
            ("10.10.0.0/30", "outside"),
            ("10.10.0.5/24", "did you mean 10.10.0.0/24"),
            ("127.0.0.0/24", "usable"),
            ("224.0.0.0/24", "usable"),
        ] {
            let err = bad.parse::<Cidr>().unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn overlap() {
        let a: Cidr = "10.10.0.0/24".parse().unwrap();
        let b: Cidr = "10.10.0.128/25".parse().unwrap();
        let c: Cidr = "10.10.1.0/24".parse().unwrap();
        let d: Cidr = "10.10.0.0/16".parse().unwrap();
        assert!(a.overlaps(&b) && b.overlaps(&a));
        assert!(!a.overlaps(&c) && !c.overlaps(&a));
        assert!(d.overlaps(&a) && d.overlaps(&c) && a.overlaps(&d));
        assert!(a.contains(Ipv4Addr::new(10, 10, 0, 200)));
        assert!(!a.contains(Ipv4Addr::new(10, 10, 1, 1)));
    }

    #[test]
    fn allocation_skips_network_gateway_and_broadcast() {
        let cidr: Cidr = "192.168.5.0/29".parse().unwrap();
        let mut used = HashSet::new();
        let mut got = Vec::new();
        while let Some(address) = cidr.allocate(&used) {
            used.insert(address);
            got.push(address.octets()[3]);
        }
        assert_eq!(
            got,
            [2, 3, 4, 5, 6],
            "not .0, .1 (gateway) or .7 (broadcast)"
        );
        used.remove(&Ipv4Addr::new(192, 168, 5, 4));
        assert_eq!(cidr.allocate(&used), Some(Ipv4Addr::new(192, 168, 5, 4)));
    }
}
