//! Reading the files a project is made of (contracts, payload schemas, SQL set-up
//! files), for the runtime's loader and the CLI alike: regular files only, and never
//! more than [`MAX_BYTES`] of one.
//!
//! A named pipe would block the reader until someone writes to it, and a device such
//! as `/dev/zero` never ends, so anything that is not a regular file is refused before
//! it is opened. A file's size is not trusted either (`/proc` files say 0): reading
//! stops one byte past the limit, so a larger file is refused without being read whole.

use std::fmt;
use std::fs::{self, FileType};
use std::io::{self, Read};
use std::path::Path;

use onex_contract::Loaded;

/// The most one file may hold: the contracts' limit (OX104 resource-limit).
pub const MAX_BYTES: usize = onex_contract::MAX_CONTRACT_BYTES;

#[derive(Debug)]
pub enum ReadError {
    /// The path is something else: "a directory", "a named pipe (FIFO)", ...
    NotAFile(&'static str),
    TooLarge {
        limit: usize,
    },
    NotUtf8 {
        offset: usize,
    },
    Io(io::Error),
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::NotAFile(what) => write!(f, "expected a file, got {what}"),
            ReadError::TooLarge { limit } => write!(
                f,
                "the file is larger than {} MiB ({limit} bytes), the limit",
                limit >> 20
            ),
            ReadError::NotUtf8 { offset } => {
                write!(f, "the file is not UTF-8 (invalid byte at offset {offset})")
            }
            ReadError::Io(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for ReadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ReadError::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> Self {
        ReadError::Io(e)
    }
}

/// The bytes of the regular file at `path`, at most [`MAX_BYTES`] of them.
pub fn read(path: &Path) -> Result<Vec<u8>, ReadError> {
    read_at_most(path, MAX_BYTES)
}

/// The text of the regular file at `path`, at most [`MAX_BYTES`] of it, in UTF-8.
pub fn read_to_string(path: &Path) -> Result<String, ReadError> {
    String::from_utf8(read(path)?).map_err(|e| ReadError::NotUtf8 {
        offset: e.utf8_error().valid_up_to(),
    })
}

/// A contract file read and loaded: its text (for rendering the findings) and the
/// result. A file over the limit is not an error but its OX104 finding, like any
/// other problem of a contract's content.
pub fn load_contract(path: &Path) -> Result<(String, Loaded), ReadError> {
    match read(path) {
        Ok(bytes) => Ok(onex_contract::load_bytes(&bytes)),
        Err(ReadError::TooLarge { .. }) => Ok((String::new(), Loaded::oversized())),
        Err(e) => Err(e),
    }
}

fn read_at_most(path: &Path, limit: usize) -> Result<Vec<u8>, ReadError> {
    check_is_file(fs::metadata(path)?.file_type())?;
    let file = fs::File::open(path)?;
    // What was opened may not be what was looked at, if the path changed in between.
    let metadata = file.metadata()?;
    check_is_file(metadata.file_type())?;
    let limit = limit as u64;
    let mut bytes = Vec::with_capacity(metadata.len().min(limit + 1) as usize);
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(ReadError::TooLarge {
            limit: limit as usize,
        });
    }
    Ok(bytes)
}

fn check_is_file(kind: FileType) -> Result<(), ReadError> {
    if kind.is_file() {
        return Ok(());
    }
    if kind.is_dir() {
        return Err(ReadError::NotAFile("a directory"));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        let what = if kind.is_fifo() {
            "a named pipe (FIFO)"
        } else if kind.is_char_device() {
            "a character device"
        } else if kind.is_block_device() {
            "a block device"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "something that is not a regular file"
        };
        Err(ReadError::NotAFile(what))
    }
    #[cfg(not(unix))]
    Err(ReadError::NotAFile("something that is not a regular file"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_up_to_the_limit_is_read_and_one_byte_more_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        std::fs::write(&path, b"12345").expect("write");
        assert_eq!(read_at_most(&path, 5).expect("read"), b"12345");
        assert!(matches!(
            read_at_most(&path, 4),
            Err(ReadError::TooLarge { limit: 4 })
        ));
    }

    #[test]
    fn what_is_not_a_regular_file_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let error = read(dir.path()).expect_err("a directory");
        assert_eq!(error.to_string(), "expected a file, got a directory");
        #[cfg(unix)]
        {
            let error = read(Path::new("/dev/zero")).expect_err("a device");
            assert_eq!(error.to_string(), "expected a file, got a character device");
        }
    }

    #[test]
    fn a_size_that_lies_does_not_matter() {
        // /proc files say they hold 0 bytes.
        #[cfg(target_os = "linux")]
        assert!(
            !read(Path::new("/proc/self/status"))
                .expect("read")
                .is_empty()
        );
    }
}
