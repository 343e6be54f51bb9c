//! Which parts of a disk the guest wrote while its disk is being copied to
//! another host (live migration with local storage): a bitmap of 64 KiB
//! chunks, marked by every write, DISCARD and WRITE_ZEROES, and taken (and
//! cleared) by the copier.

use std::sync::atomic::{AtomicU64, Ordering};

/// The granularity of the tracking.
pub const CHUNK: u64 = 64 * 1024;

pub struct WriteTracker {
    words: Vec<AtomicU64>,
    chunks: u64,
}

impl WriteTracker {
    /// A tracker for a disk of `capacity` bytes, nothing marked.
    pub fn new(capacity: u64) -> Self {
        let chunks = capacity.div_ceil(CHUNK);
        Self {
            words: (0..chunks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            chunks,
        }
    }

    /// Marks the chunks `[offset, offset + len)` touches (clamped to the
    /// disk).
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / CHUNK;
        let last = (offset.saturating_add(len) - 1) / CHUNK;
        for chunk in first..=last.min(self.chunks.saturating_sub(1)) {
            self.words[(chunk / 64) as usize].fetch_or(1 << (chunk % 64), Ordering::SeqCst);
        }
    }

    /// The marked chunks' indices, clearing them.
    pub fn take(&self) -> Vec<u64> {
        let mut chunks = Vec::new();
        for (index, word) in self.words.iter().enumerate() {
            let bits = word.swap(0, Ordering::SeqCst);
            chunks.extend(
                (0..64)
                    .filter(|bit| bits & (1 << bit) != 0)
                    .map(|bit| index as u64 * 64 + bit),
            );
        }
        chunks
    }

    pub fn chunks(&self) -> u64 {
        self.chunks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_mark_their_chunks_once_and_are_taken() {
        let tracker = WriteTracker::new(10 * CHUNK + 1);
        assert_eq!(tracker.chunks(), 11);
        tracker.mark(0, 1);
        tracker.mark(CHUNK - 1, 2); // straddles chunks 0 and 1
        tracker.mark(10 * CHUNK, 1);
        tracker.mark(5 * CHUNK, 0);
        tracker.mark(10 * CHUNK, u64::MAX); // clamped, no overflow
        assert_eq!(tracker.take(), [0, 1, 10]);
        assert!(tracker.take().is_empty());
    }
}
