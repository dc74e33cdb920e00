//! Any job config text or `--set` flags: parsing and validation must return
//! a config or an error, never panic; a config that validates must write
//! out as TOML that reads back to the same config (run folders and
//! checkpoints store it that way).
#![no_main]

use libfuzzer_sys::fuzz_target;
use worker::JobConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // A first line "--set" makes the rest `--set` flags on the built-in job
    // (the common way configs change); anything else is a whole file.
    let job = match text.strip_prefix("--set\n") {
        Some(flags) => {
            let overrides: Vec<String> = flags.lines().map(str::to_string).collect();
            match JobConfig::load(None, &overrides) {
                Ok(job) => job,
                Err(_) => return,
            }
        }
        None => match JobConfig::from_toml(text, "fuzz") {
            Ok(job) if job.validate("fuzz").is_ok() => job,
            _ => return,
        },
    };
    let _ = job.parallel_dims();
    let _ = job.warnings();
    let written = job.to_toml();
    let again = JobConfig::from_toml(&written, "written").expect("a valid config's TOML reads back");
    assert_eq!(again, job, "the written config differs:\n{written}");
});
