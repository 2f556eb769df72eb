//! AFL++ target `update_decoder` (see `src/targets.rs`); `scripts/fuzz.sh` runs it.

#[path = "../targets.rs"]
#[allow(dead_code)]
mod targets;

fn main() {
    afl::fuzz!(|data: &[u8]| targets::update_decoder(data));
}
