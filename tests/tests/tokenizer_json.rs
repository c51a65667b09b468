//! A Hugging Face tokenizer.json with tokenizer_config.json: ids as transformers gives them
//! (tools/reference/tokenizer_json.py), special tokens, end-of-turn ids and the chat format.

use edgetune::tokenizer::{ChatTemplate, Tokenizer};
use serde_json::Value;
use std::path::Path;

#[test]
fn tokenizer_json_matches_transformers() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/tokenizer");
    let tok = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let want: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    for case in want["cases"].as_array().unwrap() {
        let ids: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            tok.encode(case["text"].as_str().unwrap()).unwrap(),
            ids,
            "{}",
            case["text"]
        );
    }
    // tokenizer_config.json's eos first, then the end-of-turn token the chat format uses.
    let id = |k: &str| want[k].as_u64().unwrap() as u32;
    assert_eq!(tok.eos, vec![id("endoftext"), id("im_end")]);
    assert_eq!(tok.bos, None);
    assert!(!tok.add_bos);
    assert_eq!(
        tok.chat,
        ChatTemplate::ChatMl {
            default_system: None
        }
    );
    assert_eq!(
        tok.chat.user_turn("hi"),
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn chat_templates_are_recognised_not_run() {
    let smol = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}";
    assert_eq!(
        ChatTemplate::recognise(Some(smol)),
        ChatTemplate::ChatMl {
            default_system: Some(
                "You are a helpful AI assistant named SmolLM, trained by Hugging Face".into()
            )
        }
    );
    assert_eq!(
        ChatTemplate::recognise(Some("{{ '<|start_header_id|>' }}")),
        ChatTemplate::Llama3
    );
    // Unknown templates, even ones that look like code, fall back to the raw prompt.
    let odd = "{% import os %}{{ os.system('rm -rf /') }}";
    assert_eq!(ChatTemplate::recognise(Some(odd)), ChatTemplate::Raw);
    assert_eq!(ChatTemplate::Raw.user_turn("as is"), "as is");
    assert_eq!(ChatTemplate::recognise(None), ChatTemplate::Raw);
}

#[test]
fn missing_or_corrupt_tokenizer_files_are_errors() {
    assert!(Tokenizer::from_file(Path::new("/nonexistent/tokenizer.json")).is_err());
    let bad = std::env::temp_dir().join(format!(
        "edgetune-bad-tokenizer-{}.json",
        std::process::id()
    ));
    std::fs::write(&bad, b"{\"model\": 5").unwrap();
    assert!(Tokenizer::from_file(&bad).is_err());
    std::fs::remove_file(bad).unwrap();
}
