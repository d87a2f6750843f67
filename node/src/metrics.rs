//! Prometheus metrics and the health endpoint.
//!
//! Shards record into `metrics` handles registered once per shard with a `shard` label, so no
//! counter is shared between cores. The Prometheus recorder renders them; a small hyper server
//! on the control-plane thread serves `/metrics` and `/health` at `metrics.listen`, and a
//! cluster member's `/cluster`, `/cluster/slots` and `POST /cluster/leave`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Installs the global recorder (once per process) and returns its handle.
pub fn install() -> Result<PrometheusHandle, String> {
    let recorder = PrometheusBuilder::new()
        .set_buckets(&[
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
        ])
        .map_err(|e| format!("metrics: {e}"))?
        // Counts, not seconds.
        .set_buckets_for_metric(
            Matcher::Full("starling_storage_batch_size".into()),
            &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0],
        )
        .map_err(|e| format!("metrics: {e}"))?
        .set_buckets_for_metric(
            Matcher::Full("starling_offline_queue_length".into()),
            &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0],
        )
        .map_err(|e| format!("metrics: {e}"))?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|e| format!("metrics: {e}"))?;
    describe();
    Ok(handle)
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!("starling_cluster_envelopes_out_total", "Envelopes sent to other nodes");
    describe_counter!(
        "starling_cluster_envelopes_in_total",
        "Envelopes received from other nodes"
    );
    describe_counter!(
        "starling_cluster_envelopes_lost_total",
        "Envelopes still queued for a node when its link closed"
    );
    describe_counter!(
        "starling_cluster_sessions_rebound_total",
        "Sessions that registered with their user's actor on another node after a membership change (their clients stay connected)"
    );
    describe_counter!(
        "starling_cluster_bad_frames_total",
        "Corrupt or refused frames from other nodes"
    );
    describe_counter!(
        "starling_cluster_replication_failures_total",
        "Writes and reads of the replicated state that failed (no leader, no majority, timed out, refused)"
    );
    describe_counter!(
        "starling_raft_dropped_total",
        "Raft messages dropped on a full link or call mesh (raft sends again)"
    );
    describe_counter!(
        "starling_raft_leader_changes_total",
        "Times this node became a slot's leader"
    );
    describe_counter!(
        "starling_raft_snapshots_total",
        "Snapshots of a slot made to send, or installed"
    );
    describe_counter!(
        "starling_raft_conf_changes_total",
        "Configuration changes proposed for slots"
    );
    describe_gauge!("starling_cluster_members", "Cluster members up, this node included");
    describe_gauge!("starling_connections", "Open client connections");
    describe_gauge!("starling_sessions", "Bound client sessions");
    describe_gauge!("starling_user_actors", "Active user actors");
    describe_counter!(
        "starling_user_write_failures_total",
        "User actors ended because a write of theirs was not made durable (storage or cluster)"
    );
    describe_counter!("starling_logins_total", "Successful logins (resource bound)");
    describe_counter!("starling_auth_failures_total", "Failed SASL authentications");
    describe_counter!("starling_stanzas_in_total", "Stanzas received from clients, by kind");
    describe_counter!("starling_stanzas_out_total", "Stanzas written to clients, by kind");
    describe_counter!("starling_bytes_in_total", Unit::Bytes, "Bytes read from clients");
    describe_counter!("starling_bytes_out_total", Unit::Bytes, "Bytes written to clients");
    describe_counter!(
        "starling_bounced_total",
        "Stanzas bounced because a mailbox or link was full"
    );
    describe_counter!(
        "starling_stream_errors_total",
        "Connections ended by a stream error or timeout"
    );
    describe_histogram!(
        "starling_user_handle_seconds",
        Unit::Seconds,
        "User actor time per message, including durable writes"
    );
    describe_histogram!(
        "starling_storage_write_seconds",
        Unit::Seconds,
        "Storage batch apply + flush time"
    );
    describe_histogram!("starling_storage_batch_size", "Write requests per group commit");
    describe_gauge!("starling_offline_messages", "Offline messages stored, all users");
    describe_gauge!(
        "starling_offline_unreadable",
        "Stored offline messages that could not be parsed back, set aside (starling user unreadable)"
    );
    describe_histogram!(
        "starling_offline_queue_length",
        "Offline messages waiting for a user when its actor loads (users with any)"
    );
    describe_histogram!(
        "starling_route_seconds",
        Unit::Seconds,
        "Routing latency: from routing an envelope to its actor or session taking it from the mailbox"
    );
    describe_gauge!(
        "starling_mailbox_depth",
        "Messages waiting in mailboxes, summed over a shard's actors (sampled each second)"
    );
    describe_gauge!(
        "starling_mailbox_depth_max",
        "Deepest mailbox of a shard's actors (sampled each second)"
    );
    describe_gauge!("process_resident_memory_bytes", Unit::Bytes, "Resident set size");
}

