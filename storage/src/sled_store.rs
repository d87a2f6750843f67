//! sled key layout (one tree each, keys are UTF-8 bare JIDs):
//! - `accounts`: `user` → postcard(Account)
//! - `roster`:   `user \0 contact` → postcard(RosterItem)
//! - `meta`:     `rver \0 user` → u64 big-endian (roster version); `wver \0 user` → u64
//!   big-endian (write version, see `UserData::version`)
//! - `offline`:  `user \0 seq(u64 BE)` → postcard(OfflineMessage); BE keeps them in order
//! - `unreadable`: same keys and values as `offline`: stored stanzas that could not be parsed
//!   back when they were to be delivered, set aside (`Write::SetAsideOffline`) for the
//!   operator (`starling user unreadable`) rather than deleted
//! - `raft`: each slot's Raft group (`crate::raft_log`): `l slot(u32 BE) index(u64 BE)` →
//!   log entry, `s slot` → state, `a slot` → applied index (u64 BE), all as the caller
//!   encodes them; an entry's writes and the applied index commit in one transaction
//!
//! Batches are atomic: `apply` works out a batch's changes to every tree (reading through
//! what is pending and what the batch itself changed) and adds them to the pending changes;
//! `flush` — and any read, so reads see every applied write — commits everything pending in
//! one sled transaction, then fsyncs. A crash leaves each batch whole or absent, and one
//! transaction per group commit, not per batch, keeps the cost of atomicity small (a sled
//! transaction costs about 150 µs; measured in BENCHMARKS.md, "Storage").
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::Path;

use serde::{de::DeserializeOwned, Serialize};

use crate::{
    Account, OfflineMessage, RaftStored, RaftWrite, Result, RosterItem, Storage, StorageError, UserData, Write,
};

pub struct SledStorage {
    db: sled::Db,
    accounts: sled::Tree,
    roster: sled::Tree,
    meta: sled::Tree,
    offline: sled::Tree,
    unreadable: sled::Tree,
    raft: sled::Tree,
    /// Applied and not yet committed (see the module's doc). A `RefCell`: reads (`&self`)
    /// commit it first. Only the storage thread uses a store.
    pending: RefCell<Changes>,
    /// Entries in `offline` and `unreadable`, pending ones included (counted at open).
    offline_count: u64,
    unreadable_count: u64,
}

/// Per tree: key → new value (`None`: removed).
type Changes = [BTreeMap<Vec<u8>, Option<Vec<u8>>>; TREES];

/// The trees in the order of [`Overlay`]'s slots and of the commit's transaction.
const ACCOUNTS: usize = 0;
const ROSTER: usize = 1;
const META: usize = 2;
const OFFLINE: usize = 3;
const UNREADABLE: usize = 4;
const RAFT: usize = 5;
const TREES: usize = 6;

/// One batch's changes, over what is pending, over the trees. Reads go through all three,
/// so a write sees what earlier writes of its batch and earlier batches did.
struct Overlay<'a> {
    trees: [&'a sled::Tree; TREES],
    pending: &'a Changes,
    changes: Changes,
}

