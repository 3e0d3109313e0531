//! The guest command line, parsed by `pvsync-boot-parse` (the words are documented there):
//! a word that is not understood ends the VM with the reason.

use pvsync_guest::NR_CPUS;

pub use pvsync_boot_parse::cmdline::Cmdline;

pub fn parse(s: &str) -> Cmdline<'_> {
    pvsync_boot_parse::cmdline::parse(s, NR_CPUS)
        .unwrap_or_else(|e| crate::panic::fail(format_args!("{e}")))
}
