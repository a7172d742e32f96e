//! Durable snapshot metadata in redb. Every change is one write transaction committed with
//! immediate durability, so a crash leaves either the old or the new state, never a mix.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{
    Database, MultimapTableDefinition, ReadableDatabase, ReadableMultimapTable, ReadableTable,
    TableDefinition, WriteTransaction,
};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Snapshot key → JSON [`Record`].
const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
/// Parent key → child keys (to refuse removing a parent, and to find children fast).
const CHILDREN: MultimapTableDefinition<&str, &str> = MultimapTableDefinition::new("children");
/// Counters; "next_id" is the id the next snapshot gets (ids are never reused).
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const NEXT_ID: &str = "next_id";

/// Parent chains longer than this are refused (overlayfs itself stops far earlier).
const MAX_CHAIN: usize = 4096;

/// The kind of a snapshot, as containerd defines it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    View,
    Active,
    Committed,
}

/// A point in time as seconds and nanoseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Time {
    pub secs: i64,
    pub nanos: u32,
}

impl Time {
    pub fn now() -> Time {
        let d = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Time {
            secs: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            nanos: d.subsec_nanos(),
        }
    }
}

/// What is stored per snapshot key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Names the snapshot's directory; kept across Commit.
    pub id: u64,
    pub kind: Kind,
    /// Key of the parent, empty for none.
    pub parent: String,
    pub created: Time,
    pub updated: Time,
    pub labels: BTreeMap<String, String>,
    /// Disk usage measured at Commit (zero before).
    pub size: i64,
    pub inodes: i64,
}

/// A record with its key and the ids of its ancestors, nearest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub key: String,
    pub record: Record,
    pub parent_ids: Vec<u64>,
}

/// Which label fields an update replaces.
#[derive(Debug, Clone)]
pub enum LabelUpdate {
    /// Replace all labels.
    All(BTreeMap<String, String>),
    /// Set (or, with no value, remove) just these labels.
    Keys(BTreeMap<String, Option<String>>),
}

/// The snapshots' metadata, in one redb database under the snapshotter's root.
pub struct Metadata {
    db: Database,
}

fn decode(key: &str, bytes: &[u8]) -> Result<Record> {
    serde_json::from_slice(bytes).map_err(|source| Error::Corrupt {
        key: key.to_string(),
        source,
    })
}

fn encode(record: &Record) -> Vec<u8> {
    // Serializing plain structs with string keys cannot fail.
    serde_json::to_vec(record).unwrap_or_default()
}

fn get_in<T: ReadableTable<&'static str, &'static [u8]>>(
    table: &T,
    key: &str,
) -> Result<Option<Record>> {
    match table
        .get(key)
        .map_err(Error::db("reading a snapshot record"))?
    {
        Some(v) => decode(key, v.value()).map(Some),
        None => Ok(None),
    }
}

/// The ids of `parent` and its ancestors, nearest first.
fn chain_in<T: ReadableTable<&'static str, &'static [u8]>>(
    table: &T,
    parent: &str,
) -> Result<Vec<u64>> {
    let mut ids = Vec::new();
    let mut next = parent.to_string();
    while !next.is_empty() {
        if ids.len() >= MAX_CHAIN {
            return Err(Error::InvalidArgument(format!(
                "parent chain of {parent} is longer than {MAX_CHAIN}"
            )));
        }
        let rec = get_in(table, &next)?.ok_or_else(|| Error::NotFound(next.clone()))?;
        ids.push(rec.id);
        next = rec.parent;
    }
    Ok(ids)
}

impl Metadata {
    /// Opens (or creates) the database file. redb locks it, so a second process fails here.
    pub fn open(path: &Path) -> Result<Metadata> {
        let db = Database::create(path).map_err(Error::db("opening the database"))?;
        let txn = db.begin_write().map_err(Error::db("starting a write"))?;
        {
            // Create the tables so that readers never see them missing.
            txn.open_table(SNAPSHOTS)
                .map_err(Error::db("creating tables"))?;
            txn.open_multimap_table(CHILDREN)
                .map_err(Error::db("creating tables"))?;
            txn.open_table(META).map_err(Error::db("creating tables"))?;
        }
        txn.commit()
            .map_err(Error::db("committing table creation"))?;
        Ok(Metadata { db })
    }

    fn write(&self) -> Result<WriteTransaction> {
        self.db
            .begin_write()
            .map_err(Error::db("starting a write transaction"))
    }