impl<'a> Overlay<'a> {
    fn new(trees: [&'a sled::Tree; TREES], pending: &'a Changes) -> Self {
        Overlay {
            trees,
            pending,
            changes: Default::default(),
        }
    }

    /// The value before this batch.
    fn before(&self, t: usize, key: &[u8]) -> Result<Option<Vec<u8>>> {
        match self.pending[t].get(key) {
            Some(v) => Ok(v.clone()),
            None => Ok(self.trees[t].get(key).map_err(backend)?.map(|v| v.to_vec())),
        }
    }

    fn get(&self, t: usize, key: &[u8]) -> Result<Option<Vec<u8>>> {
        match self.changes[t].get(key) {
            Some(v) => Ok(v.clone()),
            None => self.before(t, key),
        }
    }

    fn put(&mut self, t: usize, key: Vec<u8>, value: Vec<u8>) {
        self.changes[t].insert(key, Some(value));
    }

    fn remove(&mut self, t: usize, key: Vec<u8>) {
        self.changes[t].insert(key, None);
    }

    /// Keys present in `lo..=hi` of tree `t`, the batch's changes included.
    fn keys_in(&self, t: usize, lo: &[u8], hi: &[u8]) -> Result<Vec<Vec<u8>>> {
        let mut keys: std::collections::BTreeSet<Vec<u8>> = std::collections::BTreeSet::new();
        for kv in self.trees[t].range(lo..=hi) {
            keys.insert(kv.map_err(backend)?.0.to_vec());
        }
        for layer in [self.pending, &self.changes] {
            for (k, v) in layer[t].range(lo.to_vec()..=hi.to_vec()) {
                if v.is_some() {
                    keys.insert(k.clone());
                } else {
                    keys.remove(k);
                }
            }
        }
        Ok(keys.into_iter().collect())
    }

    /// Keys of tree `t` under `user`'s prefix.
    fn user_keys(&self, t: usize, user: &str) -> Result<Vec<Vec<u8>>> {
        let lo = prefix(user);
        let mut hi = user.as_bytes().to_vec();
        hi.push(1);
        let mut keys = self.keys_in(t, &lo, &hi)?;
        keys.retain(|k| k.as_slice() != hi.as_slice());
        Ok(keys)
    }

    /// How many entries tree `t` gains (or loses) with this batch.
    fn count_delta(&self, t: usize) -> Result<i64> {
        let mut d = 0i64;
        for (k, v) in &self.changes[t] {
            let before = self.before(t, k)?.is_some();
            d += i64::from(v.is_some()) - i64::from(before);
        }
        Ok(d)
    }
}

/// Commits `changes` in one transaction over the trees they touch (one tree: sled's own
/// atomic batch, which is cheaper).
fn commit(trees_all: [&sled::Tree; TREES], changes: Changes) -> Result<()> {
    {
        use sled::Transactional;
        let mut trees: Vec<&sled::Tree> = Vec::with_capacity(TREES);
        let mut batches: Vec<sled::Batch> = Vec::with_capacity(TREES);
        for (t, c) in changes.into_iter().enumerate() {
            if c.is_empty() {
                continue;
            }
            let mut b = sled::Batch::default();
            for (k, v) in c {
                match v {
                    Some(v) => b.insert(k, v),
                    None => b.remove(k),
                }
            }
            trees.push(trees_all[t]);
            batches.push(b);
        }
        match trees.len() {
            0 => Ok(()),
            1 => trees[0].apply_batch(batches.pop().expect("one batch")).map_err(backend),
            _ => trees
                .as_slice()
                .transaction(|trees| {
                    for (t, b) in trees.iter().zip(&batches) {
                        t.apply_batch(b)?;
                    }
                    Ok::<(), sled::transaction::ConflictableTransactionError<()>>(())
                })
                .map_err(|e| StorageError::Backend(format!("transaction: {e:?}"))),
        }
    }
}

fn apply_count(count: &mut u64, delta: i64) {
    *count = count.saturating_add_signed(delta);
}

fn backend(e: sled::Error) -> StorageError {
    StorageError::Backend(e.to_string())
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).expect("postcard encoding of plain structs cannot fail")
}

fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T> {
    postcard::from_bytes(bytes).map_err(|e| StorageError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    })
}

fn prefix(user: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(user.len() + 1);
    k.extend_from_slice(user.as_bytes());
    k.push(0);
    k
}

fn roster_key(user: &str, contact: &str) -> Vec<u8> {
    let mut k = prefix(user);
    k.extend_from_slice(contact.as_bytes());
    k
}

