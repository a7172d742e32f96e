//! Taking over the mounts a previous agent left with the fd holder (docs/survive.md).
//!
//! The agent takes over once the previous agent has exited (it holds the root's lock until
//! then): requests wait in the kernel meanwhile, and the holder has the kernel resend what the
//! previous agent read and left unanswered.
//!
//! What a next agent needs to serve a connection it did not mount: the snapshot (whose
//! directory keeps the layer's record and index, checked against the index digest here),
//! and the inodes open with passthrough (noted in the holder as they change). Inode numbers
//! and file handles are functions of the index, so the kernel's are the ones this agent
//! gives.

use std::collections::HashSet;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{RemoteLayers, load_record};
use crate::holder::Held;

/// The version of [`MountState`] this build writes. An agent serves the versions up to its
/// own; a state of a higher version (written by a newer agent) is left to that agent.
pub const HANDOVER_VERSION: u32 = 1;

fn understood(version: u32) -> bool {
    (1..=HANDOVER_VERSION).contains(&version)
}

/// `(entry, version)` of the held mounts whose state this agent does not know: they stay
/// with the agent that wrote them (a newer one, before a rollback). Checked as soon as the
/// agent starts, before it waits for the root: an upgrade's new agent that cannot take over
/// says so (metric, Event, not ready), and the old one keeps serving.
pub fn unservable(held: &[Held]) -> Vec<(u64, u32)> {
    let out: Vec<(u64, u32)> = held
        .iter()
        .filter(|h| !understood(h.version))
        .map(|h| (h.id, h.version))
        .collect();
    for (id, version) in &out {
        warn!(
            id,
            version,
            understood = HANDOVER_VERSION,
            "a held mount's state is of a version this agent does not know; left to the agent that wrote it"
        );
    }
    out
}

/// What the holder keeps of a mount, for the next agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountState {
    pub snapshot: u64,
    /// The mount point: the snapshot's `fs` dir, whose parent holds its record and index.
    pub fs_dir: PathBuf,
    pub index_digest: String,
}

impl MountState {
    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn decode(s: &str) -> Result<MountState, serde_json::Error> {
        serde_json::from_str(s)
    }
}

/// How a takeover went.
#[derive(Debug, Default)]
pub struct Takeover {
    /// Mounts this agent serves now.
    pub taken: Vec<u64>,
    /// Mount points the holder keeps a connection of (taken or not): not stale.
    pub kept: HashSet<PathBuf>,
    /// `(entry, state version)` of mounts left to the agent that wrote them.
    pub unserved: Vec<(u64, u32)>,
    /// Entries whose snapshot is gone: dropped from the holder.
    pub dropped: usize,
    /// Entries this agent understood but could not serve (logged).
    pub failed: usize,
}

impl RemoteLayers {
    /// Serves every held mount whose state this agent understands; tells the holder which.
    /// Call it once the root is this agent's (the previous agent has exited): two agents
    /// serving one connection could each open an inode in a mode the other does not know.
    pub fn take_over(&self, held: Vec<Held>) -> Takeover {
        let mut t = Takeover::default();
        for h in held {
            if !understood(h.version) {
                // Counted and reported when the agent started (see [`unservable`]).
                if let Ok(s) = MountState::decode(&h.state) {
                    t.kept.insert(s.fs_dir);
                }
                t.unserved.push((h.id, h.version));
                continue;
            }
            let state = match MountState::decode(&h.state) {
                Ok(s) if s.snapshot == h.id => s,
                other => {
                    warn!(id = h.id, state = ?other, "a held mount's state does not parse; left alone");
                    self.metrics.handover("bad_state");
                    t.failed += 1;
                    continue;
                }
            };
            t.kept.insert(state.fs_dir.clone());
            match self.adopt(&state, h) {
                Ok(true) => {
                    t.taken.push(state.snapshot);
                    self.metrics.handover("taken");
                }
                Ok(false) => {
                    t.dropped += 1;
                    self.metrics.handover("dropped");
                }
                Err(e) => {
                    warn!(id = state.snapshot, error = %e, "a held mount could not be taken over");
                    self.metrics.handover("failed");
                    t.failed += 1;
                }
            }
        }
        if let Some(holder) = &self.opts.holder
            && !t.taken.is_empty()
            && let Err(e) = holder.serve(t.taken.clone())
        {
            self.metrics.handover(e.reason());
            warn!(error = %e, "telling the fd holder which mounts this agent serves");
        }
        if let Ok(mut u) = self.unserved.lock() {
            u.extend(t.unserved.iter().map(|(id, _)| *id));
        }
        info!(
            taken = t.taken.len(),
            unserved = t.unserved.len(),
            dropped = t.dropped,
            failed = t.failed,
            "took over held mounts"
        );
        t
    }

    /// Serves held mount `h`. `Ok(false)`: its snapshot is gone (dropped from the holder).
    fn adopt(&self, state: &MountState, h: Held) -> Result<bool, super::RemoteError> {
        let Some(dir) = state.fs_dir.parent() else {
            return Ok(false);
        };
        if !dir.join(super::RECORD_FILE).exists() {
            // Removed while no agent ran (or its removal's Drop was lost).
            if let Some(holder) = &self.opts.holder
                && let Err(e) = holder.drop_entry(h.id)
            {
                warn!(id = h.id, error = %e, "dropping a held mount whose snapshot is gone");
            }
            return Ok(false);
        }
        let (rec, index) = load_record(dir)?;
        if rec.index_digest.as_deref() != Some(state.index_digest.as_str()) {
            return Err(super::RemoteError::Index {
                index: dir.display().to_string(),
                message: format!(
                    "is {:?}, the held mount was served from {}",
                    rec.index_digest, state.index_digest
                ),
            });
        }
        let (fs, layer) = self.layer_fs(state.snapshot, index, None, &rec)?;
        let served = fs.adopt(h.fd, &state.fs_dir, &h.backing)?;
        self.register(state.snapshot, served, layer, &rec.manifest_digest);
        Ok(true)
    }

    /// Whether snapshot `id` is served (mounted or taken over) by this agent.
    pub(super) fn serves(&self, id: u64) -> bool {
        self.mounts.lock().is_ok_and(|m| m.contains_key(&id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips() {
        let s = MountState {
            snapshot: 12,
            fs_dir: "/var/lib/talaria-node/snapshots/12/fs".into(),
            index_digest: "sha256:ab".into(),
        };
        assert_eq!(MountState::decode(&s.encode()).unwrap(), s);
        assert!(MountState::decode("{").is_err());
    }
}
