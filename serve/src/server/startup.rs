//! Starting a server: load the cloud model, open the stores, bind the listeners, start the
//! engine, and serve. [`start`] reads as that list; each step is a function below.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use candle_core::DType;
use dashmap::DashMap;
use tandem_kvcache::KvLayout;
use tandem_model::checkpoint::Checkpoint;
use tandem_model::manifest::{Part, MANIFEST_FILE};
use tandem_model::split::LoadOptions;
use tandem_model::{CloudModel, SplitPoint};
use tandem_scheduler::SchedulerConfig;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::health::refresh_snapshots;
use super::{
    admin_app, app, conn_limit, heartbeat_loop, kv_dtype_for, serve_until, tls, ListenerSetup,
    ServerConfig, ServerHandle, ValidConfig,
};
use crate::metrics::Metrics;
use crate::rest::auth::AdminKey;
use crate::rest::device::DeviceKey;
use crate::rest::webhook::Webhooks;
use crate::rest::RestState;
use crate::ws::{admission, Served, Shared, WS_PATH};
use tandem_engine::{Engine, EngineConfig};
use tandem_store::{RedisStoreConfig, ReplicaId, SessionExpiry, StoreConfig, Stores};

/// Loads the model, opens the session store, binds `cfg.listen` and serves until
/// [`ServerHandle::shutdown`]. `cfg` is a [`ValidConfig`], or a [`ServerConfig`] that is
/// checked first (its check's error is `start`'s).
pub async fn start<C>(cfg: C) -> anyhow::Result<ServerHandle>
where
    C: TryInto<ValidConfig>,
    anyhow::Error: From<C::Error>,
{
    start_checked(cfg.try_into()?).await
}

async fn start_checked(cfg: ValidConfig) -> anyhow::Result<ServerHandle> {
    let (served, model, tokenizer) = load(&cfg).await?;
    let engine_cfg = engine_config(&cfg, &model);
    let stores = open_stores(&cfg).await?;
    let device_key = device_key(&cfg);
    let metrics = Arc::new(Metrics::default());
    let webhooks = Webhooks::new(
        stores.prompts.clone(),
        stores.tenants.clone(),
        cfg.webhook_policy()?,
        tls::client_config(cfg.webhook_ca_cert.as_deref())?,
    );
    let rest = rest_state(&cfg, &stores, &metrics, &device_key, &webhooks);
    let replica = ReplicaId::unique(cfg.replica_id.as_deref().unwrap_or("tandem"))?;
    stores
        .sessions
        .heartbeat(&replica, cfg.heartbeat_ttl())
        .await
        .context("first heartbeat")?;
    let listeners = Listeners::bind(&cfg)?;
    let engine = Arc::new(Engine::start_observed(
        model,
        tokenizer,
        engine_cfg,
        Some(metrics.clone() as Arc<dyn tandem_engine::Observer>),
    ));
    let (stop, _) = watch::channel(false);
    let advertise_url = cfg.advertise_url.clone().unwrap_or_else(|| {
        let scheme = if listeners.tls.is_some() { "wss" } else { "ws" };
        format!("{scheme}://{}{WS_PATH}", listeners.addr)
    });
    let admission = admission::Admission::new(admission::AdmissionLimits {
        attached: cfg.max_sessions,
        grace: cfg.max_resume_grace_sessions,
        per_user: cfg.max_sessions_per_user,
        hidden_state_bytes: (cfg.hidden_state_budget_mib * f64::from(1u32 << 20)) as u64,
    });
    let shared = Arc::new(Shared {
        cfg,
        served,
        engine,
        store: stores.sessions,
        prompts: stores.prompts,
        webhooks,
        advertise_url,
        metrics,
        last_snapshot: Arc::default(),
        params: stores.opens,
        replica: replica.clone(),
        sessions: DashMap::new(),
        draining: AtomicBool::new(false),
        stop,
        next_conn: AtomicU64::new(1),
        device_key,
        admission,
    });
    let heartbeat = tokio::spawn(heartbeat_loop(shared.clone()));
    export_metrics(&shared);
    let (addr, admin_addr) = (listeners.addr, listeners.admin_addr);
    let serving = listeners.serve(&shared, rest.clone());
    tracing::info!(%addr, admin_addr = ?admin_addr, replica = %replica, "serving");
    Ok(ServerHandle {
        addr,
        admin_addr,
        admin_stop: serving.admin_stop,
        admin_serve: serving.admin_serve,
        replica: replica.to_string(),
        shared,
        accept_stop: serving.accept_stop,
        serve: serving.serve,
        heartbeat,
        rest,
    })
}

