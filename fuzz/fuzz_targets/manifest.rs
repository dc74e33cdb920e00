//! Any bytes as a checkpoint's manifest.json: reading must return a
//! manifest or an error, never panic; one that reads must pass or fail its
//! consistency check without panicking, and write out as JSON that reads
//! back to the same manifest, sealed with its CRC-32 (one read without a
//! seal, as written before the seal existed, gains one).
#![no_main]

use checkpoint::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(manifest) = Manifest::from_json(data, "fuzz://manifest.json") else { return };
    let _ = manifest.check_consistent();
    let written = manifest.to_json();
    let again = Manifest::from_json(&written, "fuzz://written").expect("a manifest read back from its own JSON");
    assert!(again.crc32.is_some(), "written manifests are sealed");
    assert_eq!(Manifest { crc32: None, ..again }, Manifest { crc32: None, ..manifest });
});
