//! Read-only memory maps of files (the model loader's weight files), behind a safe function.
//!
//! Mapping a file is a system call whose safety rests on something Rust cannot check: the
//! bytes under the map must not change while it is alive. This module is where that promise
//! is made, so that the crates reading weights need no `unsafe` of their own. The cost is the
//! same as `memmap2::Mmap::map`: no copy, pages are read on first touch.

use std::fs::File;
use std::io;

use memmap2::Mmap;

/// Maps `file` read-only into memory.
///
/// The caller's contract, documented for model files (weights, split parts): nobody truncates
/// or rewrites a file while it is mapped. A file changed underneath the map is undefined
/// behaviour (truncation typically ends the process with `SIGBUS`), as with every mmap-based
/// loader.
///
/// # Errors
/// Whatever `mmap(2)` reports (e.g. the file is not a regular file, or out of address space).
pub fn map_readonly(file: &File) -> io::Result<Mmap> {
    // SAFETY: the map is read-only and owns its pages for its lifetime; the one thing safe
    // code could break, the file's bytes changing underneath the map, is excluded by the
    // contract above: model files are not truncated or modified while they are served.
    unsafe { Mmap::map(file) }
}