/// One shard's handles.
pub struct ShardMetrics {
    pub connections: Gauge,
    pub sessions: Gauge,
    pub user_actors: Gauge,
    pub user_write_failures: Counter,
    pub logins: Counter,
    pub auth_failures: Counter,
    pub stanzas_in: [Counter; 3],
    pub stanzas_out: [Counter; 3],
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    pub bounced: Counter,
    pub stream_errors: Counter,
    pub user_handle: Histogram,
    pub route: Histogram,
    pub offline_at_load: Histogram,
    /// `[user, session]` mailboxes.
    pub mailbox: [Gauge; 2],
    pub mailbox_max: [Gauge; 2],
    pub cluster_frames_out: Counter,
    pub cluster_frames_in: Counter,
    pub cluster_frames_lost: Counter,
    pub cluster_bad_frames: Counter,
    pub sessions_rebound: Counter,
    pub cluster_replication_failures: Counter,
    pub cluster_raft_dropped: Counter,
    pub raft_leader_changes: Counter,
    pub raft_snapshots: Counter,
    pub raft_conf_changes: Counter,
}

/// Index of a stanza kind in the `[message, presence, iq]` arrays.
pub fn kind_index(name: &str) -> Option<usize> {
    match name {
        "message" => Some(0),
        "presence" => Some(1),
        "iq" => Some(2),
        _ => None,
    }
}

impl ShardMetrics {
    pub fn new(shard: u16) -> Self {
        let s = shard.to_string();
        let mailboxes =
            |name: &'static str| ["user", "session"].map(|k| metrics::gauge!(name, "shard" => s.clone(), "kind" => k));
        let kinds = |name: &'static str| {
            ["message", "presence", "iq"].map(|k| metrics::counter!(name, "shard" => s.clone(), "kind" => k))
        };
        ShardMetrics {
            connections: metrics::gauge!("starling_connections", "shard" => s.clone()),
            sessions: metrics::gauge!("starling_sessions", "shard" => s.clone()),
            user_actors: metrics::gauge!("starling_user_actors", "shard" => s.clone()),
            user_write_failures: metrics::counter!("starling_user_write_failures_total", "shard" => s.clone()),
            logins: metrics::counter!("starling_logins_total", "shard" => s.clone()),
            auth_failures: metrics::counter!("starling_auth_failures_total", "shard" => s.clone()),
            stanzas_in: kinds("starling_stanzas_in_total"),
            stanzas_out: kinds("starling_stanzas_out_total"),
            bytes_in: metrics::counter!("starling_bytes_in_total", "shard" => s.clone()),
            bytes_out: metrics::counter!("starling_bytes_out_total", "shard" => s.clone()),
            bounced: metrics::counter!("starling_bounced_total", "shard" => s.clone()),
            stream_errors: metrics::counter!("starling_stream_errors_total", "shard" => s.clone()),
            user_handle: metrics::histogram!("starling_user_handle_seconds", "shard" => s.clone()),
            route: metrics::histogram!("starling_route_seconds", "shard" => s.clone()),
            offline_at_load: metrics::histogram!("starling_offline_queue_length", "shard" => s.clone()),
            mailbox: mailboxes("starling_mailbox_depth"),
            mailbox_max: mailboxes("starling_mailbox_depth_max"),
            cluster_frames_out: metrics::counter!("starling_cluster_envelopes_out_total", "shard" => s.clone()),
            cluster_frames_in: metrics::counter!("starling_cluster_envelopes_in_total", "shard" => s.clone()),
            cluster_frames_lost: metrics::counter!("starling_cluster_envelopes_lost_total", "shard" => s.clone()),
            cluster_bad_frames: metrics::counter!("starling_cluster_bad_frames_total", "shard" => s.clone()),
            sessions_rebound: metrics::counter!("starling_cluster_sessions_rebound_total", "shard" => s.clone()),
            cluster_replication_failures: metrics::counter!("starling_cluster_replication_failures_total", "shard" => s.clone()),
            cluster_raft_dropped: metrics::counter!("starling_raft_dropped_total", "shard" => s.clone()),
            raft_leader_changes: metrics::counter!("starling_raft_leader_changes_total", "shard" => s.clone()),
            raft_snapshots: metrics::counter!("starling_raft_snapshots_total", "shard" => s.clone()),
            raft_conf_changes: metrics::counter!("starling_raft_conf_changes_total", "shard" => s.clone()),
        }
    }
}

