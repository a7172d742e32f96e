//! The holder's side: entries (fd, state, passthrough notes) in memory, a thread per agent
//! connection, a resend when a serving connection ends. Bounded in entries, notes per entry,
//! connections and message size; nothing is written to disk (a restarted holder has nothing
//! to hold: the connections ended with it).

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, UnixAddr, accept4, bind, listen, setsockopt,
    socket, sockopt,
};
use tracing::{debug, info, warn};

use super::{HolderError, MAX_STATE, Reply, Request, notify_resend, recv, send};

/// The holder's bounds.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Entries (mounted layers) kept; a `Put` beyond is refused (that mount does not
    /// survive the agent).
    pub max_entries: usize,
    /// Passthrough notes per entry; beyond, a note is dropped (docs/survive.md).
    pub max_backing: usize,
    /// Agent connections at a time (an upgrade has two).
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_entries: 8192,
            max_backing: 4096,
            max_connections: 16,
        }
    }
}

struct Entry {
    fd: OwnedFd,
    version: u32,
    state: String,
    backing: BTreeMap<u64, u32>,
    /// Connections serving this entry.
    servers: BTreeSet<u64>,
}

/// What the holder keeps.
pub struct Holder {
    entries: Mutex<BTreeMap<u64, Entry>>,
    limits: Limits,
    connections: AtomicUsize,
    next_connection: AtomicU64,
}

impl Holder {
    pub fn new(limits: Limits) -> Arc<Holder> {
        Arc::new(Holder {
            entries: Mutex::new(BTreeMap::new()),
            limits,
            connections: AtomicUsize::new(0),
            next_connection: AtomicU64::new(1),
        })
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Binds `path` (root only, replacing a stale socket) and serves agents until the process
    /// ends.
    pub fn serve(self: &Arc<Self>, path: &Path) -> Result<(), HolderError> {
        let _ = std::fs::remove_file(path);
        let sock = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
        let bound = bind(sock.as_raw_fd(), &UnixAddr::new(path)?);
        nix::sys::stat::umask(old);
        bound?;
        listen(&sock, Backlog::new(16)?)?;
        info!(socket = %path.display(), "holding FUSE connections");
        loop {
            let raw = match accept4(sock.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
                Ok(fd) => fd,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    warn!(error = %e, "accept");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    continue;
                }
            };
            // SAFETY: accept4 returned a new descriptor that nothing else owns.
            let conn = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
            if self.connections.fetch_add(1, Ordering::SeqCst) >= self.limits.max_connections {
                self.connections.fetch_sub(1, Ordering::SeqCst);
                warn!("too many agent connections; refused one");
                continue;
            }
            // A stuck agent must not hold the entries' lock during a List.
            let _ = setsockopt(
                &conn,
                sockopt::SendTimeout,
                &nix::sys::time::TimeVal::new(5, 0),
            );
            let id = self.next_connection.fetch_add(1, Ordering::Relaxed);
            let me = self.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("agent-{id}"))
                .spawn(move || {
                    me.connection(id, conn);
                    me.connections.fetch_sub(1, Ordering::SeqCst);
                });
            if let Err(e) = spawned {
                self.connections.fetch_sub(1, Ordering::SeqCst);
                warn!(error = %e, "no thread for an agent connection");
            }
        }
    }

    fn connection(&self, cid: u64, conn: OwnedFd) {
        debug!(connection = cid, "agent connected");
        let sock = conn.as_raw_fd();
        loop {
            let (req, fd) = match recv::<Request>(sock) {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) => {
                    // Garbage or a broken socket: the connection goes (a reply could be
                    // taken for the answer to something else).
                    warn!(connection = cid, error = %e, "closing an agent connection");
                    break;
                }
            };
            let reply = self.handle(cid, req, fd, sock);
            if let Some(r) = reply
                && let Err(e) = send(sock, &r, None)
            {
                warn!(connection = cid, error = %e, "answering an agent");
                break;
            }
        }
        self.ended(cid);
    }

    /// Answers one request (`None`: no answer, or already sent).
    fn handle(&self, cid: u64, req: Request, fd: Option<OwnedFd>, sock: i32) -> Option<Reply> {
        let mut entries = self.lock();
        match req {
            Request::Put { id, version, state } => {
                let Some(fd) = fd else {
                    return Some(Reply::Error {
                        message: "put without an fd".into(),
                    });
                };
                if state.len() > MAX_STATE {
                    return Some(Reply::Error {
                        message: format!("state of {} bytes, over {MAX_STATE}", state.len()),
                    });
                }
                if !entries.contains_key(&id) && entries.len() >= self.limits.max_entries {
                    return Some(Reply::Error {
                        message: format!("holding {} entries already", entries.len()),
                    });
                }
                debug!(connection = cid, id, version, "put");
                entries.insert(
                    id,
                    Entry {
                        fd,
                        version,
                        state,
                        backing: BTreeMap::new(),
                        servers: BTreeSet::from([cid]),
                    },
                );
                Some(Reply::Ok)
            }
            Request::Backing { id, ino, backing } => {
                if let Some(e) = entries.get_mut(&id) {
                    match backing {
                        Some(b)
                            if e.backing.len() < self.limits.max_backing
                                || e.backing.contains_key(&ino) =>
                        {
                            e.backing.insert(ino, b);
                        }
                        Some(_) => warn!(id, ino, "passthrough notes full; this one dropped"),
                        None => {
                            e.backing.remove(&ino);
                        }
                    }
                }
                None
            }
            Request::Drop { id } => {
                entries.remove(&id);
                debug!(connection = cid, id, "dropped");
                Some(Reply::Ok)
            }
            Request::Serve { ids } => {
                for id in ids {
                    if let Some(e) = entries.get_mut(&id) {
                        e.servers.insert(cid);
                    }
                }
                Some(Reply::Ok)
            }
            Request::List => {
                for (id, e) in entries.iter() {
                    let entry = Reply::Entry {
                        id: *id,
                        version: e.version,
                        state: e.state.clone(),
                        backing: e.backing.iter().map(|(i, b)| (*i, *b)).collect(),
                    };
                    if let Err(err) = send(sock, &entry, Some(e.fd.as_raw_fd())) {
                        warn!(connection = cid, error = %err, "listing entries");
                        return None;
                    }
                }
                Some(Reply::End)
            }
        }
    }

    /// Connection `cid` ended: its agent is gone (or let go). What it had read of its
    /// entries' requests and not answered is queued again for whoever serves them next.
    fn ended(&self, cid: u64) {
        let mut entries = self.lock();
        let mut resent = 0;
        for (id, e) in entries.iter_mut() {
            if !e.servers.remove(&cid) {
                continue;
            }
            match notify_resend(e.fd.as_raw_fd()) {
                Ok(()) => resent += 1,
                // ENOTCONN: the connection is gone (unmounted); the entry goes with the
                // agent's Drop, or with the next agent's takeover.
                Err(err) => debug!(id, error = %err, "FUSE_NOTIFY_RESEND"),
            }
        }
        info!(connection = cid, resent, "agent disconnected");
    }
}
