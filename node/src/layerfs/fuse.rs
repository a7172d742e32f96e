//! A read-only FUSE filesystem of one layer: names and attributes from its [`Tree`], file
//! bytes from [`LayerContent`] (which decides between local copies, the startup pack and
//! the verified spans). This file only translates FUSE requests and maps errors; a file
//! whose whole local copy is here is opened with kernel passthrough.

use std::ffi::OsStr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    BackingId, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request, SessionACL,
};
use prometheus_client::metrics::counter::Counter;
use talaria_artifact::index::LayerIndex;
use talaria_artifact::index::reader::LayerReader;
use tracing::{debug, warn};

use super::{FsError, Tree};
use crate::content::layer::LayerContent;
use crate::content::materialize::Materializer;
use crate::content::reach::Reachability;
use crate::holder::HolderClient;
use crate::metrics::{Metrics, OpLabels};
use talaria_artifact::startup::TraceRecorder;

/// The layer never changes, so the kernel may cache names and attributes for long.
const TTL: Duration = Duration::from_secs(3600);

/// The FUSE filesystem of one layer.
pub struct LayerFs {
    tree: Arc<Tree>,
    index: Arc<LayerIndex>,
    /// Where file bytes come from; reads that wait run on `rt`.
    content: LayerContent,
    rt: tokio::runtime::Handle,
    metrics: Arc<Metrics>,
    /// The kernel took FUSE passthrough at init (and no open has failed it since).
    passthrough: std::sync::atomic::AtomicBool,
    /// Requests answered, by op.
    ops: FuseOps,
    /// Open handles per inode, by mode. The kernel refuses (EIO to the application) a
    /// passthrough open while a cached one is open, and the reverse; it wants one backing id
    /// per inode, alive while any passthrough handle is.
    handles: std::sync::Mutex<OpenHandles>,
    /// Where passthrough opens are noted, as which entry (see [`LayerFs::with_handover`]).
    handover: Option<(Arc<HolderClient>, u64)>,
    /// Backing ids of inodes a previous agent had open with passthrough (adopted mounts).
    inherited: std::collections::HashMap<u64, u32>,
}

/// The answer to a lookup of a name a layer lacks: node id 0 (see `lookup`).
const NEGATIVE_ENTRY: FileAttr = FileAttr {
    ino: INodeNo(0),
    size: 0,
    blocks: 0,
    atime: UNIX_EPOCH,
    mtime: UNIX_EPOCH,
    ctime: UNIX_EPOCH,
    crtime: UNIX_EPOCH,
    kind: FileType::RegularFile,
    perm: 0,
    nlink: 0,
    uid: 0,
    gid: 0,
    rdev: 0,
    blksize: 0,
    flags: 0,
};

/// The open count of an inherited passthrough inode: never reaches 0.
const STICKY: u32 = u32::MAX / 2;

/// Handle `fh` of a cached (non-passthrough) open: the inode with the top bit set (a
/// passthrough handle is the bare inode number).
const CACHED_FH: u64 = 1 << 63;

#[derive(Default)]
struct OpenHandles {
    passthrough: std::collections::HashMap<u64, (BackingId, u32)>,
    cached: std::collections::HashMap<u64, u32>,
}

/// Per-op request counters, made once per mount (no label lookup per request).
struct FuseOps {
    lookup: Counter,
    /// Lookups of names the layer does not have (overlayfs asks every layer above the one
    /// holding a file).
    lookup_miss: Counter,
    getattr: Counter,
    open: Counter,
    read: Counter,
    readdir: Counter,
    opendir: Counter,
    getxattr: Counter,
    /// getxattr of a name the file does not have.
    getxattr_miss: Counter,
    listxattr: Counter,
    readlink: Counter,
    release: Counter,
}

impl FuseOps {
    fn new(m: &Metrics) -> FuseOps {
        let c = |op: &str| {
            m.fuse_requests
                .get_or_create(&OpLabels { op: op.to_string() })
                .clone()
        };
        FuseOps {
            lookup: c("lookup"),
            lookup_miss: c("lookup_miss"),
            getattr: c("getattr"),
            open: c("open"),
            read: c("read"),
            readdir: c("readdir"),
            opendir: c("opendir"),
            getxattr: c("getxattr"),
            getxattr_miss: c("getxattr_miss"),
            listxattr: c("listxattr"),
            readlink: c("readlink"),
            release: c("release"),
        }
    }
}

