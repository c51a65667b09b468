//! Model commands: info, logits (and the generation commands built on them).

use edgetune::backend::any::AnyBackend;
use edgetune::format::gguf::{Array, Value};
use edgetune::generate::{Sampler, Sampling, generate};
use edgetune::model::files::ModelFiles;
use edgetune::model::{Config, Model};
use edgetune::tokenizer::{TextStream, Tokenizer};
use edgetune::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// What `edgetune generate` asks for.
pub struct GenerateRequest<'a> {
    pub tokenizer: &'a Tokenizer,
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: Sampling,
}

/// Loads the model and, if given, the adapter in `adapter` onto it.
pub fn load<'b>(
    be: &'b AnyBackend,
    file: &ModelFiles,
    adapter: Option<&Path>,
) -> Result<Model<'b, AnyBackend>> {
    let mut model = file.load(be)?;
    if let Some(dir) = adapter {
        edgetune::adapter::peft::attach_dir(&mut model, dir)?;
        let cfg = model.adapter().map_or("", |c| c.method_name());
        eprintln!(
            "adapter: {} ({cfg}, {} tensors)",
            dir.display(),
            model.layout().len()
        );
    }
    Ok(model)
}

/// Logits at every position of `tokens`, with the model's config.
pub fn logits(
    be: &AnyBackend,
    file: &ModelFiles,
    adapter: Option<&Path>,
    tokens: &[u32],
) -> Result<(Config, Vec<f32>)> {
    let model = load(be, file, adapter)?;
    let mut cache = model.new_cache(
        u32::try_from(tokens.len())
            .unwrap_or(u32::MAX)
            .min(model.cfg.context),
    )?;
    let logits = model.forward(&mut cache, tokens, true)?;
    Ok((model.cfg, logits))
}

