//! Keeping requests in a file that is safe: created private, never
//! through a symbolic link, and whole (made under a name of its own, then
//! published at its path, so that a crash while it is made never leaves a
//! half-made outbox there); refused when others may write it or it is
//! another user's, and told apart from a file put at its path later.

use std::{
    fs::{File, Metadata, OpenOptions},
    io,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::outbox::OutboxError;

/// A file's device and inode: what tells it from another put at its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FileId {
    device: u64,
    inode: u64,
}

impl FileId {
    #[cfg(unix)]
    pub(super) fn of(metadata: &Metadata) -> FileId {
        use std::os::unix::fs::MetadataExt;
        FileId {
            device: metadata.dev(),
            inode: metadata.ino(),
        }
    }

    /// Elsewhere std says nothing stable of a file's identity: only a file
    /// removed from its path is told.
    #[cfg(not(unix))]
    pub(super) fn of(_: &Metadata) -> FileId {
        FileId {
            device: 0,
            inode: 0,
        }
    }
}

/// The start of a draft's name.
const DRAFT_PREFIX: &str = ".outbox-draft-";

/// A file opened to keep requests in.
pub(super) enum Opened {
    /// The file at the path; `held`: whether it held anything.
    Existing { file: File, id: FileId, held: bool },
    /// A new, empty file beside the path, under a name of its own: to be
    /// made into an outbox, then [`publish`]ed at the path.
    Draft {
        file: File,
        id: FileId,
        draft: PathBuf,
    },
}

/// Opens the file at `path` for reading and writing; where there is none,
/// creates a draft beside it (and its folder). Refuses a file that is not
/// safe to keep requests in.
pub(super) fn open_file(path: &Path) -> Result<Opened, OutboxError> {
    let io = |error: io::Error| OutboxError::io(path, error);
    let seen = match std::fs::symlink_metadata(path) {
        Ok(seen) => seen,
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            let folder = path.parent().unwrap_or(Path::new("."));
            create_folder(folder).map_err(io)?;
            let draft = folder.join(format!("{DRAFT_PREFIX}{}", uuid::Uuid::new_v4().simple()));
            // Fails on anything at that name, a dangling link included: a
            // new file is never created through a link.
            let mut options = OpenOptions::new();
            options.read(true).write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let file = options.open(&draft).map_err(io)?;
            let id = FileId::of(&file.metadata().map_err(io)?);
            return Ok(Opened::Draft { file, id, draft });
        }
        Err(error) => return Err(io(error)),
    };
    check_safe(path, &seen)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io)?;
    let opened = file.metadata().map_err(io)?;
    // Swapped between the look and the open (for a link, say).
    if FileId::of(&opened) != FileId::of(&seen) {
        return Err(OutboxError::unsafe_path(
            path,
            "it changed while being opened",
        ));
    }
    Ok(Opened::Existing {
        file,
        id: FileId::of(&opened),
        held: opened.len() > 0,
    })
}

/// Puts the finished `draft` at `path`, only if nothing is there yet (a
/// process that started at the same time may have published its own:
/// then `false`, and the draft is removed). Its own name is then removed,
/// and the folder synced, so that the file stays at `path` through a power
/// cut.
pub(super) fn publish(draft: &Path, path: &Path) -> Result<bool, OutboxError> {
    let io = |error: io::Error| OutboxError::io(path, error);
    let linked = match std::fs::hard_link(draft, path) {
        Ok(()) => true,
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => false,
        // A file system without hard links: renamed instead, unless a file
        // came meanwhile (a narrower window, on such file systems only).
        Err(_) if std::fs::symlink_metadata(path).is_ok() => false,
        Err(_) => {
            std::fs::rename(draft, path).map_err(io)?;
            sync_folder(path).map_err(io)?;
            return Ok(true);
        }
    };
    // The draft's name only: published, the file is at `path` whatever
    // becomes of it (a name left is removed once stale).
    let _ = std::fs::remove_file(draft);
    if linked {
        sync_folder(path).map_err(io)?;
    }
    Ok(linked)
}

/// How old a draft is when it is taken for one a crash left: far longer
/// than making a file takes.
const STALE_DRAFT: Duration = Duration::from_secs(10 * 60);

/// At most this many entries of the folder are looked at for stale drafts.
const FOLDER_SCAN: usize = 10_000;

/// Removes the drafts beside `path` that a crash left while making a file:
/// this user's regular files, named as drafts, older than [`STALE_DRAFT`].
/// Best effort: what cannot be read or removed is left.
pub(super) fn remove_stale_drafts(path: &Path) {
    let Some(folder) = path.parent() else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(folder) else {
        return;
    };
    for entry in entries.take(FOLDER_SCAN).flatten() {
        if !entry
            .file_name()
            .to_string_lossy()
            .starts_with(DRAFT_PREFIX)
        {
            continue;
        }
        let draft = entry.path();
        let stale = std::fs::symlink_metadata(&draft).is_ok_and(|metadata| {
            check_safe(&draft, &metadata).is_ok()
                && metadata
                    .modified()
                    .is_ok_and(|at| at.elapsed().is_ok_and(|age| age > STALE_DRAFT))
        });
        if stale {
            let _ = std::fs::remove_file(&draft);
        }
    }
}

/// Syncs the folder of `path`, so that its entries are on disk.
fn sync_folder(path: &Path) -> io::Result<()> {
    #[cfg(unix)]
    if let Some(folder) = path.parent() {
        File::open(folder)?.sync_all()?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

fn create_folder(folder: &Path) -> io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(folder)
}

/// Refuses what `metadata` (not following a link) says is unsafe to keep
/// requests in: anything but a regular file; on unix, a file others may
/// write, or another user's.
fn check_safe(path: &Path, metadata: &Metadata) -> Result<(), OutboxError> {
    if metadata.file_type().is_symlink() {
        return Err(OutboxError::unsafe_path(path, "it is a symbolic link"));
    }
    if !metadata.is_file() {
        return Err(OutboxError::unsafe_path(path, "it is not a regular file"));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if metadata.mode() & 0o022 != 0 {
            return Err(OutboxError::unsafe_path(
                path,
                "it is writable by group or others",
            ));
        }
        let user = process_user().map_err(|error| OutboxError::io(path, error))?;
        if metadata.uid() != user {
            return Err(OutboxError::unsafe_path(
                path,
                "it is owned by another user",
            ));
        }
    }
    Ok(())
}

/// The effective user of this process. std has no `geteuid`; a new pipe is
/// owned by the user that makes it, and takes no file on disk.
#[cfg(unix)]
fn process_user() -> io::Result<u32> {
    use std::os::{fd::OwnedFd, unix::fs::MetadataExt};
    let (reader, _writer) = io::pipe()?;
    Ok(File::from(OwnedFd::from(reader)).metadata()?.uid())
}

/// Opens the file at `path` again, if it is still the file `id`.
pub(super) fn reopen_file(path: &Path, id: FileId, write: bool) -> Result<File, OutboxError> {
    let file = match OpenOptions::new().read(true).write(write).open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            return Err(OutboxError::replaced(path))
        }
        Err(error) => return Err(OutboxError::io(path, error)),
    };
    let metadata = file
        .metadata()
        .map_err(|error| OutboxError::io(path, error))?;
    match FileId::of(&metadata) == id {
        true => Ok(file),
        false => Err(OutboxError::replaced(path)),
    }
}
