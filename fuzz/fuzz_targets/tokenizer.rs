//! tokenizer.json from arbitrary bytes, then encoding a fixed text and decoding the ids and
//! a few arbitrary ids: Ok or a typed error, never a panic that escapes edgetune's boundary
//! (a panic inside the `tokenizers` crate becomes an error; libFuzzer's own hook, which
//! aborts, still sees every panic outside it).
#![no_main]

use edgetune::tokenizer::Tokenizer;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    edgetune::guard::quiet_caught_panics();
    if let Ok(t) = Tokenizer::from_json_bytes(data, "tokenizer.json") {
        if let Ok(ids) = t.encode("Hello, wörld! 123 <|im_start|> \u{1F600}") {
            let _ = t.decode(&ids);
        }
        let _ = t.decode(&[0, 1, 2, 3, 255, 65_535, u32::MAX]);
    }
});
