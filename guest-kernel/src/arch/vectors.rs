//! Interrupt vectors the kernel uses (exceptions occupy 0..32).

/// The per-CPU LAPIC tick.
pub const TIMER: u8 = 0x30;
/// "Look at your run queue": wakes an idle CPU for a task just queued on it.
pub const RESCHEDULE: u8 = 0xf1;
/// TLB shootdown request.
pub const TLB_SHOOTDOWN: u8 = 0xf2;
/// Ping, for IPI round-trip measurements and tests.
pub const PING: u8 = 0xf3;