impl LayerFs {
    pub fn new(
        reader: Arc<LayerReader>,
        reach: Arc<Reachability>,
        rt: tokio::runtime::Handle,
        read_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<LayerFs, FsError> {
        let tree = Arc::new(Tree::build(reader.index())?);
        Ok(Self::with_tree(
            reader,
            tree,
            reach,
            rt,
            read_timeout,
            metrics,
        ))
    }

    /// As [`LayerFs::new`], with the tree of the reader's index already built.
    pub fn with_tree(
        reader: Arc<LayerReader>,
        tree: Arc<Tree>,
        reach: Arc<Reachability>,
        rt: tokio::runtime::Handle,
        read_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> LayerFs {
        let index = reader.index().clone();
        let ops = FuseOps::new(&metrics);
        LayerFs {
            tree,
            index,
            content: LayerContent::new(reader, reach, read_timeout, metrics.clone()),
            rt,
            metrics,
            passthrough: std::sync::atomic::AtomicBool::new(false),
            ops,
            handles: std::sync::Mutex::new(OpenHandles::default()),
            handover: None,
            inherited: std::collections::HashMap::new(),
        }
    }

    /// Serves the files `m` holds under `index_digest` from local disk.
    pub fn with_materialized(mut self, m: Arc<Materializer>, index_digest: String) -> Self {
        self.content = self.content.with_materialized(m, index_digest);
        self
    }

    /// Records reads into `r` (it keeps those of a startup window) under `layer_digest`.
    pub fn with_recorder(mut self, r: Arc<TraceRecorder>, layer_digest: String) -> Self {
        self.content = self.content.with_recorder(r, layer_digest);
        self
    }

    /// Counts the bytes every read returns to the kernel into `c`.
    pub fn with_read_bytes_counter(mut self, c: Counter) -> Self {
        self.content = self.content.with_read_bytes_counter(c);
        self
    }

    /// Notes to `holder`, as its entry `id`, which inodes are open with passthrough (a next
    /// agent must answer their opens with the same backing ids).
    pub fn with_handover(mut self, holder: Arc<HolderClient>, id: u64) -> Self {
        self.handover = Some((holder, id));
        self
    }

    /// Mounts read-only at `mountpoint` and serves it. The session never unmounts by itself
    /// (the caller detaches the mount); `fd` is a copy of the connection's `/dev/fuse` fd,
    /// for the holder.
    pub fn mount(self, mountpoint: &Path) -> Result<Served, FsError> {
        map_large_allocations();
        let err = |source: std::io::Error| FsError::Mount {
            mountpoint: mountpoint.display().to_string(),
            source,
        };
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
            .map_err(err)?;
        let fd = OwnedFd::from(dev);
        // As fuser would mount it (allow_other, default_permissions, dev, suid), but here,
        // so the fd is ours to hand over and nothing unmounts on a drop.
        let data = format!(
            "fd={},rootmode=40000,user_id={},group_id={},default_permissions,allow_other",
            fd.as_raw_fd(),
            nix::unistd::geteuid(),
            nix::unistd::getegid()
        );
        nix::mount::mount(
            Some("talaria"),
            mountpoint,
            Some("fuse.talaria"),
            nix::mount::MsFlags::MS_RDONLY,
            Some(data.as_str()),
        )
        .map_err(|e| err(e.into()))?;
        let held = fd.try_clone().map_err(err);
        let session = held.and_then(|held| {
            let s = fuser::Session::from_fd(self, fd, SessionACL::All, session_config())
                .and_then(fuser::Session::spawn)
                .map_err(err)?;
            Ok(Served {
                session: Some(s),
                mountpoint: mountpoint.to_path_buf(),
                fd: Some(held),
            })
        });
        if session.is_err() {
            let _ = nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH);
        }
        session
    }

    /// Serves a connection another agent mounted and initialized (`fd` from the holder).
    /// `backing`: the inodes it had open with passthrough, and their backing ids. New opens
    /// of other inodes are not passthrough for this connection's life: which of them the
    /// kernel still has open, and how, died with the other agent.
    pub fn adopt(
        mut self,
        fd: OwnedFd,
        mountpoint: &Path,
        backing: &[(u64, u32)],
    ) -> Result<Served, FsError> {
        map_large_allocations();
        *self.passthrough.get_mut() = false;
        self.inherited = backing.iter().copied().collect();
        fuser::Session::from_initialized_fd(self, fd, SessionACL::All, session_config())
            .spawn()
            .map(|s| Served::adopted(s, mountpoint))
            .map_err(|source| FsError::Mount {
                mountpoint: mountpoint.display().to_string(),
                source,
            })
    }
}

/// A mount served by this process. Dropping it detaches the mount (lazily, so a busy one
/// cannot block) and ends the session; [`Served::leave`] leaves both to the next agent.
pub struct Served {
    session: Option<fuser::BackgroundSession>,
    mountpoint: std::path::PathBuf,
    /// A copy of the connection's `/dev/fuse` fd (mounts made here, not adopted ones).
    fd: Option<OwnedFd>,
}

impl Served {
    /// Wraps an adopted session of the mount at `mountpoint`.
    pub fn adopted(session: fuser::BackgroundSession, mountpoint: &Path) -> Served {
        Served {
            session: Some(session),
            mountpoint: mountpoint.to_path_buf(),
            fd: None,
        }
    }