    /// Creates snapshot `key` (Active or View) on `parent` (a committed snapshot or "").
    /// `finish(id, parent_ids)` runs inside the transaction (e.g. to put the directory in
    /// place); if it fails nothing is recorded.
    pub fn create(
        &self,
        key: &str,
        parent: &str,
        kind: Kind,
        labels: BTreeMap<String, String>,
        finish: impl FnOnce(u64, &[u64]) -> Result<()>,
    ) -> Result<Snapshot> {
        if key.is_empty() {
            return Err(Error::InvalidArgument(
                "snapshot key must not be empty".into(),
            ));
        }
        if kind == Kind::Committed {
            return Err(Error::InvalidArgument(
                "new snapshots are active or views".into(),
            ));
        }
        let txn = self.write()?;
        let snap = {
            let mut table = txn
                .open_table(SNAPSHOTS)
                .map_err(Error::db("opening snapshots"))?;
            if get_in(&table, key)?.is_some() {
                return Err(Error::AlreadyExists(key.to_string()));
            }
            if !parent.is_empty() {
                let p = get_in(&table, parent)?
                    .ok_or_else(|| Error::NotFound(format!("{parent} (parent of {key})")))?;
                if p.kind != Kind::Committed {
                    return Err(Error::InvalidArgument(format!(
                        "parent {parent} of {key} is not a committed snapshot"
                    )));
                }
            }
            let parent_ids = chain_in(&table, parent)?;
            let mut meta = txn.open_table(META).map_err(Error::db("opening meta"))?;
            let id = meta
                .get(NEXT_ID)
                .map_err(Error::db("reading next_id"))?
                .map(|v| v.value())
                .unwrap_or(1);
            meta.insert(NEXT_ID, id.saturating_add(1))
                .map_err(Error::db("writing next_id"))?;
            let now = Time::now();
            let record = Record {
                id,
                kind,
                parent: parent.to_string(),
                created: now,
                updated: now,
                labels,
                size: 0,
                inodes: 0,
            };
            table
                .insert(key, encode(&record).as_slice())
                .map_err(Error::db("inserting a snapshot"))?;
            if !parent.is_empty() {
                let mut children = txn
                    .open_multimap_table(CHILDREN)
                    .map_err(Error::db("opening children"))?;
                children
                    .insert(parent, key)
                    .map_err(Error::db("linking a child"))?;
            }
            finish(id, &parent_ids)?;
            Snapshot {
                key: key.to_string(),
                record,
                parent_ids,
            }
        };
        txn.commit()
            .map_err(Error::db("committing a new snapshot"))?;
        Ok(snap)
    }

    /// The snapshot `key` with its ancestors' ids.
    pub fn get(&self, key: &str) -> Result<Snapshot> {
        let txn = self.db.begin_read().map_err(Error::db("starting a read"))?;
        let table = txn
            .open_table(SNAPSHOTS)
            .map_err(Error::db("opening snapshots"))?;
        let record = get_in(&table, key)?.ok_or_else(|| Error::NotFound(key.to_string()))?;
        let parent_ids = chain_in(&table, &record.parent)?;
        Ok(Snapshot {
            key: key.to_string(),
            record,
            parent_ids,
        })
    }

