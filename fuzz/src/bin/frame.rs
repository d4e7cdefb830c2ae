//! AFL target: the bench TLV frame codec (`Codec::decode`/`encode`, `Scanner`).
#[path = "../targets.rs"]
mod targets;

fn main() {
    afl::fuzz!(|data: &[u8]| targets::frame(data));
}
