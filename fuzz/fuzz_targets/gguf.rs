//! The GGUF reader on arbitrary bytes: it must return Ok or a typed error, never panic,
//! and never allocate beyond what the input's size allows. A parsed file's tensors must lie
//! inside the input.
#![no_main]

use edgetune::format::gguf::Gguf;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(g) = Gguf::parse(data) {
        for t in &g.tensors {
            let bytes = g.tensor_data(data, t).expect("a parsed tensor lies inside the file");
            assert_eq!(bytes.len() as u64, t.size);
        }
    }
});
