//! AFL target: the config parser (`Config::parse`) and what `check` prints back.
#[path = "../targets.rs"]
mod targets;

fn main() {
    afl::fuzz!(|data: &[u8]| targets::config(data));
}
