//! Token management: the operations behind `avgate token ...` and the
//! admin API, each audited. Both front ends parse their input into
//! [`TokenOptions`] and print what these functions return.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::audit::{self, Entry, Event};
use super::token::{self, Token};
use super::{RateSpec, Scope};
use crate::config::{ByteSize, Humantime};
use crate::perimeter::ratelimit::Rate;
use crate::store::clock::{self, Month};

/// Highest `max_concurrent` a token may have: far above any real use, and
/// far below what a semaphore can hold.
const MAX_CONCURRENT: usize = 1_000_000;
use crate::store::{Store, StoreError, TokenRecord};

/// Longest token name.
const MAX_NAME_LEN: usize = 64;

/// The most addresses and ranges one token may be limited to.
pub const MAX_ALLOW_IPS: usize = 256;

/// What a new token should be, as written by a person (CLI flags or the
/// admin API's JSON body).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenOptions {
    pub name: String,
    #[serde(default)]
    pub scope: Option<Scope>,
    /// From now: `90d`, `12h`. None: never expires.
    #[serde(default)]
    pub expires: Option<String>,
    /// `10/s`, `600/m`.
    #[serde(default)]
    pub rate: Option<String>,
    /// Default: twice the per-second rate, at least 1.
    #[serde(default)]
    pub burst: Option<u32>,
    #[serde(default)]
    pub allow_ips: Vec<String>,
    #[serde(default)]
    pub monthly_files: Option<u64>,
    #[serde(default)]
    pub monthly_bytes: Option<ByteSize>,
    #[serde(default)]
    pub max_concurrent: Option<usize>,
}

/// A validated [`TokenOptions`].
#[derive(Debug, Clone, PartialEq)]
pub struct TokenSpec {
    pub name: String,
    pub scope: Scope,
    /// Unix seconds.
    pub expires_at: Option<i64>,
    pub rate: Option<RateSpec>,
    pub allow_ips: Vec<IpNet>,
    pub monthly_files: Option<u64>,
    pub monthly_bytes: Option<u64>,
    pub max_concurrent: Option<usize>,
}

impl TokenOptions {
    /// Checks every option; `now` anchors a relative expiry.
    pub fn validate(&self, now: i64) -> Result<TokenSpec, String> {
        let name = self.name.trim();
        if name.is_empty() || name.len() > MAX_NAME_LEN {
            return Err(format!("the name must have 1 to {MAX_NAME_LEN} characters"));
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(format!(
                "name {name:?}: use letters, digits, '-', '_' and '.'"
            ));
        }
        // `.` and `..` in /v1/admin/tokens/{name} are dot segments: HTTP
        // clients remove them, so such a token could not be managed.
        if name.bytes().all(|b| b == b'.') {
            return Err(format!("name {name:?}: a name must not be only dots"));
        }
        if name.starts_with(token::ID_PREFIX) || name.starts_with(token::PREFIX) {
            return Err(format!(
                "name {name:?}: names must not start with {:?} or {:?}",
                token::ID_PREFIX,
                token::PREFIX
            ));
        }
        let expires_at = match self.expires.as_deref().map(str::trim) {
            None | Some("never") => None,
            Some(s) => {
                let d = s
                    .parse::<Humantime>()
                    .map_err(|e| format!("expires: {e}"))?
                    .0;
                // Expiry is kept in whole seconds: "500ms" would be a
                // token born expired.
                if d < Duration::from_secs(1) {
                    return Err("expires: must be at least 1s in the future".into());
                }
                Some(now.saturating_add(d.as_secs().min(i64::MAX as u64) as i64))
            }
        };
        let rate = match (self.rate.as_deref(), self.burst) {
            (None, None) => None,
            (None, Some(_)) => return Err("burst needs a rate (e.g. rate 10/s, burst 20)".into()),
            (Some(r), burst) => {
                let per_second = r
                    .parse::<Rate>()
                    .map_err(|e| format!("rate: {e}"))?
                    .per_second;
                let burst = burst.unwrap_or_else(|| {
                    (per_second * 2.0).ceil().clamp(1.0, u32::MAX as f64) as u32
                });
                if burst == 0 {
                    return Err("burst must be at least 1".into());
                }
                Some(RateSpec { per_second, burst })
            }
        };
        if self.allow_ips.len() > MAX_ALLOW_IPS {
            return Err(format!(
                "allow_ips: at most {MAX_ALLOW_IPS} addresses or ranges (each is checked on every request; use wider ranges)"
            ));
        }
        let mut allow_ips = crate::perimeter::network::parse_nets(&self.allow_ips)?;
        allow_ips.sort();
        allow_ips.dedup();
        // The store keeps counts as SQLite integers (i64).
        let too_large = |n: u64| n > i64::MAX as u64;
        if self.monthly_files.is_some_and(too_large)
            || self.monthly_bytes.is_some_and(|b| too_large(b.0))
        {
            return Err(format!(
                "monthly_files and monthly_bytes must be at most {} (leave them out for no limit)",
                i64::MAX
            ));
        }
        for (what, zero) in [
            ("monthly_files", self.monthly_files == Some(0)),
            (
                "monthly_bytes",
                self.monthly_bytes.is_some_and(|b| b.0 == 0),
            ),
            ("max_concurrent", self.max_concurrent == Some(0)),
        ] {
            if zero {
                return Err(format!(
                    "{what} must be above 0 (leave it out for no limit)"
                ));
            }
        }
        if self.max_concurrent.is_some_and(|n| n > MAX_CONCURRENT) {
            return Err(format!(
                "max_concurrent must be at most {MAX_CONCURRENT} (leave it out for no limit)"
            ));
        }
        Ok(TokenSpec {
            name: name.to_owned(),
            scope: self.scope.unwrap_or(Scope::Scan),
            expires_at,
            rate,
            allow_ips,
            monthly_files: self.monthly_files,
            monthly_bytes: self.monthly_bytes.map(|b| b.0),
            max_concurrent: self.max_concurrent,
        })
    }
}

