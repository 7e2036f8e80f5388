//! Payloads: fresh pseudo-random bytes, never reused, generated as a
//! stream so that neither clamd's cache nor the client's memory come into
//! play, and the EICAR test string.

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
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let clock = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        Rng(splitmix64(clock ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1)
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

/// `total` fresh random bytes as a stream of `chunk`-sized pieces,
/// generated as they are pulled: at most one chunk is held at a time.
pub fn random_stream(
    total: u64,
    chunk: usize,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    futures_util::stream::unfold((Rng::fresh(), total), move |(mut rng, left)| async move {
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
        let chunks: Vec<_> = random_stream(1000, 300).collect().await;
        let sizes: Vec<usize> = chunks.iter().map(|c| c.as_ref().unwrap().len()).collect();
        assert_eq!(sizes, vec![300, 300, 300, 100]);
    }
}