    /// Turns active `key` into committed `name` (same id, same directory).
    pub fn commit(
        &self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
        size: i64,
        inodes: i64,
    ) -> Result<Snapshot> {
        if name.is_empty() {
            return Err(Error::InvalidArgument(
                "commit name must not be empty".into(),
            ));
        }
        let txn = self.write()?;
        let snap = {
            let mut table = txn
                .open_table(SNAPSHOTS)
                .map_err(Error::db("opening snapshots"))?;
            let mut rec = get_in(&table, key)?.ok_or_else(|| Error::NotFound(key.to_string()))?;
            if rec.kind != Kind::Active {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key} is not active"
                )));
            }
            if get_in(&table, name)?.is_some() {
                return Err(Error::AlreadyExists(name.to_string()));
            }
            table
                .remove(key)
                .map_err(Error::db("removing the active record"))?;
            let now = Time::now();
            rec.kind = Kind::Committed;
            rec.created = now;
            rec.updated = now;
            rec.labels = labels;
            rec.size = size;
            rec.inodes = inodes;
            table
                .insert(name, encode(&rec).as_slice())
                .map_err(Error::db("inserting the committed record"))?;
            if !rec.parent.is_empty() {
                let mut children = txn
                    .open_multimap_table(CHILDREN)
                    .map_err(Error::db("opening children"))?;
                children
                    .remove(rec.parent.as_str(), key)
                    .map_err(Error::db("unlinking a child"))?;
                children
                    .insert(rec.parent.as_str(), name)
                    .map_err(Error::db("linking a child"))?;
            }
            let parent_ids = chain_in(&table, &rec.parent)?;
            Snapshot {
                key: name.to_string(),
                record: rec,
                parent_ids,
            }
        };
        txn.commit().map_err(Error::db("committing a commit"))?;
        Ok(snap)
    }

    /// Removes `key` unless it has children; returns what was removed.
    pub fn remove(&self, key: &str) -> Result<Record> {
        let txn = self.write()?;
        let rec = {
            let mut table = txn
                .open_table(SNAPSHOTS)
                .map_err(Error::db("opening snapshots"))?;
            let rec = get_in(&table, key)?.ok_or_else(|| Error::NotFound(key.to_string()))?;
            let mut children = txn
                .open_multimap_table(CHILDREN)
                .map_err(Error::db("opening children"))?;
            let has_child = children
                .get(key)
                .map_err(Error::db("reading children"))?
                .next()
                .is_some();
            if has_child {
                return Err(Error::FailedPrecondition(format!(
                    "cannot remove snapshot {key}: it has children"
                )));
            }
            table
                .remove(key)
                .map_err(Error::db("removing a snapshot"))?;
            if !rec.parent.is_empty() {
                children
                    .remove(rec.parent.as_str(), key)
                    .map_err(Error::db("unlinking a child"))?;
            }
            rec
        };
        txn.commit().map_err(Error::db("committing a removal"))?;
        Ok(rec)
    }

    /// Updates the labels of `key` and its updated time.
    pub fn update_labels(&self, key: &str, update: LabelUpdate) -> Result<Snapshot> {
        let txn = self.write()?;
        let snap = {
            let mut table = txn
                .open_table(SNAPSHOTS)
                .map_err(Error::db("opening snapshots"))?;
            let mut rec = get_in(&table, key)?.ok_or_else(|| Error::NotFound(key.to_string()))?;
            match update {
                LabelUpdate::All(labels) => rec.labels = labels,
                LabelUpdate::Keys(keys) => {
                    for (k, v) in keys {
                        match v {
                            Some(v) => rec.labels.insert(k, v),
                            None => rec.labels.remove(&k),
                        };
                    }
                }
            }
            rec.updated = Time::now();
            table
                .insert(key, encode(&rec).as_slice())
                .map_err(Error::db("updating a snapshot"))?;
            let parent_ids = chain_in(&table, &rec.parent)?;
            Snapshot {
                key: key.to_string(),
                record: rec,
                parent_ids,
            }
        };
        txn.commit().map_err(Error::db("committing an update"))?;
        Ok(snap)
    }

    /// All snapshots, ordered by key.
    pub fn list(&self) -> Result<Vec<(String, Record)>> {
        let txn = self.db.begin_read().map_err(Error::db("starting a read"))?;
        let table = txn
            .open_table(SNAPSHOTS)
            .map_err(Error::db("opening snapshots"))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(Error::db("listing snapshots"))? {
            let (k, v) = entry.map_err(Error::db("listing snapshots"))?;
            let key = k.value().to_string();
            let rec = decode(&key, v.value())?;
            out.push((key, rec));
        }
        Ok(out)
    }

    /// Runs `f` with the set of live ids while holding the write lock, so no snapshot can be
    /// created or removed meanwhile (used to find orphaned directories).
    pub fn with_live_ids<T>(&self, f: impl FnOnce(&HashSet<u64>) -> T) -> Result<T> {
        let txn = self.write()?;
        let ids = {
            let table = txn
                .open_table(SNAPSHOTS)
                .map_err(Error::db("opening snapshots"))?;
            let mut ids = HashSet::new();
            for entry in table.iter().map_err(Error::db("listing snapshots"))? {
                let (k, v) = entry.map_err(Error::db("listing snapshots"))?;
                ids.insert(decode(k.value(), v.value())?.id);
            }
            ids
        };
        let out = f(&ids);
        // Nothing was written; aborting releases the lock.
        txn.abort().map_err(Error::db("ending a read-under-lock"))?;
        Ok(out)
    }
}
