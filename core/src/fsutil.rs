//! File-system helpers: atomic writes, private directories and files, and advisory locks.
//!
//! Kind: IO. Every state or key write in the project goes through [`write_atomic`] or
//! [`create_new_atomic`]: temp file in the same directory → write → `fsync` → rename (or link) →
//! `fsync` of the directory. A crash leaves either the old or the new file, never a torn one.
//! Secrets are never followed through symlinks ([`read_private`] opens with `O_NOFOLLOW`).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Writes `data` to `path` atomically with permission bits `mode` (independent of the umask).
///
/// # Errors
/// Any IO error; the previous file at `path`, if any, is then left untouched.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    write_atomic_with(path, data, mode, || Ok(()))
}

/// [`write_atomic`] with a hook between the durable temp file and the rename (tests inject
/// failures there).
fn write_atomic_with(
    path: &Path,
    data: &[u8],
    mode: u32,
    before_rename: impl FnOnce() -> io::Result<()>,
) -> io::Result<()> {
    let (tmp_path, _guard) = write_temp(path, data, mode)?;
    before_rename()?;
    fs::rename(&tmp_path, path)?;
    sync_parent(path)
}

/// Creates `path` with `data` atomically if it does not exist. Returns `false` (and writes
/// nothing) when the file already exists.
///
/// # Errors
/// Any IO error other than "already exists".
pub fn create_new_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<bool> {
    let (tmp_path, _guard) = write_temp(path, data, mode)?;
    // A hard link fails if the target exists, so concurrent creators cannot overwrite each other.
    match fs::hard_link(&tmp_path, path) {
        Ok(()) => {
            sync_parent(path)?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// Removes the temp file when dropped (after a successful rename it is already gone).
struct TempGuard(PathBuf);

impl Drop for TempGuard {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

fn write_temp(path: &Path, data: &[u8], mode: u32) -> io::Result<(PathBuf, TempGuard)> {
    let dir = parent_dir(path);
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let mut suffix = [0u8; 6];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut suffix);
    let tmp_path = dir.join(format!(
        ".{}.{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        hex::encode(suffix)
    ));
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp_path)?;
    let guard = TempGuard(tmp_path.clone());
    // `mode` passed to open is filtered by the umask; set it explicitly.
    file.set_permissions(fs::Permissions::from_mode(mode))?;
    file.write_all(data)?;
    file.sync_all()?;
    Ok((tmp_path, guard))
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn sync_parent(path: &Path) -> io::Result<()> {
    File::open(parent_dir(path))?.sync_all()
}

/// Creates `dir` (and parents) if needed and makes sure it is mode 0700.
///
/// # Errors
/// Any IO error, or `dir` existing as something other than a directory.
pub fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    match fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {
            if meta.permissions().mode() & 0o077 != 0 {
                fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
            }
            Ok(())
        }
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("'{}' exists and is not a directory", dir.display()),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        }
        Err(e) => Err(e),
    }
}

/// Why [`read_private`] refused a file.
#[derive(Debug, thiserror::Error)]
pub enum PrivateReadError {
    /// The file has group or other permission bits set (the mode is given).
    #[error("permissions {0:04o} are too open")]
    TooOpen(u32),
    /// Another user owns it.
    #[error(transparent)]
    Untrusted(Untrusted),
    /// Opening or reading failed (a symlink gives `ELOOP`).
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Reads a secret file: refuses symlinks, files accessible by group or others, and files owned by
/// another user (root excepted).
///
/// # Errors
/// [`PrivateReadError`].
pub fn read_private(path: &Path) -> Result<Vec<u8>, PrivateReadError> {
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "is a symbolic link; secrets are never read through symlinks",
                )
            } else {
                e
            }
        })?;
    let meta = file.metadata()?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(PrivateReadError::TooOpen(mode));
    }
    check_owner(&meta).map_err(PrivateReadError::Untrusted)?;
    let mut out = Vec::new();
    file.read_to_end(&mut out)?;
    Ok(out)
}

/// Why a file or directory that can change what the program trusts is not itself trusted
/// (OpenSSH's `StrictModes`).
#[derive(Debug, thiserror::Error)]
pub enum Untrusted {
    /// It is a symbolic link (it could point anywhere).
    #[error("is a symbolic link; use the file itself")]
    Symlink,
    /// Group or others may write it.
    #[error(
        "is writable by group or others (mode {0:04o}), so another local user could change it; \
         fix it with: chmod go-w"
    )]
    Writable(u32),
    /// Another user owns it.
    #[error(
        "is owned by uid {owner}, neither this user (uid {me}) nor root, so that user could \
         change it; fix it with: chown"
    )]
    Owner {
        /// The owner's uid.
        owner: u32,
        /// This process's effective uid.
        me: u32,
    },
    /// It could not be examined.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Checks that `path` (a file or a directory) is trusted: not a symlink, not writable by group
