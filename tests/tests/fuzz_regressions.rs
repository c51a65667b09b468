//! Every fuzz seed and every input the GGUF fuzzer ever crashed on parses to Ok or a typed
//! error without panicking (fuzz/regressions/gguf holds the crashes, fuzz/seeds/gguf the seeds).

use edgetune::format::gguf::Gguf;

#[test]
fn gguf_fuzz_inputs_never_panic() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut n = 0;
    for dir in ["seeds/gguf", "regressions/gguf"] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.file_name().is_some_and(|n| n == ".keep") {
                continue;
            }
            let bytes = std::fs::read(&path).unwrap();
            if let Ok(g) = Gguf::parse(&bytes) {
                for t in &g.tensors {
                    assert_eq!(
                        g.tensor_data(&bytes, t).map(<[u8]>::len),
                        Some(t.size as usize),
                        "{}",
                        path.display()
                    );
                }
            }
            n += 1;
        }
    }
    assert!(n >= 1, "no fuzz inputs found");
}
