//! The membership driver: a ractor actor on the control-plane thread that hosts the sans-io
//! [`Membership`] — it owns the UDP socket, turns foca's timer requests into tokio sleeps, and
//! pushes every membership change to every shard. It also keeps the JSON that `/cluster`
//! (and so `starling cluster status`) shows, and runs `starling cluster leave`
//! (`DriverMsg::StartLeave`): it gossips that this node leaves, looks at the slots its shards
//! host once a tick (`starling_actors::system::leave`), and once they have all moved says
//! goodbye and asks the process to stop.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::Serialize;
use starling_actors::system::leave::{self, Leave, Step};
use starling_gossip::{Change, MemberState, Membership, NodeIdentity, Output, Ring, Timer, Timings};

use super::Members;

/// Datagrams larger than this are not gossip (foca's packets are ≤ 1400 bytes).
const MAX_DATAGRAM: usize = 2048;
/// How often the driver checks whether it is alone (and re-announces to the seeds),
/// refreshes the status, and (leaving) looks at the slots still hosted.
const TICK: Duration = Duration::from_secs(1);

pub enum DriverMsg {
    Packet(Vec<u8>),
    Timer(Timer<NodeIdentity>),
    Tick,
    /// A clean shutdown: tell the others, then answer.
    Leave(RpcReplyPort<()>),
    /// `starling cluster leave`: start decommissioning this node; refused (with the reason)
    /// when no other member stays. Asking again while leaving is not an error.
    StartLeave(RpcReplyPort<Result<(), String>>),
}

pub struct DriverArgs {
    pub me: NodeIdentity,
    pub seeds: Vec<String>,
    pub shards: Vec<flume::Sender<()>>,
    pub latest: Arc<Mutex<Members>>,
    pub status: Arc<Mutex<String>>,
    /// The slots this node's shards host (`/cluster/slots`): a leave waits for it to empty.
    pub slot_table: super::status::SlotTable,
    /// Told once a leave has finished: the process stops (`cli::serve`).
    pub stop: Arc<tokio::sync::Notify>,
}

pub struct DriverState {
    membership: Membership,
    socket: Arc<tokio::net::UdpSocket>,
    shards: Vec<flume::Sender<()>>,
    latest: Arc<Mutex<Members>>,
    status: Arc<Mutex<String>>,
    recv_task: tokio::task::JoinHandle<()>,
    slot_table: super::status::SlotTable,
    stop: Arc<tokio::sync::Notify>,
    /// A leave under way.
    leave: Option<Leave>,
    /// Goodbye said (a finished leave, or the shutdown's): not said twice.
    left: bool,
}

pub struct Driver;

#[derive(Serialize)]
struct StatusMember {
    name: String,
    gossip: String,
    transport: String,
    generation: u64,
    state: MemberState,
    /// Decommissioning (`cluster leave`): off the ring, its slots moving away.
    leaving: bool,
    /// Share of user keys this member owns, estimated over sample keys.
    ring_share: f64,
}

#[derive(Serialize)]
struct Status {
    node: String,
    members: Vec<StatusMember>,
}

/// The fraction of keys each member owns, over 10,000 sample keys (rendezvous hashing has
/// no token table to read shares from).
fn shares(ring: &Ring) -> Vec<(String, f64)> {
    const SAMPLES: usize = 10_000;
    let mut counts: std::collections::BTreeMap<&str, usize> = ring.members().iter().map(|m| (m.as_str(), 0)).collect();
    for i in 0..SAMPLES {
        let key = format!("user{i}@sample");
        if let Some(o) = ring.owner(key.as_bytes()) {
            *counts.entry(o).or_default() += 1;
        }
    }
    counts
        .into_iter()
        .map(|(m, c)| (m.to_string(), c as f64 / SAMPLES as f64))
        .collect()
}

impl DriverState {
    async fn carry(&mut self, me: &ActorRef<DriverMsg>, out: Output) {
        for (to, data) in out.send {
            match to.parse::<SocketAddr>() {
                Ok(addr) => {
                    if let Err(e) = self.socket.send_to(data.as_slice(), addr).await {
                        tracing::debug!(%addr, error = %e, "gossip: send failed");
                    }
                }
                Err(_) => tracing::warn!(to, "gossip: member with a bad address"),
            }
        }
        for (after, timer) in out.timers {
            let me = me.clone();
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                let _ = me.cast(DriverMsg::Timer(timer));
            });
        }
        if out.rejoined {
            tracing::warn!("cluster: this node was declared down and rejoined; closing its sessions");
        }
        if !out.changes.is_empty() || out.rejoined {
            for c in &out.changes {
                match c {
                    Change::Up(id) => tracing::info!(node = %id.name, generation = id.generation, "cluster: member up"),
                    Change::Down(id) => {
                        tracing::warn!(node = %id.name, generation = id.generation, "cluster: member down")
                    }
                    Change::Leaving(id) => {
                        tracing::info!(node = %id.name, "cluster: member leaving (its slots move to the others)")
                    }
                }
            }
            let members: Members = Arc::new(super::MemberList {
                up: self.membership.up(),
                leaving: self.membership.leaving().into_iter().collect(),
            });
            *self.latest.lock().expect("members lock") = members.clone();
            for tx in &self.shards {
                // A wake-up, bounded at 1: when one is already pending the shard will read
                // the latest membership anyway.
                let _ = tx.try_send(());
            }
            metrics::gauge!("starling_cluster_members").set(members.up.len() as f64);
            self.refresh_status();
        }
    }

    fn refresh_status(&self) {
        let ring = self.membership.ring();
        let shares = shares(&ring);
        let leaving = self.membership.leaving();
        let members = self
            .membership
            .members()
            .into_iter()
            .map(|(id, state)| StatusMember {
                ring_share: shares
                    .iter()
                    .find(|(n, _)| *n == id.name)
                    .map(|(_, s)| *s)
                    .unwrap_or(0.0),
                leaving: leaving.contains(&id.name),
                name: id.name,
                gossip: id.gossip,
                transport: id.transport,
                generation: id.generation,
                state,
            })
            .collect();
        let status = Status {
            node: self.membership.me().name.clone(),
            members,
        };
        if let Ok(json) = serde_json::to_string_pretty(&status) {
            *self.status.lock().expect("status lock") = json;
        }
    }
}

