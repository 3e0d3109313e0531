//! The guest's x86-TSO model of the RCU grace-period request (`guest-kernel/src/rcu_model.rs`,
//! `core` and `alloc` only), run on the host: every interleaving with store buffers is
//! explored; the updater's full barrier before it reads the grace-period counter is what
//! keeps a reader from seeing a freed element.

#[path = "../../guest-kernel/src/rcu_model.rs"]
#[allow(dead_code)]
mod rcu_model;

#[test]
fn request_gp_is_safe_with_its_barrier() {
    let o = rcu_model::explore(true);
    assert!(o.states > 0);
    assert!(
        o.counterexample.is_none(),
        "a bad interleaving with the barrier"
    );
}

#[test]
fn without_the_barrier_a_reader_sees_a_freed_element() {
    let o = rcu_model::explore(false);
    let steps = o
        .counterexample
        .expect("the store-buffering interleaving is found");
    assert!(!steps.is_empty());
    // The counterexample prints step by step.
    for s in &steps {
        assert!(!s.to_string().is_empty());
    }
}
