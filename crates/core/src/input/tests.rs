//! The input readers on files made here: every kind, and the errors users meet.
#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use arrow_array::{ArrayRef, RecordBatch};

use super::*;
use crate::messages::Message;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn hh_rlhf_transcripts() {
    let t = "\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: fine";
    assert_eq!(
        hh_rlhf_prompt(t).unwrap(),
        vec![Message::user("hi there"), Message::assistant("hello"), Message::user("how are you?")]
    );
    assert_eq!(hh_rlhf_prompt("no turns here"), None);
}

#[test]
fn jsonl_prompts_with_ids_limit_and_duplicates() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        "a.jsonl",
        "{\"id\": 1, \"q\": \"one\"}\n\n{\"id\": 2, \"q\": \"two\"}\n{\"id\": 3, \"q\": \"three\"}\n",
    );
    let mut cfg = InputConfig {
        path: Some(p.display().to_string()),
        prompt_column: Some("q".into()),
        id_column: Some("id".into()),
        ..Default::default()
    };
    let rows = read_prompts(&cfg).unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[1].prompt_id, "2");
    assert_eq!(rows[1].messages, vec![Message::user("two")]);
    assert!(rows[2].location.ends_with("a.jsonl:4"), "{}", rows[2].location);
    cfg.limit = Some(2);
    assert_eq!(read_prompts(&cfg).unwrap().len(), 2);

    let dup = write(d.path(), "dup.jsonl", "{\"q\": \"same\"}\n{\"q\": \"other\"}\n{\"q\": \"same\"}\n");
    let cfg =
        InputConfig { path: Some(dup.display().to_string()), prompt_column: Some("q".into()), ..Default::default() };
    let e = read_prompts(&cfg).unwrap_err().to_string();
    assert!(e.contains("dup.jsonl:3") && e.contains("also at") && e.contains("dup.jsonl:1"), "{e}");
}

#[test]
fn json_array_messages_gz_and_glob() {
    let d = tempfile::tempdir().unwrap();
    write(
        d.path(),
        "x.json",
        r#"[{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}]"#,
    );
    let gz = d.path().join("y.jsonl.gz");
    let mut enc = flate2::write::GzEncoder::new(File::create(&gz).unwrap(), flate2::Compression::default());
    enc.write_all(b"{\"messages\": [{\"from\": \"human\", \"value\": \"v\"}]}\n").unwrap();
    enc.finish().unwrap();
    let cfg = InputConfig {
        path: Some(format!("{}/*", d.path().display())),
        messages_column: Some("messages".into()),
        ..Default::default()
    };
    let rows = read_prompts(&cfg).unwrap();
    assert_eq!(rows[0].messages, vec![Message::new("system", "s"), Message::user("u")]);
    assert_eq!(rows[1].messages, vec![Message::user("v")]);
    assert_eq!(rows[0].prompt_id, prompt_id_of(&rows[0].messages));
    // A directory reads the same files.
    let cfg = InputConfig { path: Some(d.path().display().to_string()), ..cfg };
    assert_eq!(read_prompts(&cfg).unwrap(), rows);
}

#[test]
#[allow(clippy::print_stderr, reason = "says why the test is skipped")]
fn shared_hh_rlhf_if_present() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/hh-rlhf/harmless-base/test.jsonl.gz");
    if !p.exists() {
        eprintln!("skipping: {} is absent", p.display());
        return;
    }
    let cfg = InputConfig {
        path: Some(p.display().to_string()),
        format: InputFormat::HhRlhf,
        limit: Some(50),
        ..Default::default()
    };
    let rows = read_prompts(&cfg).unwrap();
    assert_eq!(rows.len(), 50);
    assert!(rows.iter().all(|r| r.messages.last().unwrap().role == "user"));
    assert!(rows.iter().all(|r| r.messages.iter().all(|m| !m.content.contains("\n\nHuman:"))));
}

