//! The atomics the algorithms use: `core`'s in a kernel, loom's when the crate's own unit
//! tests model-check it (`cfg(test)`: every interleaving of the real code is explored).
//!
//! Statistics counters and the fault switches of negative controls stay on `core`'s atomics
//! everywhere: they are not part of any protocol.

#[cfg(not(test))]
pub(crate) use core::sync::atomic::{fence, AtomicBool, AtomicPtr, AtomicU32, AtomicU64};
#[cfg(test)]
pub(crate) use loom::sync::atomic::{fence, AtomicBool, AtomicPtr, AtomicU32, AtomicU64};

pub(crate) use core::sync::atomic::Ordering;

/// One iteration of a busy-wait loop (PAUSE on x86; a yield point under loom, which must
/// see a spinning thread give way).
#[inline]
pub(crate) fn spin_loop() {
    #[cfg(test)]
    loom::hint::spin_loop();
    #[cfg(not(test))]
    core::hint::spin_loop();
}

/// Declares a constructor that is `const` in a kernel (locks live in statics) and a plain
/// function under loom, whose atomics cannot be built in a constant.
macro_rules! const_fn {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty $body:block) => {
        #[cfg(not(test))]
        $(#[$m])* $vis const fn $name($($arg: $ty),*) -> $ret $body
        #[cfg(test)]
        $(#[$m])* $vis fn $name($($arg: $ty),*) -> $ret $body
    };
}
pub(crate) use const_fn;

/// `[T; N]` built element by element, in a `const` context where the crate is built for a
/// kernel.
macro_rules! array_of {
    ($n:expr, $e:expr) => {{
        #[cfg(not(test))]
        {
            [const { $e }; $n]
        }
        #[cfg(test)]
        {
            core::array::from_fn(|_| $e)
        }
    }};
}
pub(crate) use array_of;
