//! Real HTTP on 127.0.0.1: the callback POST through hyper-util's client bare,
//! under the floor (`tower::retry::Retry` cloning the request and never
//! retrying) and with the layer, at 1 and 64 calls in flight. The peers
//! package (`peers/`) runs the same bench with the peer stacks added.
//!
//! Criterion gives each contender's median; the same contenders then run in
//! alternation (`side_by_side`) for ratios that the machine's drifting load
//! does not skew.

mod common;

fn main() {
    common::loopback::main(common::loopback::Contenders::new);
}