#[test]
fn candidates_jsonl_errors_name_the_line() {
    let d = tempfile::tempdir().unwrap();
    let ok = "{\"prompt_id\": \"a\", \"prompt\": \"p\", \"sample_idx\": 0, \"response\": \"r\", \"reward_x\": 1.0}\n";
    let p = write(
        d.path(),
        "c.jsonl",
        &format!("{ok}{}", ok.replace("\"sample_idx\": 0", "\"sample_idx\": 1").replace("1.0", "NaN")),
    );
    let e = read_candidates(&p, None).unwrap_err().to_string();
    assert!(e.contains("c.jsonl:2") && e.contains("invalid JSON"), "{e}");
    let p = write(d.path(), "c2.jsonl", &format!("{ok}{ok}"));
    let e = read_candidates(&p, None).unwrap_err().to_string();
    assert!(e.contains("c2.jsonl:2: duplicate sample_idx 0") && e.contains("c2.jsonl:1"), "{e}");
    // No reward column: the score section computes them (checked in the pipeline config).
    let p = write(d.path(), "c3.jsonl", &ok.replace("\"reward_x\": 1.0", "\"score\": 1.0"));
    let c = read_candidates(&p, None).unwrap();
    assert!(c.rewards.is_empty() && c.groups[0].samples[0].rewards.is_empty(), "{c:?}");
    let h = candidates_header(&p).unwrap();
    assert_eq!(h.columns.len(), 5);
    assert!(h.rewards.is_empty() && h.columns.iter().any(|c| c == "score"), "{h:?}");
    let p = write(
        d.path(),
        "c4.jsonl",
        &format!("{ok}{}", ok.replace("\"sample_idx\": 0", "\"sample_idx\": 1").replace("\"p\"", "\"q\"")),
    );
    let e = read_candidates(&p, None).unwrap_err().to_string();
    assert!(e.contains("c4.jsonl:2: prompt differs"), "{e}");
}

fn parquet_candidates(dir: &Path, reward: Vec<Option<f32>>) -> PathBuf {
    use arrow_array::builder::{FixedSizeListBuilder, Float32Builder};
    use arrow_array::{Float32Array, Float64Array, Int32Array, Int64Array, StringArray};
    use std::sync::Arc;
    let msgs = [vec![Message::new("system", "be brief"), Message::user("q1")], vec![Message::user("q2")]];
    let rows = [0usize, 0, 1];
    let mut emb = FixedSizeListBuilder::new(Float32Builder::new(), 3);
    for v in [[3.0f32, 0.0, 4.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0]] {
        emb.values().append_slice(&v);
        emb.append(true);
    }
    let cols: Vec<(&str, ArrayRef)> = vec![
        ("prompt_id", Arc::new(Int64Array::from(vec![7, 7, 9]))),
        ("prompt", crate::messages::messages_array(rows.iter().map(|&r| msgs[r].as_slice()))),
        ("sample_idx", Arc::new(Int64Array::from(vec![1, 0, 0]))),
        ("response", Arc::new(StringArray::from(vec!["b", "a", "c"]))),
        ("reward_rm", Arc::new(Float32Array::from(reward))),
        ("logprob", Arc::new(Float64Array::from(vec![-1.0, -2.0, -3.0]))),
        ("num_tokens", Arc::new(Int32Array::from(vec![2, 3, 4]))),
        ("embedding", Arc::new(emb.finish())),
    ];
    let batch = RecordBatch::try_from_iter(cols).unwrap();
    let p = dir.join("c.parquet");
    crate::shard::write_parquet(&p, &batch.schema(), &[batch], &Default::default()).unwrap();
    p
}

