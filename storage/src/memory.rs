use std::collections::BTreeMap;

use crate::{Account, OfflineMessage, RaftStored, RaftWrite, Result, Storage, UserData, Write};

#[derive(Clone, Debug, Default)]
struct State {
    accounts: BTreeMap<String, Account>,
    users: BTreeMap<String, UserData>,
    raft: BTreeMap<u32, RaftStored>,
}

/// In-memory storage with a durable part (what `flush` made durable) and a volatile part
/// (applied, not yet flushed). [`MemoryStorage::crash`] loses the volatile part, as a power cut
/// would: the simulator uses it to check that nothing acknowledged was unflushed.
#[derive(Clone, Debug, Default)]
pub struct MemoryStorage {
    durable: State,
    current: State,
}

impl MemoryStorage {
    pub fn new() -> Self {
        Self::default()
    }
    /// Forgets every write since the last flush.
    pub fn crash(&mut self) {
        self.current = self.durable.clone();
    }
}

fn apply_one(state: &mut State, w: &Write) {
    match w {
        Write::PutAccount { user, account } => {
            state.accounts.insert(user.clone(), account.clone());
        }
        Write::DeleteUser { user } => {
            state.accounts.remove(user);
            state.users.remove(user);
        }
        Write::PutRosterItem { user, item } => {
            let roster = &mut state.users.entry(user.clone()).or_default().roster;
            match roster.iter_mut().find(|i| i.jid == item.jid) {
                Some(old) => *old = item.clone(),
                None => roster.push(item.clone()),
            }
        }
        Write::DeleteRosterItem { user, contact } => {
            if let Some(u) = state.users.get_mut(user) {
                u.roster.retain(|i| &i.jid != contact);
            }
        }
        Write::SetRosterVer { user, ver } => {
            state.users.entry(user.clone()).or_default().roster_ver = *ver;
        }
        Write::PushOffline { user, msg } => {
            state.users.entry(user.clone()).or_default().offline.push(msg.clone());
        }
        Write::DeleteOffline { user, upto } => {
            if let Some(u) = state.users.get_mut(user) {
                u.offline.retain(|m| m.seq > *upto);
            }
        }
        Write::SetAsideOffline { user, seq } => {
            if let Some(u) = state.users.get_mut(user) {
                if let Some(i) = u.offline.iter().position(|m| m.seq == *seq) {
                    let m = u.offline.remove(i);
                    u.unreadable.push(m);
                }
            }
        }
        Write::NextVersion { user, base } => {
            state.users.entry(user.clone()).or_default().version = base + 1;
        }
        Write::SetVersion { user, version } => {
            state.users.entry(user.clone()).or_default().version = *version;
        }
        Write::NoAccount { .. } => {}
    }
}

impl Storage for MemoryStorage {
    fn account(&self, user: &str) -> Result<Option<Account>> {
        Ok(self.current.accounts.get(user).cloned())
    }
    fn create_account(&mut self, user: &str, account: &Account) -> Result<bool> {
        if self.current.accounts.contains_key(user) {
            return Ok(false);
        }
        self.current.accounts.insert(user.to_owned(), account.clone());
        Ok(true)
    }
    fn load_user(&self, user: &str) -> Result<UserData> {
        let mut data = self.current.users.get(user).cloned().unwrap_or_default();
        data.roster.sort_by(|a, b| a.jid.cmp(&b.jid));
        Ok(data)
    }
    fn apply(&mut self, writes: &[Write]) -> Result<()> {
        if let Some(user) = crate::absent_conditions(writes).find(|u| self.current.accounts.contains_key(*u)) {
            return Err(crate::StorageError::Exists(user.to_string()));
        }
        for (user, base) in crate::version_conditions(writes) {
            let have = self.current.users.get(user).map_or(0, |u| u.version);
            if have != base {
                return Err(crate::StorageError::Conflict {
                    user: user.to_string(),
                    have,
                    base,
                });
            }
        }
        for w in writes {
            apply_one(&mut self.current, w);
        }
        Ok(())
    }
    fn flush(&mut self) -> Result<()> {
        self.durable = self.current.clone();
        Ok(())
    }
    fn raft_slots(&self) -> Result<Vec<u32>> {
        Ok(self.current.raft.keys().copied().collect())
    }
    fn raft_stored(&self, slot: u32) -> Result<Option<RaftStored>> {
        Ok(self.current.raft.get(&slot).cloned())
    }
    fn raft_write(&mut self, w: &RaftWrite) -> Result<()> {
        self.current.raft.entry(w.slot).or_default().write(w);
        Ok(())
    }
    fn apply_committed(&mut self, slot: u32, index: u64, writes: &[Write]) -> Result<()> {
        let r = self.apply(writes);
        if let Err(e) = &r {
            if !matches!(e, crate::StorageError::Conflict { .. } | crate::StorageError::Exists(_)) {
                return r;
            }
        }
        self.current.raft.entry(slot).or_default().applied = index;
        r
    }
    fn install_slot(&mut self, slot: u32, index: u64, in_slot: &dyn Fn(&str) -> bool, writes: &[Write]) -> Result<()> {
        let gone: Vec<String> = self.current.accounts.keys().filter(|u| in_slot(u)).cloned().collect();
        for user in gone {
            apply_one(&mut self.current, &Write::DeleteUser { user });
        }
        self.current.users.retain(|u, _| !in_slot(u));
        for w in writes {
            apply_one(&mut self.current, w);
        }
        self.current.raft.entry(slot).or_default().applied = index;
        Ok(())
    }
    fn list_accounts(&self) -> Result<Vec<String>> {
        Ok(self.current.accounts.keys().cloned().collect())
    }
    fn offline_total(&self) -> u64 {
        self.current.users.values().map(|u| u.offline.len() as u64).sum()
    }
    fn unreadable_total(&self) -> u64 {
        self.current.users.values().map(|u| u.unreadable.len() as u64).sum()
    }
    fn unreadable(&self) -> Result<Vec<(String, OfflineMessage)>> {
        Ok(self
            .current
            .users
            .iter()
            .flat_map(|(u, d)| d.unreadable.iter().map(move |m| (u.clone(), m.clone())))
            .collect())
    }
}
