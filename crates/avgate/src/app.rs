//! Wiring: from a [`Config`] to a running service, and a clean stop.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use clamd::{BackendConfig, Pool, Timeouts};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::auth::Auth;
use crate::config::Config;
use crate::http::server::{self, ServerLimits};
use crate::http::{self as web, AppState, Limits};
use crate::managed::{DatabaseKind, ManagedClamd};
use crate::perimeter::{Perimeter, RateSpec};
use crate::scan::clamav::{ClamavEngine, EngineSettings};
use crate::scan::Engine;
use crate::store::SqliteStore;

/// A started service.
pub struct Running {
    /// The address the public listener is bound to.
    pub addr: SocketAddr,
    /// The plain-HTTP listener's address (`http_listen`), when there is one.
    pub http_addr: Option<SocketAddr>,
    /// The metrics listener's address, unless `metrics.enabled = false`.
    pub metrics_addr: Option<SocketAddr>,
    pub state: AppState,
    /// Applies a reloaded configuration and reloads the signatures (SIGHUP).
    pub reloader: Arc<crate::reload::Reloader>,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// A handle that stops the service when cancelled.
    pub fn stopper(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Waits until the service has stopped (after [`Running::stopper`] was
    /// cancelled): in-flight requests finished, the managed clamd stopped.
    pub async fn wait(self) {
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// The perimeter's settings from the configuration (validated in
/// `Config::load`).
fn perimeter(config: &Config) -> anyhow::Result<Perimeter> {
    use crate::perimeter::network::{parse_nets, IpPolicy};
    let net = &config.network;
    let nets = |list: &[String]| parse_nets(list).map_err(anyhow::Error::msg);
    let policy = IpPolicy {
        allow: nets(&net.allow)?,
        deny: nets(&net.deny)?,
        trusted_proxies: nets(&net.trusted_proxies)?,
    };
    let rl = &config.rate_limit;
    let spec = |rate, burst| RateSpec { rate, burst };
    Ok(Perimeter::new(
        policy,
        rl.enabled.then(|| spec(rl.per_ip, rl.per_ip_burst)),
        rl.enabled.then(|| spec(rl.per_token, rl.per_token_burst)),
        spec(rl.auth_failures, rl.auth_failures_burst),
        config.request_timeout.0,
        config.min_upload_rate.0,
        config.min_upload_window.0,
    ))
}

/// Binds the listener, starts clamd (managed mode) and the health checks,
/// and serves until the stopper is cancelled.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    let stop = CancellationToken::new();
    let timeouts = Timeouts {
        connect: config.clamd.connect_timeout.0,
        io: config.clamd.io_timeout.0,
        reply: config.clamd.scan_timeout.0,
    };

    let external = config.backends();
    let (backends, stream_max, managed, database) = if external.is_empty() {
        let managed = Arc::new(ManagedClamd::prepare(&config)?);
        let backend = BackendConfig {
            address: managed.address(),
            max_concurrent: managed.max_threads,
        };
        let stream_max = vec![Some(managed.stream_max_length)];
        let database = managed.database();
        (vec![backend], stream_max, Some(managed), database)
    } else {
        let stream_max = config.clamd.stream_max_length.map(|s| s.0);
        for address in &external {
            crate::managed::warn_about_external_clamd(
                address,
                std::path::Path::new(crate::managed::SYSTEM_CLAMD_CONF),
                config.max_size.0,
            );
        }
        let backends: Vec<BackendConfig> = external
            .into_iter()
            .map(|address| BackendConfig {
                address,
                max_concurrent: config.clamd.max_concurrent_per_backend,
            })
            .collect();
        let n = backends.len();
        (backends, vec![stream_max; n], None, DatabaseKind::External)
    };

    let pool = Pool::new(backends, timeouts);
    let signatures = crate::signatures::Signatures::new(pool.clone(), managed.clone(), &config);
    let reloader = crate::reload::Reloader::new(config.clone(), signatures.clone());
    let engine: Arc<dyn Engine> = Arc::new(ClamavEngine::new(
        pool.clone(),
        EngineSettings {
            queue_timeout: config.clamd.queue_timeout.0,
            replay_limit: config.replay_buffer.0 as usize,
            small_file_max: config.clamd.small_file_max_size.0 as usize,
            stream_max,
        },
    ));

    // Tokens, usage and audit trail: data_dir/avgate.db.
    let auth = {
        let dir = config.data_dir.clone();
        let store = tokio::task::spawn_blocking(move || SqliteStore::open(&dir)).await??;
        Arc::new(Auth::new(Arc::new(store), config.auth.required))
    };
    // The false-positive policy, from the same store. With a managed clamd
    // its files are written now, before clamd starts and loads them.
    let policy = crate::policy::Policy::start(
        auth.store.clone(),
        &config,
        managed.clone(),
        signatures.clone(),
    )
    .await?;

    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let http_listener = match config.http_listen {
        Some(http) => Some(
            TcpListener::bind(http)
                .await
                .with_context(|| format!("cannot listen on {http}"))?,
        ),
        None => None,
    };
    let http_addr = http_listener.as_ref().map(|l| l.local_addr()).transpose()?;
    let metrics_listener = match config.metrics.enabled {
        true => Some(crate::metrics::bind(config.metrics.listen).await?),
        false => None,
    };
    let metrics_addr = metrics_listener
        .as_ref()
        .map(|l| l.local_addr())
        .transpose()?;
    let metrics = Arc::new(crate::metrics::Metrics::new(
        pool.clone(),
        managed.clone(),
        Some(signatures.clone()),
        database,
        config.max_concurrent_scans,
    ));

    let state = AppState {
        engines: Arc::from(vec![engine]),
        pool: pool.clone(),
        managed: managed.clone(),
        database,
        limits: Arc::new(Limits {
            max_size: config.max_size.0,
            max_files: config.max_files_per_request,
            max_parts: config.max_parts,
            max_field_size: config.max_field_size.0,
        }),
        scan_slots: Arc::new(Semaphore::new(config.max_concurrent_scans)),
        perimeter: Arc::new(perimeter(&config)?),
        auth: auth.clone(),
        metrics: metrics.clone(),
        signatures: signatures.clone(),
        policy: policy.clone(),
    };

    if config.auth.required {
        let more = crate::auth::manage::token_command(
            &std::env::args().next().unwrap_or_else(|| "avgate".into()),
            &config.data_dir,
            &crate::config::default_data_dir(),
        );
        let journal = std::env::var_os("JOURNAL_STREAM").is_some();
        crate::auth::manage::bootstrap(
            auth.store.as_ref(),
            addr,
            config.tls.enabled(),
            &more,
            journal,
        )
        .await?;
    } else {
        tracing::warn!(
            listen = %addr,
            "AUTHENTICATION IS DISABLED (auth.required = false): anyone who can reach this address can scan without a token"
        );
    }

    // Certificates are loaded (or ACME starts) last: nothing after this
    // can fail, so its task never outlives a failed start.
    let (tls, tls_task) = match crate::tls::start(&config, stop.clone())? {
        Some((tls, task)) => (Some(tls), Some(task)),
        None => (None, None),
    };
    let mut tasks = Vec::from_iter(tls_task);
    // clamd outlives the HTTP server: it is stopped only once in-flight
    // scans are done, hence its own token.
    let clamd_stop = CancellationToken::new();
    // Signature freshness warnings; freshclam runs and reloads (managed).
    tasks.push(tokio::spawn(signatures.clone().monitor(stop.clone())));
    if let Some(m) = &managed {
        let run = crate::managed::updates::run(m.clone(), signatures.clone(), stop.clone());
        tasks.push(tokio::spawn(run));
    }
    // Use of tokens without quotas, counted in memory: written every
    // second, and once more after the last request (below).
    tasks.push(tokio::spawn(auth.clone().flush_usage_every(
        crate::auth::usage::FLUSH_INTERVAL,
        stop.clone(),
    )));
    // Policy changes (store polled, expiry, SIGHUP) into the managed clamd.
    tasks.push(tokio::spawn(policy.run(reloader.subscribe(), stop.clone())));
    let managed_task = managed.map(|m| {
        // Out of rotation the moment clamd exits, and /readyz says so at
        // once; the health checker probes it back in once it runs again.
        let backend = pool.backends().first().cloned();
        let on_exit = move || {
            if let Some(backend) = &backend {
                let why = std::io::Error::other("the managed clamd exited");
                backend.mark_down(&clamd::Error::Io(why));
                // The next clamd loads the directory as it is then.
                backend.database_reloaded();
            }
        };
        tokio::spawn(m.supervise(clamd_stop.clone(), on_exit))
    });
    // The metrics listener stays up until the public listener has drained:
    // a drain of in-flight scans can be watched (and scraped) to its end.
    let metrics_stop = CancellationToken::new();
    if let Some(listener) = metrics_listener {
        // Its own small limits: a scraper needs a connection or two.
        let limits = ServerLimits {
            max_connections: 16,
            per_ip: None,
            header_timeout: config.header_timeout.0,
            idle_timeout: config.idle_timeout.0,
            shutdown_timeout: config.shutdown_timeout.0,
        };
        let stop = metrics_stop.clone();
        // Health too: a container's health check or a Kubernetes probe
        // asks here in plain HTTP whatever the public listener speaks
        // (TLS, a domain's certificate, another port).
        let app = crate::metrics::router(metrics).merge(web::health_router(state.clone()));
        tasks.push(tokio::spawn(
            async move { server::serve(listener, app, limits, None, stop.cancelled_owned()).await }
                .instrument(tracing::info_span!("metrics_listener")),
        ));
    }
    {
        let stop = stop.clone();
        let interval = config.clamd.health_interval.0;
        tasks.push(tokio::spawn(pool.clone().run_health_checks(
            interval,
            async move { stop.cancelled().await },
        )));
    }
    {
        let app = web::router(state.clone());
        let limits = ServerLimits {
            max_connections: config.max_connections,
            per_ip: Some(crate::http::server::PerIpLimit {
                max: config.max_connections_per_ip,
                exempt: Arc::new(
                    crate::perimeter::network::parse_nets(&config.network.trusted_proxies)
                        .unwrap_or_default(),
                ),
                refused: state.metrics.connections_refused.clone(),
            }),
            header_timeout: config.header_timeout.0,
            idle_timeout: config.idle_timeout.0,
            shutdown_timeout: config.shutdown_timeout.0,
        };
        if let (Some(http_listener), Some(tls)) = (http_listener, &tls) {
            let redirect = web::redirect_router(&state, addr.port(), tls.http01.clone());
            let (limits, stop) = (limits.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                server::serve(
                    http_listener,
                    redirect,
                    limits,
                    None,
                    stop.cancelled_owned(),
                )
                .await
            }));
        }
        let acceptor = tls.as_ref().map(|t| t.acceptor.clone());
        let stop = stop.clone();
        let auth = auth.clone();
        tasks.push(tokio::spawn(async move {
            server::serve(listener, app, limits, acceptor, stop.cancelled_owned()).await;
            // Every request has been answered: what they counted in memory
            // goes to the store before the process ends.
            if let Err(e) = auth.flush_usage().await {
                tracing::error!(error = %e, "token usage of the last second could not be written");
            }
            clamd_stop.cancel();
            if let Some(task) = managed_task {
                let _ = task.await;
            }
            metrics_stop.cancel();
        }));
    }
    tracing::info!(
        listen = %addr,
        tls = tls.is_some(),
        http_listen = %http_addr.map_or("off".into(), |a| a.to_string()),
        metrics_listen = %metrics_addr.map_or("off".into(), |a| a.to_string()),
        backends = %pool.backends().iter().map(|b| b.address.to_string()).collect::<Vec<_>>().join(","),
        database = database.as_str(),
        max_size = %config.max_size,
        worker_threads = config.runtime_workers(),
        "avgate is listening"
    );
    Ok(Running {
        addr,
        http_addr,
        metrics_addr,
        state,
        reloader,
        stop,
        tasks,
    })
}