#[test]
fn candidates_from_parquet_with_other_types() {
    let d = tempfile::tempdir().unwrap();
    let p = parquet_candidates(d.path(), vec![Some(0.5), Some(1.5), Some(-1.0)]);
    let h = candidates_header(&p).unwrap();
    assert_eq!(h.rewards, vec!["rm".to_owned()]);
    assert!(h.has_logprob && h.has_num_tokens && h.has_embedding);
    let c = read_candidates(&p, None).unwrap();
    assert_eq!(c.embedding_dim, Some(3));
    assert_eq!(c.groups.len(), 2);
    let g = &c.groups[0];
    assert_eq!(g.prompt_id, "7");
    assert_eq!(g.messages, vec![Message::new("system", "be brief"), Message::user("q1")]);
    // Sorted by sample_idx.
    assert_eq!(g.samples.iter().map(|s| (s.sample_idx, s.response.as_str())).collect::<Vec<_>>(), [(0, "a"), (1, "b")]);
    assert_eq!(g.samples[0].rewards, vec![1.5]);
    assert_eq!(g.samples[0].num_tokens, Some(3));
    assert_eq!(g.samples[1].embedding, Some(vec![3.0, 0.0, 4.0]));
    assert_eq!(read_candidates(&p, Some(1)).unwrap().groups.len(), 1);

    let p = parquet_candidates(d.path(), vec![Some(0.5), None, Some(1.0)]);
    let e = read_candidates(&p, None).unwrap_err().to_string();
    assert!(e.ends_with("c.parquet: row 1: `reward_rm` is null or not a number"), "{e}");
    let p = parquet_candidates(d.path(), vec![Some(0.5), Some(f32::NAN), Some(1.0)]);
    let e = read_candidates(&p, None).unwrap_err().to_string();
    assert!(e.ends_with("c.parquet: row 1: `reward_rm` is NaN; it must be a finite number"), "{e}");
}

#[test]
fn prompts_from_parquet_messages_and_text() {
    use arrow_array::StringArray;
    use std::sync::Arc;
    let d = tempfile::tempdir().unwrap();
    let msgs = [vec![Message::user("a")], vec![Message::new("system", "s"), Message::user("b")]];
    let batch = RecordBatch::try_from_iter(vec![
        ("conv", crate::messages::messages_array(msgs.iter().map(Vec::as_slice))),
        ("text", Arc::new(StringArray::from(vec!["x", "y"])) as ArrayRef),
    ])
    .unwrap();
    let p = d.path().join("p.parquet");
    crate::shard::write_parquet(&p, &batch.schema(), &[batch], &Default::default()).unwrap();
    let cfg =
        InputConfig { path: Some(p.display().to_string()), prompt_column: Some("conv".into()), ..Default::default() };
    let rows = read_prompts(&cfg).unwrap();
    assert_eq!(rows.iter().map(|r| r.messages.clone()).collect::<Vec<_>>(), msgs.to_vec());
    let cfg = InputConfig { prompt_column: Some("text".into()), ..cfg };
    assert_eq!(read_prompts(&cfg).unwrap()[1].messages, vec![Message::user("y")]);
    let cfg = InputConfig { prompt_column: None, messages_column: Some("text".into()), ..cfg };
    let e = read_prompts(&cfg).unwrap_err().to_string();
    assert!(e.ends_with("p.parquet: column `text` has type Utf8; expected list<struct<role, content>>"), "{e}");
    let cfg = InputConfig { messages_column: Some("nope".into()), ..cfg };
    let e = read_prompts(&cfg).unwrap_err().to_string();
    assert!(e.contains("no column `nope`; columns: conv, text"), "{e}");
}

#[test]
fn candidates_stream_by_shard_in_any_row_order() {
    let d = tempfile::tempdir().unwrap();
    let row = |p: usize, k: u32| {
        format!(
            "{{\"prompt_id\": \"p{p}\", \"prompt\": \"q{p}\", \"sample_idx\": {k}, \"response\": \"r{p}-{k}\", \"reward_x\": {p}.5}}\n"
        )
    };
    // Sample-major order: every prompt's rows are spread over the whole file.
    let text: String = (0..3u32).rev().flat_map(|k| (0..5).map(move |p| (p, k))).map(|(p, k)| row(p, k)).collect();
    let p = write(d.path(), "s.jsonl", &text);
    let all = read_candidates(&p, Some(4)).unwrap();
    assert_eq!(all.groups.len(), 4);
    assert!(all.groups.iter().all(|g| g.samples.iter().map(|s| s.sample_idx).eq(0..3)));
    let index = scan_candidates(&p, Some(4)).unwrap();
    assert_eq!(index.group_rows, vec![3, 3, 3, 3]);
    let mut got = Vec::new();
    stream_candidates(
        &p,
        &index,
        3,
        |i| i == 1,
        |i, g| {
            got.push((i, g));
            Ok(true)
        },
    )
    .unwrap();
    // Shard 1 holds the 4th prompt only (the limit), complete and sorted.
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, 1);
    assert_eq!(got[0].1, all.groups[3..].to_vec());
    // A grouped file streams its shards as they complete, in file order.
    let text: String = (0..5).flat_map(|p| (0..2).map(move |k| (p, k))).map(|(p, k)| row(p, k)).collect();
    let p = write(d.path(), "g.jsonl", &text);
    let index = scan_candidates(&p, None).unwrap();
    let mut order = Vec::new();
    stream_candidates(
        &p,
        &index,
        2,
        |_| true,
        |i, g| {
            order.push((i, g.len()));
            Ok(true)
        },
    )
    .unwrap();
    assert_eq!(order, vec![(0, 2), (1, 2), (2, 1)]);
}

