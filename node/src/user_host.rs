//! Hosts user actors on a shard: one task per active user with a bounded mailbox. The task
//! loads the user's state, feeds messages to the sans-io actor, and carries out its effects in
//! order — a persist is awaited (durable) before the messages that depend on it are sent. A
//! panic in the actor ends that actor only: its sessions get a stream error.

use std::rc::Rc;

use jid::BareJid;
use starling_actors::system::life::{self, Ending};
use starling_actors::system::runner::{Runner, Step};
use starling_actors::user::UserActor;

use crate::shard::{since, Origin, Shard};

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Starts the actor of `jid`, whose mailbox the shard's core just created.
pub fn start(shard: &Rc<Shard>, jid: BareJid) {
    shard.metrics.user_actors.increment(1.0);
    let s = shard.clone();
    glommio::spawn_local(async move {
        run(s.clone(), jid).await;
        s.metrics.user_actors.decrement(1.0);
    })
    .detach();
}

async fn run(shard: Rc<Shard>, jid: BareJid) {
    // The membership when it started: after a change, its state may be stale (another node
    // may serve the user meanwhile), so it is not kept idle in memory past one.
    let born = shard.membership_changes();
    // A stale mark from before this incarnation is not for it.
    shard.take_stale(&jid);
    let loaded = async {
        // Everything committed in the user's slot is applied here first (a read index: a
        // single node's groups of one answer at once).
        shard.pull_newest(jid.as_str()).await?;
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
            return shard.not_started(&jid);
        }
    };
    if !data.offline.is_empty() {
        shard.metrics.offline_at_load.record(data.offline.len() as f64);
    }
    // The version of this actor's state in storage: its batches are written on that base.
    let data_version = data.version;
    let actor = UserActor::new(jid.clone(), exists, data, shard.user_cfg.clone());
    let mut runner = Runner::new(actor, data_version);
    // Idle since its last message (no sessions): let go once `passivate_after` passes
    // without another (the shard's core refuses while something is queued for it).
    let mut idle = false;
    loop {
        let next = if idle && !shard.passivate_after.is_zero() {
            // Or at once when the membership changes (then as soon as it is idle again
            // with nothing queued: what the change queued for it comes first).
            let since = shard.membership_changes();
            let wait = futures::future::select(
                Box::pin(glommio::timer::sleep(shard.passivate_after)),
                Box::pin(shard.membership_changed(&jid, since)),
            );
            match futures::future::select(Box::pin(shard.next_user_msg(&jid)), wait).await {
                futures::future::Either::Left((m, _)) => m,
                futures::future::Either::Right(_) => {
                    if shard.passivate(&jid) {
                        tracing::trace!(user = %jid, "user actor idle; dropped");
                        return;
                    }
                    continue;
                }
            }
        } else {
            shard.next_user_msg(&jid).await
        };
        let Some(t) = next else { return };
        shard.metrics.route.record(since(t.at));
        let msg = t.msg;
        if shard.take_stale(&jid) {
            // Another incarnation's write of this user was applied here (`Act::Stale`): this
            // state is older than the store's. The actor ends; the message goes to the next
            // incarnation, which reloads, and the sessions register with it.
            tracing::info!(user = %jid, "user actor's state is stale; ending it");
            let again = life::stale_again(&jid, msg);
            return shard.end_user(&jid, runner.actor().sessions(), Ending::Stale, again);
        }
        tracing::trace!(user = %jid, ?msg, "user actor input");
        let started = std::time::Instant::now();
        if runner.handle(msg, now_ms()).is_err() {
            tracing::error!(user = %jid, "user actor panicked; ending it and its sessions");
            return shard.end_user(&jid, runner.actor().sessions(), Ending::Panicked, Vec::new());
        }
        loop {
            match runner.step() {
                Step::Send(env) => shard.route_wait(env, Origin::Actor).await,
                Step::Persist { writes, base } => {
                    let ok = match shard.write_replicated(jid.as_str(), writes, Some(base)).await {
                        Ok(()) => true,
                        Err(e) => {
                            // Nothing that depended on the write is claimed.
                            tracing::error!(user = %jid, error = %e, "write failed; ending the actor");
                            shard.metrics.user_write_failures.increment(1);
                            false
                        }
                    };
                    for env in runner.persisted(ok) {
                        shard.route_wait(env, Origin::Actor).await;
                    }
                }
                Step::Waiting => {
                    // Cannot come: this task awaits every write before asking again.
                    debug_assert!(false, "a user actor asked to wait with no write in flight");
                    tracing::error!(user = %jid, "user actor asked to wait with no write in flight");
                    break;
                }
                Step::Done { idle: idle_now } => {
                    shard.metrics.user_handle.record(started.elapsed().as_secs_f64());
                    // Idle and nothing queued: let go (now, or after `passivate_after`); the
                    // durable state reloads on the next message.
                    let after = shard.passivate_after.as_millis() as u64;
                    let now = life::passivate_now(after, born, shard.membership_changes());
                    if idle_now && now && shard.passivate(&jid) {
                        tracing::trace!(user = %jid, "user actor idle; dropped");
                        return;
                    }
                    idle = idle_now;
                    break;
                }
                Step::End { sessions, instead, why } => {
                    // Its memory is now ahead of its storage: end it, so that the next
                    // incarnation reloads what is durable (found by the simulator: a roster
                    // item in memory only was shown to the client, then missing after a
                    // reconnect).
                    return shard.end_user(&jid, sessions, why, instead);
                }
            }
        }
    }
}
