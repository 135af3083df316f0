//! Real HTTP on 127.0.0.1: the main package's loopback bench (the callback
//! POST through hyper-util's client bare, under the floor and with the layer,
//! at 1 and 64 calls in flight) with the two reqwest stacks a user picks
//! today added, reqwest 0.13's own retry module and reqwest-middleware 0.5
//! with reqwest-retry 0.9, against the same server and side by side.
//!
//! `cargo bench --bench loopback` in this folder.

#[path = "../../benches/common/mod.rs"]
mod common;
mod reqwest_stacks;

use std::sync::Arc;

use common::loopback::{self, Contenders};
use reqwest_stacks::ReqwestCallback;

fn main() {
    loopback::main(|| {
        let mut contenders = Contenders::new();
        contenders.add("reqwest_builtin_retry", |base| {
            let callback = Arc::new(ReqwestCallback::builtin_retry(base));
            move || {
                let callback = callback.clone();
                async move { callback.send().await }
            }
        });
        contenders.add("reqwest_middleware_retry", |base| {
            let callback = Arc::new(ReqwestCallback::middleware_retry(base));
            move || {
                let callback = callback.clone();
                async move { callback.send().await }
            }
        });
        contenders
    });
}