fn offline_key(user: &str, seq: u64) -> Vec<u8> {
    let mut k = prefix(user);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn ver_key(user: &str) -> Vec<u8> {
    let mut k = b"rver\0".to_vec();
    k.extend_from_slice(user.as_bytes());
    k
}

fn wver_key(user: &str) -> Vec<u8> {
    let mut k = b"wver\0".to_vec();
    k.extend_from_slice(user.as_bytes());
    k
}

fn raft_key(kind: u8, slot: u32) -> Vec<u8> {
    let mut k = vec![kind];
    k.extend_from_slice(&slot.to_be_bytes());
    k
}

fn log_key(slot: u32, index: u64) -> Vec<u8> {
    let mut k = raft_key(b'l', slot);
    k.extend_from_slice(&index.to_be_bytes());
    k
}

fn be_u64(key: &[u8], v: &[u8]) -> Result<u64> {
    let bytes: [u8; 8] = v.try_into().map_err(|_| StorageError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: "not 8 bytes".into(),
    })?;
    Ok(u64::from_be_bytes(bytes))
}

fn read_u64(tree: &sled::Tree, key: &[u8], what: &str) -> Result<u64> {
    match tree.get(key).map_err(backend)? {
        None => Ok(0),
        Some(v) => {
            let bytes: [u8; 8] = v.as_ref().try_into().map_err(|_| StorageError::Corrupt {
                key: String::from_utf8_lossy(key).into_owned(),
                reason: format!("{what} is not 8 bytes"),
            })?;
            Ok(u64::from_be_bytes(bytes))
        }
    }
}

impl SledStorage {
    /// Opens (or creates) the store under `dir`. A store held by a running server is reported as
    /// [`StorageError::Locked`].
    pub fn open(dir: &Path) -> Result<Self> {
        // No periodic flusher: every write batch is flushed explicitly (group commit) before
        // it is acknowledged, and the flusher thread keeps the database (and its file lock)
        // alive for up to its interval after drop, so an immediate reopen failed as "in use".
        let db = sled::Config::new()
            .path(dir)
            .flush_every_ms(None)
            .open()
            .map_err(|e| match e {
                sled::Error::Io(ref io) if io.kind() == std::io::ErrorKind::WouldBlock => {
                    StorageError::Locked(dir.display().to_string())
                }
                sled::Error::Io(ref io) if io.to_string().contains("could not acquire lock") => {
                    StorageError::Locked(dir.display().to_string())
                }
                other => backend(other),
            })?;
        let tree = |name: &str| db.open_tree(name).map_err(backend);
        let offline = tree("offline")?;
        let unreadable = tree("unreadable")?;
        Ok(Self {
            accounts: tree("accounts")?,
            roster: tree("roster")?,
            meta: tree("meta")?,
            offline_count: offline.len() as u64,
            offline,
            unreadable_count: unreadable.len() as u64,
            unreadable,
            raft: tree("raft")?,
            pending: RefCell::new(Default::default()),
            db,
        })
    }