/// A token as shown to admins (never the token itself).
#[derive(Debug, Clone, Serialize)]
pub struct TokenView {
    pub id: String,
    pub name: String,
    pub scope: Scope,
    /// `active`, `revoked`, `expired`.
    pub status: &'static str,
    pub created_at: String,
    pub expires_at: Option<String>,
    pub revoked_at: Option<String>,
    pub rate: Option<RateSpec>,
    pub allow_ips: Vec<String>,
    pub monthly_files: Option<u64>,
    pub monthly_bytes: Option<u64>,
    pub max_concurrent: Option<usize>,
}

impl TokenView {
    pub fn of(t: &TokenRecord, now: i64) -> TokenView {
        TokenView {
            id: t.id.clone(),
            name: t.name.clone(),
            scope: t.scope,
            status: t.status(now),
            created_at: clock::rfc3339(t.created_at),
            expires_at: t.expires_at.map(clock::rfc3339),
            revoked_at: t.revoked_at.map(clock::rfc3339),
            rate: t.rate,
            allow_ips: t.allow_ips.iter().map(|n| n.to_string()).collect(),
            monthly_files: t.monthly_files,
            monthly_bytes: t.monthly_bytes,
            max_concurrent: t.max_concurrent,
        }
    }
}

/// A token that was just created: the only time the secret is at hand.
#[derive(Debug)]
pub struct Created {
    pub token: Token,
    pub view: TokenView,
}

