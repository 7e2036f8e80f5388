//! Keyed token buckets: per client address, per token, per address for
//! failed authentications.

use std::collections::HashMap;
use std::hash::Hash;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A rate written as `10/s`, `600/m` or `1000/h`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
}

impl FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (n, unit) = s
            .trim()
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: expected a rate like 10/s, 600/m or 1000/h"))?;
        let n: f64 = n
            .trim()
            .parse()
            .map_err(|_| format!("{s:?}: {n:?} is not a number"))?;
        let seconds = match unit.trim() {
            "s" | "sec" | "second" => 1.0,
            "m" | "min" | "minute" => 60.0,
            "h" | "hour" => 3600.0,
            "d" | "day" => 86400.0,
            other => return Err(format!("{s:?}: unknown unit {other:?} (use s, m, h or d)")),
        };
        if !(n.is_finite() && n > 0.0) {
            return Err(format!("{s:?}: the rate must be above 0"));
        }
        // Slower than that is no rate limit but a ban, and its waits would
        // not fit in a Duration.
        if n / seconds < 1.0 / 86400.0 {
            return Err(format!("{s:?}: the rate must be at least 1/d"));
        }
        Ok(Rate {
            per_second: n / seconds,
        })
    }
}

/// The first of /s, /m, /h, /d that gives a whole number (`10/s`,
/// `600/m`); otherwise a fraction per second.
impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (unit, seconds) in [("s", 1.0), ("m", 60.0), ("h", 3600.0), ("d", 86400.0)] {
            let n = self.per_second * seconds;
            if (n - n.round()).abs() < 1e-9 && n.round() >= 1.0 {
                return write!(f, "{}/{unit}", n.round() as u64);
            }
        }
        write!(f, "{}/s", self.per_second)
    }
}

impl serde::Serialize for Rate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// What a bucket said.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    Allowed {
        limit: u32,
        remaining: u32,
        /// Until the bucket is full again.
        reset: Duration,
    },
    Limited {
        limit: u32,
        retry_after: Duration,
    },
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Most keys kept. A full bucket carries no information, so dropping one
/// changes no decision; those go first.
const MAX_KEYS: usize = 100_000;

/// Shortest time between two sweeps of the full buckets.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Token buckets by key. `check` takes one token if there is one.
#[derive(Debug)]
pub struct Limiter<K> {
    state: Mutex<Buckets<K>>,
    max_keys: usize,
}

#[derive(Debug)]
struct Buckets<K> {
    map: HashMap<K, Bucket>,
    last_sweep: Option<Instant>,
    /// Sweeps so far (tests check that a flood does not sweep per request).
    sweeps: u64,
}

impl<K: Eq + Hash + Clone> Default for Limiter<K> {
    fn default() -> Self {
        Self::with_max_keys(MAX_KEYS)
    }
}

impl<K: Eq + Hash + Clone> Limiter<K> {
    pub fn new() -> Self {
        Self::default()
    }

    fn with_max_keys(max_keys: usize) -> Self {
        Limiter {
            state: Mutex::new(Buckets {
                map: HashMap::new(),
                last_sweep: None,
                sweeps: 0,
            }),
            max_keys,
        }
    }

    /// Takes one token from `key`'s bucket (rate `rate`, capacity `burst`).
    pub fn check(&self, key: &K, rate: Rate, burst: u32) -> Decision {
        self.check_at(key, rate, burst, Instant::now())
    }

    /// Like `check`, but only looks: no token is taken.
    pub fn peek(&self, key: &K, rate: Rate, burst: u32) -> Decision {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let bucket = state.map.get(key).copied().unwrap_or(Bucket {
            tokens: f64::from(burst.max(1)),
            last: now,
        });
        let tokens = refill(bucket, rate, burst, now).tokens;
        decide(tokens, rate, burst, false).0
    }

    fn check_at(&self, key: &K, rate: Rate, burst: u32, now: Instant) -> Decision {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.map.len() >= self.max_keys && !state.map.contains_key(key) {
            state.make_room(self.max_keys, rate, burst, now);
        }
        let bucket = state.map.entry(key.clone()).or_insert(Bucket {
            tokens: f64::from(burst.max(1)),
            last: now,
        });
        *bucket = refill(*bucket, rate, burst, now);
        let (decision, take) = decide(bucket.tokens, rate, burst, true);
        if take {
            bucket.tokens -= 1.0;
        }
        decision
    }
}

impl<K: Eq + Hash + Clone> Buckets<K> {
    /// Room for one more key. The full buckets go, in a sweep made at most
    /// once a second: a flood of new keys (an IPv6 network holds billions
    /// of /64s) must not make every request walk the whole map under the
    /// lock. If the map is still full, an arbitrary key goes: its owner
    /// starts again with a full bucket, and during such a flood that owner
    /// is most likely the flooder, who has fresh keys anyway.
    fn make_room(&mut self, max_keys: usize, rate: Rate, burst: u32, now: Instant) {
        let due = self
            .last_sweep
            .is_none_or(|t| now.saturating_duration_since(t) >= SWEEP_INTERVAL);
        if due {
            self.last_sweep = Some(now);
            self.sweeps += 1;
            self.map
                .retain(|_, b| refill(*b, rate, burst, now).tokens < f64::from(burst));
        }
        if self.map.len() >= max_keys {
            if let Some(key) = self.map.keys().next().cloned() {
                self.map.remove(&key);
            }
        }
    }
}

/// A wait in seconds as a Duration; one too long for it is the longest.
fn seconds(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or(Duration::MAX)
}

fn refill(b: Bucket, rate: Rate, burst: u32, now: Instant) -> Bucket {
    let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
    Bucket {
        tokens: (b.tokens + elapsed * rate.per_second).min(f64::from(burst.max(1))),
        last: now,
    }
}

