//! AFL++ target `dns_handler` (see `src/targets.rs`); `scripts/fuzz.sh` runs it.

#[path = "../targets.rs"]
#[allow(dead_code)]
mod targets;

fn main() {
    afl::fuzz!(|data: &[u8]| targets::dns_handler(data));
}
