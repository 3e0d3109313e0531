//! Host CPU affinity of threads, with CPU masks sized at run time: the kernel's mask may be
//! larger than `cpu_set_t` (1024 CPUs), so none of this has a CPU limit built in.

/// Bits per mask word.
const WORD_BITS: usize = u64::BITS as usize;
/// The kernel refuses a mask smaller than its own (`nr_cpu_ids` bits) with EINVAL; masks
/// grow up to this many CPUs trying.
const MAX_CPUS: usize = 1 << 20;

/// The host CPUs this process may run on, in order; None if the kernel would not say.
pub fn allowed_cpus() -> Option<Vec<usize>> {
    let mut mask = vec![0u64; mask_words()];
    get_mask(0, &mut mask).ok()?;
    let cpus: Vec<usize> = (0..mask.len() * WORD_BITS)
        .filter(|&c| mask[c / WORD_BITS] & (1 << (c % WORD_BITS)) != 0)
        .collect();
    (!cpus.is_empty()).then_some(cpus)
}

/// Words in the kernel's CPU mask (found once, by asking for this process's): every mask
/// passed to the kernel has this size, so that one thread's mask can be saved and put back.
pub fn mask_words() -> usize {
    static WORDS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *WORDS.get_or_init(|| {
        let mut words = 1024 / WORD_BITS;
        while words * WORD_BITS <= MAX_CPUS {
            let mut mask = vec![0u64; words];
            if get_mask(0, &mut mask).is_ok() {
                return words;
            }
            words *= 2;
        }
        1024 / WORD_BITS
    })
}

/// Reads thread `tid`'s CPU mask into `mask`.
pub fn get_mask(tid: libc::pid_t, mask: &mut [u64]) -> std::io::Result<()> {
    // SAFETY: sched_getaffinity writes at most `size` bytes into `mask`, which has them.
    let n = unsafe {
        libc::syscall(
            libc::SYS_sched_getaffinity,
            tid as libc::c_long,
            std::mem::size_of_val(mask),
            mask.as_mut_ptr(),
        )
    };
    if n > 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Sets thread `tid`'s CPU mask (the caller names a thread of this process).
pub fn set_mask(tid: libc::pid_t, mask: &[u64]) -> std::io::Result<()> {
    // SAFETY: sched_setaffinity reads `size` bytes of `mask`, which has them.
    let r = unsafe {
        libc::syscall(
            libc::SYS_sched_setaffinity,
            tid as libc::c_long,
            std::mem::size_of_val(mask),
            mask.as_ptr(),
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `mask` holding CPU `cpu` alone (false if `cpu` does not fit).
pub fn only(mask: &mut [u64], cpu: usize) -> bool {
    mask.fill(0);
    match mask.get_mut(cpu / WORD_BITS) {
        Some(w) => {
            *w = 1 << (cpu % WORD_BITS);
            true
        }
        None => false,
    }
}

/// Pins thread `tid` (of this process) to host CPU `cpu`.
pub fn pin_thread(tid: libc::pid_t, cpu: usize) -> std::io::Result<()> {
    let mut mask = vec![0u64; mask_words()];
    if tid <= 0 || !only(&mut mask, cpu) {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    set_mask(tid, &mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_may_run_somewhere_and_a_thread_can_be_pinned_there() {
        let cpus = allowed_cpus().expect("the kernel says where this process may run");
        let last = *cpus.last().unwrap();
        std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            let me = unsafe { libc::gettid() };
            pin_thread(me, last).unwrap();
            // SAFETY: sched_getcpu has no preconditions.
            assert_eq!(unsafe { libc::sched_getcpu() }, last as i32);
        })
        .join()
        .unwrap();
        assert!(pin_thread(0, last).is_err(), "0 would mean the caller");
        assert!(pin_thread(1, MAX_CPUS).is_err());
    }
}
