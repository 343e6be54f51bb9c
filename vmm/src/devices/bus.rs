//! Address buses: which device answers a port I/O or MMIO access.
//!
//! A vCPU thread that exits on an access looks the address up here and calls
//! the device with the offset into its range. Accesses that hit no device are
//! ignored (writes) or read as all ones, as on real hardware with nothing
//! decoding the address.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on a bus. `offset` is relative to the start of its range.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors in building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} overlaps the device at {other_base:#x}+{other_len:#x}")]
    Overlap {
        base: u64,
        len: u64,
        other_base: u64,
        other_len: u64,
    },
    #[error("bus range {base:#x}+{len:#x} is empty or wraps around")]
    InvalidRange { base: u64, len: u64 },
}

#[derive(Clone)]
struct Entry {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// A set of non-overlapping address ranges, each with its device.
#[derive(Clone, Default)]
pub struct Bus {
    devices: BTreeMap<u64, Entry>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `device` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        if len == 0 || base.checked_add(len).is_none() {
            return Err(BusError::InvalidRange { base, len });
        }
        let end = base + len;
        // The closest range starting before `end` is the only one that can overlap.
        if let Some((&other_base, other)) = self.devices.range(..end).next_back() {
            if other_base + other.len > base {
                return Err(BusError::Overlap {
                    base,
                    len,
                    other_base,
                    other_len: other.len,
                });
            }
        }
        self.devices.insert(base, Entry { len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &Entry)> {
        let (&base, entry) = self.devices.range(..=addr).next_back()?;
        (addr - base < entry.len).then_some((addr - base, entry))
    }

    /// Reads from the device at `addr`; returns false when none is there
    /// (and fills `data` with ones).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, entry)) => {
                lock(&entry.device).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Writes to the device at `addr`; returns false when none is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, entry)) => {
                lock(&entry.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering it if a previous holder panicked: device state
/// is plain data and stays usable.
pub fn lock<T: ?Sized>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_range_with_offsets() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Recorder::default()));
        let b = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        bus.insert(b.clone(), 0x60, 1).unwrap();
        let mut data = [0u8; 1];
        assert!(bus.read(0x3fd, &mut data));
        assert_eq!(data, [5]);
        assert!(bus.write(0x3f8, b"x"));
        assert!(bus.write(0x60, &[1]));
        assert!(!bus.write(0x61, &[1]));
        assert!(!bus.read(0x400, &mut data));
        assert_eq!(data, [0xff]);
        assert_eq!(a.lock().unwrap().writes, vec![(0, vec![b'x'])]);
        assert_eq!(b.lock().unwrap().writes, vec![(0, vec![1])]);
    }

    #[test]
    fn overlaps_and_bad_ranges_are_refused() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(dev.clone(), 0x100, 0x10).unwrap();
        for (base, len) in [(0x100, 1), (0x10f, 1), (0xf8, 0x9), (0x0, 0x1000)] {
            assert!(matches!(
                bus.insert(dev.clone(), base, len),
                Err(BusError::Overlap { .. })
            ));
        }
        bus.insert(dev.clone(), 0x110, 0x10).unwrap();
        bus.insert(dev.clone(), 0xf0, 0x10).unwrap();
        assert!(matches!(
            bus.insert(dev.clone(), 0x200, 0),
            Err(BusError::InvalidRange { .. })
        ));
        assert!(matches!(
            bus.insert(dev, u64::MAX, 2),
            Err(BusError::InvalidRange { .. })
        ));
    }
}