/// Streams a continuation of the request's prompt to stdout.
pub fn generate_text(
    be: &AnyBackend,
    file: &ModelFiles,
    adapter: Option<&Path>,
    req: &GenerateRequest<'_>,
) -> Result<()> {
    let model = load(be, file, adapter)?;
    // The caller checked that the prompt and the tokens to generate fit the context.
    let need = req.prompt.len().saturating_add(req.max_tokens);
    let capacity = u32::try_from(need)
        .unwrap_or(u32::MAX)
        .min(model.cfg.context);
    let mut cache = model.new_cache(capacity)?;
    let mut sampler = Sampler::new(req.sampling)?;
    let mut stream = TextStream::default();
    let mut stdout = std::io::stdout();
    let start = std::time::Instant::now();
    let (out, stop) = generate(
        &model,
        &mut cache,
        &req.prompt,
        req.max_tokens,
        &req.tokenizer.eos,
        &mut sampler,
        |t| {
            if let Some(piece) = stream.push(req.tokenizer, t)? {
                let _ = write!(stdout, "{piece}");
                let _ = stdout.flush();
            }
            Ok(())
        },
    )?;
    if let Some(rest) = stream.finish(req.tokenizer)? {
        print!("{rest}");
    }
    println!();
    eprintln!(
        "[{} prompt tokens, {} generated in {:.2} s, stop: {stop:?}]",
        req.prompt.len(),
        out.len(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// (mean negative log-likelihood per token, tokens scored) over independent windows.
pub fn nll(
    be: &AnyBackend,
    file: &ModelFiles,
    adapter: Option<&Path>,
    tokens: &[u32],
    window: usize,
) -> Result<(f64, usize)> {
    let model = load(be, file, adapter)?;
    // The caller checked 2 <= window <= context; a text shorter than a window needs
    // only its own length of cache.
    let window = window.min(tokens.len()).max(2);
    let mut cache = model.new_cache(u32::try_from(window).unwrap_or(u32::MAX))?;
    let (mut total, mut count) = (0.0f64, 0usize);
    // Independent windows: each token is predicted from the ones before it in its window.
    let windows = tokens.len().div_ceil(window);
    let start = std::time::Instant::now();
    for (w, chunk) in tokens.chunks(window).enumerate() {
        progress(w, windows, start);
        if chunk.len() < 2 {
            continue;
        }
        let (nll, n) = model.sequence_nll(&mut cache, chunk)?;
        total += nll;
        count += n;
    }
    progress(windows, windows, start);
    eprintln!();
    Ok((total / count as f64, count))
}

fn describe(v: &Value) -> String {
    match v {
        Value::Str(s) if s.len() > 80 => format!(
            "{:?}... ({} bytes)",
            &s[..s.floor_char_boundary(80)],
            s.len()
        ),
        Value::Str(s) => format!("{s:?}"),
        Value::Array(a) => {
            let kind = match a {
                Array::Str(_) => "strings",
                Array::F32(_) => "f32",
                Array::I32(_) => "i32",
                _ => "values",
            };
            format!("[{} {kind}]", a.len())
        }
        other => format!("{other:?}"),
    }
}

pub fn info(path: &Path) -> Result<()> {
    let files = ModelFiles::open(path, None)?;
    let (cfg, weights) = match &files {
        ModelFiles::Gguf(f) => {
            let g = &f.header;
            println!(
                "file:        {} (GGUF v{}, {} bytes)",
                f.path(),
                g.version,
                f.bytes().len()
            );
            let params: u64 = g.tensors.iter().map(|t| t.n_elements()).sum();
            let mut types: Vec<(String, usize)> = Vec::new();
            for t in &g.tensors {
                let name = t.ggml_type.name().to_string();
                match types.iter_mut().find(|(n, _)| *n == name) {
                    Some((_, c)) => *c += 1,
                    None => types.push((name, 1)),
                }
            }
            println!("parameters:  {params} ({:.1} M)", params as f64 / 1e6);
            println!(
                "quant types: {}",
                types
                    .iter()
                    .map(|(n, c)| format!("{n} x{c}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let tok = |k: &str| g.get(k).map(describe).unwrap_or_else(|| "-".into());
            println!(
                "tokenizer:   model {} pre {} tokens {} merges {}",
                tok("tokenizer.ggml.model"),
                tok("tokenizer.ggml.pre"),
                tok("tokenizer.ggml.tokens"),
                tok("tokenizer.ggml.merges")
            );
            (
                Config::from_gguf(g, f.path()),
                g.tensors.iter().map(|t| t.size).sum::<u64>(),
            )
        }
        ModelFiles::Hf(d) => {
            println!(
                "directory:   {} (Hugging Face config.json + safetensors)",
                path.display()
            );
            match files.tokenizer() {
                Ok(t) => println!(
                    "tokenizer:   tokenizer.json, {} tokens, chat {:?}",
                    t.vocab_size(),
                    t.chat
                ),
                Err(e) => println!("tokenizer:   {e}"),
            }
            let size = d.shard_bytes();
            (files.config(), size)
        }
    };
    match cfg {
        Ok(c) => {
            println!(
                "model:       {:?}, {} layers, width {}, ffn {}, {} heads ({} kv) of {}, vocab {}, rope theta {}, {} embeddings",
                c.arch,
                c.n_layers,
                c.dim,
                c.ffn_dim,
                c.n_heads,
                c.n_kv_heads,
                c.head_dim,
                c.vocab,
                c.rope_theta,
                if c.tied_embeddings { "tied" } else { "untied" }
            );
            println!("context:     {} tokens", c.context);
            let kv = c
                .kv_bytes_per_position()
                .saturating_mul(u64::from(c.context));
            println!(
                "memory:      weights {:.1} MiB + KV cache {:.1} MiB at full context ({} bytes per position)",
                weights as f64 / 1048576.0,
                kv as f64 / 1048576.0,
                c.kv_bytes_per_position()
            );
        }
        Err(e) => {
            // Described as far as it could be; still a failure, not an exit 0.
            println!("model:       not runnable");
            return Err(e);
        }
    }
    Ok(())
}

/// A one-line progress bar on stderr: `[#####-----] done/total, elapsed, remaining`.
fn progress(done: usize, total: usize, start: std::time::Instant) {
    let width = 30;
    let filled = (done * width).checked_div(total).unwrap_or(width);
    let elapsed = start.elapsed().as_secs_f64();
    let eta = match done {
        0 => "?".to_string(),
        _ => format!("{:.0}", elapsed / done as f64 * (total - done) as f64),
    };
    eprint!(
        "\r[{}{}] {done}/{total} windows, {elapsed:.0} s elapsed, {eta} s left ",
        "#".repeat(filled),
        "-".repeat(width - filled)
    );
}

/// Writes a float32 array as .npy (version 1.0, little-endian, C order).
pub fn write_npy(path: &PathBuf, shape: &[usize], data: &[f32]) -> Result<()> {
    let dims = shape
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let dims = if shape.len() == 1 {
        format!("{dims},")
    } else {
        dims
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({dims}), }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend(data.iter().flat_map(|v| v.to_le_bytes()));
    std::fs::write(path, out).map_err(|e| Error::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

pub fn parse_tokens(s: &str) -> std::result::Result<Vec<u32>, crate::CliError> {
    s.split(',')
        .map(|t| {
            t.trim().parse::<u32>().map_err(|_| crate::CliError::Flag {
                flag: "--tokens",
                reason: format!("`{}` is not a token id", t.escape_debug()),
            })
        })
        .collect()
}
