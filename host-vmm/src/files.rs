//! Reading the files an operator names (kernel images, scenario files, traces, study data):
//! regular files only, and never more than a bound. A FIFO or a device (`/dev/zero`,
//! `/dev/stdin`) would block or never end; a huge file would exhaust memory.

use std::fs::OpenOptions;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Why a file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is not a regular file")]
    NotAFile(PathBuf),
    #[error("{path} is larger than {max} bytes")]
    TooLarge { path: PathBuf, max: u64 },
    #[error("{0} is not UTF-8 text")]
    NotText(PathBuf),
}

/// The bytes of the regular file at `path`, at most `max` of them.
pub fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, FileError> {
    let read_err = |source| FileError::Read {
        path: path.to_owned(),
        source,
    };
    // Non-blocking: opening a FIFO (or a tty) for reading would otherwise wait for a writer
    // before the check below could refuse it. A regular file ignores the flag.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(read_err)?;
    if !file.metadata().map_err(read_err)?.is_file() {
        return Err(FileError::NotAFile(path.to_owned()));
    }
    let mut data = Vec::new();
    // One byte past the bound tells a file at the bound from one past it, even if it grows
    // while it is read.
    file.take(max.saturating_add(1))
        .read_to_end(&mut data)
        .map_err(read_err)?;
    if data.len() as u64 > max {
        return Err(FileError::TooLarge {
            path: path.to_owned(),
            max,
        });
    }
    Ok(data)
}

/// The text of the regular file at `path`, at most `max` bytes of UTF-8.
pub fn read_text(path: &Path, max: u64) -> Result<String, FileError> {
    String::from_utf8(read_bounded(path, max)?).map_err(|_| FileError::NotText(path.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_directories_and_big_files_are_refused() {
        assert!(matches!(
            read_bounded(Path::new("/dev/zero"), 16),
            Err(FileError::NotAFile(_))
        ));
        assert!(matches!(
            read_bounded(Path::new("/"), 16),
            Err(FileError::NotAFile(_))
        ));
        assert!(matches!(
            read_bounded(Path::new("/no/such/file"), 16),
            Err(FileError::Read { .. })
        ));
        let dir = std::env::temp_dir().join(format!("pvsync-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("f");
        std::fs::write(&f, b"0123456789").unwrap();
        assert_eq!(read_bounded(&f, 10).unwrap(), b"0123456789");
        assert!(matches!(
            read_bounded(&f, 9),
            Err(FileError::TooLarge { max: 9, .. })
        ));
        std::fs::write(&f, [0xff, 0xfe]).unwrap();
        assert!(matches!(read_text(&f, 10), Err(FileError::NotText(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A FIFO nobody writes is refused at once (opening it for reading would block).
    #[test]
    fn a_fifo_is_refused_without_waiting_for_a_writer() {
        let dir = std::env::temp_dir().join(format!("pvsync-fifo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path, which outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let (tx, rx) = std::sync::mpsc::channel();
        let path = fifo.clone();
        std::thread::spawn(move || tx.send(read_bounded(&path, 16).is_err()).unwrap());
        let refused = rx.recv_timeout(std::time::Duration::from_secs(10));
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(refused, Ok(true), "refused, without blocking");
    }
}
