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

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (address, prefix) = text
            .split_once('/')
            .ok_or_else(|| format!("'{text}' is not in CIDR notation (like 10.10.0.0/24)"))?;
        let address: Ipv4Addr = address
            .parse()
            .map_err(|_| format!("'{address}' is not an IPv4 address"))?;
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| format!("'{prefix}' is not a prefix length"))?;
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
