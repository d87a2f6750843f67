use serde::{Deserialize, Serialize};

/// SCRAM credentials for one hash function (RFC 5802): what the server stores instead of a
/// password.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScramCreds {
    pub salt: Vec<u8>,
    pub iterations: u32,
    pub stored_key: Vec<u8>,
    pub server_key: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub sha1: ScramCreds,
    pub sha256: ScramCreds,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Subscription {
    #[default]
    None,
    To,
    From,
    Both,
}

impl Subscription {
    pub fn as_str(self) -> &'static str {
        match self {
            Subscription::None => "none",
            Subscription::To => "to",
            Subscription::From => "from",
            Subscription::Both => "both",
        }
    }
    /// The user receives the contact's presence.
    pub fn has_to(self) -> bool {
        matches!(self, Subscription::To | Subscription::Both)
    }
    /// The contact receives the user's presence.
    pub fn has_from(self) -> bool {
        matches!(self, Subscription::From | Subscription::Both)
    }
}

/// One roster entry with the full RFC 6121 subscription state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RosterItem {
    pub jid: String,
    pub name: Option<String>,
    pub groups: Vec<String>,
    pub subscription: Subscription,
    /// We asked the contact for a subscription ("Pending Out").
    pub ask_out: bool,
    /// The contact asked us and we have not answered ("Pending In").
    pub pending_in: bool,
    /// Pre-approved subscription (RFC 6121 §3.4).
    pub approved: bool,
    /// False for an entry that only records an inbound request from someone not on the roster:
    /// such entries are never shown to the client as roster items.
    pub in_roster: bool,
    /// The contact's subscription request while it is pending in, as it came (RFC 6121
    /// §3.1.3: the complete stanza, extended content such as a pre-authentication token
    /// included), serialised in the jabber:client namespace; delivered when the user next
    /// comes online. Last, so that records written before it existed still decode
    /// ([`RosterItem::decode_legacy`]).
    pub pending_stanza: Option<String>,
}

/// The layout of [`RosterItem`] before `pending_stanza`.
#[derive(Deserialize)]
struct RosterItemV0 {
    jid: String,
    name: Option<String>,
    groups: Vec<String>,
    subscription: Subscription,
    ask_out: bool,
    pending_in: bool,
    approved: bool,
    in_roster: bool,
}

impl RosterItem {
    /// Decodes a record of the layout before `pending_stanza` (postcard has no field names:
    /// the old layout is one field short).
    pub fn decode_legacy(bytes: &[u8]) -> Option<RosterItem> {
        let o: RosterItemV0 = postcard::from_bytes(bytes).ok()?;
        Some(RosterItem {
            jid: o.jid,
            name: o.name,
            groups: o.groups,
            subscription: o.subscription,
            ask_out: o.ask_out,
            pending_in: o.pending_in,
            approved: o.approved,
            in_roster: o.in_roster,
            pending_stanza: None,
        })
    }
}

/// A message kept for an offline user (XEP-0160), with its arrival time for XEP-0203.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfflineMessage {
    pub seq: u64,
    pub stamp_unix_ms: u64,
    /// The stanza as serialised XML in the jabber:client namespace.
    pub xml: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct UserData {
    pub roster: Vec<RosterItem>,
    pub roster_ver: u64,
    pub offline: Vec<OfflineMessage>,
    /// Offline messages set aside because they could not be read back
    /// (`Write::SetAsideOffline`): kept for the operator, never delivered.
    pub unreadable: Vec<OfflineMessage>,
    /// How many write batches the user's state has had (`Write::NextVersion`): in a cluster,
    /// a copy with a lower version is stale and a handoff may replace it.
    pub version: u64,
}

impl UserData {
    /// The whole state of `user` (this data and its account) as writes that recreate it
    /// elsewhere (cluster handoff and read repair); the version travels beside them.
    pub fn into_writes(self, user: &str, account: Account) -> Vec<Write> {
        let u = user.to_string();
        let mut w = vec![Write::PutAccount {
            user: u.clone(),
            account,
        }];
        w.extend(
            self.roster
                .into_iter()
                .map(|item| Write::PutRosterItem { user: u.clone(), item }),
        );
        w.push(Write::SetRosterVer {
            user: u.clone(),
            ver: self.roster_ver,
        });
        w.extend(
            self.offline
                .into_iter()
                .map(|msg| Write::PushOffline { user: u.clone(), msg }),
        );
        for msg in self.unreadable {
            let seq = msg.seq;
            w.push(Write::PushOffline { user: u.clone(), msg });
            w.push(Write::SetAsideOffline { user: u.clone(), seq });
        }
        w
    }
}

/// One write. Batches of writes are applied in order. Serde: batches travel to replicas.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Write {
    PutAccount {
        user: String,
        account: Account,
    },
    /// Removes the account and everything stored for it.
    DeleteUser {
        user: String,
    },
    PutRosterItem {
        user: String,
        item: RosterItem,
    },
    DeleteRosterItem {
        user: String,
        contact: String,
    },
    SetRosterVer {
        user: String,
        ver: u64,
    },
    PushOffline {
        user: String,
        msg: OfflineMessage,
    },
    /// Removes offline messages with `seq <= upto`.
    DeleteOffline {
        user: String,
        upto: u64,
    },
    /// Moves the offline message `seq` out of the queue into the unreadable records: it
    /// could not be parsed back, so it is kept for the operator instead of being deleted
    /// with the messages delivered around it.
    SetAsideOffline {
        user: String,
        seq: u64,
    },
    /// One more batch for this user, on condition: the whole batch applies only if the
    /// user's version is `base` (it then becomes `base + 1`), else nothing of it does and
    /// `apply` fails with [`crate::StorageError::Conflict`]. The cluster appends it to every
    /// replicated batch, so a copy that missed or diverged from the owner's history refuses
    /// the next batch instead of applying it on a different base.
    NextVersion {
        user: String,
        base: u64,
    },
    /// The version of a whole state handed to this node.
    SetVersion {
        user: String,
        version: u64,
    },
    /// A condition: the whole batch applies only if `user` has no account, else nothing of it
    /// does and `apply` fails with [`crate::StorageError::Exists`] (an account created through
    /// the replicated log: "create if absent", decided where it is applied).
    NoAccount {
        user: String,
    },
}

/// The users a batch requires to have no account (its `NoAccount` writes).
pub fn absent_conditions(writes: &[Write]) -> impl Iterator<Item = &str> {
    writes.iter().filter_map(|w| match w {
        Write::NoAccount { user } => Some(user.as_str()),
        _ => None,
    })
}

/// The conditions of a batch (its `NextVersion` writes) as `(user, base)`.
pub fn version_conditions(writes: &[Write]) -> impl Iterator<Item = (&str, u64)> {
    writes.iter().filter_map(|w| match w {
        Write::NextVersion { user, base } => Some((user.as_str(), *base)),
        _ => None,
    })
}

impl Write {
    /// The user whose state this write changes.
    pub fn user(&self) -> &str {
        match self {
            Write::PutAccount { user, .. }
            | Write::DeleteUser { user }
            | Write::PutRosterItem { user, .. }
            | Write::DeleteRosterItem { user, .. }
            | Write::SetRosterVer { user, .. }
            | Write::PushOffline { user, .. }
            | Write::DeleteOffline { user, .. }
            | Write::SetAsideOffline { user, .. }
            | Write::NextVersion { user, .. }
            | Write::SetVersion { user, .. }
            | Write::NoAccount { user } => user,
        }
    }
}
