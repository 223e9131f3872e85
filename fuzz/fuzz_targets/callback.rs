//! A connect callback query: parameters and flow state verification.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| finx_gateway_fuzz::targets::callback(data));
