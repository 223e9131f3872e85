//! A raw request target: route classification, the /auth guard, route policies.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| finx_gateway_fuzz::targets::route(data));