/// Loads the cloud part off the async runtime.
async fn load(cfg: &ServerConfig) -> anyhow::Result<Loaded> {
    let cloud_dir = cloud_dir(&cfg.cloud);
    let dtype = cfg.device.resolve_dtype(cfg.dtype);
    let device = cfg.device;
    tokio::task::spawn_blocking(move || load_cloud(&cloud_dir, dtype, device))
        .await
        .context("loading the cloud model")?
}

/// Opens the stores: in memory, or all on the same Redis through one connection, whose calls
/// feed the Redis metrics.
async fn open_stores(cfg: &ServerConfig) -> anyhow::Result<Stores> {
    tandem_store::set_call_observer(crate::metrics::record_redis);
    let expiry = SessionExpiry::default();
    let config = match &cfg.redis {
        None => StoreConfig::Memory { expiry },
        Some(url) => StoreConfig::Redis(RedisStoreConfig {
            key_prefix: cfg.redis_key_prefix.clone(),
            expiry,
            ..RedisStoreConfig::new(url.clone())
        }),
    };
    Stores::open(&config)
        .await
        .context("opening the session store")
}

/// The key that signs and checks device tokens: the configured one, or a random one (tokens
/// then work on this process only).
fn device_key(cfg: &ServerConfig) -> DeviceKey {
    match &cfg.device_token_key {
        Some(k) => DeviceKey::from_secret(k.expose()),
        None => {
            tracing::warn!(
                "no device-token key configured: device tokens issued now work on this process only"
            );
            DeviceKey::random()
        }
    }
}

fn rest_state(
    cfg: &ServerConfig,
    stores: &Stores,
    metrics: &Arc<Metrics>,
    device_key: &DeviceKey,
    webhooks: &Webhooks,
) -> Arc<RestState> {
    Arc::new(RestState {
        webhooks: webhooks.clone(),
        metrics: metrics.clone(),
        store: stores.tenants.clone(),
        prompts: stores.prompts.clone(),
        admin_key: cfg.admin_key.as_ref().map(|k| AdminKey::new(k.expose())),
        device_key: device_key.clone(),
        system_prompt: cfg.system_prompt.clone(),
        max_tokens_cap: cfg.max_tokens_cap,
        partner_requests_per_minute: cfg.partner_requests_per_minute,
        device_requests_per_minute: cfg.device_requests_per_minute,
        body_timeout: cfg.http_body_timeout(),
    })
}

/// The bound listeners and their TLS settings, before they serve.
struct Listeners {
    public: tokio::net::TcpListener,
    addr: SocketAddr,
    tls: Option<Arc<rustls::ServerConfig>>,
    admin: Option<tokio::net::TcpListener>,
    admin_addr: Option<SocketAddr>,
    admin_tls: Option<Arc<rustls::ServerConfig>>,
}

/// The serving tasks and the switches that stop them.
struct Serving {
    accept_stop: watch::Sender<bool>,
    serve: JoinHandle<()>,
    admin_stop: watch::Sender<bool>,
    admin_serve: Option<JoinHandle<()>>,
}