    /// One batch's changes over `pending`, and how many offline and unreadable records it
    /// adds; nothing when a condition does not hold. Checked before anything is staged: a
    /// refused batch leaves no trace. The storage thread is the only writer.
    fn stage(&self, writes: &[Write], pending: &Changes) -> Result<(Changes, i64, i64)> {
        for user in crate::absent_conditions(writes) {
            let o = Overlay::new(self.trees(), pending);
            if o.get(ACCOUNTS, user.as_bytes())?.is_some() {
                return Err(StorageError::Exists(user.to_string()));
            }
        }
        for (user, base) in crate::version_conditions(writes) {
            let o = Overlay::new(self.trees(), pending);
            let have = match o.get(META, &wver_key(user))? {
                None => 0,
                Some(v) => u64::from_be_bytes(v.as_slice().try_into().map_err(|_| StorageError::Corrupt {
                    key: format!("wver/{user}"),
                    reason: "write version is not 8 bytes".into(),
                })?),
            };
            if have != base {
                return Err(StorageError::Conflict {
                    user: user.to_string(),
                    have,
                    base,
                });
            }
        }
        let mut o = Overlay::new(self.trees(), pending);
        for w in writes {
            match w {
                Write::PutAccount { user, account } => o.put(ACCOUNTS, user.as_bytes().to_vec(), encode(account)),
                Write::DeleteUser { user } => {
                    o.remove(ACCOUNTS, user.as_bytes().to_vec());
                    for t in [ROSTER, OFFLINE, UNREADABLE] {
                        for k in o.user_keys(t, user)? {
                            o.remove(t, k);
                        }
                    }
                    o.remove(META, ver_key(user));
                    o.remove(META, wver_key(user));
                }
                Write::NextVersion { user, base } => o.put(META, wver_key(user), (base + 1).to_be_bytes().to_vec()),
                Write::SetVersion { user, version } => o.put(META, wver_key(user), version.to_be_bytes().to_vec()),
                Write::NoAccount { .. } => {}
                Write::PutRosterItem { user, item } => o.put(ROSTER, roster_key(user, &item.jid), encode(item)),
                Write::DeleteRosterItem { user, contact } => o.remove(ROSTER, roster_key(user, contact)),
                Write::SetRosterVer { user, ver } => o.put(META, ver_key(user), ver.to_be_bytes().to_vec()),
                Write::PushOffline { user, msg } => o.put(OFFLINE, offline_key(user, msg.seq), encode(msg)),
                Write::DeleteOffline { user, upto } => {
                    for k in o.keys_in(OFFLINE, &offline_key(user, 0), &offline_key(user, *upto))? {
                        o.remove(OFFLINE, k);
                    }
                }
                Write::SetAsideOffline { user, seq } => {
                    let k = offline_key(user, *seq);
                    if let Some(v) = o.get(OFFLINE, &k)? {
                        o.remove(OFFLINE, k.clone());
                        o.put(UNREADABLE, k, v);
                    }
                }
            }
        }
        let (offline, unreadable) = (o.count_delta(OFFLINE)?, o.count_delta(UNREADABLE)?);
        Ok((o.changes, offline, unreadable))
    }

    fn trees(&self) -> [&sled::Tree; TREES] {
        [
            &self.accounts,
            &self.roster,
            &self.meta,
            &self.offline,
            &self.unreadable,
            &self.raft,
        ]
    }

    /// Adds a staged batch to what is pending.
    fn merge(&mut self, (changes, offline, unreadable): (Changes, i64, i64)) {
        let pending = self.pending.get_mut();
        for (t, c) in changes.into_iter().enumerate() {
            pending[t].extend(c);
        }
        apply_count(&mut self.offline_count, offline);
        apply_count(&mut self.unreadable_count, unreadable);
    }

    /// `stage` with the slot's applied index set to `index` in the same changes.
    fn stage_applied(&self, slot: u32, index: u64, writes: &[Write]) -> Result<(Changes, i64, i64)> {
        let pending = self.pending.borrow();
        let mut staged = self.stage(writes, &pending)?;
        staged.0[RAFT].insert(raft_key(b'a', slot), Some(index.to_be_bytes().to_vec()));
        Ok(staged)
    }

    /// Commits what is pending (before a read, and at `flush`).
    fn commit_pending(&self) -> Result<()> {
        let changes = std::mem::take(&mut *self.pending.borrow_mut());
        if changes.iter().all(BTreeMap::is_empty) {
            return Ok(());
        }
        commit(self.trees(), changes)
    }
}

impl Drop for SledStorage {
    fn drop(&mut self) {
        if let Err(e) = self.commit_pending() {
            eprintln!("storage: applied writes could not be committed at close: {e}");
        }
    }
}

impl Storage for SledStorage {
    fn account(&self, user: &str) -> Result<Option<Account>> {
        self.commit_pending()?;
        match self.accounts.get(user.as_bytes()).map_err(backend)? {
            Some(v) => Ok(Some(decode(user.as_bytes(), &v)?)),
            None => Ok(None),
        }
    }

    fn create_account(&mut self, user: &str, account: &Account) -> Result<bool> {
        self.commit_pending()?;
        let swapped = self
            .accounts
            .compare_and_swap(user.as_bytes(), None::<&[u8]>, Some(encode(account)))
            .map_err(backend)?;
        Ok(swapped.is_ok())
    }

