//! The storage thread: sled behind the `Storage` trait, off the shards. Shards send requests
//! over a bounded channel and await replies. Writes are group-committed: the thread applies
//! every write request it has queued, flushes once, and only then answers them.

use futures::channel::oneshot;
use starling_actors::system::commit::GroupCommit;
use starling_storage::{Account, RaftWrite, Storage, StorageError, UserData, Write};

pub type Reply<T> = oneshot::Sender<Result<T, StorageError>>;

pub enum StorageReq {
    Account {
        user: String,
        reply: Reply<Option<Account>>,
    },
    CreateAccount {
        user: String,
        account: Account,
        reply: Reply<bool>,
    },
    /// Whether the account exists, and the user's data.
    LoadUser {
        user: String,
        reply: Reply<(bool, UserData)>,
    },
    Write {
        writes: Vec<Write>,
        reply: Reply<()>,
    },
    /// A slot's Raft log write: answered once durable (group commit), as a `Write`.
    RaftLog {
        w: RaftWrite,
        reply: Reply<()>,
    },
    /// Committed entries of a slot applied in order (`Storage::apply_committed`), each with
    /// its verdict; answered at once (the log has them: no flush is waited for).
    RaftApply {
        slot: u32,
        entries: Vec<(u64, Vec<Write>)>,
        reply: Reply<Vec<Result<(), StorageError>>>,
    },
    /// The data of one slot (`Storage::slot_state`), for a snapshot.
    SlotState {
        slot: u32,
        slots: u32,
        reply: Reply<Vec<Write>>,
    },
    /// A snapshot installed (`Storage::install_slot`); answered at once (the log write after
    /// it waits for the flush that covers both).
    Install {
        slot: u32,
        slots: u32,
        index: u64,
        writes: Vec<Write>,
        reply: Reply<()>,
    },
    Shutdown,
}

#[derive(Clone)]
pub struct StorageHandle {
    tx: flume::Sender<StorageReq>,
}

/// Requests queued toward the storage thread before senders wait (backpressure).
pub const QUEUE: usize = starling_actors::system::limits::STORAGE_QUEUE;

impl StorageHandle {
    pub fn new(tx: flume::Sender<StorageReq>) -> Self {
        StorageHandle { tx }
    }

    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> StorageReq) -> Result<T, StorageError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send_async(make(tx))
            .await
            .map_err(|_| StorageError::Backend("storage thread has stopped".into()))?;
        rx.await
            .map_err(|_| StorageError::Backend("storage thread dropped the request".into()))?
    }

    pub async fn account(&self, user: String) -> Result<Option<Account>, StorageError> {
        self.ask(|reply| StorageReq::Account { user, reply }).await
    }
    pub async fn create_account(&self, user: String, account: Account) -> Result<bool, StorageError> {
        self.ask(|reply| StorageReq::CreateAccount { user, account, reply })
            .await
    }
    pub async fn load_user(&self, user: String) -> Result<(bool, UserData), StorageError> {
        self.ask(|reply| StorageReq::LoadUser { user, reply }).await
    }
    /// Returns once the writes are durable.
    pub async fn write(&self, writes: Vec<Write>) -> Result<(), StorageError> {
        self.ask(|reply| StorageReq::Write { writes, reply }).await
    }

    /// Queues a request without waiting for its answer, in the order of the calls (the
    /// replicated state's storage calls: `Shard::protocol_act`).
    pub async fn send(&self, req: StorageReq) -> Result<(), StorageError> {
        self.tx
            .send_async(req)
            .await
            .map_err(|_| StorageError::Backend("storage thread has stopped".into()))
    }
}

/// Who waits for a flush.
enum Waiter {
    Ack(Reply<()>),
    Created(Reply<bool>, bool),
}

impl Waiter {
    fn answer(self, flushed: &Result<(), StorageError>) {
        let failed = |e: &StorageError| StorageError::Backend(e.to_string());
        match self {
            Waiter::Ack(r) => {
                let _ = r.send(flushed.as_ref().map(|_| ()).map_err(failed));
            }
            Waiter::Created(r, c) => {
                let _ = r.send(flushed.as_ref().map(|_| c).map_err(failed));
            }
        }
    }
}