impl Listeners {
    /// Reads the TLS files, binds both listeners, and warns about exposed settings.
    fn bind(cfg: &ServerConfig) -> anyhow::Result<Self> {
        let tls = match cfg.tls_files() {
            Some(files) => Some(tls::server_config(&files)?),
            None => None,
        };
        let admin_tls = match cfg.admin_tls_files() {
            Some(files) => Some(tls::server_config(&files)?),
            None => None,
        };
        let public = bind(cfg.listen).with_context(|| format!("binding {}", cfg.listen))?;
        let addr = public.local_addr()?;
        let admin = match cfg.admin_listen.addr() {
            None => None,
            Some(a) => Some(bind(a).with_context(|| format!("binding the admin listener {a}"))?),
        };
        let admin_addr = match &admin {
            Some(l) => Some(l.local_addr()?),
            None => None,
        };
        let l = Self {
            public,
            addr,
            tls,
            admin,
            admin_addr,
            admin_tls,
        };
        l.warn_exposure(cfg);
        Ok(l)
    }

    fn warn_exposure(&self, cfg: &ServerConfig) {
        let exposed = self.admin_addr.filter(|a| !a.ip().is_loopback());
        if let Some(a) = exposed.filter(|_| self.admin_tls.is_none()) {
            tracing::warn!(
                admin_addr = %a,
                "the operator listener is not on loopback and has no TLS: the admin key travels \
                 in clear; give --admin-tls-cert/--admin-tls-key"
            );
        }
        if let Some(a) = exposed {
            tracing::warn!(
                admin_addr = %a,
                "the operator listener is not on loopback: /metrics and /readyz there need no \
                 credentials; keep this port off the internet"
            );
        }
        if self.tls.is_none() && !self.addr.ip().is_loopback() {
            tracing::warn!(
                addr = %self.addr,
                "serving WITHOUT TLS on a non-loopback address: device tokens, hidden states and \
                 output text travel in clear; give --tls-cert/--tls-key, or terminate TLS in front"
            );
        }
        if !cfg.credential_required() && !self.addr.ip().is_loopback() {
            tracing::warn!(
                addr = %self.addr,
                "opening a session needs no credential (no device_token_key, or \
                 open_requires_credential = never): anyone who reaches the listener can use the cloud"
            );
        }
    }

    /// Spawns the operator listener (no connection caps: it is on loopback or a private
    /// network) and the public one.
    fn serve(self, shared: &Arc<Shared>, rest: Arc<RestState>) -> Serving {
        let (accept_stop, accept_rx) = watch::channel(false);
        let (admin_stop, admin_rx) = watch::channel(false);
        let header_timeout = shared.cfg.http_header_timeout();
        let admin_tls = self.admin_tls;
        let admin_serve = self.admin.map(|l| {
            let setup = ListenerSetup {
                limits: conn_limit::ConnLimits {
                    per_ip: usize::MAX,
                    total: usize::MAX,
                },
                tls: admin_tls,
                header_timeout,
                what: "the operator listener",
            };
            let app = admin_app(shared.clone(), rest.clone());
            tokio::spawn(serve_until(l, setup, app, admin_rx))
        });
        let setup = ListenerSetup {
            limits: conn_limit::ConnLimits {
                per_ip: shared.cfg.max_connections_per_ip,
                total: shared.cfg.max_connections,
            },
            tls: self.tls,
            header_timeout,
            what: "the listener",
        };
        let app = app(shared.clone(), rest);
        let serve = tokio::spawn(serve_until(self.public, setup, app, accept_rx));
        Serving {
            accept_stop,
            serve,
            admin_stop,
            admin_serve,
        }
    }
}

/// With an OTLP meter provider: exports every metric, and keeps the engine snapshot the
/// export reads fresh.
fn export_metrics(shared: &Arc<Shared>) {
    let Some(provider) = crate::telemetry::meter_provider() else {
        return;
    };
    use opentelemetry::metrics::MeterProvider as _;
    // The last known engine counters, also after the server stopped (the final export comes
    // after the shutdown; a counter must not fall back to 0).
    let last = shared.last_snapshot.clone();
    shared.metrics.export_otel(
        &provider.meter("tandem"),
        Arc::new(move || {
            *last
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        }),
    );
    tokio::spawn(refresh_snapshots(
        Arc::downgrade(shared),
        Duration::from_secs(5),
    ));
}