fn decide(tokens: f64, rate: Rate, burst: u32, taking: bool) -> (Decision, bool) {
    let limit = burst.max(1);
    if tokens >= 1.0 {
        let after = if taking { tokens - 1.0 } else { tokens };
        let reset = seconds((f64::from(limit) - after) / rate.per_second);
        (
            Decision::Allowed {
                limit,
                remaining: after.floor() as u32,
                reset,
            },
            true,
        )
    } else {
        let retry_after = seconds((1.0 - tokens) / rate.per_second);
        (Decision::Limited { limit, retry_after }, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse() {
        assert_eq!("10/s".parse::<Rate>().unwrap().per_second, 10.0);
        assert_eq!("60/m".parse::<Rate>().unwrap().per_second, 1.0);
        assert!("10".parse::<Rate>().is_err());
        assert!("0/s".parse::<Rate>().is_err());
        assert!("10/week".parse::<Rate>().is_err());
        assert!("1/d".parse::<Rate>().is_ok());
        // A ban, not a rate (and its waits would not fit in a Duration).
        assert!("1e-15/d".parse::<Rate>().is_err());
        assert!("0.5/d".parse::<Rate>().is_err());
    }

    #[test]
    fn the_request_past_the_burst_is_limited_then_refills() {
        let limiter = Limiter::new();
        let rate: Rate = "10/s".parse().unwrap();
        let t0 = Instant::now();
        for i in 0..20 {
            let d = limiter.check_at(&"k", rate, 20, t0);
            assert!(
                matches!(d, Decision::Allowed { remaining, .. } if remaining == 19 - i),
                "{i}: {d:?}"
            );
        }
        let Decision::Limited { retry_after, limit } = limiter.check_at(&"k", rate, 20, t0) else {
            panic!("21st request allowed");
        };
        assert_eq!(limit, 20);
        assert!(retry_after <= Duration::from_millis(100), "{retry_after:?}");
        // Another key is not affected.
        assert!(matches!(
            limiter.check_at(&"other", rate, 20, t0),
            Decision::Allowed { .. }
        ));
        // 100 ms later one token is back.
        let later = t0 + Duration::from_millis(101);
        assert!(matches!(
            limiter.check_at(&"k", rate, 20, later),
            Decision::Allowed { .. }
        ));
        assert!(matches!(
            limiter.check_at(&"k", rate, 20, later),
            Decision::Limited { .. }
        ));
    }

    #[test]
    fn a_flood_of_new_keys_stays_bounded_and_is_not_swept_per_request() {
        let limiter = Limiter::with_max_keys(100);
        // Slow refill: no bucket touched here is full again within the test.
        let rate: Rate = "1/m".parse().unwrap();
        let t0 = Instant::now();
        for key in 0..10_000u32 {
            let d = limiter.check_at(&key, rate, 10, t0);
            assert!(matches!(d, Decision::Allowed { .. }), "{key}: {d:?}");
        }
        {
            let state = limiter.state.lock().unwrap();
            assert!(state.map.len() <= 100, "{} keys", state.map.len());
            assert_eq!(state.sweeps, 1, "one sweep in the same second");
        }
        // A second later the next new key may sweep again.
        limiter.check_at(&20_000, rate, 10, t0 + Duration::from_millis(1500));
        assert_eq!(limiter.state.lock().unwrap().sweeps, 2);
    }

    #[test]
    fn full_buckets_are_swept_and_a_drained_one_is_remembered() {
        let limiter = Limiter::with_max_keys(100);
        let rate: Rate = "10/s".parse().unwrap();
        let t0 = Instant::now();
        // 99 clients that made one request: full again 0.1 s later.
        for key in 0..99u32 {
            limiter.check_at(&key, rate, 20, t0);
        }
        // One that used its whole burst just now.
        let drained = t0 + Duration::from_millis(9_990);
        for _ in 0..20 {
            limiter.check_at(&1_000, rate, 20, drained);
        }
        // A new client, with the map full.
        limiter.check_at(&2_000, rate, 20, t0 + Duration::from_secs(10));
        let state = limiter.state.lock().unwrap();
        let mut keys: Vec<u32> = state.map.keys().copied().collect();
        keys.sort();
        assert_eq!(keys, vec![1_000, 2_000]);
        drop(state);
        // And the drained client is still limited.
        assert!(matches!(
            limiter.check_at(&1_000, rate, 20, t0 + Duration::from_secs(10)),
            Decision::Limited { .. }
        ));
    }

    #[test]
    fn peek_takes_nothing() {
        let limiter = Limiter::new();
        let rate: Rate = "1/m".parse().unwrap();
        assert!(matches!(
            limiter.peek(&1, rate, 1),
            Decision::Allowed { .. }
        ));
        assert!(matches!(
            limiter.check(&1, rate, 1),
            Decision::Allowed { .. }
        ));
        assert!(matches!(
            limiter.peek(&1, rate, 1),
            Decision::Limited { .. }
        ));
    }

    /// A burst of 0 acts as 1 (the configuration refuses it; a token's
    /// own is at least 1): looking at a new key must not say it is
    /// limited forever, which `check` never corrects for a key it never
    /// stores.
    #[test]
    fn a_burst_of_zero_holds_one() {
        let limiter = Limiter::new();
        let rate: Rate = "1/s".parse().unwrap();
        assert!(matches!(
            limiter.peek(&7, rate, 0),
            Decision::Allowed { .. }
        ));
        assert!(matches!(
            limiter.check(&7, rate, 0),
            Decision::Allowed { .. }
        ));
    }
}
