//! The control plane, on ractor (its own tokio thread; nothing on a shard calls tokio):
//! the supervisor starts the storage service and the shards, and stops them in order on
//! shutdown — shards first (clients get `system-shutdown`), then storage (final flush).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use glommio::channels::channel_mesh::MeshBuilder;
use glommio::{LocalExecutorBuilder, Placement};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use starling_storage::SledStorage;

use crate::shard::{self, ShardParams};
use crate::storage_thread::{self, StorageHandle, StorageReq};

pub struct StorageService;

pub struct StorageState {
    thread: Option<JoinHandle<()>>,
    tx: flume::Sender<StorageReq>,
}

impl Actor for StorageService {
    type Msg = ();
    type State = StorageState;
    type Arguments = (
        SledStorage,
        flume::Sender<StorageReq>,
        flume::Receiver<StorageReq>,
        Arc<AtomicBool>,
    );

    async fn pre_start(
        &self,
        _me: ActorRef<()>,
        (store, tx, rx, alive): Self::Arguments,
    ) -> Result<StorageState, ActorProcessingErr> {
        alive.store(true, Ordering::Relaxed);
        let thread = std::thread::Builder::new().name("storage".into()).spawn(move || {
            storage_thread::run(store, rx);
            alive.store(false, Ordering::Relaxed);
        })?;
        Ok(StorageState {
            thread: Some(thread),
            tx,
        })
    }

    async fn post_stop(&self, _me: ActorRef<()>, state: &mut StorageState) -> Result<(), ActorProcessingErr> {
        let _ = state.tx.send_async(StorageReq::Shutdown).await;
        if let Some(t) = state.thread.take() {
            tokio::task::spawn_blocking(move || t.join())
                .await?
                .map_err(|_| "storage thread panicked")?;
        }
        Ok(())
    }
}

pub enum SupervisorMsg {
    Shutdown(RpcReplyPort<()>),
}

pub struct Supervisor;

/// A running shard: its stop signal and the thread that joins its executor.
type ShardHandle = (flume::Sender<()>, JoinHandle<()>);

pub struct SupervisorState {
    shards: Vec<ShardHandle>,
    storage: ActorRef<()>,
}

/// Liveness the health endpoint reads: shards still running, storage thread still running.
#[derive(Clone, Default)]
pub struct Liveness {
    pub shards_alive: Arc<AtomicUsize>,
    pub storage_alive: Arc<AtomicBool>,
}

pub struct SupervisorArgs {
    pub live: Liveness,
    pub store: SledStorage,
    pub params: ShardParams,
    pub storage_tx: flume::Sender<StorageReq>,
    pub storage_rx: flume::Receiver<StorageReq>,
}

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        me: ActorRef<SupervisorMsg>,
        args: SupervisorArgs,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        let (storage, _) = Actor::spawn_linked(
            Some("storage".into()),
            StorageService,
            (
                args.store,
                args.storage_tx.clone(),
                args.storage_rx,
                args.live.storage_alive.clone(),
            ),
            me.get_cell(),
        )
        .await?;
        let mut params = args.params;
        params.storage = StorageHandle::new(args.storage_tx);
        let n = params.shards;
        let alive = args.live.shards_alive.clone();
        let shards = tokio::task::spawn_blocking(move || start_shards(params, n, alive)).await??;
        Ok(SupervisorState { shards, storage })
    }

    async fn handle(
        &self,
        _me: ActorRef<SupervisorMsg>,
        msg: SupervisorMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Shutdown(reply) => {
                tracing::info!("shutting down: stopping shards");
                let shards = std::mem::take(&mut state.shards);
                for (stop, _) in &shards {
                    let _ = stop.send(());
                }
                tokio::task::spawn_blocking(move || {
                    for (_, t) in shards {
                        let _ = t.join();
                    }
                })
                .await?;
                tracing::info!("shards stopped; flushing storage");
                state.storage.stop_and_wait(None, Some(Duration::from_secs(30))).await?;
                let _ = reply.send(());
            }
        }
        Ok(())
    }
}

/// Starts one pinned glommio executor per shard and waits until each listens.
fn start_shards(params: ShardParams, n: usize, alive: Arc<AtomicUsize>) -> Result<Vec<ShardHandle>, String> {
    let mesh = (n > 1).then(|| MeshBuilder::full(n, starling_actors::system::limits::MESH_CAPACITY));
    // The shards' work for one another's slots (raft messages, account operations).
    let calls = (n > 1).then(|| MeshBuilder::full(n, starling_actors::system::limits::MESH_CAPACITY));
    let cpus = std::thread::available_parallelism().map(|c| c.get()).unwrap_or(1);
    let (ready_tx, ready_rx) = flume::unbounded();
    let mut shards = Vec::with_capacity(n);
    for i in 0..n {
        let (stop_tx, stop_rx) = flume::bounded(1);
        let p = params.clone();
        let m = mesh.clone();
        let c = calls.clone();
        let ready = ready_tx.clone();
        let spawn = |placement: Placement| {
            let (p, m, c, stop_rx, ready) = (p.clone(), m.clone(), c.clone(), stop_rx.clone(), ready.clone());
            LocalExecutorBuilder::new(placement)
                .name(&format!("shard-{i}"))
                .spawn(move || shard::run(p, m, c, stop_rx, ready))
        };
        let handle = spawn(Placement::Fixed(i % cpus))
            .or_else(|_| spawn(Placement::Unbound))
            .map_err(|e| {
                format!(
                    "cannot start shard {i}: {e}. glommio needs io_uring (blocked by Docker's default \
                     seccomp profile) and RLIMIT_MEMLOCK of at least 512 KiB"
                )
            })?;
        alive.fetch_add(1, Ordering::Relaxed);
        let alive = alive.clone();
        let thread = std::thread::spawn(move || {
            if let Err(e) = handle.join() {
                tracing::error!(shard = i, error = %e, "shard ended with an error");
            }
            alive.fetch_sub(1, Ordering::Relaxed);
        });
        shards.push((stop_tx, thread));
    }
    for _ in 0..n {
        match ready_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err("a shard did not start within 30 s".into()),
        }
    }
    Ok(shards)
}
