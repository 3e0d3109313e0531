//! Where and how the host runs a thread, from `/proc/<pid>/task/<tid>/stat`: its state
//! (running or runnable is `R`), the CPU it last ran on, and its scheduling policy and
//! real-time priority. The monitor samples it for every vCPU thread under the Linux
//! backend: stacking is measured from the CPUs the host really used, not from the VMM's
//! intent, and a raised priority is seen as the host sees it.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

/// One reading of a thread's `stat`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskStat {
    /// `R` running or runnable, `S` sleeping, ...
    pub state: u8,
    /// The CPU it last ran on (field 39, `processor`).
    pub cpu: u32,
    /// Real-time priority (field 40), 0 for the ordinary policies.
    pub rt_priority: u32,
    /// Scheduling policy (field 41): `SCHED_OTHER` 0, `SCHED_FIFO` 1, ...
    pub policy: u32,
}

impl TaskStat {
    /// Parses a `stat` line. The command name (field 2) is in parentheses and may itself
    /// hold spaces and parentheses: fields are counted after its last `)`.
    pub fn parse(line: &str) -> Option<Self> {
        let rest = &line[line.rfind(')')? + 1..];
        let mut f = rest.split_ascii_whitespace();
        // Fields 3.. of the kernel's numbering: index i is field i + 3.
        let state = *f.next()?.as_bytes().first()?;
        let mut f = f.skip(35);
        let cpu = f.next()?.parse().ok()?;
        let rt_priority = f.next()?.parse().ok()?;
        let policy = f.next()?.parse().ok()?;
        Some(TaskStat {
            state,
            cpu,
            rt_priority,
            policy,
        })
    }

    /// On a CPU or waiting for one.
    pub fn runnable(&self) -> bool {
        self.state == b'R'
    }

    /// Running under a real-time policy.
    pub fn real_time(&self) -> bool {
        self.policy == libc::SCHED_FIFO as u32 || self.policy == libc::SCHED_RR as u32
    }
}

/// An open `stat` file of one thread of this process.
pub struct TaskStatFile {
    file: File,
    buf: Vec<u8>,
}

impl TaskStatFile {
    pub fn open(tid: i32) -> std::io::Result<Self> {
        let path = format!("/proc/{}/task/{tid}/stat", std::process::id());
        Ok(TaskStatFile {
            file: File::open(path)?,
            buf: Vec::with_capacity(512),
        })
    }

    pub fn read(&mut self) -> Option<TaskStat> {
        self.buf.clear();
        self.file.seek(SeekFrom::Start(0)).ok()?;
        self.file.read_to_end(&mut self.buf).ok()?;
        // The name may hold any bytes; the fields after it are ASCII.
        TaskStat::parse(&String::from_utf8_lossy(&self.buf))
    }
}

/// Whether two runnable threads of `threads` (one VM's vCPUs) share a CPU.
pub fn stacked(threads: &[TaskStat]) -> bool {
    let running: Vec<u32> = threads
        .iter()
        .filter(|t| t.runnable())
        .map(|t| t.cpu)
        .collect();
    running
        .iter()
        .enumerate()
        .any(|(i, c)| running[i + 1..].contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real line (Linux 6.18), with a command name that holds ") (" to confuse a parser.
    const LINE: &str = "4242 (vm-vcpu1 ) (x) R 4200 4200 100 34816 4200 4194368 12 0 0 0 \
        91 7 0 0 -2 0 9 0 123456 1000000 500 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 \
        -1 1 1 1 0 0 0 0 0 0 0 0 0 0 0";

    #[test]
    fn parses_state_cpu_and_policy_past_a_tricky_name() {
        let t = TaskStat::parse(LINE).unwrap();
        assert_eq!(
            t,
            TaskStat {
                state: b'R',
                cpu: 1,
                rt_priority: 1,
                policy: 1
            }
        );
        assert!(t.runnable() && t.real_time());
        assert_eq!(TaskStat::parse("1 (x) R 2 3"), None);
        assert_eq!(TaskStat::parse("no parenthesis"), None);
    }

    #[test]
    fn reads_this_thread_as_running_where_it_is_pinned() {
        let cpus = crate::sched::affinity::allowed_cpus().unwrap();
        let last = *cpus.last().unwrap();
        std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            crate::sched::affinity::pin_thread(tid, last).unwrap();
            let t = TaskStatFile::open(tid).unwrap().read().unwrap();
            assert!(t.runnable(), "{t:?}");
            assert_eq!(t.cpu as usize, last, "{t:?}");
            assert_eq!(t.policy, libc::SCHED_OTHER as u32);
            assert!(!t.real_time());
        })
        .join()
        .unwrap();
    }

    #[test]
    fn stacking_needs_two_runnable_siblings_on_one_cpu() {
        let t = |state, cpu| TaskStat {
            state,
            cpu,
            rt_priority: 0,
            policy: 0,
        };
        assert!(!stacked(&[t(b'R', 0), t(b'R', 1)]));
        assert!(stacked(&[t(b'R', 0), t(b'S', 1), t(b'R', 0)]));
        assert!(!stacked(&[t(b'R', 0), t(b'S', 0)]));
        assert!(!stacked(&[]));
    }
}