#[test]
fn candidates_limit_unordered_and_row_checks() {
    let d = tempfile::tempdir().unwrap();
    let row = |p: &str, k: u32, extra: &str| {
        format!(
            "{{\"prompt_id\": \"{p}\", \"prompt\": \"q{p}\", \"sample_idx\": {k}, \"response\": \"r{k}\", \"reward_x\": 1.0{extra}}}\n"
        )
    };
    // Rows of the first prompt after a later prompt's rows are kept under a limit.
    let text = [row("a", 0, ""), row("b", 0, ""), row("a", 1, "")].concat();
    let p = write(d.path(), "u.jsonl", &text);
    let c = read_candidates(&p, Some(1)).unwrap();
    assert_eq!(c.groups.len(), 1);
    assert_eq!(c.groups[0].samples.len(), 2);
    // A field missing from the first record is an error, not silently ignored.
    let text = [row("a", 0, ""), row("a", 1, ", \"logprob\": -3.0")].concat();
    let e = read_candidates(&write(d.path(), "f.jsonl", &text), None).unwrap_err().to_string();
    assert!(e.contains("f.jsonl:2: field `logprob` is not on the first record"), "{e}");
    // Zero embeddings and f32 overflow are caught at read time.
    let text = [row("a", 0, ", \"embedding\": [1.0, 0.0]"), row("a", 1, ", \"embedding\": [0.0, 0.0]")].concat();
    let e = read_candidates(&write(d.path(), "z.jsonl", &text), None).unwrap_err().to_string();
    assert!(e.contains("z.jsonl:2: `embedding` is the zero vector"), "{e}");
    let text = row("a", 0, ", \"embedding\": [1e300, 0.0]");
    let e = read_candidates(&write(d.path(), "o.jsonl", &text), None).unwrap_err().to_string();
    assert!(e.contains("o.jsonl:1: `embedding` must hold finite 32-bit floats"), "{e}");
    // A prompt must end with the user turn being answered.
    let text = "{\"prompt_id\": \"a\", \"prompt\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"yo\"}], \"sample_idx\": 0, \"response\": \"r\", \"reward_x\": 1.0}\n";
    let e = read_candidates(&write(d.path(), "t.jsonl", text), None).unwrap_err().to_string();
    assert!(e.contains("t.jsonl:1: the prompt ends with a `assistant` turn"), "{e}");
}

/// One candidates row as a JSON line, with `extra` replacing or adding fields.
fn candidate_line(p: usize, k: u32, extra: &str) -> String {
    let base = format!(
        "\"prompt_id\": \"p{p}\", \"prompt\": \"q{p}\", \"sample_idx\": {k}, \"response\": \"r{k}\", \"reward_x\": 1.0"
    );
    format!("{{{base}{extra}}}\n")
}