    fn load_user(&self, user: &str) -> Result<UserData> {
        self.commit_pending()?;
        let p = prefix(user);
        let mut data = UserData::default();
        for kv in self.roster.scan_prefix(&p) {
            let (k, v) = kv.map_err(backend)?;
            let item = match decode::<RosterItem>(&k, &v) {
                Ok(item) => item,
                Err(e) => RosterItem::decode_legacy(&v).ok_or(e)?,
            };
            data.roster.push(item);
        }
        for kv in self.offline.scan_prefix(&p) {
            let (k, v) = kv.map_err(backend)?;
            data.offline.push(decode::<OfflineMessage>(&k, &v)?);
        }
        for kv in self.unreadable.scan_prefix(&p) {
            let (k, v) = kv.map_err(backend)?;
            data.unreadable.push(decode::<OfflineMessage>(&k, &v)?);
        }
        if let Some(v) = self.meta.get(ver_key(user)).map_err(backend)? {
            let bytes: [u8; 8] = v.as_ref().try_into().map_err(|_| StorageError::Corrupt {
                key: format!("rver/{user}"),
                reason: "roster version is not 8 bytes".into(),
            })?;
            data.roster_ver = u64::from_be_bytes(bytes);
        }
        data.version = read_u64(&self.meta, &wver_key(user), "write version")?;
        Ok(data)
    }

    fn apply(&mut self, writes: &[Write]) -> Result<()> {
        let staged = self.stage(writes, &self.pending.borrow())?;
        self.merge(staged);
        Ok(())
    }

    fn raft_slots(&self) -> Result<Vec<u32>> {
        self.commit_pending()?;
        let mut out = Vec::new();
        for kv in self.raft.scan_prefix(b"s") {
            let (k, _) = kv.map_err(backend)?;
            let slot: [u8; 4] = k[1..].try_into().map_err(|_| StorageError::Corrupt {
                key: String::from_utf8_lossy(&k).into_owned(),
                reason: "raft state key is not a slot".into(),
            })?;
            out.push(u32::from_be_bytes(slot));
        }
        Ok(out)
    }

    fn raft_stored(&self, slot: u32) -> Result<Option<RaftStored>> {
        self.commit_pending()?;
        let state = self.raft.get(raft_key(b's', slot)).map_err(backend)?;
        let applied = self.raft.get(raft_key(b'a', slot)).map_err(backend)?;
        if state.is_none() && applied.is_none() {
            return Ok(None);
        }
        let mut out = RaftStored {
            state: state.map(|v| v.to_vec()).unwrap_or_default(),
            entries: Vec::new(),
            applied: match applied {
                Some(v) => be_u64(&raft_key(b'a', slot), &v)?,
                None => 0,
            },
        };
        for kv in self.raft.scan_prefix(raft_key(b'l', slot)) {
            let (k, v) = kv.map_err(backend)?;
            out.entries.push((be_u64(&k, &k[5..])?, v.to_vec()));
        }
        Ok(Some(out))
    }

