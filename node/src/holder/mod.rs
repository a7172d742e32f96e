//! The FUSE fd holder: keeps every lazily mounted layer's `/dev/fuse` connection open while
//! talaria-node is gone (crashed, OOM-killed, restarted, replaced by a new version), and
//! hands the fds to the next agent (docs/survive.md).
//!
//! A FUSE connection ends when the last fd of its `/dev/fuse` file closes. The agent sends a
//! copy of each mount's fd (the same open file, by `SCM_RIGHTS`) to the holder, a small
//! process of its own DaemonSet that is not rolled with the agent. While no agent runs,
//! requests wait in the kernel. When a connection that served an entry closes (its agent
//! died), the holder writes `FUSE_NOTIFY_RESEND` to the entry's fd: the kernel queues again
//! every request that agent had read and not answered (Linux 6.9+; older kernels refuse the
//! notification, and those requests wait until the application is killed).
//!
//! The holder does not read the agent's state: each entry carries an opaque, versioned
//! string the agent wrote, so the holder need not change when the agent does.
//!
//! Protocol: `SOCK_SEQPACKET` on a unix socket (root only), one JSON message per packet,
//! an fd with `Put` and with each `Entry`.

pub mod server;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
    connect, recvmsg, sendmsg, setsockopt, socket, sockopt,
};
use serde::{Deserialize, Serialize};

/// Largest message, either way (a state string is far smaller).
pub const MAX_MESSAGE: usize = 64 << 10;
/// Largest state string of an entry.
pub const MAX_STATE: usize = 16 << 10;

/// Errors of the holder's client and server.
#[derive(Debug, thiserror::Error)]
pub enum HolderError {
    #[error("fd holder at {socket}: {source}")]
    Connect {
        socket: String,
        source: nix::errno::Errno,
    },
    #[error("fd holder socket: {0}")]
    Io(#[from] nix::errno::Errno),
    #[error("fd holder message: {0}")]
    Message(String),
    #[error("fd holder refused: {0}")]
    Refused(String),
    #[error("fd holder closed the connection")]
    Closed,
}

impl HolderError {
    pub fn reason(&self) -> &'static str {
        match self {
            HolderError::Connect { .. } => "connect",
            HolderError::Io(_) | HolderError::Closed => "io",
            HolderError::Message(_) => "message",
            HolderError::Refused(_) => "refused",
        }
    }
}

/// What an agent asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Keep the fd sent with this message as entry `id` (an older entry `id` is closed).
    /// This connection serves it. Answered `Ok` or `Error`.
    Put {
        id: u64,
        version: u32,
        state: String,
    },
    /// Inode `ino` of entry `id` is open with passthrough under the kernel's `backing` id
    /// (`None`: its last passthrough handle closed). Not answered.
    Backing {
        id: u64,
        ino: u64,
        backing: Option<u32>,
    },
    /// Close entry `id` (its mount is gone). Answered `Ok`.
    Drop { id: u64 },
    /// Every entry: one `Entry` each (with its fd), then `End`.
    List,
    /// This connection serves entries `ids` from now on. Answered `Ok`.
    Serve { ids: Vec<u64> },
}

/// What the holder answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Reply {
    Ok,
    Error {
        message: String,
    },
    Entry {
        id: u64,
        version: u32,
        state: String,
        /// `(inode, backing id)` of inodes open with passthrough.
        backing: Vec<(u64, u32)>,
    },
    End,
}

/// An entry as an agent receives it.
#[derive(Debug)]
pub struct Held {
    pub id: u64,
    pub version: u32,
    pub state: String,
    pub backing: Vec<(u64, u32)>,
    pub fd: OwnedFd,
}

pub(crate) fn send<T: Serialize>(
    sock: RawFd,
    msg: &T,
    fd: Option<RawFd>,
) -> Result<(), HolderError> {
    let body = serde_json::to_vec(msg).map_err(|e| HolderError::Message(e.to_string()))?;
    if body.len() > MAX_MESSAGE {
        return Err(HolderError::Message(format!(
            "{} bytes, over {MAX_MESSAGE}",
            body.len()
        )));
    }
    let iov = [std::io::IoSlice::new(&body)];
    let fds: Vec<RawFd> = fd.into_iter().collect();
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    sendmsg::<UnixAddr>(sock, &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)?;
    Ok(())
}

/// One message and the fd that came with it. `Ok(None)`: the peer closed.
pub(crate) fn recv<T: for<'de> Deserialize<'de>>(
    sock: RawFd,
) -> Result<Option<(T, Option<OwnedFd>)>, HolderError> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let (n, fd, truncated) = {
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let msg =
            recvmsg::<UnixAddr>(sock, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
        let mut fd = None;
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                for raw in fds {
                    // SAFETY: the kernel just installed `raw` in this process for us; nothing
                    // else owns it.
                    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                    // One fd per message: extra ones are closed (dropped) here.
                    if fd.is_none() {
                        fd = Some(owned);
                    }
                }
            }
        }
        let truncated = msg
            .flags
            .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
        (msg.bytes, fd, truncated)
    };
    if n == 0 && fd.is_none() {
        return Ok(None);
    }
    if truncated {
        return Err(HolderError::Message("message over the size limit".into()));
    }
    let m = serde_json::from_slice(&buf[..n]).map_err(|e| HolderError::Message(e.to_string()))?;
    Ok(Some((m, fd)))
}