/// Pending connections the kernel queues before `accept`: thousands of devices reconnect
/// at once after a network blip, and the default of 128 made a burst of 200 wait a second
/// for a TCP retransmit (seen by the load test).
const LISTEN_BACKLOG: u32 = 4096;

fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// `dir` itself if it holds a manifest, else `dir/cloud` (a whole split directory).
fn cloud_dir(dir: &Path) -> PathBuf {
    if dir.join(MANIFEST_FILE).is_file() {
        dir.to_path_buf()
    } else {
        dir.join("cloud")
    }
}

type Loaded = (
    Served,
    CloudModel,
    Option<tandem_model::tokenizer::TextTokenizer>,
);

fn load_cloud(
    dir: &Path,
    dtype: DType,
    name: tandem_model::device::DeviceName,
) -> anyhow::Result<Loaded> {
    let ck = Checkpoint::open_part(dir, Part::Cloud)
        .with_context(|| format!("opening the cloud checkpoint {}", dir.display()))?;
    let manifest = ck
        .manifest
        .clone()
        .context("the cloud checkpoint has no manifest")?;
    let split = SplitPoint::new(manifest.edge_layers, manifest.num_layers)?;
    // The weights are converted to the configured dtype whatever the stored one (bf16 and
    // f32 run on the model's own CPU kernels, with f32 activations).
    let device = name.open()?;
    let opts = LoadOptions {
        dtype,
        device: &device,
    };
    let started = std::time::Instant::now();
    let model = CloudModel::load(ck.tensors.as_ref(), &ck.config, split, opts)?;
    tracing::info!(
        device = %name,
        dtype = tandem_model::weights::dtype_user_name(dtype),
        bf16_kernel = (dtype == DType::BF16)
            .then(|| tandem_kernels::gemm_bf16::Bf16Kernel::selected().ok())
            .flatten()
            .map(|k| k.name()),
        load_s = started.elapsed().as_secs_f64(),
        "cloud model loaded"
    );
    let served = Served {
        pair_id: manifest.pair_id.clone(),
        split: u32::try_from(manifest.edge_layers)?,
        hidden_size: manifest.hidden_size,
        max_context: ck.config.max_position_embeddings,
    };
    Ok((served, model, ck.tokenizer))
}

fn engine_config(cfg: &ServerConfig, model: &CloudModel) -> EngineConfig {
    let c = model.config();
    let range = model.split().cloud_range();
    let layout = KvLayout {
        first_layer: range.start,
        num_layers: range.len(),
        num_blocks: 0,
        block_size: cfg.block_size,
        kv_heads: c.num_key_value_heads,
        head_dim: c.head_dim,
        dtype: kv_dtype_for(model.weight_dtype()),
    };
    let bytes = (cfg.kv_cache_gib * (1u64 << 30) as f64) as usize;
    EngineConfig {
        scheduler: SchedulerConfig {
            policy: cfg.policy.policy(),
            max_batch_tokens: cfg.max_batch_tokens,
            max_batch_seqs: cfg.max_batch_seqs,
            // Attached sessions and those waiting for a Resume have separate caps
            // (`admission`); the engine holds both.
            max_sessions: cfg
                .max_sessions
                .saturating_add(cfg.max_resume_grace_sessions),
            max_queued_tokens: cfg.max_queued_tokens,
            max_context: c.max_position_embeddings,
            prefill_slack: Some(cfg.prefill_slack),
        },
        block_size: cfg.block_size,
        kv_blocks: cfg
            .kv_blocks
            .unwrap_or_else(|| layout.blocks_for_budget(bytes).max(1)),
        kv_dtype: layout.dtype,
        prefix_sharing: cfg.prefix_sharing,
        decode_wait: Duration::from_secs_f64(cfg.decode_wait_ms / 1000.0),
        max_draft_tokens: cfg.max_draft_tokens,
    }
}
