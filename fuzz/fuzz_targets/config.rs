//! A config file: TOML parsing and validation.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| finx_gateway_fuzz::targets::config(data));
