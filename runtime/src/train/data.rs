//! Training data: JSONL files of prompt/completion pairs, chat conversations or
//! pre-tokenised sequences, turned into [`Example`]s whose loss covers only what the model
//! should learn to write. Bad lines are counted and reported, not fatal, up to a share.

use super::Example;
use crate::error::{Error, Result};
use crate::format::file::{FileKind, read_text};
use crate::rng::philox4x32_10;
use crate::tokenizer::Tokenizer;
use serde_json::Value;
use std::path::Path;
use std::prelude::v1::*;

/// How lines become token sequences.
#[derive(Debug, Clone, Copy)]
pub struct DataOptions {
    /// Longest sequence kept, in tokens; longer ones are skipped and counted.
    pub seq_len: usize,
    /// Wrap prompt/completion pairs in the model's chat format (a user turn answered by
    /// an assistant turn).
    pub chat: bool,
    /// The share of bad lines (malformed, empty, too long) above which loading fails.
    pub max_bad_share: f64,
}

/// A loaded data set.
#[derive(Debug)]
pub struct Dataset {
    pub examples: Vec<Example>,
    /// Non-empty lines read.
    pub lines: usize,
    /// (line number, reason) of every line skipped.
    pub skipped: Vec<(usize, String)>,
}

/// Loads `path` (see the module docs for the formats); token ids are checked against
/// `vocab`. Without a tokenizer only pre-tokenised lines are usable.
pub fn load_jsonl(
    path: &Path,
    tok: Option<&Tokenizer>,
    vocab: u32,
    opts: &DataOptions,
) -> Result<Dataset> {
    let text = read_text(path, FileKind::Data)?;
    let shown = path.display().to_string();
    let mut set = Dataset {
        examples: Vec::new(),
        lines: 0,
        skipped: Vec::new(),
    };
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        set.lines += 1;
        match parse_line(line, tok, vocab, opts) {
            Ok(ex) => set.examples.push(ex),
            Err(reason) => set.skipped.push((i + 1, reason)),
        }
    }
    let bad = set.skipped.len();
    if set.examples.is_empty() || bad as f64 > opts.max_bad_share * set.lines as f64 {
        let first = set
            .skipped
            .first()
            .map(|(l, r)| format!("; line {l}: {r}"))
            .unwrap_or_default();
        return Err(Error::Syntax {
            path: shown,
            line: 0,
            column: 0,
            message: format!(
                "{bad} of {} lines are unusable (at most {:.0}% may be){first}",
                set.lines,
                opts.max_bad_share * 100.0
            ),
        });
    }
    Ok(set)
}

/// One line as an example, or why not.
fn parse_line(
    line: &str,
    tok: Option<&Tokenizer>,
    vocab: u32,
    opts: &DataOptions,
) -> core::result::Result<Example, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let need_tok = || tok.ok_or("text needs a tokenizer, which the model lacks");
    let ex = if let Some(ids) = v.get("input_ids") {
        pretokenised(ids, v.get("labels"))?
    } else if let Some(msgs) = v.get("messages") {
        conversation(msgs, need_tok()?)?
    } else if let (Some(p), Some(c)) = (v.get("prompt"), v.get("completion")) {
        let (p, c) = (
            p.as_str().ok_or("`prompt` is not a string")?,
            c.as_str().ok_or("`completion` is not a string")?,
        );
        prompt_completion(p, c, need_tok()?, opts.chat)?
    } else {
        return Err("needs `prompt` and `completion`, `messages`, or `input_ids`".into());
    };
    if ex.tokens.len() < 2 || !ex.targets[1..].iter().any(|&t| t) {
        return Err("nothing to learn (no target tokens)".into());
    }
    if ex.tokens.len() > opts.seq_len {
        return Err(format!(
            "{} tokens exceed the sequence length {}",
            ex.tokens.len(),
            opts.seq_len
        ));
    }
    if let Some(&bad) = ex.tokens.iter().find(|&&t| t >= vocab) {
        return Err(format!(
            "token id {bad} is outside the vocabulary of {vocab}"
        ));
    }
    Ok(ex)
}

