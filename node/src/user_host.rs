//! Hosts user actors on a shard: one task per active user with a bounded mailbox. The task
//! loads the user's state, feeds messages to the sans-io actor, and carries out its effects in
//! order — a persist is awaited (durable) before the messages that depend on it are sent. A
//! panic in the actor ends that actor only: its sessions get a stream error.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;

use jid::BareJid;
use starling_actors::msg::{Envelope, UserMsg};
use starling_actors::system::life::{self, Ending, NotStarted};
use starling_actors::user::{Effect, UserActor};

use crate::shard::{Mailbox, Origin, Shard, Timed};

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Creates the mailbox for `jid` and starts its actor.
pub fn activate(shard: &Rc<Shard>, jid: BareJid) -> Mailbox<UserMsg> {
    let (tx, rx) = flume::bounded(shard.mailbox);
    shard.users.borrow_mut().insert(jid.clone(), tx.clone());
    shard.metrics.user_actors.increment(1.0);
    let s = shard.clone();
    glommio::spawn_local(async move {
        run(s.clone(), jid, rx).await;
        s.metrics.user_actors.decrement(1.0);
    })
    .detach();
    tx
}

async fn run(shard: Rc<Shard>, jid: BareJid, rx: flume::Receiver<Timed<UserMsg>>) {
    let loaded = async {
        if shard.in_cluster() {
            shard.pull_newest(jid.as_str()).await?;
        }
        shard
            .storage
            .load_user(jid.to_string())
            .await
            .map_err(|e| e.to_string())
    };
    let (exists, data) = match loaded.await {
        Ok(x) => x,
        Err(e) => {
            tracing::error!(user = %jid, error = %e, "cannot load user; failing its messages");
            shard.users.borrow_mut().remove(&jid);
            while let Ok(t) = rx.try_recv() {
                fail(&shard, &jid, t.msg);
            }
            return;
        }
    };
    if !data.offline.is_empty() {
        shard.metrics.offline_at_load.record(data.offline.len() as f64);
    }
    // The version of this actor's state in storage: its batches are written on that base.
    let mut version = data.version;
    let mut actor = UserActor::new(jid.clone(), exists, data, shard.user_cfg.clone());
    while let Ok(Timed { at, msg }) = rx.recv_async().await {
        shard.metrics.route.record(at.elapsed().as_secs_f64());
        tracing::trace!(user = %jid, ?msg, "user actor input");
        let started = std::time::Instant::now();
        let now = now_ms();
        let effects = match catch_unwind(AssertUnwindSafe(|| actor.handle(msg, now))) {
            Ok(fx) => fx,
            Err(_) => {
                tracing::error!(user = %jid, "user actor panicked; ending it and its sessions");
                shard.users.borrow_mut().remove(&jid);
                for env in life::ended(&jid, actor.sessions(), Ending::Panicked) {
                    shard.route(env);
                }
                return;
            }
        };
        // What the failed writes' actors asked to send instead (`Effect::Persist::failed`).
        let mut instead: Vec<Envelope> = Vec::new();
        let mut write_failed = false;
        for fx in effects {
            match fx {
                Effect::Send(env) => shard.route_wait(env, Origin::Actor).await,
                // After a failed write, later ones would build on what is not stored.
                Effect::Persist { failed, .. } if write_failed => instead.extend(failed),
                Effect::Persist { writes, then, failed } => {
                    match shard.write_replicated(jid.as_str(), writes, Some(version)).await {
                        Ok(()) => {
                            version += 1;
                            for e in then {
                                shard.route_wait(e, Origin::Actor).await;
                            }
                        }
                        Err(e) => {
                            // Nothing that depended on the write is claimed.
                            tracing::error!(user = %jid, error = %e, "write failed; ending the actor");
                            shard.metrics.user_write_failures.increment(1);
                            write_failed = true;
                            instead.extend(failed);
                        }
                    }
                }
            }
        }
        shard.metrics.user_handle.record(started.elapsed().as_secs_f64());
        if write_failed {
            // Its memory is now ahead of its storage: end it, so that the next incarnation
            // reloads what is durable (found by the simulator: a roster item in memory only
            // was shown to the client, then missing after a reconnect).
            return end_after_failed_write(&shard, &jid, &actor, &rx, instead);
        }
        // Idle and nothing queued: let go; the durable state reloads on the next message.
        let queued = shard.users.borrow().get(&jid).map(|tx| tx.len()).unwrap_or(0);
        if actor.is_idle() && queued == 0 {
            tracing::trace!(user = %jid, "user actor idle; dropped");
            shard.users.borrow_mut().remove(&jid);
            return;
        }
    }
}

/// Ends an actor whose write failed: its sessions are closed (their clients reconnect), the
/// next incarnation learns they are gone, what the actor asked to send instead goes (an
/// inbound subscription stanza to the next incarnation among it), then what was queued, in
/// order.
fn end_after_failed_write(
    shard: &Rc<Shard>,
    jid: &BareJid,
    actor: &UserActor,
    rx: &flume::Receiver<Timed<UserMsg>>,
    instead: Vec<Envelope>,
) {
    shard.users.borrow_mut().remove(jid);
    for env in life::ended(jid, actor.sessions(), Ending::WriteFailed) {
        shard.route(env);
    }
    for env in instead {
        match life::delay_ms(&env) {
            0 => shard.route(env),
            ms => {
                let s = shard.clone();
                glommio::spawn_local(async move {
                    glommio::timer::sleep(std::time::Duration::from_millis(ms)).await;
                    s.route(env);
                })
                .detach();
            }
        }
    }
    while let Ok(t) = rx.try_recv() {
        shard.route(Envelope::to_user(jid.clone(), t.msg));
    }
}

fn fail(shard: &Rc<Shard>, jid: &BareJid, m: UserMsg) {
    match life::not_started(jid, m) {
        NotStarted::Send(env) => shard.route(env),
        NotStarted::Bounce(env) => shard.undeliverable(env, "internal-server-error"),
        NotStarted::Nothing => {}
    }
}
