//! Random bytes from the operating system's CSPRNG (getrandom(2)), for every layer: key
//! material and nonces (`pipeline`), and ids and temporary names (`store::local`, leases,
//! audit chains). It imports nothing of tidemark, so the lowest layer can use it.
//!
//! Not AWS-LC's RNG: seeding that costs 25-45 ms of CPU-jitter entropy collection in every
//! process, and wal-push is one process per segment. Salts, ids, keys and wrapping nonces need
//! unpredictability, which the kernel's CSPRNG provides.

#[derive(Debug, thiserror::Error)]
#[error("the system random number generator failed")]
pub struct RandomError;

/// Fills `buf` from the operating system's CSPRNG.
pub fn random_bytes(buf: &mut [u8]) -> Result<(), RandomError> {
    getrandom::fill(buf).map_err(|_| RandomError)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_the_buffer() {
        let (mut a, mut b) = ([0u8; 32], [0u8; 32]);
        random_bytes(&mut a).unwrap();
        random_bytes(&mut b).unwrap();
        assert_ne!(a, b);
        assert_ne!(a, [0u8; 32]);
    }
}
