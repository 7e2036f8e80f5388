//! Payloads: fresh pseudo-random bytes, generated as a stream so that
//! neither clamd's cache nor the client's memory come into play, and the
//! EICAR test string. A large upload's bytes come from a seed, so that the
//! two sides of a comparison can scan the same content (see `large`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::Stream;

/// The EICAR test string: every clamd database (and avgate's test
/// signatures) finds it.
pub const EICAR: &[u8] = clamd::EICAR;

/// xorshift64*: fast (several GB/s, so the generator costs the client
/// little), not cryptographic, which is all a benchmark needs.
pub struct Rng(u64);

impl Rng {
    /// A generator whose seed differs from every other one made by this
    /// process (counter) and by earlier runs (clock).
    pub fn fresh() -> Rng {
        Rng::from_seed(fresh_seed())
    }

    pub fn from_seed(seed: u64) -> Rng {
        Rng(splitmix64(seed) | 1)
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// A seed that differs from every other one made by this process
/// (counter) and by earlier runs (clock).
pub fn fresh_seed() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let clock = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    clock ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `len` fresh random bytes.
pub fn random_bytes(len: usize) -> Bytes {
    let mut buf = vec![0u8; len];
    Rng::fresh().fill(&mut buf);
    Bytes::from(buf)
}

/// `total` random bytes from `seed` as a stream of `chunk`-sized pieces,
/// generated as they are pulled: at most one chunk is held at a time.
pub fn random_stream(
    total: u64,
    chunk: usize,
    seed: u64,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    let rng = Rng::from_seed(seed);
    futures_util::stream::unfold((rng, total), move |(mut rng, left)| async move {
        if left == 0 {
            return None;
        }
        let n = left.min(chunk as u64) as usize;
        let mut buf = vec![0u8; n];
        rng.fill(&mut buf);
        Some((Ok(Bytes::from(buf)), (rng, left - n as u64)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    #[test]
    fn generators_do_not_repeat() {
        assert_ne!(random_bytes(1024), random_bytes(1024));
    }

    #[tokio::test]
    async fn stream_has_the_requested_length() {
        let chunks: Vec<_> = random_stream(1000, 300, fresh_seed()).collect().await;
        let sizes: Vec<usize> = chunks.iter().map(|c| c.as_ref().unwrap().len()).collect();
        assert_eq!(sizes, vec![300, 300, 300, 100]);
    }

    async fn collect(seed: u64) -> Vec<u8> {
        let chunks: Vec<_> = random_stream(4096, 1000, seed).collect().await;
        chunks
            .into_iter()
            .flat_map(|c| c.unwrap().to_vec())
            .collect()
    }

    #[tokio::test]
    async fn a_seed_gives_the_same_bytes_and_fresh_seeds_differ() {
        let seed = fresh_seed();
        assert_eq!(collect(seed).await, collect(seed).await);
        assert_ne!(collect(seed).await, collect(fresh_seed()).await);
    }
}
