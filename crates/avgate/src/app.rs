//! Wiring: from a [`Config`] to a running service, and a clean stop.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use clamd::{BackendConfig, Pool, Timeouts};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::http::server::{self, ServerLimits};
use crate::http::{self as web, AppState, Limits};
use crate::managed::{DatabaseKind, ManagedClamd};
use crate::scan::clamav::ClamavEngine;
use crate::scan::Engine;

/// A started service.
pub struct Running {
    /// The address the public listener is bound to.
    pub addr: SocketAddr,
    pub state: AppState,
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
            address: clamd::Address::Unix(managed.socket.clone()),
            max_concurrent: managed.max_threads,
        };
        let stream_max = vec![Some(managed.stream_max_length)];
        let database = managed.database;
        (vec![backend], stream_max, Some(managed), database)
    } else {
        let stream_max = config.clamd.stream_max_length.map(|s| s.0);
        for address in &external {
            crate::managed::warn_about_external_clamd(
                address,
                std::path::Path::new(crate::managed::SYSTEM_CLAMD_CONF),
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
    let engine: Arc<dyn Engine> = Arc::new(ClamavEngine::new(
        pool.clone(),
        config.clamd.queue_timeout.0,
        config.replay_buffer.0 as usize,
        stream_max,
    ));

    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;

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
    };

    let mut tasks = Vec::new();
    // clamd outlives the HTTP server: it is stopped only once in-flight
    // scans are done, hence its own token.
    let clamd_stop = CancellationToken::new();
    let managed_task = managed.map(|m| tokio::spawn(m.supervise(clamd_stop.clone())));
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
            header_timeout: config.header_timeout.0,
            shutdown_timeout: config.shutdown_timeout.0,
        };
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            server::serve(listener, app, limits, stop.cancelled_owned()).await;
            clamd_stop.cancel();
            if let Some(task) = managed_task {
                let _ = task.await;
            }
        }));
    }
    tracing::info!(
        listen = %addr,
        backends = ?pool.backends().iter().map(|b| b.address.to_string()).collect::<Vec<_>>(),
        database = database.as_str(),
        max_size = %config.max_size,
        "avgate is listening"
    );
    Ok(Running {
        addr,
        state,
        stop,
        tasks,
    })
}