    /// A copy of the connection's `/dev/fuse` fd, for the holder.
    pub fn fd(&self) -> Option<&OwnedFd> {
        self.fd.as_ref()
    }

    /// Unmounts and waits for the session to end.
    pub fn unmount(mut self) -> std::io::Result<()> {
        nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::empty())?;
        match self.session.take() {
            Some(s) => s.join(),
            None => Ok(()),
        }
    }

    /// Leaves the mount and its connection as they are (the holder keeps the connection,
    /// for the next agent): this process stops serving it when it exits.
    pub fn leave(self) {
        std::mem::forget(self);
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Err(e) = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH) {
            debug!(fs = %self.mountpoint.display(), error = %e, "lazy unmount");
        }
        // The session ends when the kernel drops the connection (the superblock's last user
        // goes); it is not joined here, so nothing waits on a busy mount.
        drop(self.session.take());
    }
}

fn session_config() -> Config {
    let mut config = Config::default();
    config.acl = SessionACL::All;
    // Both threads read the same fd (no clone_fd): the kernel's queue of requests read and
    // not answered is then that one file's, which the holder keeps and resends.
    config.n_threads = Some(2);
    config
}

/// Has glibc serve every allocation of 1 MiB or more with its own mmap, for good.
///
/// fuser gives each mount three 16 MiB request buffers (the handshake's, freed at once, and
/// one per session thread), zero-filled. By default glibc raises its mmap threshold to the
/// size of a freed mapped block, so from the first freed buffer on, each new one came from
/// the heap and was zeroed by hand: 2-23 ms more per mount (measured), and all 32 MiB of a
/// mount's buffers resident (a 12-mount test: 88 MB resident against 5 MB). Mapped, the
/// buffers cost only the pages requests touch. A fixed threshold stops the raising.
pub fn map_large_allocations() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only sets an allocator parameter; no pointer is involved.
        let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20) } == 1;
        #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
        let ok = true;
        if !ok {
            warn!("mallopt(M_MMAP_THRESHOLD) refused; each FUSE mount keeps 32 MiB resident");
        }
    });
}

fn xattr_reply(size: u32, data: &[u8], reply: ReplyXattr) {
    if size == 0 {
        reply.size(u32::try_from(data.len()).unwrap_or(u32::MAX));
    } else if data.len() <= size as usize {
        reply.data(data);
    } else {
        reply.error(Errno::ERANGE);
    }
}

/// One handle of `ino` closed: its count goes down, and the entry (with a backing id it
/// holds) goes with the last one.
/// Returns the entry when it goes.
fn release_one<V>(
    map: &mut std::collections::HashMap<u64, V>,
    ino: u64,
    count: impl Fn(&mut V) -> &mut u32,
) -> Option<V> {
    let v = map.get_mut(&ino)?;
    let n = count(v);
    *n = n.saturating_sub(1);
    if *n == 0 { map.remove(&ino) } else { None }
}

impl LayerFs {
    fn note_backing(&self, ino: u64, backing: Option<u32>) {
        if let Some((holder, id)) = &self.handover
            && let Err(e) = holder.backing(*id, ino, backing)
        {
            warn!(ino, error = %e, "noting a passthrough open with the fd holder");
        }
    }