fn encode(tok: &Tokenizer, text: &str) -> core::result::Result<Vec<u32>, String> {
    tok.encode(text).map_err(|e| e.to_string())
}

/// Prompt tokens (BOS first when the model wants one) then completion tokens ending the
/// turn (the chat format's end marker, or EOS), the loss on the completion only.
pub fn prompt_completion(
    prompt: &str,
    completion: &str,
    tok: &Tokenizer,
    chat: bool,
) -> core::result::Result<Example, String> {
    if completion.is_empty() {
        return Err("empty completion".into());
    }
    let (prompt_text, completion_text) = if chat {
        let (_, body) = tok
            .chat
            .turn("assistant", completion)
            .ok_or("the model has no recognised chat format")?;
        (tok.chat.user_turn(prompt), body)
    } else {
        (prompt.to_owned(), completion.to_owned())
    };
    let mut tokens = tok.encode_prompt(&prompt_text).map_err(|e| e.to_string())?;
    let n_prompt = tokens.len();
    tokens.extend(encode(tok, &completion_text)?);
    if !chat && let Some(&eos) = tok.eos.first() {
        tokens.push(eos);
    }
    let targets = (0..tokens.len()).map(|i| i >= n_prompt).collect();
    Ok(Example { tokens, targets })
}

/// A conversation in the model's chat format, the loss on the assistant turns' bodies.
fn conversation(msgs: &Value, tok: &Tokenizer) -> core::result::Result<Example, String> {
    let msgs = msgs.as_array().ok_or("`messages` is not a list")?;
    let mut turns = Vec::with_capacity(msgs.len());
    for m in msgs {
        let role = m["role"].as_str().ok_or("a message has no string `role`")?;
        let content = m["content"]
            .as_str()
            .ok_or("a message has no string `content`")?;
        if !matches!(role, "system" | "user" | "assistant") {
            return Err(format!("unknown role `{role}`"));
        }
        turns.push((role, content));
    }
    if !turns
        .iter()
        .any(|&(r, c)| r == "assistant" && !c.is_empty())
    {
        return Err("no non-empty assistant turn".into());
    }
    let has_system = turns.first().is_some_and(|&(r, _)| r == "system");
    let mut tokens = encode(tok, &tok.chat.conversation_start(has_system))?;
    // BOS once: Llama 3's conversation start is its BOS marker already.
    if let (true, Some(bos)) = (tok.add_bos, tok.bos)
        && tokens.first() != Some(&bos)
    {
        tokens.insert(0, bos);
    }
    let mut targets = vec![false; tokens.len()];
    for (role, content) in turns {
        let (head, body) = tok
            .chat
            .turn(role, content)
            .ok_or("the model has no recognised chat format")?;
        let head = encode(tok, &head)?;
        targets.extend(core::iter::repeat_n(false, head.len()));
        tokens.extend(head);
        let body = encode(tok, &body)?;
        targets.extend(core::iter::repeat_n(role == "assistant", body.len()));
        tokens.extend(body);
    }
    Ok(Example { tokens, targets })
}

/// Token ids with Hugging Face labels: -100 masks a token, any other label must equal
/// its token (the shift happens in the loss); no labels means every token is a target.
fn pretokenised(ids: &Value, labels: Option<&Value>) -> core::result::Result<Example, String> {
    let ints = |v: &Value, what: &str| -> core::result::Result<Vec<i64>, String> {
        v.as_array()
            .ok_or(format!("`{what}` is not a list"))?
            .iter()
            .map(|x| x.as_i64().ok_or(format!("`{what}` holds a non-integer")))
            .collect()
    };
    let tokens: Vec<u32> = ints(ids, "input_ids")?
        .into_iter()
        .map(|t| u32::try_from(t).map_err(|_| format!("token id {t} is out of range")))
        .collect::<core::result::Result<_, _>>()?;
    let targets = match labels {
        None => vec![true; tokens.len()],
        Some(l) => {
            let l = ints(l, "labels")?;
            if l.len() != tokens.len() {
                return Err(format!("{} labels for {} input_ids", l.len(), tokens.len()));
            }
            l.iter()
                .zip(&tokens)
                .enumerate()
                .map(|(i, (&label, &t))| match label {
                    -100 => Ok(false),
                    _ if label == i64::from(t) => Ok(true),
                    _ => Err(format!(
                        "label {label} at {i} is neither -100 nor its token {t}"
                    )),
                })
                .collect::<core::result::Result<_, _>>()?
        }
    };
    Ok(Example { tokens, targets })
}