/// or others, owned by this user or root. A missing path is `Io` with `NotFound`.
///
/// # Errors
/// [`Untrusted`].
pub fn check_strict(path: &Path) -> Result<(), Untrusted> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::symlink_metadata(path)?;
    if meta.file_type().is_symlink() {
        return Err(Untrusted::Symlink);
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(Untrusted::Writable(mode & 0o777));
    }
    check_owner(&meta)
}

/// The owner must be this process's effective user or root.
fn check_owner(meta: &fs::Metadata) -> Result<(), Untrusted> {
    use std::os::unix::fs::MetadataExt;
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(Untrusted::Owner {
            owner: meta.uid(),
            me,
        });
    }
    Ok(())
}

/// An exclusive advisory lock on a lock file, released when dropped.
#[derive(Debug)]
pub struct LockFile {
    _file: File,
    path: PathBuf,
}

impl LockFile {
    /// Takes the lock, waiting for other holders.
    ///
    /// # Errors
    /// Any IO error creating or locking the file.
    pub fn acquire(path: &Path) -> io::Result<Self> {
        let file = open_lock(path)?;
        file.lock()?;
        Ok(Self {
            _file: file,
            path: path.to_owned(),
        })
    }

    /// Takes the lock if nobody holds it; `Ok(None)` when it is held elsewhere.
    ///
    /// # Errors
    /// Any IO error creating or locking the file.
    pub fn try_acquire(path: &Path) -> io::Result<Option<Self>> {
        let file = open_lock(path)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(Self {
                _file: file,
                path: path.to_owned(),
            })),
            Err(fs::TryLockError::WouldBlock) => Ok(None),
            Err(fs::TryLockError::Error(e)) => Err(e),
        }
    }

    /// The lock file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn open_lock(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Raises this process's soft limit on open files to its hard limit (every tunnel holds a TCP
/// socket). Returns the new soft limit.
///
/// # Errors
/// The OS error.
pub fn raise_open_file_limit() -> io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

/// Points standard output at `/dev/null`, so that whoever reads our standard output (a pipe)
/// sees EOF while we keep running: the half-close of `tunnel-client stdio`.
///
/// # Errors
/// The OS error.
pub fn detach_stdout() -> io::Result<()> {
    let null = OpenOptions::new().write(true).open("/dev/null")?;
    rustix::stdio::dup2_stdout(&null)?;
    Ok(())
}

/// A cheap identity of a file's current version: changes whenever it is replaced or rewritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

impl FileStamp {
    /// Stats `path`; `None` when it does not exist or cannot be read.
    pub fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = fs::metadata(path).ok()?;
        Some(Self {
            ino: m.ino(),
            len: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_sets_mode_whatever_the_content() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        write_atomic(&p, b"one", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"one");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        write_atomic(&p, b"two", 0o644).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o644
        );
        // No temp files are left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_write_that_fails_before_the_rename_leaves_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        write_atomic(&p, b"old", 0o600).unwrap();
        let err = write_atomic_with(&p, b"new", 0o600, || {
            Err(io::Error::new(io::ErrorKind::StorageFull, "disk full"))
        })
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::StorageFull);
        assert_eq!(fs::read(&p).unwrap(), b"old");
        // The temp file is cleaned up.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn failed_write_leaves_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        write_atomic(&p, b"old", 0o600).unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o500)).unwrap();
        // Root ignores directory permissions; only assert when the write actually failed.
        let res = write_atomic(&p, b"new", 0o600);
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
        if res.is_err() {
            assert_eq!(fs::read(&p).unwrap(), b"old");
        }
    }

    #[test]
    fn create_new_does_not_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        assert!(create_new_atomic(&p, b"first", 0o600).unwrap());
        assert!(!create_new_atomic(&p, b"second", 0o600).unwrap());
        assert_eq!(fs::read(&p).unwrap(), b"first");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn private_dir_is_0700() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a/b");
        ensure_private_dir(&p).unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o700
        );
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        ensure_private_dir(&p).unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o700
        );
    }

    #[test]
    fn strict_mode_refuses_loose_files_and_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        fs::write(&p, b"x").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        check_strict(&p).unwrap();
        for mode in [0o666, 0o664, 0o646] {
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
            assert!(
                matches!(check_strict(&p), Err(Untrusted::Writable(m)) if m == mode),
                "{mode:o}"
            );
        }
        let link = dir.path().join("l");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        assert!(matches!(check_strict(&link), Err(Untrusted::Symlink)));
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(
            check_strict(dir.path()),
            Err(Untrusted::Writable(_))
        ));
        assert!(matches!(
            check_strict(&dir.path().join("missing")),
            Err(Untrusted::Io(e)) if e.kind() == io::ErrorKind::NotFound
        ));
    }

    #[test]
    fn try_lock_is_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lock");
        let held = LockFile::try_acquire(&p).unwrap().unwrap();
        assert!(LockFile::try_acquire(&p).unwrap().is_none());
        drop(held);
        assert!(LockFile::try_acquire(&p).unwrap().is_some());
    }
}
