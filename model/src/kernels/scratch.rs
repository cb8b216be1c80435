//! Per-thread scratch buffers for the hot path: grown to the largest size asked and reused, so
//! a step allocates (and the kernel zeroes fresh pages) only while sizes are still growing.

use std::cell::RefCell;
use std::thread::LocalKey;

/// A per-thread buffer; declare with `thread_local!` and pass to [`with_scratch`].
pub type Scratch = RefCell<Vec<f32>>;

/// Runs `f` on `len` values of this thread's buffer `key` (contents unspecified: `f` must
/// write before it reads). Should the buffer already be in use further up this thread's stack
/// (a pool task stolen while waiting), a fresh one is used instead of failing.
pub fn with_scratch<R>(key: &'static LocalKey<Scratch>, len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                buf.resize(len, 0.0);
            }
            f(&mut buf[..len])
        }
        Err(_) => f(&mut vec![0.0; len]),
    })
}