/// JSON decodes into the batches Parquet is read as, so one validator tells both what is wrong
/// with a value, in the same words.
#[test]
fn json_and_parquet_rows_get_the_same_messages() {
    use arrow_array::{Float64Array, StringArray};
    use std::sync::Arc;
    let d = tempfile::tempdir().unwrap();
    let ok = candidate_line(0, 0, "");
    // (a later JSON field overriding the good one, the Parquet column for it, the message)
    type Case<'a> = (&'a str, Option<(&'a str, ArrayRef)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            r#", "reward_x": null"#,
            Some(("reward_x", Arc::new(Float64Array::from(vec![Some(1.0), None])))),
            "`reward_x` is null or not a number",
        ),
        (
            r#", "reward_x": "high""#,
            Some(("reward_x", Arc::new(StringArray::from(vec!["1.0", "high"])))),
            "`reward_x` is null or not a number",
        ),
        (
            r#", "sample_idx": 1.5"#,
            Some(("sample_idx", Arc::new(Float64Array::from(vec![0.0, 1.5])))),
            "`sample_idx` must be a non-negative integer below 2^32",
        ),
        (
            r#", "sample_idx": -1"#,
            Some(("sample_idx", Arc::new(Float64Array::from(vec![0.0, -1.0])))),
            "`sample_idx` must be a non-negative integer below 2^32",
        ),
        (
            r#", "response": null"#,
            Some(("response", Arc::new(StringArray::from(vec![Some("r"), None])))),
            "`response` is missing or null",
        ),
        (r#", "response": ["r"]"#, None, "`response` must be text"),
        (r#", "prompt": []"#, None, "`prompt` must be text or a non-empty list of {role, content} messages"),
        (
            r#", "prompt": [{"role": "user", "content": 5}]"#,
            None,
            "`prompt` must be text or a non-empty list of {role, content} messages",
        ),
        (
            r#", "num_tokens": 3"#,
            None,
            "field `num_tokens` is not on the first record; every record must have the same fields",
        ),
    ];
    for (extra, parquet, message) in cases {
        // The bad value overrides the field (serde_json keeps the last of repeated keys; so does
        // arrow-json).
        let text = format!("{ok}{}", candidate_line(0, 1, extra));
        let p = d.path().join("c.jsonl");
        std::fs::write(&p, text).unwrap();
        let e = read_candidates(&p, None).unwrap_err().to_string();
        assert!(e.ends_with(&format!("c.jsonl:2: {message}")), "{extra}: {e}");
        let Some((column, values)) = parquet else { continue };
        let mut cols: Vec<(&str, ArrayRef)> = vec![
            ("prompt_id", Arc::new(StringArray::from(vec!["p0", "p0"]))),
            ("prompt", Arc::new(StringArray::from(vec!["q0", "q0"]))),
            ("sample_idx", Arc::new(Float64Array::from(vec![0.0, 1.0]))),
            ("response", Arc::new(StringArray::from(vec!["r0", "r1"]))),
            ("reward_x", Arc::new(Float64Array::from(vec![1.0, 1.0]))),
        ];
        for c in &mut cols {
            if c.0 == column {
                c.1 = values.clone();
            }
        }
        let batch = RecordBatch::try_from_iter(cols).unwrap();
        let p = d.path().join("c.parquet");
        crate::shard::write_parquet(&p, &batch.schema(), &[batch], &Default::default()).unwrap();
        let e = read_candidates(&p, None).unwrap_err().to_string();
        assert!(e.ends_with(&format!("c.parquet: row 1: {message}")), "{extra}: {e}");
    }
}

#[test]
fn json_batches_keep_lines_records_and_types() {
    let d = tempfile::tempdir().unwrap();
    // Past one batch of rows, with blank lines: the bad row is still named by its line.
    let mut text: String = (0..1500).map(|p| candidate_line(p, 0, "")).collect();
    text.insert(0, '\n');
    text.push_str(&candidate_line(1500, 0, r#", "reward_x": "x""#));
    let p = write(d.path(), "big.jsonl", &text);
    let e = read_candidates(&p, None).unwrap_err().to_string();
    assert!(e.ends_with("big.jsonl:1502: `reward_x` is null or not a number"), "{e}");
    let c = read_candidates(&p, Some(1500)).unwrap_err().to_string();
    assert!(c.contains("big.jsonl:1502"), "a bad row past the limit is still checked: {c}");

    // A JSON array names records; numbers as ids are read as text, numbers in strings as numbers.
    let rows = r#"[{"prompt_id": 7, "prompt": "a", "sample_idx": 0, "response": "r", "reward_x": 2},
        {"prompt_id": 7, "prompt": "a", "sample_idx": 1, "response": "s", "reward_x": "inf"}]"#;
    let p = write(d.path(), "c.json", rows);
    let e = read_candidates(&p, None).unwrap_err().to_string();
    assert!(e.ends_with("c.json: record 1: `reward_x` is inf; it must be a finite number"), "{e}");
    let p = write(d.path(), "c.json", &rows.replace(r#""inf""#, "-0.5"));
    let c = read_candidates(&p, None).unwrap();
    assert_eq!(c.groups[0].prompt_id, "7");
    assert_eq!(c.groups[0].samples.iter().map(|s| s.rewards[0]).collect::<Vec<_>>(), [2.0, -0.5]);
    assert_eq!(c.groups[0].samples[1].location, format!("{}: record 1", p.display()));

    // Not an object; fields the first record lacks that rbon does not read are ignored.
    let p = write(d.path(), "s.jsonl", &format!("{}5\n", candidate_line(0, 0, "")));
    let e = read_candidates(&p, None).unwrap_err().to_string();
    assert!(e.ends_with("s.jsonl:2: expected a JSON object on each line"), "{e}");
    let p = write(
        d.path(),
        "m.jsonl",
        &format!("{}{}", candidate_line(0, 0, ""), candidate_line(0, 1, r#", "meta": {"a": [1]}"#)),
    );
    assert_eq!(read_candidates(&p, None).unwrap().groups[0].samples.len(), 2);
}

#[test]
fn sharegpt_messages_in_parquet_and_json() {
    use arrow_array::builder::{ListBuilder, StringBuilder, StructBuilder};
    use arrow_schema::{DataType, Field, Fields};
    use std::sync::Arc;
    let d = tempfile::tempdir().unwrap();
    let fields =
        Fields::from(vec![Field::new("from", DataType::Utf8, true), Field::new("value", DataType::Utf8, true)]);
    let sb = StructBuilder::new(fields, vec![Box::new(StringBuilder::new()), Box::new(StringBuilder::new())]);
    let mut lb = ListBuilder::new(sb);
    for (from, value) in [("system", "s"), ("human", "hi")] {
        let sb = lb.values();
        sb.field_builder::<StringBuilder>(0).unwrap().append_value(from);
        sb.field_builder::<StringBuilder>(1).unwrap().append_value(value);
        sb.append(true);
    }
    lb.append(true);
    let batch = RecordBatch::try_from_iter(vec![("conversations", Arc::new(lb.finish()) as ArrayRef)]).unwrap();
    let p = d.path().join("g.parquet");
    crate::shard::write_parquet(&p, &batch.schema(), &[batch], &Default::default()).unwrap();
    let cfg = InputConfig {
        path: Some(p.display().to_string()),
        messages_column: Some("conversations".into()),
        ..Default::default()
    };
    let want = vec![Message::new("system", "s"), Message::user("hi")];
    assert_eq!(read_prompts(&cfg).unwrap()[0].messages, want);
    let j = write(
        d.path(),
        "g.jsonl",
        r#"{"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "hi"}], "id": 3}"#,
    );
    let cfg = InputConfig { path: Some(j.display().to_string()), id_column: Some("id".into()), ..cfg };
    let rows = read_prompts(&cfg).unwrap();
    assert_eq!((rows[0].messages.clone(), rows[0].prompt_id.as_str()), (want, "3"));
    let cfg = InputConfig { id_column: Some("key".into()), ..cfg };
    let e = read_prompts(&cfg).unwrap_err().to_string();
    assert!(e.ends_with("g.jsonl:1: no id column `key`; columns: conversations, id"), "{e}");
}

/// One rule for conversations, with the same words, whether they come as prompts or with
/// candidates.
#[test]
fn malformed_conversations_are_refused_as_prompts_and_as_candidates() {
    let d = tempfile::tempdir().unwrap();
    let cases = [
        (
            r#"[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]"#,
            "the prompt ends with a `assistant` turn",
        ),
        (r#"[{"role": "system", "content": "be brief"}]"#, "the conversation has only a system turn"),
        (
            r#"[{"role": "assistant", "content": "hello"}, {"role": "user", "content": "hi"}]"#,
            "starts with a `assistant` turn",
        ),
        (
            r#"[{"role": "narrator", "content": "once"}, {"role": "user", "content": "hi"}]"#,
            "turn 0 has the unknown role `narrator`",
        ),
        (r#"[{"role": "user", "content": "  "}]"#, "turn 0 (`user`) is blank"),
        (
            r#"[{"role": "user", "content": "a"}, {"role": "system", "content": "s"}, {"role": "user", "content": "b"}]"#,
            "turn 1 is a `system` turn",
        ),
        (r#""   ""#, "turn 0 (`user`) is blank"),
    ];
    for (prompt, message) in cases {
        let p = write(d.path(), "p.jsonl", &format!("{{\"prompt\": {prompt}}}\n"));
        let cfg = InputConfig { path: Some(p.display().to_string()), ..Default::default() };
        let e = read_prompts(&cfg).unwrap_err().to_string();
        assert!(e.contains("p.jsonl:1: ") && e.contains(message), "{prompt}: {e}");
        let c = candidate_line(0, 0, &format!(", \"prompt\": {prompt}"));
        let e = read_candidates(&write(d.path(), "c.jsonl", &c), None).unwrap_err().to_string();
        assert!(e.contains("c.jsonl:1: ") && e.contains(message), "{prompt}: {e}");
    }
    // ShareGPT's roles are read as user and assistant, and pass.
    let p = write(
        d.path(),
        "g.jsonl",
        r#"{"prompt": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, {"from": "human", "value": "c"}]}"#,
    );
    let cfg = InputConfig { path: Some(p.display().to_string()), ..Default::default() };
    assert_eq!(read_prompts(&cfg).unwrap()[0].messages.len(), 3);
}

#[test]
fn a_positive_logprob_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let text = [candidate_line(0, 0, r#", "logprob": -2.5"#), candidate_line(0, 1, r#", "logprob": 1e6"#)].concat();
    let e = read_candidates(&write(d.path(), "l.jsonl", &text), None).unwrap_err().to_string();
    assert!(e.ends_with("l.jsonl:2: `logprob` is 1000000; a log-probability is at most 0"), "{e}");
    let text = [candidate_line(0, 0, r#", "logprob": -2.5"#), candidate_line(0, 1, r#", "logprob": 0.0"#)].concat();
    assert_eq!(
        read_candidates(&write(d.path(), "l.jsonl", &text), None).unwrap().groups[0].samples[1].logprob,
        Some(0.0)
    );
}

#[test]
fn json_ids_keep_their_text_whatever_the_first_record_holds() {
    let d = tempfile::tempdir().unwrap();
    let rows = ["1", "2.5", "\"007\"", "\"1e3\"", "18446744073709551615", "\"abc\""];
    let text: String =
        rows.iter().enumerate().map(|(i, id)| format!("{{\"id\": {id}, \"prompt\": \"q{i}\"}}\n")).collect();
    let p = write(d.path(), "ids.jsonl", &text);
    let cfg = InputConfig { path: Some(p.display().to_string()), id_column: Some("id".into()), ..Default::default() };
    let ids: Vec<String> = read_prompts(&cfg).unwrap().into_iter().map(|r| r.prompt_id).collect();
    assert_eq!(ids, ["1", "2.5", "007", "1e3", "18446744073709551615", "abc"]);
    // An empty embedding is called empty, not the zero vector.
    let c = candidate_line(0, 0, r#", "embedding": []"#);
    let e = read_candidates(&write(d.path(), "e.jsonl", &c), None).unwrap_err().to_string();
    assert!(e.ends_with("e.jsonl:1: embedding is empty"), "{e}");
}
