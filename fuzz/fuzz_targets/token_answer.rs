//! A finX token endpoint answer: the grant parser and the error classifier.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| finx_gateway_fuzz::targets::token_answer(data));
