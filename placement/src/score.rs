//! The scores: which of the hosts that passed the filters gets the VM.
//!
//! A host's load is its fullest dimension (vCPUs, memory or disk) as a
//! fraction of its capacity, counted as if the VM were already on it.
//! Fractions are compared exactly, by cross-multiplying in 128 bits, so
//! there is no rounding, no NaN and no order that depends on the inputs'
//! order; a dimension a host has none of counts as empty while nothing uses
//! it and as infinitely full once something does.

use std::cmp::Ordering;

use crate::{HostView, Resources, Strategy};

/// `num / den`; `den == 0` only as `1 / 0`, infinity.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Load {
    num: u64,
    den: u64,
}

impl Load {
    fn fraction(used: u64, capacity: u64) -> Load {
        match (used, capacity) {
            (0, 0) => Load { num: 0, den: 1 },
            (_, 0) => Load { num: 1, den: 0 },
            (num, den) => Load { num, den },
        }
    }

    /// `host`'s load with `needs` added to what it has allocated.
    pub(crate) fn after(host: &HostView, needs: Resources) -> Load {
        let used = host.allocated.saturating_add(needs);
        let capacity = host.capacity;
        [
            Load::fraction(used.vcpus.into(), capacity.vcpus.into()),
            Load::fraction(used.memory_mib, capacity.memory_mib),
            Load::fraction(used.disk_mib, capacity.disk_mib),
        ]
        .into_iter()
        .max()
        .unwrap_or(Load { num: 0, den: 1 })
    }
}

impl Ord for Load {
    fn cmp(&self, other: &Self) -> Ordering {
        // a/b against c/d is ad against cb (b, d >= 0; infinity is 1/0).
        let left = u128::from(self.num) * u128::from(other.den);
        let right = u128::from(other.num) * u128::from(self.den);
        left.cmp(&right)
    }
}

impl PartialOrd for Load {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Load {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Load {}

/// The host `strategy` picks among `feasible`, all of which can take
/// `needs`: with [`Strategy::Spread`] the lowest load, then the fewest VMs;
/// with [`Strategy::BinPack`] the highest load. Then the first name.
pub(crate) fn choose<'h>(
    feasible: &[&'h HostView],
    needs: Resources,
    strategy: Strategy,
) -> Option<&'h HostView> {
    let scored = feasible
        .iter()
        .map(|host| (Load::after(host, needs), *host));
    match strategy {
        Strategy::Spread => scored.min_by(|(a_load, a), (b_load, b)| {
            a_load
                .cmp(b_load)
                .then(a.vms.cmp(&b.vms))
                .then(a.name.cmp(&b.name))
        }),
        Strategy::BinPack => {
            scored.min_by(|(a_load, a), (b_load, b)| b_load.cmp(a_load).then(a.name.cmp(&b.name)))
        }
    }
    .map(|(_, host)| host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(num: u64, den: u64) -> Load {
        Load::fraction(num, den)
    }

    #[test]
    fn fractions_compare_exactly() {
        assert_eq!(load(1, 2), load(2, 4));
        assert!(load(1, 3) < load(1, 2));
        assert!(load(u64::MAX - 1, u64::MAX) < load(u64::MAX, u64::MAX));
        assert_eq!(load(u64::MAX, u64::MAX), load(1, 1));
        // Beyond full (a host allocated beyond its capacity).
        assert!(load(3, 2) > load(1, 1));
    }

    #[test]
    fn zero_capacity_is_empty_until_used() {
        assert_eq!(load(0, 0), load(0, 1));
        assert!(load(1, 0) > load(u64::MAX, 1));
        assert_eq!(load(1, 0), load(5, 0));
        assert!(load(0, 0) < load(1, u64::MAX));
    }
}
