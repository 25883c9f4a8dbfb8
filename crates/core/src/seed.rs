//! Seeds derived from content, never from processing order, so outputs do not depend on batch
//! size, worker count, shard size or the order in which shards run.

use sha2::{Digest, Sha256};

/// A 64-bit seed from the run seed, the prompt id and a purpose tag (e.g. `b"sample"` plus the
/// sample index). Stable across platforms and releases: it is part of the output contract.
pub fn derive_seed(seed: u64, prompt_id: &str, tag: &[u8]) -> u64 {
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    h.update((prompt_id.len() as u64).to_le_bytes());
    h.update(prompt_id.as_bytes());
    h.update(tag);
    let out = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&out[..8]);
    u64::from_le_bytes(b)
}

/// A uniform integer in `0..n` from a seed (n > 0), by rejection so there is no modulo bias.
pub fn uniform_below(seed: u64, n: u64) -> u64 {
    assert!(n > 0, "uniform_below needs n > 0");
    let mut state = seed;
    let zone = u64::MAX - (u64::MAX % n);
    loop {
        let x = splitmix64(&mut state);
        if x < zone {
            return x % n;
        }
    }
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// SHA-256 of bytes, as lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// The first 16 bytes of SHA-256: a compact key for sets of ids (collisions are out of reach).
pub fn digest16(bytes: &[u8]) -> [u8; 16] {
    let d = Sha256::digest(bytes);
    let mut out = [0u8; 16];
    out.copy_from_slice(&d[..16]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_are_stable_and_distinct() {
        // Pinned: changing this changes every random choice in existing runs.
        assert_eq!(derive_seed(0, "p", b"x"), derive_seed(0, "p", b"x"));
        assert_ne!(derive_seed(0, "p", b"x"), derive_seed(1, "p", b"x"));
        assert_ne!(derive_seed(0, "p", b"x"), derive_seed(0, "q", b"x"));
        assert_ne!(derive_seed(0, "ab", b"c"), derive_seed(0, "a", b"bc"));
        assert_eq!(sha256_hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn uniform_covers_range() {
        let mut seen = [0u32; 5];
        for s in 0..2000 {
            seen[uniform_below(derive_seed(s, "p", b"u"), 5) as usize] += 1;
        }
        assert!(seen.iter().all(|&c| c > 300), "{seen:?}");
    }
}
