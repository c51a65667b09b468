//! config.json and a safetensors header from arbitrary bytes (the first two bytes give the
//! length of the config part): parsing, the config's checks, and the check of the config
//! against the header's tensors must return Ok or a typed error, never panic or allocate
//! by a number they read.
#![no_main]

use edgetune::format::file::parse_json;
use edgetune::model::files::{check_config_against_tensors, config_from_json, safetensors_header};
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    edgetune::guard::quiet_caught_panics();
    let Some((len, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let split = (u16::from_le_bytes(*len) as usize).min(rest.len());
    let (config, weights) = rest.split_at(split);
    let config = parse_json(config, "config.json")
        .and_then(|json| config_from_json(&json, Path::new("config.json")));
    let header = safetensors_header(weights, "model.safetensors");
    if let (Ok(config), Ok((_, meta))) = (config, header) {
        let _ = check_config_against_tensors(
            &config,
            "model.safetensors",
            meta.tensors().keys().map(String::as_str),
            |name| Some(meta.info(name)?.shape.clone()),
        );
    }
});