impl DriverState {
    fn start_leave(&mut self) -> Result<Output, String> {
        if self.leave.is_some() {
            return Ok(Output::default());
        }
        if self.left {
            return Err("this node is stopping".into());
        }
        leave::may_start(&self.membership.ring(), &self.membership.me().name).map_err(|e| e.to_string())?;
        tracing::warn!("cluster leave: this node leaves the cluster once its slots have moved to the others");
        self.leave = Some(Leave::new());
        Ok(self.membership.start_leaving())
    }

    /// A tick while leaving: once the shards have hosted no slot for long enough, goodbye,
    /// and the process stops.
    fn look(&mut self) -> Option<Output> {
        let l = self.leave.as_mut()?;
        if self.left {
            return None;
        }
        let hosted = self.slot_table.lock().map(|t| t.len()).unwrap_or(usize::MAX);
        match l.look(hosted) {
            Step::Wait { hosted, .. } => {
                tracing::info!(hosted, "cluster leave: waiting for this node's slots to move");
                None
            }
            Step::Stop => {
                tracing::warn!("cluster leave: no slot is hosted here any more; leaving the membership and stopping");
                self.left = true;
                self.stop.notify_one();
                Some(self.membership.leave())
            }
        }
    }
}

impl Actor for Driver {
    type Msg = DriverMsg;
    type State = DriverState;
    type Arguments = DriverArgs;

    async fn pre_start(&self, me: ActorRef<DriverMsg>, args: DriverArgs) -> Result<DriverState, ActorProcessingErr> {
        let addr: SocketAddr = args.me.gossip.parse()?;
        let socket = Arc::new(
            tokio::net::UdpSocket::bind(addr)
                .await
                .map_err(|e| format!("cluster.gossip {addr}: {e}"))?,
        );
        let rx = socket.clone();
        let tx = me.clone();
        let recv_task = tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            loop {
                match rx.recv_from(&mut buf).await {
                    Ok((n, _)) => {
                        if tx.cast(DriverMsg::Packet(buf[..n].to_vec())).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "gossip: receive failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        });
        let seed = args.me.generation ^ xxhash_rust::xxh3::xxh3_64(args.me.name.as_bytes());
        let membership = Membership::new(args.me, args.seeds, &Timings::default(), seed);
        let mut state = DriverState {
            membership,
            socket,
            shards: args.shards,
            latest: args.latest,
            status: args.status,
            recv_task,
            slot_table: args.slot_table,
            stop: args.stop,
            leave: None,
            left: false,
        };
        let out = state.membership.join();
        state.carry(&me, out).await;
        state.refresh_status();
        me.send_interval(TICK, || DriverMsg::Tick);
        tracing::info!(gossip = %addr, "cluster: gossip listening");
        Ok(state)
    }

    async fn handle(
        &self,
        me: ActorRef<DriverMsg>,
        msg: DriverMsg,
        state: &mut DriverState,
    ) -> Result<(), ActorProcessingErr> {
        let out = match msg {
            DriverMsg::Packet(p) => state.membership.handle_data(&p),
            DriverMsg::Timer(t) => state.membership.handle_timer(t),
            DriverMsg::Tick => {
                if let Some(out) = state.look() {
                    state.carry(&me, out).await;
                }
                state.refresh_status();
                state.membership.tick()
            }
            DriverMsg::Leave(reply) => {
                if !state.left {
                    state.left = true;
                    let out = state.membership.leave();
                    state.carry(&me, out).await;
                }
                let _ = reply.send(());
                return Ok(());
            }
            DriverMsg::StartLeave(reply) => {
                match state.start_leave() {
                    Ok(out) => {
                        state.carry(&me, out).await;
                        state.refresh_status();
                        let _ = reply.send(Ok(()));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cluster leave refused");
                        let _ = reply.send(Err(e));
                    }
                }
                return Ok(());
            }
        };
        state.carry(&me, out).await;
        Ok(())
    }

    async fn post_stop(&self, _me: ActorRef<DriverMsg>, state: &mut DriverState) -> Result<(), ActorProcessingErr> {
        state.recv_task.abort();
        Ok(())
    }
}
