//! The atomics and locks the protocols use: std's and parking_lot's, or loom's under
//! `--cfg loom` (tokio's `loom` module is the pattern). loom cannot see inside parking_lot or
//! crossbeam, so everything these protocols synchronise on goes through here.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicUsize, Ordering, fence};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicUsize, Ordering, fence};

/// A mutex with parking_lot's interface (a lock that cannot be poisoned).
#[cfg(not(loom))]
pub use parking_lot::{Mutex, MutexGuard};

#[cfg(loom)]
mod loom_mutex {
    /// loom's mutex behind parking_lot's interface.
    #[derive(Debug, Default)]
    pub struct Mutex<T>(loom::sync::Mutex<T>);

    /// Its guard.
    pub type MutexGuard<'a, T> = loom::sync::MutexGuard<'a, T>;

    impl<T> Mutex<T> {
        /// A new mutex.
        pub fn new(t: T) -> Self {
            Mutex(loom::sync::Mutex::new(t))
        }

        /// Locks it (a panicking holder does not poison it here either).
        pub fn lock(&self) -> MutexGuard<'_, T> {
            self.0.lock().unwrap_or_else(|e| e.into_inner())
        }
    }
}
#[cfg(loom)]
pub use loom_mutex::{Mutex, MutexGuard};