    /// Opens regular file `ino`: with kernel passthrough to its local copy when all of it
    /// is on local disk (its reads then never come to this process), else cached.
    fn open_file(&self, ino: u64, reply: ReplyOpen) {
        let mut handles = self.handles.lock().unwrap_or_else(|p| p.into_inner());
        // The inode keeps the mode its open handles have (a copy that was whole stays whole).
        let reply = if handles.cached.contains_key(&ino) {
            reply
        } else {
            match self.open_passthrough(&mut handles, ino, reply) {
                Ok(()) => return,
                Err(reply) => reply,
            }
        };
        *handles.cached.entry(ino).or_default() += 1;
        reply.opened(FileHandle(ino | CACHED_FH), FopenFlags::FOPEN_KEEP_CACHE);
    }

    /// The passthrough open of `ino`, if its copy is here. `Err(reply)`: not possible.
    fn open_passthrough(
        &self,
        handles: &mut OpenHandles,
        ino: u64,
        reply: ReplyOpen,
    ) -> Result<(), ReplyOpen> {
        use std::sync::atomic::Ordering;
        let inherited = self.inherited.get(&ino).copied();
        if inherited.is_none() && !self.passthrough.load(Ordering::Relaxed) {
            return Err(reply);
        }
        let Some(entry) = self
            .tree
            .node(ino)
            .and_then(|n| n.content)
            .and_then(|i| self.index.entries.get(i))
        else {
            return Err(reply);
        };
        let (id, open) = match handles.passthrough.entry(ino) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => match inherited {
                Some(raw) => {
                    // SAFETY: a backing id of this connection the previous agent opened and
                    // noted; it is closed only after its note is withdrawn, so it is open.
                    let id = unsafe { reply.wrap_backing(raw) };
                    // Never closed: how many handles of it the kernel still has is unknown.
                    v.insert((id, STICKY))
                }
                None => {
                    let Some(f) = self.content.whole_local(entry) else {
                        return Err(reply);
                    };
                    match reply.open_backing(&*f) {
                        Ok(id) => {
                            let raw = id.into_raw();
                            // SAFETY: `raw` was opened just now on this connection.
                            let id = unsafe { reply.wrap_backing(raw) };
                            // Noted before the kernel hears of it, so a next agent knows it.
                            self.note_backing(ino, Some(raw));
                            v.insert((id, 0))
                        }
                        Err(e) => {
                            // Once is enough to know: this mount answers every later open normally.
                            self.passthrough.store(false, Ordering::Relaxed);
                            warn!(path = %entry.path, error = %e, "FUSE passthrough refused; reads go through this process");
                            return Err(reply);
                        }
                    }
                }
            },
        };
        *open += 1;
        self.content.record_whole(entry);
        self.metrics.passthrough_opens.inc();
        // No FOPEN_KEEP_CACHE: the kernel refuses it with passthrough (the page cache is the
        // local copy's).
        reply.opened_passthrough(FileHandle(ino), FopenFlags::empty(), id);
        Ok(())
    }
}