fn rss_bytes() -> Option<f64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: f64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as f64;
    Some(pages * page)
}

/// What `/health` reports: the process is up and its shards and storage answer.
pub type HealthCheck = Arc<dyn Fn() -> bool + Send + Sync>;

/// The membership as JSON, kept by the cluster driver (empty on a single node).
pub type ClusterStatus = Arc<std::sync::Mutex<String>>;

/// The membership driver, once it runs (`POST /cluster/leave` asks it); `None` on a single
/// node and while the node starts.
pub type ClusterControl = Arc<std::sync::OnceLock<ractor::ActorRef<crate::cluster::driver::DriverMsg>>>;

/// What the listener serves.
#[derive(Clone)]
pub struct Endpoints {
    pub handle: PrometheusHandle,
    pub health: HealthCheck,
    pub cluster: ClusterStatus,
    pub slots: Option<crate::cluster::status::SlotTable>,
    pub control: ClusterControl,
}

/// `POST /cluster/leave` (`starling cluster leave`): only from this machine — the listener
/// has no authentication yet (the admin API with tokens is issue 23's), and a leave stops
/// the node.
async fn cluster_leave(control: &ClusterControl, peer: SocketAddr) -> (StatusCode, String) {
    if !peer.ip().is_loopback() {
        tracing::warn!(%peer, "POST /cluster/leave refused: not from this machine");
        return (
            StatusCode::FORBIDDEN,
            "cluster leave is accepted from this machine only (loopback)\n".into(),
        );
    }
    let Some(driver) = control.get() else {
        return (
            StatusCode::NOT_FOUND,
            "not a cluster member (cluster.node_name is empty), or still starting\n".into(),
        );
    };
    match ractor::call!(driver, crate::cluster::driver::DriverMsg::StartLeave) {
        Ok(Ok(())) => (
            StatusCode::ACCEPTED,
            "leaving: this node stops once its slots have moved to the others\n".into(),
        ),
        Ok(Err(e)) => (StatusCode::CONFLICT, format!("{e}\n")),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the membership driver did not answer: {e}\n"),
        ),
    }
}

async fn respond(
    req: Request<hyper::body::Incoming>,
    e: Endpoints,
    peer: SocketAddr,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let Endpoints {
        handle,
        health,
        cluster,
        slots,
        control,
    } = e;
    let text = |code: StatusCode, ctype: &str, body: String| {
        Response::builder()
            .status(code)
            .header("content-type", ctype)
            .body(Full::new(Bytes::from(body)))
            .expect("static response parts")
    };
    Ok(match (req.method().as_str(), req.uri().path()) {
        ("GET", "/metrics") => {
            if let Some(rss) = rss_bytes() {
                metrics::gauge!("process_resident_memory_bytes").set(rss);
            }
            handle.run_upkeep();
            text(StatusCode::OK, "text/plain; version=0.0.4", handle.render())
        }
        ("GET", "/health") => {
            if health() {
                text(StatusCode::OK, "text/plain", "ok\n".into())
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "unhealthy\n".into())
            }
        }
        ("GET", "/cluster") => {
            let json = cluster.lock().map(|s| s.clone()).unwrap_or_default();
            if json.is_empty() {
                text(
                    StatusCode::NOT_FOUND,
                    "text/plain",
                    "not a cluster member (cluster.node_name is empty)\n".into(),
                )
            } else {
                text(StatusCode::OK, "application/json", json)
            }
        }
        ("GET", "/cluster/slots") => match &slots {
            Some(t) => text(
                StatusCode::OK,
                "application/json",
                crate::cluster::status::slots_json(t),
            ),
            None => text(
                StatusCode::NOT_FOUND,
                "text/plain",
                "not a cluster member (cluster.node_name is empty)\n".into(),
            ),
        },
        ("POST", "/cluster/leave") => {
            let (code, body) = cluster_leave(&control, peer).await;
            text(code, "text/plain", body)
        }
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    })
}

/// Serves until the task is dropped. Runs on the control-plane (tokio) thread.
pub async fn serve(listener: tokio::net::TcpListener, endpoints: Endpoints) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let e = endpoints.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| respond(req, e.clone(), peer));
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await
            {
                tracing::debug!(error = %e, "metrics connection error");
            }
        });
    }
}

pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, String> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("metrics.listen {addr}: {e}"))
}