/// An agent's connection to the holder.
#[derive(Debug)]
pub struct HolderClient {
    sock: OwnedFd,
    /// One request and its answers at a time (`Backing` notes have no answer).
    exchange: Mutex<()>,
}

impl HolderClient {
    pub fn connect(path: &Path) -> Result<HolderClient, HolderError> {
        let err = |source| HolderError::Connect {
            socket: path.display().to_string(),
            source,
        };
        let sock = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(err)?;
        connect(sock.as_raw_fd(), &UnixAddr::new(path).map_err(err)?).map_err(err)?;
        // A stuck holder must not hold up a FUSE thread for long (a `Backing` note is sent
        // before its open is answered).
        let t = nix::sys::time::TimeVal::new(2, 0);
        setsockopt(&sock, sockopt::SendTimeout, &t)?;
        setsockopt(
            &sock,
            sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(10, 0),
        )?;
        Ok(HolderClient {
            sock,
            exchange: Mutex::new(()),
        })
    }

    /// Connects, retrying for up to `wait` (the holder's pod may start after the agent's).
    pub fn connect_within(path: &Path, wait: Duration) -> Result<HolderClient, HolderError> {
        let deadline = std::time::Instant::now() + wait;
        loop {
            match HolderClient::connect(path) {
                Ok(c) => return Ok(c),
                Err(e) if std::time::Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    fn call(&self, req: &Request, fd: Option<RawFd>) -> Result<(), HolderError> {
        let _one = self.exchange.lock().unwrap_or_else(|p| p.into_inner());
        send(self.sock.as_raw_fd(), req, fd)?;
        match recv::<Reply>(self.sock.as_raw_fd())? {
            Some((Reply::Ok, _)) => Ok(()),
            Some((Reply::Error { message }, _)) => Err(HolderError::Refused(message)),
            Some((other, _)) => Err(HolderError::Message(format!("unexpected {other:?}"))),
            None => Err(HolderError::Closed),
        }
    }

    /// Hands a copy of mount `id`'s `/dev/fuse` fd to the holder with its state.
    pub fn put(
        &self,
        id: u64,
        version: u32,
        state: String,
        fd: &OwnedFd,
    ) -> Result<(), HolderError> {
        self.call(&Request::Put { id, version, state }, Some(fd.as_raw_fd()))
    }

    /// Closes the holder's copy of mount `id`.
    pub fn drop_entry(&self, id: u64) -> Result<(), HolderError> {
        self.call(&Request::Drop { id }, None)
    }

    /// This agent serves `ids` (taken over): the holder resends their unanswered requests
    /// when it dies.
    pub fn serve(&self, ids: Vec<u64>) -> Result<(), HolderError> {
        self.call(&Request::Serve { ids }, None)
    }

    /// Notes which inodes of mount `id` are open with passthrough, and under which backing id.
    pub fn backing(&self, id: u64, ino: u64, backing: Option<u32>) -> Result<(), HolderError> {
        send(
            self.sock.as_raw_fd(),
            &Request::Backing { id, ino, backing },
            None,
        )
    }

    /// Every entry the holder keeps, with a copy of its fd.
    pub fn list(&self) -> Result<Vec<Held>, HolderError> {
        let _one = self.exchange.lock().unwrap_or_else(|p| p.into_inner());
        send(self.sock.as_raw_fd(), &Request::List, None)?;
        let mut out = Vec::new();
        loop {
            match recv::<Reply>(self.sock.as_raw_fd())? {
                Some((Reply::End, _)) => return Ok(out),
                Some((
                    Reply::Entry {
                        id,
                        version,
                        state,
                        backing,
                    },
                    Some(fd),
                )) => out.push(Held {
                    id,
                    version,
                    state,
                    backing,
                    fd,
                }),
                Some((other, _)) => {
                    return Err(HolderError::Message(format!("unexpected {other:?}")));
                }
                None => return Err(HolderError::Closed),
            }
        }
    }
}

/// Asks the kernel to queue again every request of this connection that was read and not
/// answered (`FUSE_NOTIFY_RESEND`, Linux 6.9+). EINVAL on older kernels.
pub fn notify_resend(fuse_fd: RawFd) -> std::io::Result<()> {
    // struct fuse_out_header { u32 len; i32 error; u64 unique; }: a notification has
    // unique 0 and its code in `error`.
    const FUSE_NOTIFY_RESEND: i32 = 7;
    let mut hdr = [0u8; 16];
    hdr[0..4].copy_from_slice(&16u32.to_ne_bytes());
    hdr[4..8].copy_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
    // SAFETY: BorrowedFd over a descriptor the caller keeps open for this call.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fuse_fd) };
    let n = nix::unistd::write(fd, &hdr).map_err(std::io::Error::from)?;
    if n != hdr.len() {
        return Err(std::io::Error::other("short write of FUSE_NOTIFY_RESEND"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_as_tagged_json() {
        let r = Request::Backing {
            id: 7,
            ino: 42,
            backing: Some(3),
        };
        let j = serde_json::to_string(&r).unwrap();
        assert_eq!(j, r#"{"op":"backing","id":7,"ino":42,"backing":3}"#);
        assert_eq!(serde_json::from_str::<Request>(&j).unwrap(), r);
        let e = Reply::Entry {
            id: 1,
            version: 2,
            state: "{}".into(),
            backing: vec![(5, 1)],
        };
        let j = serde_json::to_string(&e).unwrap();
        assert_eq!(serde_json::from_str::<Reply>(&j).unwrap(), e);
    }
}
