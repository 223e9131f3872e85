//! A caller credential header: JWT verification.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| finx_gateway_fuzz::targets::jwt(data));