    fn raft_write(&mut self, w: &RaftWrite) -> Result<()> {
        let mut changes = {
            let pending = self.pending.borrow();
            let mut o = Overlay::new(self.trees(), &pending);
            let (lo, hi) = (log_key(w.slot, 0), log_key(w.slot, u64::MAX));
            let drop_from = |o: &mut Overlay<'_>, lo: &[u8], hi: &[u8]| -> Result<()> {
                for k in o.keys_in(RAFT, lo, hi)? {
                    o.remove(RAFT, k);
                }
                Ok(())
            };
            if w.clear {
                drop_from(&mut o, &lo, &hi)?;
            }
            if let Some(below) = w.compact_below.filter(|b| *b > 0) {
                drop_from(&mut o, &lo, &log_key(w.slot, below - 1))?;
            }
            if let Some((first, _)) = w.entries.first() {
                drop_from(&mut o, &log_key(w.slot, *first), &hi)?;
            }
            for (i, e) in &w.entries {
                o.put(RAFT, log_key(w.slot, *i), e.clone());
            }
            if let Some(s) = &w.state {
                o.put(RAFT, raft_key(b's', w.slot), s.clone());
            }
            o.changes
        };
        let pending = self.pending.get_mut();
        pending[RAFT].append(&mut changes[RAFT]);
        Ok(())
    }

    fn apply_committed(&mut self, slot: u32, index: u64, writes: &[Write]) -> Result<()> {
        match self.stage_applied(slot, index, writes) {
            Ok(staged) => {
                self.merge(staged);
                Ok(())
            }
            Err(e @ (StorageError::Conflict { .. } | StorageError::Exists(_))) => {
                let staged = self.stage_applied(slot, index, &[])?;
                self.merge(staged);
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    fn install_slot(&mut self, slot: u32, index: u64, in_slot: &dyn Fn(&str) -> bool, writes: &[Write]) -> Result<()> {
        let mut all: Vec<Write> = self
            .list_accounts()?
            .into_iter()
            .filter(|u| in_slot(u))
            .map(|user| Write::DeleteUser { user })
            .collect();
        all.extend(writes.iter().cloned());
        let staged = self.stage_applied(slot, index, &all)?;
        self.merge(staged);
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        self.commit_pending()?;
        self.db.flush().map_err(backend)?;
        Ok(())
    }

    fn offline_total(&self) -> u64 {
        self.offline_count
    }

    fn unreadable_total(&self) -> u64 {
        self.unreadable_count
    }

    fn unreadable(&self) -> Result<Vec<(String, OfflineMessage)>> {
        self.commit_pending()?;
        let mut out = Vec::new();
        for kv in self.unreadable.iter() {
            let (k, v) = kv.map_err(backend)?;
            let user = k.split(|b| *b == 0).next().unwrap_or(&[]);
            out.push((String::from_utf8_lossy(user).into_owned(), decode(&k, &v)?));
        }
        Ok(out)
    }

    fn list_accounts(&self) -> Result<Vec<String>> {
        self.commit_pending()?;
        let mut out = Vec::new();
        for kv in self.accounts.iter() {
            let (k, _) = kv.map_err(backend)?;
            out.push(String::from_utf8_lossy(&k).into_owned());
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ScramCreds, Subscription};

    fn account() -> Account {
        let c = ScramCreds {
            salt: vec![1],
            iterations: 1,
            stored_key: vec![2],
            server_key: vec![3],
        };
        Account {
            sha1: c.clone(),
            sha256: c,
        }
    }

    #[test]
    fn data_survives_reopen_and_second_open_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = SledStorage::open(dir.path()).unwrap();
            assert!(s.create_account("a@x", &account()).unwrap());
            assert!(!s.create_account("a@x", &account()).unwrap());
            let item = RosterItem {
                jid: "b@x".into(),
                subscription: Subscription::Both,
                in_roster: true,
                ..Default::default()
            };
            let msg = |seq| OfflineMessage {
                seq,
                stamp_unix_ms: 5,
                xml: format!("<m{seq}/>"),
            };
            s.apply(&[
                Write::PutRosterItem {
                    user: "a@x".into(),
                    item,
                },
                Write::SetRosterVer {
                    user: "a@x".into(),
                    ver: 7,
                },
                Write::PushOffline {
                    user: "a@x".into(),
                    msg: msg(1),
                },
                Write::PushOffline {
                    user: "a@x".into(),
                    msg: msg(2),
                },
                Write::PushOffline {
                    user: "a@x".into(),
                    msg: msg(300),
                },
                Write::DeleteOffline {
                    user: "a@x".into(),
                    upto: 1,
                },
            ])
            .unwrap();
            assert_eq!(s.offline_total(), 2, "three pushed, one deleted");
            s.flush().unwrap();
            assert!(matches!(SledStorage::open(dir.path()), Err(StorageError::Locked(_))));
        }
        let mut s = SledStorage::open(dir.path()).unwrap();
        assert_eq!(s.offline_total(), 2, "counted again on open");
        let d = s.load_user("a@x").unwrap();
        assert_eq!(d.roster_ver, 7);
        assert_eq!(d.roster[0].subscription, Subscription::Both);
        assert_eq!(d.offline.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![2, 300]);
        assert_eq!(s.list_accounts().unwrap(), vec!["a@x".to_string()]);
        // A user whose name is a prefix of another's must not see the other's data.
        assert!(s.load_user("a@").unwrap().offline.is_empty());
        s.apply(&[Write::DeleteUser { user: "a@x".into() }]).unwrap();
        assert_eq!(s.offline_total(), 0);
    }

    #[test]
    fn memory_crash_loses_only_unflushed_writes() {
        let mut m = crate::MemoryStorage::new();
        m.create_account("a@x", &account()).unwrap();
        m.flush().unwrap();
        m.apply(&[Write::SetRosterVer {
            user: "a@x".into(),
            ver: 3,
        }])
        .unwrap();
        m.crash();
        assert!(m.account("a@x").unwrap().is_some());
        assert_eq!(m.load_user("a@x").unwrap().roster_ver, 0);
    }

    #[test]
    fn write_versions_count_batches_and_go_with_the_user() {
        let dir = tempfile::tempdir().unwrap();
        let sled = SledStorage::open(dir.path()).unwrap();
        let stores: Vec<Box<dyn Storage>> = vec![Box::new(sled), Box::new(crate::MemoryStorage::new())];
        for mut s in stores {
            let next = |base| Write::NextVersion {
                user: "a@x".into(),
                base,
            };
            let item = |jid: &str| Write::PutRosterItem {
                user: "a@x".into(),
                item: RosterItem {
                    jid: jid.into(),
                    ..Default::default()
                },
            };
            assert_eq!(s.load_user("a@x").unwrap().version, 0);
            s.apply(&[item("b@x"), next(0)]).unwrap();
            s.apply(&[next(1)]).unwrap();
            assert_eq!(s.load_user("a@x").unwrap().version, 2);
            // A batch for another base is refused whole: its roster item is not written.
            match s.apply(&[item("c@x"), next(1)]) {
                Err(StorageError::Conflict { have: 2, base: 1, .. }) => {}
                other => panic!("expected a conflict, got {other:?}"),
            }
            let data = s.load_user("a@x").unwrap();
            assert_eq!((data.version, data.roster.len()), (2, 1));
            s.apply(&[Write::SetVersion {
                user: "a@x".into(),
                version: 10,
            }])
            .unwrap();
            assert_eq!(s.load_user("a@x").unwrap().version, 10);
            assert_eq!(s.load_user("b@x").unwrap().version, 0, "per user");
            s.apply(&[Write::DeleteUser { user: "a@x".into() }]).unwrap();
            assert_eq!(s.load_user("a@x").unwrap().version, 0);
            assert_eq!(next(0).user(), "a@x");
        }
    }

    #[test]
    fn raft_logs_are_kept_per_slot_and_applied_with_their_index() {
        let dir = tempfile::tempdir().unwrap();
        let sled = SledStorage::open(dir.path()).unwrap();
        let stores: Vec<Box<dyn Storage>> = vec![Box::new(sled), Box::new(crate::MemoryStorage::new())];
        for mut s in stores {
            let e = |i: u64, t: &str| (i, format!("{t}{i}").into_bytes());
            let w = |entries: Vec<(u64, Vec<u8>)>| RaftWrite {
                slot: 3,
                entries,
                state: Some(b"hs".to_vec()),
                ..Default::default()
            };
            assert_eq!(s.raft_stored(3).unwrap(), None);
            s.raft_write(&w(vec![e(1, "a"), e(2, "a"), e(3, "a")])).unwrap();
            // A new leader's entries replace the tail from their first index on.
            s.raft_write(&w(vec![e(2, "b")])).unwrap();
            s.raft_write(&RaftWrite {
                slot: 9,
                entries: vec![e(1, "z")],
                state: Some(b"other".to_vec()),
                ..Default::default()
            })
            .unwrap();
            let got = s.raft_stored(3).unwrap().unwrap();
            assert_eq!(got.entries, vec![e(1, "a"), e(2, "b")]);
            assert_eq!((got.state.as_slice(), got.applied), (&b"hs"[..], 0));
            assert_eq!(s.raft_slots().unwrap(), vec![3, 9]);
            s.raft_write(&RaftWrite {
                slot: 3,
                compact_below: Some(2),
                entries: vec![e(3, "c")],
                ..Default::default()
            })
            .unwrap();
            assert_eq!(s.raft_stored(3).unwrap().unwrap().entries, vec![e(2, "b"), e(3, "c")]);
            // An entry's writes and its index together; a refused batch still moves the index.
            let next = |base| Write::NextVersion {
                user: "a@x".into(),
                base,
            };
            s.apply_committed(3, 2, &[next(0)]).unwrap();
            assert!(matches!(
                s.apply_committed(3, 3, &[next(0)]),
                Err(StorageError::Conflict { .. })
            ));
            assert_eq!(s.raft_stored(3).unwrap().unwrap().applied, 3);
            assert_eq!(s.load_user("a@x").unwrap().version, 1);
            assert_eq!(
                s.raft_stored(9).unwrap().unwrap().entries,
                vec![e(1, "z")],
                "slots apart"
            );
            s.raft_write(&RaftWrite {
                slot: 3,
                clear: true,
                ..Default::default()
            })
            .unwrap();
            assert!(s.raft_stored(3).unwrap().unwrap().entries.is_empty());
        }
    }

    #[test]
    fn a_slot_state_is_taken_and_installed_whole() {
        let dir = tempfile::tempdir().unwrap();
        let sled = SledStorage::open(dir.path()).unwrap();
        let stores: Vec<Box<dyn Storage>> = vec![Box::new(sled), Box::new(crate::MemoryStorage::new())];
        let in_slot = |u: &str| u.starts_with('a');
        for mut s in stores {
            for u in ["a1@x", "a2@x", "b@x"] {
                s.create_account(u, &account()).unwrap();
                s.apply(&[
                    Write::SetRosterVer { user: u.into(), ver: 4 },
                    Write::NextVersion {
                        user: u.into(),
                        base: 0,
                    },
                ])
                .unwrap();
            }
            let state = s.slot_state(&in_slot).unwrap();
            assert!(state.iter().all(|w| w.user().starts_with('a')), "{state:?}");
            let mut other = crate::MemoryStorage::new();
            other.create_account("a3@x", &account()).unwrap();
            other.create_account("b@x", &account()).unwrap();
            other.install_slot(1, 40, &in_slot, &state).unwrap();
            assert_eq!(
                other.list_accounts().unwrap(),
                vec!["a1@x".to_string(), "a2@x".into(), "b@x".into()],
                "a3 was not in the snapshot, b is not in the slot"
            );
            let d = other.load_user("a2@x").unwrap();
            assert_eq!((d.roster_ver, d.version), (4, 1));
            assert_eq!(other.raft_stored(1).unwrap().unwrap().applied, 40);
            // And into sled, over what it has.
            s.install_slot(1, 41, &in_slot, &state[..state.len() / 2]).unwrap();
            assert_eq!(s.raft_stored(1).unwrap().unwrap().applied, 41);
        }
    }

    #[test]
    fn raft_writes_are_durable_only_after_a_flush() {
        let dir = tempfile::tempdir().unwrap();
        let w = RaftWrite {
            slot: 0,
            entries: vec![(1, b"x".to_vec())],
            state: Some(b"s".to_vec()),
            ..Default::default()
        };
        {
            let mut s = SledStorage::open(dir.path()).unwrap();
            s.raft_write(&w).unwrap();
            s.apply_committed(0, 1, &[]).unwrap();
            s.flush().unwrap();
        }
        let s = SledStorage::open(dir.path()).unwrap();
        let got = s.raft_stored(0).unwrap().unwrap();
        assert_eq!((got.entries.len(), got.applied), (1, 1));
        let mut m = crate::MemoryStorage::new();
        m.raft_write(&w).unwrap();
        m.crash();
        assert_eq!(m.raft_stored(0).unwrap(), None);
    }
}
