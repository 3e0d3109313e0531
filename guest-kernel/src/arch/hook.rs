//! Hooks: how a lower layer calls into a higher one without importing it.
//!
//! A [`Hook`] holds one plain `fn` pointer in an atomic, installed by the layer above (at
//! boot, before any CPU can reach the call site) and read with one relaxed load, so a hot
//! path (an IPI, every interrupt return) pays a load and an indirect call. An empty hook
//! means the documented default of the call site, which each hook's owner describes.
//!
//! Relaxed is enough: a hook points at code, which never changes, and whatever the hooked
//! function reads is published by its own module's synchronization (or, for everything
//! installed at boot, by the bring-up of the CPUs that later call it).

use core::marker::PhantomData;
use core::sync::atomic::{AtomicPtr, Ordering};

mod sealed {
    pub trait Sealed {}
}

/// The `fn` pointer types a [`Hook`] can hold.
pub trait HookFn: Copy + sealed::Sealed {
    #[doc(hidden)]
    fn into_raw(self) -> *mut ();
    /// # Safety
    /// `raw` must come from `into_raw` of this very type.
    #[doc(hidden)]
    unsafe fn from_raw(raw: *mut ()) -> Self;
}

macro_rules! hook_fn_types {
    ($($t:ty),* $(,)?) => {$(
        impl sealed::Sealed for $t {}
        impl HookFn for $t {
            #[inline]
            fn into_raw(self) -> *mut () {
                self as *mut ()
            }
            #[inline]
            unsafe fn from_raw(raw: *mut ()) -> Self {
                // SAFETY: per the contract `raw` is a `$t` turned into a data pointer, which
                // has the same size; converting it back gives the same function pointer.
                unsafe { core::mem::transmute::<*mut (), $t>(raw) }
            }
        }
    )*};
}

hook_fn_types!(
    fn(),
    fn(bool),
    fn(u8),
    fn(u32),
    fn(u32) -> bool,
    fn(u32) -> !,
    fn(u64, u64, u64) -> u64,
    fn(shared_abi::IpiDest, u8) -> bool,
    fn(&mut super::idt::TrapFrame),
    fn(&super::idt::TrapFrame) -> !,
);

/// One `fn` pointer of type `F`, or nothing.
pub struct Hook<F: HookFn> {
    f: AtomicPtr<()>,
    _type: PhantomData<F>,
}

impl<F: HookFn> Hook<F> {
    /// An empty hook (the call site's default applies).
    pub const fn new() -> Self {
        Hook {
            f: AtomicPtr::new(core::ptr::null_mut()),
            _type: PhantomData,
        }
    }

    /// Installs `f` (replacing what was installed).
    pub fn set(&self, f: F) {
        self.f.store(f.into_raw(), Ordering::Release);
    }

    /// The installed function, if any: one relaxed load.
    #[inline]
    pub fn get(&self) -> Option<F> {
        let raw = self.f.load(Ordering::Relaxed);
        // SAFETY: only `set` stores here, always `into_raw` of an `F`.
        (!raw.is_null()).then(|| unsafe { F::from_raw(raw) })
    }
}

impl<F: HookFn> Default for Hook<F> {
    fn default() -> Self {
        Self::new()
    }
}