/// The answer to "how much has this token used".
#[derive(Debug, Clone, Serialize)]
pub struct UsageView {
    pub token_id: String,
    pub name: String,
    pub month: String,
    pub files: u64,
    pub bytes: u64,
    pub monthly_files: Option<u64>,
    pub monthly_bytes: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManageError {
    #[error("{0}")]
    Invalid(String),
    #[error("no token with id or name {0:?}")]
    NotFound(String),
    #[error("token {0} is already revoked")]
    AlreadyRevoked(String),
    #[error("a token named {0:?} already exists (revoke it first, or choose another name)")]
    NameTaken(String),
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for ManageError {
    fn from(e: StoreError) -> ManageError {
        match e {
            StoreError::NameTaken(name) => ManageError::NameTaken(name),
            other => ManageError::Store(other),
        }
    }
}

/// Who performs an operation, for the audit trail.
#[derive(Debug, Clone)]
pub struct Actor {
    /// A token id, `cli` or `bootstrap`.
    pub id: String,
    pub client: Option<String>,
}

impl Actor {
    pub fn cli() -> Actor {
        Actor {
            id: "cli".into(),
            client: None,
        }
    }
}

pub async fn create(
    store: &dyn Store,
    spec: TokenSpec,
    actor: &Actor,
) -> Result<Created, ManageError> {
    let random = |e: getrandom::Error| {
        ManageError::Store(StoreError::Backend(format!("no randomness: {e}")))
    };
    let token = Token::generate().map_err(random)?;
    let now = clock::now();
    let record = TokenRecord {
        id: token::new_id().map_err(random)?,
        name: spec.name,
        hash: token.hash(),
        scope: spec.scope,
        created_at: now,
        expires_at: spec.expires_at,
        revoked_at: None,
        rate: spec.rate,
        allow_ips: spec.allow_ips,
        monthly_files: spec.monthly_files,
        monthly_bytes: spec.monthly_bytes,
        max_concurrent: spec.max_concurrent,
    };
    store.insert_token(&record).await?;
    audit::record(
        store,
        Event::TokenCreated,
        Entry {
            token_id: Some(record.id.clone()),
            actor: Some(actor.id.clone()),
            client: actor.client.clone(),
            detail: Some(format!("name={} scope={}", record.name, record.scope)),
        },
    )
    .await;
    Ok(Created {
        token,
        view: TokenView::of(&record, now),
    })
}

pub async fn list(store: &dyn Store) -> Result<Vec<TokenView>, ManageError> {
    let now = clock::now();
    Ok(store
        .list_tokens()
        .await?
        .iter()
        .map(|t| TokenView::of(t, now))
        .collect())
}

pub async fn revoke(
    store: &dyn Store,
    id_or_name: &str,
    actor: &Actor,
) -> Result<TokenView, ManageError> {
    let found = store
        .find_token(id_or_name)
        .await?
        .ok_or_else(|| ManageError::NotFound(id_or_name.to_owned()))?;
    let now = clock::now();
    if !store.revoke_token(&found.id, now).await? {
        return Err(ManageError::AlreadyRevoked(found.id));
    }
    audit::record(
        store,
        Event::TokenRevoked,
        Entry {
            token_id: Some(found.id.clone()),
            actor: Some(actor.id.clone()),
            client: actor.client.clone(),
            detail: Some(format!("name={}", found.name)),
        },
    )
    .await;
    let revoked = TokenRecord {
        revoked_at: Some(now),
        ..found
    };
    Ok(TokenView::of(&revoked, now))
}

pub async fn usage(
    store: &dyn Store,
    id_or_name: &str,
    month: Option<Month>,
) -> Result<UsageView, ManageError> {
    let found = store
        .find_token(id_or_name)
        .await?
        .ok_or_else(|| ManageError::NotFound(id_or_name.to_owned()))?;
    let month = month.unwrap_or_else(Month::current);
    let used = store.usage(&found.id, month).await?;
    Ok(UsageView {
        token_id: found.id,
        name: found.name,
        month: month.to_string(),
        files: used.files,
        bytes: used.bytes,
        monthly_files: found.monthly_files,
        monthly_bytes: found.monthly_bytes,
    })
}

/// On a first start (no token was ever created) with authentication
/// required: creates a scan token named `default` and prints it once, in a
/// box on stderr (never through the logs), with a curl command that works.
/// `more_tokens` is the command that makes another one ([`token_command`]).
///
/// Not when stderr is systemd's journal (`journal`: `JOURNAL_STREAM` is
/// set): the token would stay there, readable by every member of the
/// `adm` and `systemd-journal` groups, for as long as the journal keeps
/// it. The box then says how to make one instead.
pub async fn bootstrap(
    store: &dyn Store,
    listen: SocketAddr,
    tls: bool,
    more_tokens: &str,
    journal: bool,
) -> Result<(), ManageError> {
    if store.token_count().await? > 0 {
        return Ok(());
    }
    if journal {
        eprint!(
            "{}",
            boxed(&[
                "avgate: no API token exists yet, so every scan is refused (401).".to_owned(),
                "None is made here: it would be kept in the system journal.".to_owned(),
                "Make one (as the user avgate runs as) and keep it safe:".to_owned(),
                String::new(),
                format!("    {more_tokens}"),
            ])
        );
        return Ok(());
    }
    let spec = TokenOptions {
        name: "default".into(),
        ..Default::default()
    }
    .validate(clock::now())
    .map_err(ManageError::Invalid)?;
    let actor = Actor {
        id: "bootstrap".into(),
        client: None,
    };
    let created = match create(store, spec, &actor).await {
        Ok(created) => created,
        // Another process got there first: its box shows the token.
        Err(ManageError::NameTaken(_)) => return Ok(()),
        Err(e) => return Err(e),
    };
    eprint!("{}", first_token_box(&created, listen, tls, more_tokens));
    Ok(())
}

/// The command that makes another token in this server's store, ready to
/// paste: the program as it was started (`target/release/avgate`, or
/// `avgate` from PATH) and the data directory unless it is the default,
/// without which the token would go to another store and not work here.
pub fn token_command(program: &str, data_dir: &Path, default_dir: &Path) -> String {
    let quote = |s: &str| {
        if s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+=:@".contains(c))
        {
            s.to_owned()
        } else {
            format!("'{}'", s.replace('\'', r"'\''"))
        }
    };
    let mut command = format!("{} token create --name NAME", quote(program));
    if data_dir != default_dir {
        command.push_str(&format!(
            " --data-dir {}",
            quote(&data_dir.to_string_lossy())
        ));
    }
    command
}

fn first_token_box(created: &Created, listen: SocketAddr, tls: bool, more_tokens: &str) -> String {
    let host = match listen.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => "127.0.0.1".to_owned(),
        ip if ip.is_unspecified() => "[::1]".to_owned(),
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        ip => ip.to_string(),
    };
    let scheme = if tls { "https" } else { "http" };
    let url = format!("{scheme}://{host}:{}/v1/scan", listen.port());
    let secret = created.token.expose();
    let lines = [
        "avgate: no API token existed, so one was created for you.".to_owned(),
        format!(
            "Name: {}   Id: {}   Scope: {}",
            created.view.name, created.view.id, created.view.scope
        ),
        "It is shown only this once (avgate keeps only its hash):".to_owned(),
        String::new(),
        format!("    {secret}"),
        String::new(),
        "Scan a file with it:".to_owned(),
        String::new(),
        format!("    export TOKEN={secret}"),
        format!(
            "    curl -X POST {url} -H \"Authorization: Bearer $TOKEN\" -F \"file=@eicar.com\""
        ),
        String::new(),
        "More tokens:".to_owned(),
        String::new(),
        format!("    {more_tokens}"),
    ];
    boxed(&lines)
}

/// Lines in a box of dashes and bars, blank lines around it.
fn boxed(lines: &[String]) -> String {
    let width = lines.iter().map(|l| l.chars().count()).max().unwrap_or(0);
    let rule = format!("+{}+\n", "-".repeat(width + 2));
    let mut out = String::from("\n");
    out.push_str(&rule);
    for line in lines {
        out.push_str(&format!("| {line:<width$} |\n"));
    }
    out.push_str(&rule);
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(name: &str) -> TokenOptions {
        TokenOptions {
            name: name.into(),
            ..Default::default()
        }
    }

    #[test]
    fn options_are_validated() {
        let spec = TokenOptions {
            scope: Some(Scope::Admin),
            expires: Some("90d".into()),
            rate: Some("10/s".into()),
            allow_ips: vec!["203.0.113.0/24".into(), "2001:db8::1".into()],
            monthly_files: Some(1000),
            monthly_bytes: Some(ByteSize(10 << 30)),
            max_concurrent: Some(4),
            ..options("partner-a")
        }
        .validate(1_000)
        .unwrap();
        assert_eq!(spec.scope, Scope::Admin);
        assert_eq!(spec.expires_at, Some(1_000 + 90 * 86_400));
        assert_eq!(
            spec.rate,
            Some(RateSpec {
                per_second: 10.0,
                burst: 20
            })
        );
        assert_eq!(spec.allow_ips[1].to_string(), "2001:db8::1/128");
        assert_eq!(spec.monthly_bytes, Some(10 << 30));

        let default = options("x").validate(0).unwrap();
        assert_eq!(
            (default.scope, default.expires_at, default.rate),
            (Scope::Scan, None, None)
        );
        let slow = TokenOptions {
            rate: Some("1/m".into()),
            ..options("x")
        };
        assert_eq!(slow.validate(0).unwrap().rate.unwrap().burst, 1);

        for bad in [
            options(""),
            options("has space"),
            options("tok_abc"),
            options("."),
            options(".."),
            options(&"x".repeat(65)),
            TokenOptions {
                burst: Some(5),
                ..options("x")
            },
            TokenOptions {
                rate: Some("fast".into()),
                ..options("x")
            },
            TokenOptions {
                rate: Some("1/s".into()),
                burst: Some(0),
                ..options("x")
            },
            TokenOptions {
                expires: Some("soon".into()),
                ..options("x")
            },
            TokenOptions {
                expires: Some("0s".into()),
                ..options("x")
            },
            TokenOptions {
                allow_ips: vec!["300.1.1.1/8".into()],
                ..options("x")
            },
            // Accepted once, and then every request with the token panicked.
            TokenOptions {
                rate: Some("1e-15/d".into()),
                ..options("x")
            },
            TokenOptions {
                max_concurrent: Some(usize::MAX),
                ..options("x")
            },
            TokenOptions {
                monthly_files: Some(0),
                ..options("x")
            },
            TokenOptions {
                max_concurrent: Some(0),
                ..options("x")
            },
        ] {
            assert!(bad.validate(0).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_json_options_reject_unknown_fields() {
        let ok: TokenOptions =
            serde_json::from_str(r#"{"name":"a","scope":"admin","monthly_bytes":"1GiB"}"#).unwrap();
        assert_eq!(ok.monthly_bytes, Some(ByteSize(1 << 30)));
        assert!(serde_json::from_str::<TokenOptions>(r#"{"name":"a","scopes":"admin"}"#).is_err());
        assert!(serde_json::from_str::<TokenOptions>(r#"{"name":"a","scope":"root"}"#).is_err());
    }

    #[test]
    fn the_first_token_box_has_a_working_curl_command() {
        let token = Token::generate().unwrap();
        let created = Created {
            view: TokenView {
                id: "tok_x".into(),
                name: "default".into(),
                scope: Scope::Scan,
                status: "active",
                created_at: String::new(),
                expires_at: None,
                revoked_at: None,
                rate: None,
                allow_ips: vec![],
                monthly_files: None,
                monthly_bytes: None,
                max_concurrent: None,
            },
            token,
        };
        let text = first_token_box(
            &created,
            "0.0.0.0:8080".parse().unwrap(),
            false,
            "avgate token create --name NAME",
        );
        assert!(text.contains(created.token.expose()));
        assert!(text.contains(
            "curl -X POST http://127.0.0.1:8080/v1/scan -H \"Authorization: Bearer $TOKEN\""
        ));
        let widths: std::collections::HashSet<usize> = text
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| l.chars().count())
            .collect();
        assert_eq!(widths.len(), 1, "a straight box:\n{text}");
    }

    #[test]
    fn the_command_for_more_tokens_names_this_servers_store() {
        let default = Path::new("/root/.local/share/avgate");
        assert_eq!(
            token_command("target/release/avgate", default, default),
            "target/release/avgate token create --name NAME"
        );
        assert_eq!(
            token_command("avgate", Path::new("/srv/avgate"), default),
            "avgate token create --name NAME --data-dir /srv/avgate"
        );
        assert_eq!(
            token_command("/opt/my tools/avgate", Path::new("/srv/it's"), default),
            "'/opt/my tools/avgate' token create --name NAME --data-dir '/srv/it'\\''s'"
        );
    }
}