/// Runs until `Shutdown` or until every sender is gone; flushes before returning. Writes are
/// group-committed by the rule both hosts share (`starling_actors::system::commit`).
pub fn run(mut store: impl Storage, rx: flume::Receiver<StorageReq>) {
    let mut commit: GroupCommit<Waiter> = GroupCommit::default();
    let mut stop = false;
    let offline = metrics::gauge!("starling_offline_messages");
    offline.set(store.offline_total() as f64);
    let unreadable = metrics::gauge!("starling_offline_unreadable");
    unreadable.set(store.unreadable_total() as f64);
    while !stop {
        let Ok(first) = rx.recv() else { break };
        let mut next = Some(first);
        // Take whatever else is queued: one flush covers them all.
        while let Some(req) = next.take().or_else(|| rx.try_recv().ok()) {
            match req {
                StorageReq::Account { user, reply } => {
                    let _ = reply.send(store.account(&user));
                }
                StorageReq::LoadUser { user, reply } => {
                    let r = store
                        .account(&user)
                        .and_then(|a| Ok((a.is_some(), store.load_user(&user)?)));
                    let _ = reply.send(r);
                }
                StorageReq::CreateAccount { user, account, reply } => match store.create_account(&user, &account) {
                    Ok(c) => commit.after(Waiter::Created(reply, c)),
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                },
                StorageReq::Write { writes, reply } => {
                    if let Err((w, e)) = commit.write(&mut store, &writes, Waiter::Ack(reply)) {
                        tracing::error!(error = %e, "storage write failed");
                        w.answer(&Err(e));
                    }
                }
                StorageReq::RaftLog { w, reply } => match store.raft_write(&w) {
                    Ok(()) => commit.after(Waiter::Ack(reply)),
                    Err(e) => {
                        tracing::error!(error = %e, slot = w.slot, "raft log write failed");
                        let _ = reply.send(Err(e));
                    }
                },
                StorageReq::RaftApply { slot, entries, reply } => {
                    let r = entries
                        .iter()
                        .map(|(index, w)| store.apply_committed(slot, *index, w))
                        .collect();
                    let _ = reply.send(Ok(r));
                    // Applied entries wait for no flush (their log did): the gauges follow them
                    // here, or they would lag until some later write's flush.
                    offline.set(store.offline_total() as f64);
                    unreadable.set(store.unreadable_total() as f64);
                }
                StorageReq::SlotState { slot, slots, reply } => {
                    let in_slot = |u: &str| starling_actors::system::consensus::in_slot(u, slot, slots);
                    let _ = reply.send(store.slot_state(&in_slot));
                }
                StorageReq::Install {
                    slot,
                    slots,
                    index,
                    writes,
                    reply,
                } => {
                    let in_slot = |u: &str| starling_actors::system::consensus::in_slot(u, slot, slots);
                    let _ = reply.send(store.install_slot(slot, index, &in_slot, &writes));
                }
                StorageReq::Shutdown => stop = true,
            }
            if commit.waiting() >= starling_actors::system::limits::GROUP_COMMIT_MAX {
                break;
            }
        }
        while commit.start() {
            let started = std::time::Instant::now();
            let flushed = store.flush();
            let waiters = commit.flushed();
            metrics::histogram!("starling_storage_write_seconds").record(started.elapsed().as_secs_f64());
            metrics::histogram!("starling_storage_batch_size").record(waiters.len() as f64);
            if let Err(e) = &flushed {
                tracing::error!(error = %e, "storage flush failed; writes not acknowledged");
            }
            offline.set(store.offline_total() as f64);
            unreadable.set(store.unreadable_total() as f64);
            for w in waiters {
                w.answer(&flushed);
            }
        }
    }
    if let Err(e) = store.flush() {
        tracing::error!(error = %e, "final storage flush failed");
    }
    tracing::info!("storage thread stopped");
}
