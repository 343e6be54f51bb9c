//! Entry points for the fuzz targets (fuzz/, libFuzzer on the stable
//! toolchain) into what `nubis run` reads from a guest: nothing may panic.

use crate::protocol::{parse_event, EventLines, MAX_EVENT_LINE};

/// What `nubis run` reads from the guest: its event lines (split at the
/// first byte's chunk size, as reads would) and the share disk's listing,
/// whose names the guest chose.
pub fn run_protocol(data: &[u8]) {
    let Some((&chunk, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let mut lines = EventLines::default();
    for piece in rest.chunks(chunk) {
        for line in lines.feed(piece) {
            assert!(line.len() <= MAX_EVENT_LINE * 3, "{}", line.len());
            let _ = parse_event(&line);
        }
        assert!(lines.pending() <= MAX_EVENT_LINE);
    }
    if let Ok(listings) = crate::share::parse_listings(rest) {
        for (_, entries) in listings {
            for entry in entries {
                assert!(entry.name.len() <= rest.len());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Valid inputs, from which libFuzzer starts; with NUBIS_FUZZ_SEEDS=DIR
    /// they are written to DIR/run_protocol/<name> (fuzz/seeds is made so).
    #[test]
    fn seeds_are_taken() {
        let out: Vec<(&str, &str, Vec<u8>)> = vec![(
            "run_protocol",
            "events",
            b"\x07ready\nstarted\nwarning low memory\nexec-failed 2 cannot execute 'x'\nerror no share\nsignal 9\nexit 3\n".to_vec(),
        ), (
            "run_protocol",
            "listing",
            b"\x40debugfs: ls -l <2>\n      2   40755 (2)      0      0    1024  6-Dec-2026 21:04 .\n \
                 12  100644 (1)      0      0       2 16-Dec-2026 21:04 a\\x0ab\n\ndebugfs: ls -l <12>\n".to_vec(),
        )];
        let dir = std::env::var_os("NUBIS_FUZZ_SEEDS").map(std::path::PathBuf::from);
        for (target, name, bytes) in out {
            run_protocol(&bytes);
            if let Some(dir) = &dir {
                std::fs::create_dir_all(dir.join(target)).unwrap();
                std::fs::write(dir.join(target).join(name), &bytes).unwrap();
            }
        }
    }

    /// Empty, short and arbitrary input.
    #[test]
    fn any_bytes_are_taken() {
        let mut noise = vec![0u8; 70_000];
        let mut state = 0x1234_5678u32;
        for byte in &mut noise {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            *byte = state as u8;
        }
        for input in [&[][..], &[0], &[1, 2, 3], &noise[..100], &noise[..]] {
            run_protocol(input);
        }
    }
}
