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

/// Whether the model finds a failing interleaving, and fails there for the reason the
/// negative control is about: the panic's message contains `expected` (a panic for any
/// other reason, a livelock or an unrelated assertion, fails the test instead).
fn rejects(preemptions: usize, expected: &str, f: impl Fn() + Sync + Send + 'static) -> bool {
    let Err(payload) =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(preemptions, f)))
    else {
        return false;
    };
    let message = payload
        .downcast_ref::<std::string::String>()
        .map(|s| s.as_str())
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("(no message)");
    assert!(
        message.contains(expected),
        "the model failed, but not for the control's reason ({expected:?}): {message}"
    );
    true
}