impl Filesystem for LayerFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Passthrough needs the kernel's consent and a stack depth of 1, which still lets
        // overlayfs stack on this filesystem (the kernel's maximum depth is 2).
        let ok = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(1).is_ok();
        if !ok {
            debug!(
                "the kernel offers no FUSE passthrough; local copies are read through this process"
            );
        }
        *self.passthrough.get_mut() = ok;
        // A symlink's target is kept in the kernel's page cache after its first readlink
        // (the content never changes); an older kernel just keeps asking.
        if config
            .add_capabilities(InitFlags::FUSE_CACHE_SYMLINKS)
            .is_err()
        {
            debug!("the kernel does not cache FUSE symlinks");
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.ops.lookup.inc();
        let ino = self
            .tree
            .node(parent.0)
            .and_then(|p| p.children.get(name.as_bytes()).copied());
        match ino.and_then(|i| self.tree.attr(i)) {
            Some(a) => reply.entry(&TTL, &a, Generation(0)),
            None => {
                self.ops.lookup_miss.inc();
                // Node id 0 with a timeout: the kernel keeps the name as a negative entry
                // (ENOENT would not be kept), so it is not asked again.
                reply.entry(&TTL, &NEGATIVE_ENTRY, Generation(0))
            }
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.ops.getattr.inc();
        match self.tree.attr(ino.0) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.ops.readlink.inc();
        match self.tree.node(ino.0).and_then(|n| n.link.as_deref()) {
            Some(l) => reply.data(l),
            None => reply.error(Errno::EINVAL),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.ops.open.inc();
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        match self.tree.node(ino.0) {
            // Content never changes: let the page cache keep it across opens.
            Some(n) if n.kind == FileType::RegularFile => self.open_file(ino.0, reply),
            Some(_) => reply.error(Errno::EINVAL),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        self.ops.read.inc();
        let Some(read) = self
            .tree
            .node(ino.0)
            .and_then(|n| n.content)
            .and_then(|i| self.content.read_now(i, offset, size))
        else {
            return reply.error(Errno::EINVAL);
        };
        match read {
            Ok(data) => reply.data(&data),
            // Answered from the runtime so a slow fetch never holds up this FUSE thread.
            Err(pending) => {
                let content = self.content.clone();
                self.rt.spawn(async move {
                    match content.read_pending(pending).await {
                        Ok(data) => reply.data(&data),
                        Err(_) => reply.error(Errno::EIO),
                    }
                });
            }
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.ops.readdir.inc();
        let Some(n) = self.tree.node(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        if n.kind != FileType::Directory {
            return reply.error(Errno::ENOTDIR);
        }
        let dots = [
            (ino.0, FileType::Directory, b".".as_slice()),
            (n.parent, FileType::Directory, b"..".as_slice()),
        ];
        let children = n
            .children
            .iter()
            .filter_map(|(name, c)| self.tree.node(*c).map(|cn| (*c, cn.kind, name.as_slice())));
        for (i, (cino, kind, name)) in dots
            .into_iter()
            .chain(children)
            .enumerate()
            .skip(usize::try_from(offset).unwrap_or(usize::MAX))
        {
            if reply.add(INodeNo(cino), i as u64 + 1, kind, OsStr::from_bytes(name)) {
                break;
            }
        }
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.ops.release.inc();
        // The backing id goes with the inode's last passthrough handle.
        let mut handles = self.handles.lock().unwrap_or_else(|p| p.into_inner());
        let closed = if fh.0 & CACHED_FH != 0 {
            release_one(&mut handles.cached, fh.0 & !CACHED_FH, |n| n);
            None
        } else {
            release_one(&mut handles.passthrough, fh.0, |(_, n)| n)
        };
        drop(handles);
        if let Some((id, _)) = closed {
            // The note goes before the backing id closes: a next agent never reuses a
            // closed one.
            self.note_backing(fh.0, None);
            drop(id);
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.index.uncompressed_size.div_ceil(4096);
        reply.statfs(blocks, 0, 0, self.tree.len() as u64, 0, 4096, 255, 4096);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        self.ops.getxattr.inc();
        if !self.tree.has_xattrs() {
            // Nothing to find in this layer: ENOSYS has the kernel answer every later
            // getxattr of this mount itself (EOPNOTSUPP, which overlayfs and exec read as
            // "none"), where overlayfs would ask about every directory and executable.
            self.ops.getxattr_miss.inc();
            return reply.error(Errno::ENOSYS);
        }
        let Some(x) = self.tree.xattrs(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        match x.iter().find(|(k, _)| k.as_bytes() == name.as_bytes()) {
            Some((_, v)) => xattr_reply(size, v, reply),
            None => {
                self.ops.getxattr_miss.inc();
                reply.error(Errno::ENODATA)
            }
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.ops.listxattr.inc();
        let Some(x) = self.tree.xattrs(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let mut list = Vec::new();
        for (k, _) in &x {
            list.extend_from_slice(k.as_bytes());
            list.push(0);
        }
        xattr_reply(size, &list, reply);
    }

    // No state per open directory: ENOSYS has the kernel open directories itself for the
    // rest of the mount (no opendir and releasedir round trips) and cache their entries.
    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.ops.opendir.inc();
        reply.error(Errno::ENOSYS);
    }

    // Read-only content: nothing to flush or sync, and no ioctls (quietly, not ENOSYS).
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: fuser::ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: fuser::ReplyEmpty,
    ) {
        reply.ok();
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }

    // No holes (sparse tar entries are refused): ENOSYS has the kernel answer SEEK_DATA and
    // SEEK_HOLE itself from the size for the rest of the mount (overlayfs asks on copy-up),
    // without the warning fuser logs for an op left unimplemented.
    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: i64,
        _whence: i32,
        reply: fuser::ReplyLseek,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn destroy(&mut self) {
        debug!(layer = %self.index.compressed_digest_string(), "FUSE session ended");
    }
}
