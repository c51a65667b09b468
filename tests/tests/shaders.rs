//! Every WGSL file parses and validates with naga (the version wgpu uses), and the runtime
//! embeds exactly the files in shaders/. Files named `*_sg.wgsl` use subgroup operations
//! and validate with them; every other file validates without.

use std::path::Path;

const EXPECTED_SHADERS: usize = 12;

fn shader_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shaders")
}

#[test]
fn every_shader_parses_and_validates() {
    let mut checked = 0;
    for entry in std::fs::read_dir(shader_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("wgsl") {
            continue;
        }
        let src = std::fs::read_to_string(&path).unwrap();
        let module = naga::front::wgsl::parse_str(&src)
            .unwrap_or_else(|e| panic!("{}: {}", path.display(), e.emit_to_string(&src)));
        let subgroups = path
            .file_stem()
            .is_some_and(|s| s.to_string_lossy().ends_with("_sg"));
        let caps = if subgroups {
            naga::valid::Capabilities::SUBGROUP
        } else {
            naga::valid::Capabilities::default()
        };
        let mut validator = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), caps);
        if subgroups {
            validator
                .subgroup_stages(naga::valid::ShaderStages::COMPUTE)
                .subgroup_operations(naga::valid::SubgroupOperationSet::all());
        }
        validator
            .validate(&module)
            .unwrap_or_else(|e| panic!("{}: {}", path.display(), e.emit_to_string(&src)));
        assert!(
            module
                .entry_points
                .iter()
                .all(|ep| ep.stage == naga::ShaderStage::Compute),
            "{}: only compute entry points belong in shaders/",
            path.display()
        );
        checked += 1;
    }
    assert_eq!(checked, EXPECTED_SHADERS, "number of WGSL files validated");
}

#[test]
fn runtime_embeds_every_shader_file() {
    let mut on_disk: Vec<String> = std::fs::read_dir(shader_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("wgsl"))
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    on_disk.sort();
    let mut embedded: Vec<String> = edgetune::backend::wgpu::SHADERS
        .iter()
        .map(|(n, _)| n.to_string())
        .collect();
    embedded.sort();
    assert_eq!(on_disk, embedded);
    for (name, src) in edgetune::backend::wgpu::SHADERS {
        let file = std::fs::read_to_string(shader_dir().join(format!("{name}.wgsl"))).unwrap();
        assert_eq!(file, src, "{name}.wgsl differs from the embedded copy");
    }
}

/// The text of every top-level `fn` in a WGSL source, by name.
fn functions(src: &str) -> std::collections::HashMap<String, String> {
    let mut out = std::collections::HashMap::new();
    let mut rest = src;
    while let Some(at) = rest.find("\nfn ") {
        let body = &rest[at + 1..];
        let end = body.find("\n}\n").map_or(body.len(), |e| e + 3);
        let name = body[3..].split('(').next().unwrap_or("").to_string();
        out.insert(name, body[..end].to_string());
        rest = &body[end..];
    }
    out
}

#[test]
fn subgroup_variants_copy_their_helpers_unchanged() {
    // A subgroup file cannot share its family's module (that would fail validation on
    // devices without subgroups), so it carries copies of the helpers it needs.
    for (family, variant) in [("quant", "quant_sg")] {
        let read =
            |n: &str| std::fs::read_to_string(shader_dir().join(format!("{n}.wgsl"))).unwrap();
        let (base, copy) = (functions(&read(family)), functions(&read(variant)));
        let shared: Vec<&String> = copy.keys().filter(|n| base.contains_key(*n)).collect();
        assert!(shared.len() >= 5, "{variant}: only {shared:?} shared");
        for name in shared {
            assert_eq!(
                copy[name], base[name],
                "{variant}.wgsl's `{name}` differs from {family}.wgsl's"
            );
        }
    }
}
