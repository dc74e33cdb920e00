//! Any bytes from the network: reading a frame must return a message or an
//! error, never panic, and never allocate more than the frame limit.
#![no_main]

use wire::protocol::read_blocking;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut cursor = std::io::Cursor::new(data);
    while (cursor.position() as usize) < data.len() {
        if read_blocking(&mut cursor).is_err() {
            break;
        }
    }
});