/// The (prompt, completion) pairs of a JSONL file, for scoring by generation; lines of
/// other shapes are counted in the second value.
pub fn load_pairs(path: &Path) -> Result<(Vec<(String, String)>, usize)> {
    let text = read_text(path, FileKind::Data)?;
    let (mut pairs, mut other) = (Vec::new(), 0);
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: Option<Value> = serde_json::from_str(line).ok();
        match v
            .as_ref()
            .map(|v| (v["prompt"].as_str(), v["completion"].as_str()))
        {
            Some((Some(p), Some(c))) => pairs.push((p.to_owned(), c.to_owned())),
            _ => other += 1,
        }
    }
    Ok((pairs, other))
}

/// Exact match of a generated answer with a reference: both lower-cased, with surrounding
/// whitespace and one final full stop removed.
pub fn exact_match(generated: &str, reference: &str) -> bool {
    let norm = |s: &str| {
        let t = s.trim().to_lowercase();
        t.strip_suffix('.').unwrap_or(&t).trim().to_owned()
    };
    norm(generated) == norm(reference)
}

/// The order of `n` examples in epoch `epoch`: a Fisher-Yates shuffle driven by Philox
/// (key = `seed`, counter = (epoch, i)), so a run and its resumption see the same order.
pub fn epoch_order(n: usize, seed: u64, epoch: u32) -> Vec<usize> {
    let key = [seed as u32, (seed >> 32) as u32];
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let w = philox4x32_10([epoch, i as u32, 0x5348_5546, 0], key)[0];
        let j = ((u64::from(w) * (i as u64 + 1)) >> 32) as usize;
        order.swap(i, j);
    }
    order
}

/// The examples of step `step` with `batch` per step: consecutive slices of the shuffled
/// epochs, wrapping into the next epoch.
pub fn batch_for_step(set: &[Example], batch: usize, step: u64, seed: u64) -> Vec<&Example> {
    if set.is_empty() {
        return Vec::new();
    }
    let n = set.len() as u64;
    // A batch spans at most a few epochs: shuffle each once.
    let mut order: Option<(u64, Vec<usize>)> = None;
    (0..batch as u64)
        .map(|b| {
            let at = step * batch as u64 + b;
            let epoch = at / n;
            if order.as_ref().is_none_or(|(e, _)| *e != epoch) {
                order = Some((epoch, epoch_order(set.len(), seed, epoch as u32)));
            }
            let i = order.as_ref().map_or(0, |(_, o)| o[(at % n) as usize]);
            &set[i]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn labels_mask_and_must_match_their_tokens() {
        let ex = pretokenised(&json!([5, 6, 7]), Some(&json!([-100, 6, 7]))).unwrap();
        assert_eq!(ex.targets, vec![false, true, true]);
        assert!(pretokenised(&json!([5, 6]), Some(&json!([5, 9]))).is_err());
        assert!(pretokenised(&json!([5, 6]), Some(&json!([5]))).is_err());
        assert!(pretokenised(&json!([5, -1]), None).is_err());
        assert_eq!(
            pretokenised(&json!([1, 2]), None).unwrap().targets,
            vec![true; 2]
        );
    }

    #[test]
    fn epoch_order_is_a_permutation_that_changes_per_epoch() {
        let a = epoch_order(100, 3, 0);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_ne!(a, epoch_order(100, 3, 1));
        assert_eq!(a, epoch_order(100, 3, 0));
    }
}
