//! loom models of the crate's protocols, run by `cargo test` (the crate's unit tests build it
//! on loom's atomics, so these explore the real code, not a copy). Each model has a negative
//! control: a known-broken variant, switched on at run time, that the model must reject.
//!
//! A model runs each CPU as a loom thread on [`platform::Model`]: halts are loom `Notify`
//! waits (so a lost kick leaves a thread blocked for good, which loom reports as a
//! deadlock), the clock advances on each read (so every busy wait reaches its slow path at
//! once), and there is no shared region (no hypercalls).

mod locks;
mod platform;
mod rcu;
mod tlb;

/// Runs `f` as a loom model with `preemptions` as the preemption bound.
fn check(preemptions: usize, f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(preemptions);
    b.max_branches = 100_000;
    b.check(f);
}

/// Whether the model finds a failing interleaving (a panic in some execution: a failed
/// assertion, or a deadlock loom detects).
fn rejects(preemptions: usize, f: impl Fn() + Sync + Send + 'static) -> bool {
    // The expected failure's panic message is noise here.
    let hook = std::panic::take_hook();
    std::panic::set_hook(std::boxed::Box::new(|_| {}));
    let failed =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(preemptions, f))).is_err();
    std::panic::set_hook(hook);
    failed
}
